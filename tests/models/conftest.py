from __future__ import annotations

import functools

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedshield.models import TorchModel, build_module


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
