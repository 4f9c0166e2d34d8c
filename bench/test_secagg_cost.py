"""One SecAgg+ round of 100 clients with 10,000-word updates, timed (make bench).

A small version of ``bench/secagg/cost.py`` (which ``make bench-secagg``
runs in full): the whole protocol in this process, every client timed. It
checks that the round completes with the right sum and prints each client's
compute and the bytes it sends against the plaintext update.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

COST = Path(__file__).resolve().parent / "secagg" / "cost.py"


def load_cost() -> ModuleType:
    spec = importlib.util.spec_from_file_location("secagg_cost", COST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.bench
def test_secagg_plus_round_n100() -> None:
    cost = load_cost()
    m = cost.full_round(100, 10_000, "secagg+")
    print(
        f"\nSecAgg+ n=100 d=10,000 (t={m.threshold}, k={m.k}, b={m.modulus_bits}): "
        f"client compute median {m.client_s * 1000:.1f} ms, sends "
        f"{m.sent_bytes / 1000:.1f} kB = {m.ratio_float32:.2f}x the float32 "
        f"update, {m.ratio_clear:.2f}x the b-bit integers in the clear; server "
        f"{m.server_s * 1000:.0f} ms against {m.plain_server_s * 1000:.2f} ms "
        "plaintext"
    )
    assert m.sum_ok
    assert m.clients_timed == 100
    assert m.ratio_float32 > 1.0
