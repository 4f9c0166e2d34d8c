"""The PyTorch edge: built-in architectures, the model adapter and its client.

Importing this package imports torch; nothing below :mod:`fedshield.models`
does.
"""

from fedshield.models.builtin import MODEL_KINDS, build_module
from fedshield.models.client import TorchClient
from fedshield.models.torch_model import TorchModel

__all__ = ["MODEL_KINDS", "TorchClient", "TorchModel", "build_module"]
