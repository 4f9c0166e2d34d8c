"""Membership inference on a model: the loss and confidence thresholds.

Threat model: whoever holds the released model (the final model of a run,
or one client's update applied to the model it was sent) and a candidate
record asks whether the record was trained on. The loss-threshold attack
(Yeom et al. 2018) scores each record by its negative loss; the confidence
attack by the probability the model gives its label. :func:`roc` turns the
scores of members and non-members into the ROC curve, with the AUC and the
true-positive rate at a chosen false-positive rate (Carlini et al. 2022:
report the low-FPR regime, on log axes); :func:`dp_ceiling` is the most an
(ε, δ)-DP model can allow, ``TPR <= e^ε · FPR + δ``, drawn beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedshield.core import Params
from fedshield.errors import ConfigError

__all__ = ["Roc", "confidence_scores", "dp_ceiling", "loss_scores", "roc"]


def _logits(model: object, params: Params, x: np.ndarray) -> np.ndarray:
    import torch

    model._load_params(params)  # type: ignore[attr-defined]
    module = model._get_bound().module  # type: ignore[attr-defined]
    module.eval()
    with torch.no_grad():
        out = module(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    return np.asarray(out.detach().numpy(), dtype=np.float64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def loss_scores(
    model: object, params: Params, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Each record's negative cross-entropy loss (higher: more likely a member)."""
    logp = _log_softmax(_logits(model, params, x))
    scores: np.ndarray = logp[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
    return scores


def confidence_scores(
    model: object, params: Params, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """The probability the model gives each record's label."""
    probability: np.ndarray = np.exp(loss_scores(model, params, x, y))
    return probability


@dataclass(frozen=True)
class Roc:
    """An attack's ROC curve from members' and non-members' scores."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float

    def tpr_at(self, fpr: float) -> float:
        """The best true-positive rate at a false-positive rate of at most ``fpr``."""
        ok = self.fpr <= fpr + 1e-12
        return float(self.tpr[ok].max()) if ok.any() else 0.0


def roc(members: np.ndarray, non_members: np.ndarray) -> Roc:
    """The ROC of thresholding the scores (members should score higher).

    Raises
    ------
    ConfigError
        If either set is empty or holds NaN.
    """
    inside = np.asarray(members, dtype=np.float64).ravel()
    outside = np.asarray(non_members, dtype=np.float64).ravel()
    if inside.size == 0 or outside.size == 0:
        raise ConfigError("membership inference needs members and non-members")
    if np.isnan(inside).any() or np.isnan(outside).any():
        raise ConfigError("a membership score is NaN")
    scores = np.concatenate([inside, outside])
    labels = np.concatenate([np.ones(inside.size), np.zeros(outside.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # One point per distinct threshold (ties move together).
    last = np.r_[np.diff(scores) != 0, True]
    tp = np.cumsum(labels)[last]
    fp = np.cumsum(1 - labels)[last]
    tpr = np.r_[0.0, tp / inside.size]
    fpr = np.r_[0.0, fp / outside.size]
    auc = float(np.trapezoid(tpr, fpr))
    return Roc(fpr=fpr, tpr=tpr, auc=auc)


def dp_ceiling(fpr: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR an (ε, δ)-DP model allows at each FPR (and by symmetry)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    upper = np.exp(epsilon) * fpr + delta
    # Applied to the complementary test too: 1 - TPR >= e^-ε (1 - FPR - δ).
    other = 1 - np.exp(-epsilon) * (1 - fpr - delta)
    ceiling: np.ndarray = np.minimum(1.0, np.minimum(upper, other))
    return ceiling
