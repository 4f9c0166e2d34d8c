"""Make ``tests.contracts.fakes`` importable by worker processes.

pytest imports test files with ``--import-mode=importlib``, which names this
folder's modules ``tests.contracts.*`` without putting the repository root
on ``sys.path``. Process-pool workers unpickle the fake clients by that
module name, and a spawned worker starts with its parent's ``sys.path``; so
the root goes on it here, whichever way pytest was started.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread here too, as in the workers (restored afterwards).

    The sequential reference runs in this process; one thread on both sides
    keeps the comparison free of thread-count effects on float reductions.
    """
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
