"""The PyTorch edge: built-in architectures, the model adapter and its client.

The names below load on first use (as in :mod:`fedshield.strategies`), so
``import fedshield.models.attacks`` (the attack registry the configuration
reads) does not import torch; using any of them does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedshield.models.builtin import MODEL_KINDS, build_module
    from fedshield.models.client import TorchClient, build_update, local_correction
    from fedshield.models.dp_sgd import DpSgdConfig, check_dp_sgd, train_dp_sgd
    from fedshield.models.factory import check_user_model, user_torch_model
    from fedshield.models.torch_model import TASKS, TorchModel, regression_loss
    from fedshield.models.vectorised import check_vectorisable, train_many

_LAZY = {
    "MODEL_KINDS": "fedshield.models.builtin",
    "build_module": "fedshield.models.builtin",
    "TorchClient": "fedshield.models.client",
    "build_update": "fedshield.models.client",
    "local_correction": "fedshield.models.client",
    "DpSgdConfig": "fedshield.models.dp_sgd",
    "check_dp_sgd": "fedshield.models.dp_sgd",
    "train_dp_sgd": "fedshield.models.dp_sgd",
    "check_user_model": "fedshield.models.factory",
    "user_torch_model": "fedshield.models.factory",
    "TASKS": "fedshield.models.torch_model",
    "TorchModel": "fedshield.models.torch_model",
    "regression_loss": "fedshield.models.torch_model",
    "check_vectorisable": "fedshield.models.vectorised",
    "train_many": "fedshield.models.vectorised",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "MODEL_KINDS",
    "TASKS",
    "DpSgdConfig",
    "TorchClient",
    "TorchModel",
    "build_module",
    "build_update",
    "check_dp_sgd",
    "check_user_model",
    "check_vectorisable",
    "local_correction",
    "regression_loss",
    "train_dp_sgd",
    "train_many",
    "user_torch_model",
]
