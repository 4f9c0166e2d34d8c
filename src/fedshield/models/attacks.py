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

Each kind is an :class:`Attack` registered in :data:`ATTACKS` (its name, a
one-line description and tags); the configuration, ``fedshield analyze``
and the report read the names from there. Importing this module does not
import torch (the honest client is imported when an attack retrains).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
from numpy.typing import NDArray

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params, derive_rng
from fedshield.core.registry import Registry
from fedshield.errors import ConfigError

if TYPE_CHECKING:
    from fedshield.models.client import TorchClient

__all__ = [
    "ATTACKS",
    "ATTACK_KINDS",
    "Attack",
    "AttackSpec",
    "MaliciousClient",
    "add_trigger",
    "attack_success",
    "choose_malicious",
    "collude",
    "honest_fit",
]

AttackFit: TypeAlias = Callable[
    ["MaliciousClient", Params, FitConfig, np.random.Generator], ClientUpdate
]
"""A malicious client's own update: ``fit(client, params, config, rng)``."""
Collusion: TypeAlias = Callable[
    [NDArray[np.float64], "AttackSpec", int], NDArray[np.float64]
]
"""The colluders' common update from their benign ones, stacked one per row:
``collude(benign, spec, num_clients)``."""


def honest_fit(
    client: MaliciousClient,
    params: Params,
    config: FitConfig,
    rng: np.random.Generator,
) -> ClientUpdate:
    """The update the wrapped honest client computes."""
    return client.inner.fit(params, config, rng)


@dataclass(frozen=True)
class Attack:
    """What one attack kind does to a malicious client's update.

    Parameters
    ----------
    fit
        The client's own update (default: the honest one, unchanged).
    collude
        For a colluding attack (tag ``"colluding"``), the update every
        colluder of a round sends, from their stacked benign updates
        (:func:`collude`); None for the others.
    """

    fit: AttackFit = honest_fit
    collude: Collusion | None = None


ATTACKS: Registry[Attack] = Registry("attack", "[attack] kind")
"""The attacks by name: what ``[attack] kind`` and ``fedshield analyze
--attacks`` accept; ``"none"`` is no attack (each defence's baseline).

Tags: ``"label"``, the attack rewrites class labels (classification models
only); ``"colluding"``, its clients share their benign updates and send a
common one (:attr:`Attack.collude`). Registered below the attacks."""


@dataclass(frozen=True)
class AttackSpec:
    """What ``[attack]`` declares.

    Parameters
    ----------
    kind
        A name in :data:`ATTACKS`.
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
        if self.kind not in ATTACKS:
            raise ConfigError(ATTACKS.unknown(self.kind))
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
        if "label" in ATTACKS.tags(spec.kind) and task != "classification":
            others = [
                name
                for name in ATTACKS.names()
                if name != "none" and "label" not in ATTACKS.tags(name)
            ]
            raise ConfigError(
                f"[attack] kind = {spec.kind!r} needs class labels, but the "
                f"model's task is {task!r}; use a model-poisoning attack "
                f"({', '.join(others[:-1])} or {others[-1]}) instead"
            )
        self.client_id = inner.client_id
        self.inner = inner
        self.spec = spec
        self.num_classes = num_classes
        self.boost = boost
        self.max_examples = max_examples

    @property
    def model(self) -> object:
        """The model adapter of the wrapped client."""
        return self.inner.model

    @property
    def num_train_examples(self) -> int:
        """Local training examples (of the wrapped client)."""
        return self.inner.num_train_examples

    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        """Train (or not) and send the attacked update (:attr:`Attack.fit`)."""
        return ATTACKS.get(self.spec.kind).fit(self, params, config, rng)

    def evaluate(self, params: Params, config: EvalConfig) -> dict[str, float]:
        """Evaluate honestly (evaluation is not what this attacker poisons)."""
        return self.inner.evaluate(params, config)

    def refit(self, x: np.ndarray, y: np.ndarray) -> TorchClient:
        """An honest client with this client's model, on the data ``(x, y)``."""
        from fedshield.models.client import TorchClient

        return TorchClient(self.client_id, self.inner.model, x_train=x, y_train=y)


# ------------------------------------------------------------------ attacks


def _label_flip(
    client: MaliciousClient,
    params: Params,
    config: FitConfig,
    rng: np.random.Generator,
) -> ClientUpdate:
    x, y = client.inner.train_data
    flipped = (client.num_classes - 1 - y).astype(y.dtype)
    return client.refit(x, flipped).fit(params, config, rng)


