"""The PyTorch edge: built-in architectures, the model adapter and its client.

Importing this package imports torch; nothing below :mod:`fedshield.models`
does.
"""

from fedshield.models.builtin import MODEL_KINDS, build_module
from fedshield.models.client import TorchClient, build_update, local_correction
from fedshield.models.dp_sgd import DpSgdConfig, check_dp_sgd, train_dp_sgd
from fedshield.models.factory import check_user_model, user_torch_model
from fedshield.models.torch_model import TASKS, TorchModel, regression_loss
from fedshield.models.vectorised import check_vectorisable, train_many

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
