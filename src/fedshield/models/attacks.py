"""Poisoning attacks: malicious clients with a declared threat model.

A malicious client wraps an honest :class:`~fedshield.models.TorchClient`
and runs unchanged wherever honest clients run (every backend calls its
``fit``). Threat model: the attacker controls the clients chosen by
:func:`choose_malicious` (a fraction of all clients, fixed by the seed and
recorded in the run folder), knows the training protocol and the global
model each round, and, for the colluding attacks (ALIE, IPM), shares the
benign updates its clients compute in a round (never the honest clients'
updates). It cannot touch honest clients, the server or the test set.

Attacks (``[attack] kind``):

- ``label_flip`` — trains on labels ``y → C − 1 − y`` (data poisoning).
- ``sign_flip`` — sends ``−scale × Δ`` of its honest update.
- ``gaussian`` — sends ``N(0, std²)`` noise of the update's shape.
- ``backdoor`` — model replacement (Bagdasaryan et al., AISTATS 2020): trains
  on its data plus a copy with a trigger (a pixel patch on images, a feature
  pattern on tabular data) relabelled to ``target_label``, and scales its
  update by ``boost`` so that it survives averaging. Its success is the
  attack success rate (ASR) on triggered test inputs, :func:`attack_success`.
- ``alie`` — "A little is enough" (Baruch et al., NeurIPS 2019): each
  colluder sends ``μ − z σ`` (coordinate-wise mean and std of the colluders'
  benign updates), ``z`` from the paper's ``Φ⁻¹((n − s) / n)``, ``s = ⌊n/2 + 1⌋
  − f``; small enough to pass Krum and the median.
- ``ipm`` — inner-product manipulation (Xie et al., UAI 2020): each colluder
  sends ``−ε μ``.
- ``free_rider`` — sends the global model back (a zero update) and claims the
  largest sample count the server accepts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params, derive_rng
from fedshield.errors import ConfigError
from fedshield.models.client import TorchClient

__all__ = [
    "ATTACK_KINDS",
    "AttackSpec",
    "MaliciousClient",
    "add_trigger",
    "attack_success",
    "choose_malicious",
    "collude",
]

ATTACK_KINDS = (
    "none",
    "label_flip",
    "sign_flip",
    "gaussian",
    "backdoor",
    "alie",
    "ipm",
    "free_rider",
)
COLLUDING = ("alie", "ipm")
LABEL_ATTACKS = ("label_flip", "backdoor")
"""Attacks that rewrite class labels: classification models only."""


@dataclass(frozen=True)
class AttackSpec:
    """What ``[attack]`` declares.

    Parameters
    ----------
    kind
        One of :data:`ATTACK_KINDS`.
    fraction
        Share of all clients that are malicious, in [0, 0.5).
    scale
        ``sign_flip``'s factor.
    std
        ``gaussian``'s noise std.
    target_label
        ``backdoor``'s target class.
    boost
        ``backdoor``'s model-replacement factor (None: the clients per round).
    poison_fraction
        ``backdoor``: share of the local rows copied with the trigger.
    epsilon
        ``ipm``'s ``ε``.
    z
        ``alie``'s ``z`` (None: from the number of clients and colluders).
    """

    kind: str = "none"
    fraction: float = 0.2
    scale: float = 4.0
    std: float = 1.0
    target_label: int = 0
    boost: float | None = None
    poison_fraction: float = 0.5
    epsilon: float = 0.5
    z: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ConfigError(
                f"unknown attack {self.kind!r}; choose one of {', '.join(ATTACK_KINDS)}"
            )
        if not 0.0 <= self.fraction < 0.5:
            raise ConfigError(
                f"[attack] fraction must be in [0, 0.5); got {self.fraction}: with "
                "half the clients malicious no aggregation rule can tell them "
                "apart; lower the fraction"
            )


def choose_malicious(
    client_ids: Sequence[str], fraction: float, seed: int
) -> tuple[str, ...]:
    """The malicious clients: ``round(fraction × N)`` of them, drawn from the seed."""
    count = round(fraction * len(client_ids))
    if count == 0:
        return ()
    rng = derive_rng(seed, "attack", "malicious")
    picks = rng.choice(len(client_ids), size=count, replace=False)
    return tuple(client_ids[int(i)] for i in np.sort(picks))


def add_trigger(x: np.ndarray) -> np.ndarray:
    """``x`` with the backdoor trigger (a copy).

    Images ``(n, [c,] h, w)``, or flat square images of side ≥ 8 (digits,
    MNIST-like): a 3×3 patch at the bottom-right corner set to the data's
    maximum (at least 1). Other tabular rows: the last three features set to
    it.

    Examples
    --------
    >>> add_trigger(np.zeros((1, 64)))[0].reshape(8, 8)[-3:, -3:].tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    out = np.array(x, dtype=np.float32, copy=True)
    high = max(float(out.max()), 1.0) if out.size else 1.0
    n = out.shape[0]
    if out.ndim >= 3:
        out[..., -3:, -3:] = high
        return out
    width = out.shape[1] if out.ndim == 2 else 1
    side = math.isqrt(width)
    if side * side == width and side >= 8:
        out.reshape(n, side, side)[:, -3:, -3:] = high
        return out
    out.reshape(n, -1)[:, -3:] = high
    return out