def _backdoor(
    client: MaliciousClient,
    params: Params,
    config: FitConfig,
    rng: np.random.Generator,
) -> ClientUpdate:
    x, y = client.inner.train_data
    count = max(1, round(client.spec.poison_fraction * len(y)))
    idx = rng.choice(len(y), size=count, replace=False)
    x_bad = add_trigger(x[idx])
    y_bad = np.full(count, client.spec.target_label, dtype=y.dtype)
    poisoned = client.refit(np.concatenate([x, x_bad]), np.concatenate([y, y_bad])).fit(
        params, config, rng
    )
    return replace(
        poisoned,
        client_id=client.client_id,
        delta=poisoned.delta * client.boost,
        num_examples=len(y),
    )


def _sign_flip(
    client: MaliciousClient,
    params: Params,
    config: FitConfig,
    rng: np.random.Generator,
) -> ClientUpdate:
    honest = honest_fit(client, params, config, rng)
    return replace(honest, delta=honest.delta * (-client.spec.scale))


def _gaussian(
    client: MaliciousClient,
    params: Params,
    config: FitConfig,
    rng: np.random.Generator,
) -> ClientUpdate:
    honest = honest_fit(client, params, config, rng)
    noise = rng.normal(0.0, client.spec.std, honest.delta.spec.size)
    return replace(
        honest,
        delta=Params.from_flat(noise.astype(np.float32), honest.delta.spec, copy=False),
    )


def _free_rider(
    client: MaliciousClient,
    params: Params,
    config: FitConfig,
    rng: np.random.Generator,
) -> ClientUpdate:
    honest = honest_fit(client, params, config, rng)
    return replace(
        honest,
        delta=Params.zeros(honest.delta.spec),
        num_examples=client.max_examples,
    )


def _alie(
    benign: NDArray[np.float64], spec: AttackSpec, num_clients: int
) -> NDArray[np.float64]:
    z = spec.z if spec.z is not None else alie_z(num_clients, len(benign))
    result: NDArray[np.float64] = benign.mean(axis=0) - z * benign.std(axis=0)
    return result


def _ipm(
    benign: NDArray[np.float64], spec: AttackSpec, num_clients: int
) -> NDArray[np.float64]:
    result: NDArray[np.float64] = -spec.epsilon * benign.mean(axis=0)
    return result


ATTACKS.add("none", Attack(), "no attack: every client is honest (the baseline)")
ATTACKS.add(
    "label_flip",
    Attack(_label_flip),
    "trains on flipped labels y -> C - 1 - y",
    tags={"label"},
)
ATTACKS.add("sign_flip", Attack(_sign_flip), "sends -scale times its honest update")
ATTACKS.add(
    "gaussian", Attack(_gaussian), "sends Gaussian noise N(0, std^2) as its update"
)
ATTACKS.add(
    "backdoor",
    Attack(_backdoor),
    "model replacement: trains on triggered inputs relabelled to target_label "
    "and boosts its update",
    tags={"label"},
)
ATTACKS.add(
    "alie",
    Attack(collude=_alie),
    "A Little Is Enough: colluders send mean - z std of their benign updates",
    tags={"colluding"},
)
ATTACKS.add(
    "ipm",
    Attack(collude=_ipm),
    "inner-product manipulation: colluders send -epsilon times their benign mean",
    tags={"colluding"},
)
ATTACKS.add(
    "free_rider",
    Attack(_free_rider),
    "sends a zero update and claims the largest sample count",
)

ATTACK_KINDS: tuple[str, ...] = ATTACKS.names()
"""The built-in attack names (``ATTACKS.names()`` also lists those registered
later)."""


def collude(
    updates: Sequence[ClientUpdate], spec: AttackSpec, *, num_clients: int
) -> list[ClientUpdate]:
    """The colluders' updates of a round, rewritten from their benign ones.

    ALIE: ``μ − z σ`` for every colluder (Baruch et al. 2019, Algorithm 3);
    IPM: ``−ε μ`` (Xie et al. 2020). ``μ`` and ``σ`` are the coordinate-wise
    mean and std of the colluders' own benign updates; ``num_clients`` is the
    round's number of updates, for ALIE's ``z``.
    """
    rewrite = ATTACKS.get(spec.kind).collude
    if not updates or rewrite is None:
        return list(updates)
    stack = np.stack([np.asarray(u.delta.flat, dtype=np.float64) for u in updates])
    bad = rewrite(stack, spec, num_clients)
    delta = Params.from_flat(bad.astype(np.float32), updates[0].delta.spec, copy=False)
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
