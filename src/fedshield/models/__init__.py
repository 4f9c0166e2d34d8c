"""The PyTorch edge: built-in architectures, the model adapter and its client.

Importing this package imports torch; nothing below :mod:`fedshield.models`
does.
"""

from fedshield.models.builtin import MODEL_KINDS, build_module
from fedshield.models.client import TorchClient, build_update, local_correction
from fedshield.models.dp_sgd import DpSgdConfig, check_dp_sgd, train_dp_sgd
from fedshield.models.torch_model import TorchModel
from fedshield.models.vectorised import check_vectorisable, train_many

__all__ = [
    "MODEL_KINDS",
    "DpSgdConfig",
    "TorchClient",
    "TorchModel",
    "build_module",
    "build_update",
    "check_dp_sgd",
    "check_vectorisable",
    "local_correction",
    "train_dp_sgd",
    "train_many",
]
