"""Reconstructing a client's data from its update: the analytic attack.

Threat model: an honest-but-curious server that sees one client's update
(no secure aggregation) and knows the model it sent and the client's
learning rate. For a network whose first layer is linear with a bias,
``z = W x + b``, the gradient of any loss with respect to that layer is
``dL/dW = g xᵀ`` and ``dL/db = g`` for the layer's output gradient ``g``:
with one example, every row ``i`` with ``g_i ≠ 0`` gives the input exactly,
``x = (dL/dW)_i / (dL/db)_i`` (Phong et al. 2017; Geiping et al. 2020, §3).
A client that trained one plain SGD step sends ``Δ = -lr · ∇``, so the
server divides ``Δ`` by ``-lr`` first. With a batch the same division gives
a mixture of the batch's inputs weighted by their output gradients; with
several steps, an approximation.

The label comes out of the last layer's bias gradient (iDLG, Zhao et al.
2020): under softmax cross-entropy it is ``softmax(z) - onehot(y)``, whose
only negative entry is the true label's.

What the attack sees under the defences: a clipped and noised update (DP)
or only a sum (secure aggregation) leaves the division with noise or a
mixture; :func:`psnr` against the true input, beside the mean-image
baseline, says how much was recovered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedshield.core import Params
from fedshield.errors import ConfigError

__all__ = ["Reconstruction", "analytic_inversion", "psnr"]


@dataclass(frozen=True)
class Reconstruction:
    """What the attack recovered from one update."""

    x: np.ndarray
    """The input, flattened (the first layer's input order)."""
    label: int | None
    """The label from the last bias's gradient (None: no output bias)."""
    row: int
    """The first-layer row the input was read from."""


def _layers(delta: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    entries = delta.spec.entries
    if len(entries) < 2:
        raise ConfigError("the update has no first layer with a bias to invert")
    (w_name, w_shape), (b_name, b_shape) = entries[0], entries[1]
    if len(w_shape) != 2 or len(b_shape) != 1 or b_shape[0] != w_shape[0]:
        raise ConfigError(
            f"the analytic attack needs a first linear layer with a bias; the "
            f"update starts with {w_name} {w_shape} and {b_name} {b_shape} "
            "(a convolution first: use an optimisation attack instead)"
        )
    last_bias = None
    last_name, last_shape = entries[-1]
    if len(last_shape) == 1 and len(entries) >= 4:
        last_bias = delta[last_name]
    return delta[w_name], delta[b_name], last_bias


def analytic_inversion(delta: Params, lr: float) -> Reconstruction:
    """Recover the input (and label) behind a one-example SGD step's update.

    ``delta`` is the client's update (new - old parameters) and ``lr`` its
    learning rate.

    Raises
    ------
    ConfigError
        If the model has no first linear layer with a bias, or ``lr`` is not
        positive, or the update carries no gradient through that layer.
    """
    if not lr > 0:
        raise ConfigError(f"lr must be > 0; got {lr!r}")
    w, b, last_bias = _layers(delta)
    grad_w = np.asarray(w, dtype=np.float64) / -lr
    grad_b = np.asarray(b, dtype=np.float64) / -lr
    row = int(np.argmax(np.abs(grad_b)))
    if grad_b[row] == 0:
        raise ConfigError("the first layer's bias did not move: nothing to invert")
    x = grad_w[row] / grad_b[row]
    label = None
    if last_bias is not None:
        label = int(np.argmin(np.asarray(last_bias, dtype=np.float64) / -lr))
    return Reconstruction(x=x, label=label, row=row)


def psnr(x: np.ndarray, truth: np.ndarray, *, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio of ``x`` against ``truth``, in dB.

    ``peak`` defaults to the range of ``truth`` (max - min). Identical
    arrays give ``inf``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=np.float64).ravel()
    if x.shape != truth.shape:
        raise ConfigError(f"shapes differ: {x.shape} and {truth.shape}")
    mse = float(np.mean((x - truth) ** 2))
    if peak is None:
        peak = float(truth.max() - truth.min()) or 1.0
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(peak**2 / mse))