def attack_success(predict: np.ndarray, y: np.ndarray, target_label: int) -> float:
    """ASR: the share of triggered non-target test inputs predicted as the target."""
    keep = y != target_label
    if not keep.any():
        return float("nan")
    return float(np.mean(predict[keep] == target_label))


class MaliciousClient:
    """A malicious client: an honest client's data and model, attacked.

    Parameters
    ----------
    inner
        The client it replaces (its data and model).
    spec
        The attack.
    num_classes
        Classes of the task (label flipping).
    boost
        ``backdoor``'s model-replacement factor.
    max_examples
        The largest sample count the server accepts (free rider's claim).

    Raises
    ------
    ConfigError
        If the attack rewrites class labels (``label_flip``, ``backdoor``)
        and the model is a regression model (its targets are not classes).
    """

    def __init__(
        self,
        inner: TorchClient,
        spec: AttackSpec,
        *,
        num_classes: int,
        boost: float,
        max_examples: int,
    ) -> None:
        task = getattr(inner.model, "task", "classification")
        if spec.kind in LABEL_ATTACKS and task != "classification":
            raise ConfigError(
                f"[attack] kind = {spec.kind!r} needs class labels, but the "
                f"model's task is {task!r}; use a model-poisoning attack "
                "(sign_flip, gaussian, alie, ipm or free_rider) instead"
            )
        self.client_id = inner.client_id
        self._inner = inner
        self._spec = spec
        self._num_classes = num_classes
        self._boost = boost
        self._max_examples = max_examples

    @property
    def model(self) -> object:
        """The model adapter of the wrapped client."""
        return self._inner.model

    @property
    def num_train_examples(self) -> int:
        """Local training examples (of the wrapped client)."""
        return self._inner.num_train_examples

    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        """Train (or not) and send the attacked update."""
        kind = self._spec.kind
        x, y = self._inner.train_data
        if kind == "label_flip":
            flipped = (self._num_classes - 1 - y).astype(y.dtype)
            return self._refit(x, flipped).fit(params, config, rng)
        if kind == "backdoor":
            count = max(1, round(self._spec.poison_fraction * len(y)))
            idx = rng.choice(len(y), size=count, replace=False)
            x_bad = add_trigger(x[idx])
            y_bad = np.full(count, self._spec.target_label, dtype=y.dtype)
            poisoned = self._refit(
                np.concatenate([x, x_bad]), np.concatenate([y, y_bad])
            ).fit(params, config, rng)
            return replace(
                poisoned,
                client_id=self.client_id,
                delta=poisoned.delta * self._boost,
                num_examples=len(y),
            )
        honest = self._inner.fit(params, config, rng)
        if kind == "sign_flip":
            return replace(honest, delta=honest.delta * (-self._spec.scale))
        if kind == "gaussian":
            noise = rng.normal(0.0, self._spec.std, honest.delta.spec.size)
            return replace(
                honest,
                delta=Params.from_flat(
                    noise.astype(np.float32), honest.delta.spec, copy=False
                ),
            )
        if kind == "free_rider":
            return replace(
                honest,
                delta=Params.zeros(honest.delta.spec),
                num_examples=self._max_examples,
            )
        return honest  # alie / ipm: the colluders rewrite it (collude)

    def evaluate(self, params: Params, config: EvalConfig) -> dict[str, float]:
        """Evaluate honestly (evaluation is not what this attacker poisons)."""
        return self._inner.evaluate(params, config)

    def _refit(self, x: np.ndarray, y: np.ndarray) -> TorchClient:
        return TorchClient(self.client_id, self._inner.model, x_train=x, y_train=y)


def collude(
    updates: Sequence[ClientUpdate], spec: AttackSpec, *, num_clients: int
) -> list[ClientUpdate]:
    """The colluders' updates of a round, rewritten from their benign ones.

    ALIE: ``μ − z σ`` for every colluder (Baruch et al. 2019, Algorithm 3);
    IPM: ``−ε μ`` (Xie et al. 2020). ``μ`` and ``σ`` are the coordinate-wise
    mean and std of the colluders' own benign updates; ``num_clients`` is the
    round's number of updates, for ALIE's ``z``.
    """
    if not updates or spec.kind not in COLLUDING:
        return list(updates)
    stack = np.stack([np.asarray(u.delta.flat, dtype=np.float64) for u in updates])
    mu = stack.mean(axis=0)
    spec_ = updates[0].delta.spec
    if spec.kind == "ipm":
        bad = -spec.epsilon * mu
    else:
        z = spec.z if spec.z is not None else alie_z(num_clients, len(updates))
        bad = mu - z * stack.std(axis=0)
    delta = Params.from_flat(bad.astype(np.float32), spec_, copy=False)
    return [replace(u, delta=delta) for u in updates]


def alie_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al.'s ``z``: ``Φ⁻¹((n − s) / n)`` with ``s = ⌊n/2 + 1⌋ − f``.

    Examples
    --------
    >>> round(alie_z(50, 12), 3)  # s = 26 - 12 = 14, Φ⁻¹(36/50)
    0.583
    """
    s = math.floor(num_clients / 2 + 1) - num_malicious
    p = (num_clients - s) / num_clients
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(statistics.NormalDist().inv_cdf(p))
