"""Built-in PyTorch architectures: softmax regression, an MLP and a small CNN.

They are deliberately small: federated simulations train thousands of local
copies of them, and every one has parameters only (no buffers), so
:class:`~fedshield.models.TorchModel` can move them as one flat vector.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fedshield.errors import ConfigError

__all__ = ["MODEL_KINDS", "build_module"]

MODEL_KINDS: tuple[str, ...] = ("logistic", "mlp", "cnn")
"""The architectures :func:`build_module` knows, by name."""

_CNN_CHANNELS = (16, 32)


def build_module(
    kind: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int] = (64,),
) -> torch.nn.Module:
    """Build a fresh, randomly initialised built-in architecture.

    Every architecture maps a batch of shape ``(n, *input_shape)`` to ``(n,
    num_classes)`` logits (for two classes too: train them with cross-entropy).

    Parameters
    ----------
    kind
        One of :data:`MODEL_KINDS`:

        ``"logistic"``
            Softmax regression: ``Flatten`` then ``Linear(d, num_classes)``
            with ``d = prod(input_shape)``. ``hidden`` is ignored.
        ``"mlp"``
            ``Flatten``, then ``Linear`` + ``ReLU`` for each width in
            ``hidden``, then ``Linear`` to ``num_classes``.
        ``"cnn"``
            For ``(C, H, W)`` images: two blocks of ``Conv2d(3x3, padding 1)``
            + ``ReLU`` + ``MaxPool2d(2)``, then ``Flatten`` and ``Linear`` to
            ``num_classes``. The two blocks have ``hidden[0]`` and
            ``hidden[1]`` channels when ``hidden`` has exactly two entries,
            and 16 and 32 channels otherwise (so the MLP default ``(64,)``
            gives the standard CNN).
    input_shape
        Shape of one example, without the batch dimension.
    num_classes
        Number of outputs (>= 2).
    hidden
        Hidden layer widths (MLP) or the two channel counts (CNN).

    Returns
    -------
    torch.nn.Module
        The module, initialised from torch's global generator (seed it, or
        use :meth:`TorchModel.init_params`, for reproducible weights).

    Raises
    ------
    ConfigError
        If ``kind`` is unknown, a size is not positive, the CNN input is not
        3-D or smaller than 4x4, or the CNN gets more than two widths.
    """
    _check_sizes(kind, input_shape=input_shape, num_classes=num_classes, hidden=hidden)
    if kind == "logistic":
        return _logistic(input_shape, num_classes)
    if kind == "mlp":
        return _mlp(input_shape, num_classes, hidden)
    return _cnn(input_shape, num_classes, hidden)


def _check_sizes(
    kind: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int],
) -> None:
    problems: list[str] = []
    if kind not in MODEL_KINDS:
        choices = ", ".join(repr(k) for k in MODEL_KINDS)
        problems.append(f"`kind` must be one of {choices}; got {kind!r}")
    shape = tuple(input_shape)
    if len(shape) == 0 or any(int(s) < 1 for s in shape):
        problems.append(
            f"`input_shape` must be a non-empty tuple of positive sizes; got {shape}"
        )
    if isinstance(num_classes, bool) or int(num_classes) < 1:
        problems.append(
            f"`num_classes` must be >= 2 (classification) or 1 (one output: "
            f"regression); got {num_classes!r}"
        )
    widths = list(hidden)
    if any(int(h) < 1 for h in widths):
        problems.append(f"`hidden` widths must be positive; got {widths}")
    if kind == "cnn":
        if len(shape) != 3:
            problems.append(
                "`input_shape` of the cnn must be 3-D (channels, height, width); "
                f"got {shape}"
            )
        elif shape[1] < 4 or shape[2] < 4:
            problems.append(
                "`input_shape` of the cnn must be at least 4x4 (two 2x2 poolings); "
                f"got {shape}"
            )
        if len(widths) > 2:
            problems.append(
                "`hidden` of the cnn gives the two conv channel counts; "
                f"got {len(widths)} values {widths}"
            )
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def _logistic(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    d = math.prod(input_shape)
    return nn.Sequential(
        OrderedDict(
            [("flatten", nn.Flatten()), ("linear", nn.Linear(d, int(num_classes)))]
        )
    )


def _mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int]
) -> nn.Module:
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = math.prod(input_shape)
    for i, h in enumerate(hidden):
        layers.append((f"hidden{i}", nn.Linear(width, int(h))))
        layers.append((f"relu{i}", nn.ReLU()))
        width = int(h)
    layers.append(("out", nn.Linear(width, int(num_classes))))
    return nn.Sequential(OrderedDict(layers))


def _cnn(
    input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int]
) -> nn.Module:
    channels, height, width = (int(s) for s in input_shape)
    widths = tuple(int(h) for h in hidden) if len(hidden) == 2 else _CNN_CHANNELS
    layers: list[tuple[str, nn.Module]] = []
    for i, out_channels in enumerate(widths):
        layers.append((f"conv{i}", nn.Conv2d(channels, out_channels, 3, padding=1)))
        layers.append((f"relu{i}", nn.ReLU()))
        layers.append((f"pool{i}", nn.MaxPool2d(2)))
        channels, height, width = out_channels, height // 2, width // 2
    layers.append(("flatten", nn.Flatten()))
    layers.append(("out", nn.Linear(channels * height * width, int(num_classes))))
    return nn.Sequential(OrderedDict(layers))
