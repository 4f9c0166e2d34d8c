from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedshield.models import TorchModel, build_module


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # These models are tiny: intra-op threads only add synchronisation, and on a
    # busy 2-core runner they make training 10-20x slower. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits bundled with scikit-learn, scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


@pytest.fixture
def mlp_model() -> TorchModel:
    return TorchModel(
        functools.partial(
            build_module, "mlp", input_shape=(64,), num_classes=10, hidden=(32,)
        )
    )
