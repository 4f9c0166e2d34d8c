"""Differentially private federated averaging: central (user-level) and local.

Central mode is DP-FedAvg (McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018): clients are sampled by Poisson
sampling, each sampled client's update is clipped to L2 norm ``C``, and the
server adds Gaussian noise of std ``σ_Δ·C`` to the *sum* and divides by the
*expected* number of clients ``qN`` (a fixed denominator, so one client's
influence is bounded by ``C / qN`` whoever drops out). With adaptive
clipping (Andrew et al., "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021, Algorithm 1) the clip norm follows a target
quantile of the update norms: the server releases the noised fraction of
unclipped updates ``b̃ = (Σ_k 1[‖Δ_k‖ ≤ C] + N(0, σ_b²)) / qN`` and sets
``C ← C·exp(−η (b̃ − γ))``; releasing both sums is, by their Theorem 1, the
Gaussian mechanism with ``σ = (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2)``, which is the
``noise_multiplier`` the accountant is given (``σ_Δ`` is derived from it).

Local mode: each client clips its own update to ``C`` and adds ``N(0, σ²C²)``
before it leaves the client (:func:`fedshield.privacy.local.privatize`, run
by the client); the server sees only noised updates. Each release is a
Gaussian mechanism on the client's whole data set with L2 sensitivity ``2C``
(two clipped updates differ by at most ``2C``), so a client that took part
in ``m`` rounds has spent the budget of ``m`` Gaussian mechanisms with noise
multiplier ``σ/2``; there is no amplification by sampling (the server knows
who took part). The reported ε is that of the client that took part most.

Record mode: each client trains with DP-SGD on its own records (Abadi et
al., CCS 2016; :mod:`fedshield.models.dp_sgd`), asked through the round's
options; the server accounts each client's records from the rule the client
runs (:func:`fedshield.privacy.records.record_level_event`), for every round
the client was sampled in, and reports the largest ε of any client.

Distributed mode: the distributed discrete Gaussian under secure aggregation
(Kairouz, Liu and Steinke, ICML 2021; :mod:`fedshield.privacy.distributed`).
Each client clips, rotates, rounds and noises its own update with its share
of integer noise before masking, so the server never holds an un-noised
sum; the round's rule (:class:`DistributedSum`) only divides the unmasked
sum by the number of survivors. Each completed round is one distributed
discrete Gaussian release (its RDP bound, quantisation included, in
:func:`fedshield.privacy.accounting.ddg_rdp`), accounted without
amplification by sampling (the server picks the clients) for every client
sampled in it; the reported ε is the largest of any client's.

Each mode is a :class:`DpMechanism` (:class:`CentralMechanism`,
:class:`RecordMechanism`, :class:`LocalMechanism`,
:class:`DistributedMechanism`), registered by name in :data:`MECHANISMS`:
it makes the round's rule, asks the clients for their part, charges the
round to the privacy record and says what a round releases. :class:`DpFedAvg`
holds one (``PrivacySettings(mode=...)``: a registered name or a mechanism)
and delegates every step that differs between modes to it.

Every round records its exact DP event in a :class:`PrivacyLedger` kept in
``ServerState.metadata["privacy"]``, so checkpoints carry the accountant and
a resumed run reports the same ε. With ``target_epsilon``, :meth:`configure`
raises :class:`~fedshield.errors.PrivacyBudgetExceeded` before a round that
would take ε above it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from fedshield.core import (
    Aggregate,
    Aggregator,
    ClientId,
    ClientUpdate,
    Params,
    ParamSpec,
    ServerState,
)
from fedshield.core.registry import Registry
from fedshield.errors import ConfigError, PrivacyBudgetExceeded
from fedshield.privacy.accounting import (
    AccountantKind,
    DpEventSpec,
    PrivacyLedger,
    ddg_undominated_releases,
    ddg_worst_epsilon,
    epsilon,
)
from fedshield.privacy.distributed import DistributedDp
from fedshield.privacy.local import LOCAL_CLIP, LOCAL_SIGMA
from fedshield.privacy.noise import GaussianNoise, SecureRandom, make_noise
from fedshield.privacy.records import (
    DP_SGD_CLIP,
    DP_SGD_SECURE,
    DP_SGD_SIGMA,
    record_level_event,
)
from fedshield.strategies.base import RoundPlan
from fedshield.strategies.fedavg import FedAvg
from fedshield.strategies.sampling import ClientSampler, CountSampler

__all__ = [
    "MECHANISMS",
    "CentralMechanism",
    "DistributedMechanism",
    "DistributedSum",
    "DpFedAvg",
    "DpMean",
    "DpMechanism",
    "LocalMechanism",
    "PoissonSampler",
    "PrivacySettings",
    "RecordMechanism",
    "adaptive_noise_split",
    "mechanism_for",
]


@dataclass(frozen=True, slots=True)
class PoissonSampler:
    """Each available client takes part independently with probability ``rate``.

    The sampling that privacy amplification by subsampling assumes (the
    accountant's ``PoissonSampledDpEvent``): the number of clients varies
    from round to round, ``rate × available`` on average, and may be 0.

    Parameters
    ----------
    rate
        Probability in (0, 1].
    """

    rate: float

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise ConfigError(
                f"the Poisson sampling rate must be in (0, 1]; got {self.rate}"
            )

    def expected_count(self, num_available: int) -> int:
        """``rate × num_available``, rounded down, at least 1 (for min_clients)."""
        return max(1, math.floor(self.rate * num_available + 1e-9))

    def sample(
        self,
        available: Sequence[ClientId],
        *,
        round_idx: int,
        rng: np.random.Generator | SecureRandom,
    ) -> list[ClientId]:
        """The clients whose coin came up (in ``available`` order)."""
        picked = rng.random(len(available)) < self.rate
        return [cid for cid, take in zip(available, picked, strict=True) if take]


@dataclass(frozen=True)
class PrivacySettings:
    """What ``[privacy]`` asks for (validated by the config layer).

    Parameters
    ----------
    mode
        The DP mode: a name registered in :data:`MECHANISMS`
        (``"central"``, ``"local"``, ``"record"`` or ``"distributed"``), or
        a :class:`DpMechanism`. Read back, always the mode's name (a
        string); the mechanism itself is :attr:`mechanism`.
    clip_norm
        L2 clip norm of each client's update (the initial one when adaptive).
    noise_multiplier
        ``σ``: noise std over the sensitivity. In central mode with adaptive
        clipping, the effective ``σ`` of the update and count together.
    delta
        The ``δ`` at which ε is reported.
    accountant
        ``"pld"`` (tight) or ``"rdp"``.
    target_epsilon
        Stop before a round that would exceed it (None: no budget).
    secure_rng
        Draw the noise, the round's client sample and DP-SGD's record
        samples from cryptographic randomness
        (:class:`~fedshield.privacy.noise.SecureRandom`), not from the
        seed. Local mode's noise is secure whatever it says.
    target_quantile
        Adaptive clipping's target fraction of unclipped updates ``γ``
        (None: fixed clipping).
    clip_learning_rate
        Adaptive clipping's geometric step ``η``.
    clipped_count_stddev
        ``σ_b``, the noise std of the unclipped count (None: ``qN / 20``, the
        paper's choice of ``σ_b = m/20``).
    distributed_bits
        Distributed mode: the modulus ``2^b`` of the secure sum (see
        :class:`~fedshield.privacy.distributed.DistributedDp`).
    rounding_beta
        Distributed mode: conditional rounding's ``β``.
    """

    mode: str | DpMechanism
    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    accountant: AccountantKind = "pld"
    target_epsilon: float | None = None
    secure_rng: bool = False
    target_quantile: float | None = None
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    distributed_bits: int = 20
    rounding_beta: float = math.exp(-0.5)
    mechanism: DpMechanism = field(init=False, repr=False, compare=False)
    """The mode's :class:`DpMechanism` (resolved from ``mode``)."""

    def __post_init__(self) -> None:
        mechanism = mechanism_for(self.mode)
        object.__setattr__(self, "mechanism", mechanism)
        object.__setattr__(self, "mode", mechanism.name)
        if not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
            raise ConfigError(
                f"[privacy] clip_norm must be a finite number > 0; got {self.clip_norm}"
            )
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier <= 0:
            raise ConfigError(
                "[privacy] noise_multiplier must be a finite number > 0; got "
                f"{self.noise_multiplier} (leave it out to calibrate it from "
                "target_epsilon)"
            )
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"[privacy] delta must be in (0, 1); got {self.delta}")
        if self.target_quantile is not None and not 0.0 < self.target_quantile < 1.0:
            raise ConfigError(
                "[privacy] target_quantile must be in (0, 1); got "
                f"{self.target_quantile}"
            )
        mechanism.check_settings(self)  # distributed: validates bits and beta

    def distributed(self) -> DistributedDp:
        """The distributed discrete Gaussian these settings describe."""
        return DistributedDp(
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            modulus_bits=self.distributed_bits,
            beta=self.rounding_beta,
            # Always: the clients' noise is their secret against the server,
            # which holds the simulation's seed.
            secure_rng=True,
        )


def adaptive_noise_split(noise_multiplier: float, count_stddev: float) -> float:
    """``σ_Δ`` such that ``(σ_Δ⁻² + (2σ_b)⁻²)^(−1/2) = noise_multiplier``.

    Andrew et al. 2021, Theorem 1: releasing the clipped sum with noise
    ``σ_Δ·C`` and the unclipped count with noise ``σ_b`` is as private as one
    Gaussian mechanism with the combined multiplier.

    Raises
    ------
    ConfigError
        If ``2σ_b ≤ noise_multiplier`` (the count alone would spend more
        than the whole budget).

    Examples
    --------
    >>> round(adaptive_noise_split(1.0, 5.0), 4)
    1.005
    """
    if 2.0 * count_stddev <= noise_multiplier:
        raise ConfigError(
            f"adaptive clipping needs clipped_count_stddev > noise_multiplier / 2 "
            f"(got {count_stddev} and {noise_multiplier}): raise "
            "clipped_count_stddev or sample more clients per round"
        )
    return float((noise_multiplier**-2 - (2.0 * count_stddev) ** -2) ** -0.5)


@dataclass(frozen=True)
class DpMean:
    """Clip each update, sum, add Gaussian noise, divide by a fixed denominator.

    One round's aggregator of central DP-FedAvg (built by
    :meth:`DpFedAvg.configure` with the round's clip norm). Updates are
    weighted equally (a weight by example count would let one client's
    influence exceed ``C / denominator``); the ``weight`` passed in is ignored.

    Parameters
    ----------
    clip_norm
        ``C``.
    noise_std
        Std of the Gaussian noise added to each coordinate of the sum.
    denominator
        The expected number of clients ``qN``.
    noise
        Where the noise comes from (seeded or secure); None: seeded from the
        ``rng`` passed to :meth:`begin`.
    count_stddev
        With adaptive clipping, ``σ_b`` of the noised unclipped count.
    secure_rng
        Build a secure noise source in :meth:`begin` when ``noise`` is None.
    """

    clip_norm: float
    noise_std: float
    denominator: float
    noise: GaussianNoise | None = None
    count_stddev: float | None = None
    secure_rng: bool = False

    is_streaming = True

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> _DpAccumulator:
        """Open the round's accumulator."""
        noise = self.noise or make_noise(self.secure_rng, rng)
        return _DpAccumulator(self, spec, noise)

    def release(
        self,
        total: np.ndarray,
        *,
        centred_unclipped: float,
        count: int,
        spec: ParamSpec,
        rng: np.random.Generator,
        measurements: Mapping[str, float] | None = None,
    ) -> Aggregate:
        """The DP release of an already clipped sum (from secure aggregation).

        ``total`` is ``Σ_k clip(Δ_k)`` and ``centred_unclipped`` is
        ``Σ_k (1[‖Δ_k‖ ≤ C] − ½)``, both summed without the server seeing
        the terms; the noise is added here exactly as :meth:`begin`'s
        accumulator adds it.
        """
        noise = self.noise or make_noise(self.secure_rng, rng)
        return _finish(self, spec, noise, total, centred_unclipped, count, measurements)


@dataclass(frozen=True)
class DistributedSum:
    """Distributed mode's rule: the clients noised their own updates.

    Under secure aggregation each client clips, rounds and noises its own
    update (:func:`fedshield.privacy.distributed.encode`, run by the
    client's half of :func:`fedshield.simulation.secure.secure_sum`); the
    unmasked sum already holds every share of the noise, so :meth:`release`
    only divides it by the number of survivors. Without secure aggregation
    there is nothing to release: :meth:`begin` refuses.

    Parameters
    ----------
    distributed
        The mechanism the clients run.
    """

    distributed: DistributedDp

    is_streaming = True

    @property
    def clip_norm(self) -> float:
        """``C``, which each client clips its own update to."""
        return self.distributed.clip_norm

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> _DpAccumulator:
        """Refused: distributed DP's noise is added inside secure aggregation."""
        raise ConfigError(
            'privacy.mode = "distributed" needs secure aggregation: the clients add '
            "their noise shares before masking; add [secagg] protocol = "
            '"secagg" or "secagg+"'
        )

    def release(
        self,
        total: np.ndarray,
        *,
        centred_unclipped: float,
        count: int,
        spec: ParamSpec,
        rng: np.random.Generator,
        measurements: Mapping[str, float] | None = None,
    ) -> Aggregate:
        """The mean of the noised sum over the ``count`` survivors.

        Dividing by the number of survivors (public: the protocol announces
        them) is post-processing of the noised sum.
        """
        mean = (np.asarray(total, dtype=np.float64) / max(count, 1)).astype(np.float32)
        out = dict(measurements or {})
        out["dp/clip_norm"] = self.distributed.clip_norm
        return Aggregate(
            delta=Params.from_flat(mean, spec, copy=False),
            num_updates=count,
            total_weight=float(count),
            measurements=out,
        )


def _distributed_event(measurements: Mapping[str, Any]) -> DpEventSpec:
    """A completed distributed round's release, from what secure_sum measured."""
    missing = [k for k in _DDP_KEYS if k not in measurements]
    if missing:
        raise ConfigError(
            f"a distributed-DP round must report {', '.join(missing)}: the round "
            "was not aggregated by secure aggregation with distributed DP"
        )
    return DpEventSpec.distributed_discrete_gaussian(
        num_clients=int(measurements["secagg/survivors"]),
        noise_std_per_client=float(measurements["ddp/noise_std"]),
        l2_sensitivity=float(measurements["ddp/l2_sensitivity"]),
        dimension=int(measurements["ddp/padded_dimension"]),
    )


_DDP_KEYS = (
    "secagg/survivors",
    "ddp/noise_std",
    "ddp/l2_sensitivity",
    "ddp/padded_dimension",
)


def _finish(
    rule: DpMean,
    spec: ParamSpec,
    noise: GaussianNoise,
    total: np.ndarray,
    centred_unclipped: float,
    count: int,
    extra: Mapping[str, float] | None = None,
) -> Aggregate:
    noised = np.asarray(total, dtype=np.float64) + noise.sample(
        spec.size, rule.noise_std
    )
    mean = (noised / rule.denominator).astype(np.float32)
    measurements: dict[str, float] = dict(extra or {})
    measurements.update(
        {
            "dp/clip_norm": rule.clip_norm,
            "dp/noise_std": rule.noise_std,
            "dp/denominator": rule.denominator,
        }
    )
    if rule.count_stddev is not None:
        # Only the noised count is released (it is part of the mechanism).
        # Each client's bit is centred to ±½ (Andrew et al. 2021; TF
        # Privacy's quantile estimator), so one client moves the sum by at
        # most ½: the sensitivity the noise split of adaptive_noise_split
        # assumes. The estimate adds the ½ back over the fixed denominator.
        noisy = centred_unclipped + float(noise.sample(1, rule.count_stddev)[0])
        measurements["dp/unclipped_fraction"] = noisy / rule.denominator + 0.5
    return Aggregate(
        delta=Params.from_flat(mean, spec, copy=False),
        num_updates=count,
        total_weight=float(count),
        measurements=measurements,
    )


class _DpAccumulator:
    def __init__(self, rule: DpMean, spec: ParamSpec, noise: GaussianNoise) -> None:
        self._rule = rule
        self._spec = spec
        self._noise = noise
        self._sum = np.zeros(spec.size, dtype=np.float64)
        self._count = 0
        self._centred_unclipped = 0.0  # Σ_k (1[‖Δ_k‖ ≤ C] − ½)

    def add(self, update: ClientUpdate, weight: float) -> None:
        norm = update.delta.norm()
        clip = self._rule.clip_norm
        factor = 1.0 if norm <= clip else clip / norm
        self._sum += np.asarray(update.delta.flat, dtype=np.float64) * factor
        self._count += 1
        self._centred_unclipped += (1.0 if norm <= clip else 0.0) - 0.5

    def result(self) -> Aggregate:
        return _finish(
            self._rule,
            self._spec,
            self._noise,
            self._sum,
            self._centred_unclipped,
            self._count,
        )


# --- mechanisms ----------------------------------------------------------------


def _refuse_above(
    privacy: PrivacySettings, record: Mapping[str, Any], after: float
) -> None:
    """Refuse the round if ``after`` (its ε) exceeds ``target_epsilon``."""
    target = privacy.target_epsilon
    if target is not None and after > target:
        raise PrivacyBudgetExceeded(
            f"the privacy budget is spent: one more round would take epsilon "
            f"from {float(record.get('epsilon', 0.0)):.4g} to {after:.4g}, above "
            f"target_epsilon = {target:g} (delta = {privacy.delta:g})"
        )


@dataclass(frozen=True)
class DpMechanism(ABC):
    """What one DP mode does inside :class:`DpFedAvg`.

    A mechanism names the rule that aggregates a round, what the clients do
    (the options it adds to their fit config), how a round is accounted (the
    DP event it composes into the privacy record) and what a round and a
    run report. It holds no state: :class:`DpFedAvg` holds one (through its
    :class:`PrivacySettings`) and passes itself to each hook, which reads
    the strategy's settings, sampler, population and caches.

    The hooks' defaults are those of a mode whose clients noise their own
    updates and are charged per round taken part in; each mode overrides
    what differs. Modes are registered in :data:`MECHANISMS` under
    :attr:`name`.
    """

    name: ClassVar[str] = ""
    """The mode's name, as ``[privacy] mode`` writes it."""

    # --- construction ------------------------------------------------------

    def check_settings(self, settings: PrivacySettings) -> None:
        """Refuse settings this mechanism cannot run (at their construction)."""
        return  # nothing to refuse by default

    def validate(self, dp: DpFedAvg) -> None:
        """Refuse a strategy this mechanism cannot account (at its construction).

        By default the units protected are the ``N`` clients, so ``δ`` must
        be below ``1/N``.
        """
        privacy = dp.privacy
        if privacy.delta >= 1.0 / dp.num_clients:
            raise ConfigError(
                f"[privacy] delta = {privacy.delta:g} is not below 1/N = "
                f"1/{dp.num_clients} (N: the clients, the units protected in "
                f"{self.name} mode); choose delta < "
                f"{1.0 / dp.num_clients:.3g}"
            )

    def fresh(self, dp: DpFedAvg) -> dict[str, Any]:
        """The mode's own fields of an empty privacy record.

        They follow the common fields (``mode`` … ``clip_norm``) in the
        record, in this order.
        """
        return {"participation": {}}

    # --- a round ---------------------------------------------------------------

    def initial_aggregator(self, dp: DpFedAvg) -> Aggregator:
        """The aggregation rule before any round (default: FedAvg's mean)."""
        return dp.base.aggregator

    def round_aggregator(
        self, dp: DpFedAvg, record: Mapping[str, Any]
    ) -> Aggregator | None:
        """The round's own rule (None: :meth:`initial_aggregator`'s)."""
        return None

    def client_options(self, dp: DpFedAvg) -> Mapping[str, Any] | None:
        """What the round's clients are asked to run (fit-config options)."""
        return None

    def min_clients(self, dp: DpFedAvg) -> int:
        """The fewest updates the round aggregates (default: FedAvg's)."""
        return dp.base.min_clients

    def weight(self, dp: DpFedAvg, update: ClientUpdate) -> float:
        """An update's aggregation weight (default: equal weights)."""
        return 1.0

    def released(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """A round's server-side metrics that its guarantee covers.

        By default everything but the un-noised training metrics
        (``train_*``) and the round's wall time.
        """
        return {
            key: value
            for key, value in metrics.items()
            if not key.startswith("train_") and key != "seconds"
        }

    def summary(self, settings: PrivacySettings) -> dict[str, Any]:
        """Facts of this mode for the run's privacy summary (beyond the settings)."""
        return {}

    # --- the budget --------------------------------------------------------

    def first_round_epsilon(self, dp: DpFedAvg, dimension: int | None) -> float | None:
        """ε of one round of the expected size (None: not known in advance)."""
        return None

    def check_before_sampling(self, dp: DpFedAvg, record: Mapping[str, Any]) -> None:
        """Refuse a round over budget, before its clients are sampled."""
        return  # nothing to refuse by default

    def check_sampled(
        self,
        dp: DpFedAvg,
        record: Mapping[str, Any],
        clients: Sequence[ClientId],
        dimension: int,
    ) -> None:
        """Refuse a round over budget, once ``clients`` are sampled."""
        return  # nothing to refuse by default

    # --- accounting -------------------------------------------------------------

    @abstractmethod
    def spend(
        self,
        dp: DpFedAvg,
        record: dict[str, Any],
        state: ServerState,
        plan: RoundPlan,
        aggregate: Aggregate | None,
    ) -> None:
        """Charge ``plan``'s round to ``record`` (``aggregate``: None if none).

        ``record`` is a copy of the state's record, updated in place;
        :class:`DpFedAvg` counts the round.
        """

    charges_unfinished: ClassVar[bool] = True
    """Whether a round that ended without an update still costs its clients."""

    def charge_before(
        self, dp: DpFedAvg, state: ServerState, plan: RoundPlan
    ) -> ServerState:
        """``state`` charged for ``plan``'s round before its clients train.

        By default the round's own cost (:meth:`DpFedAvg.charge_unfinished`).
        """
        return dp.charge_unfinished(state, plan)


@dataclass(frozen=True)
class CentralMechanism(DpMechanism):
    """DP-FedAvg: the server clips each update and noises the sum.

    The round's rule is a :class:`DpMean` at the record's clip norm (which
    adaptive clipping moves); each round composes one Gaussian mechanism
    amplified by the client sampling into the record's
    :class:`PrivacyLedger`; the clients run plain FedAvg.
    """

    name: ClassVar[str] = "central"

    def validate(self, dp: DpFedAvg) -> None:
        """``δ < 1/N``; fixed-size sampling only with RDP; a valid noise split."""
        super().validate(dp)
        if isinstance(dp.sampler, CountSampler) and dp.privacy.accountant != "rdp":
            # Only central mode accounts the sampling of clients (local and
            # record mode charge each client for the rounds it took part in,
            # distributed mode claims no amplification), so only central
            # mode needs the RDP accountant for fixed-size sampling.
            raise ConfigError(
                'fixed-size client sampling (sampling = "fixed") is accounted only '
                'by the RDP accountant: set [privacy] accountant = "rdp", or use '
                'sampling = "poisson"'
            )
        self.noise_split(dp)  # validates adaptive clipping's noise split

    def fresh(self, dp: DpFedAvg) -> dict[str, Any]:
        """An empty ledger."""
        privacy = dp.privacy
        return {"ledger": PrivacyLedger(privacy.accountant, privacy.delta).to_json()}

    def noise_split(self, dp: DpFedAvg) -> tuple[float, float | None]:
        """(σ_Δ, σ_b): the update's and the count's noise multipliers."""
        privacy = dp.privacy
        sigma = privacy.noise_multiplier
        if privacy.target_quantile is None:
            return sigma, None
        count_std = privacy.clipped_count_stddev
        if count_std is None:
            count_std = dp.expected_clients / 20.0
        return adaptive_noise_split(sigma, count_std), count_std

    def rule(self, dp: DpFedAvg, clip_norm: float) -> DpMean:
        """The round's :class:`DpMean` at ``clip_norm``."""
        sigma_delta, count_std = self.noise_split(dp)
        return DpMean(
            clip_norm=clip_norm,
            noise_std=sigma_delta * clip_norm,
            denominator=dp.expected_clients,
            count_stddev=count_std,
            secure_rng=dp.privacy.secure_rng,
        )

    def initial_aggregator(self, dp: DpFedAvg) -> Aggregator:
        """A :class:`DpMean` at the initial clip norm."""
        return self.rule(dp, dp.privacy.clip_norm)

    def round_aggregator(
        self, dp: DpFedAvg, record: Mapping[str, Any]
    ) -> Aggregator | None:
        """A :class:`DpMean` at the record's (adapted) clip norm."""
        return self.rule(dp, float(record["clip_norm"]))

    def min_clients(self, dp: DpFedAvg) -> int:
        """0: central mode never aborts for too few updates.

        Whether a round had enough would be a release of the clients' count
        outside the guarantee. With its fixed denominator the round releases
        the noised sum of whoever took part (DP-FedAvg's algorithm);
        min_clients is checked against the expected sample (check()).
        """
        return 0

    def released(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Only the noised aggregate's measurements (the sample stays secret)."""
        return {
            key: value
            for key, value in metrics.items()
            if key.startswith(("dp/", "federated_"))
            or key in ("update_norm", "secagg/aborted")
        }

    def event(self, dp: DpFedAvg) -> DpEventSpec:
        """One round's DP event: the Gaussian mechanism, amplified by sampling."""
        sigma = dp.privacy.noise_multiplier
        sampler = dp.sampler
        if isinstance(sampler, PoissonSampler):
            return DpEventSpec(
                noise_multiplier=sigma,
                sampling="poisson",
                sampling_rate=sampler.rate,
            )
        assert isinstance(sampler, CountSampler)
        # Fixed-size sampling is accounted under replace-one neighbours:
        # replacing one client moves the clipped sum by up to 2C (and the
        # centred unclipped count by up to 1, twice its add/remove
        # sensitivity), against noise σC, so the event's multiplier is σ/2.
        return DpEventSpec(
            noise_multiplier=sigma / 2.0,
            sampling="fixed",
            population=dp.num_clients,
            sample_size=min(sampler.count, dp.num_clients),
        )

    def ledger(self, dp: DpFedAvg, data: Mapping[str, Any]) -> PrivacyLedger:
        """The record's ledger.

        The one this strategy wrote last round, unless the state came from
        elsewhere (a checkpoint): then rebuilt from its JSON.
        """
        if dp._cache.get("json") is data:
            ledger: PrivacyLedger = dp._cache["ledger"]
            return ledger
        return PrivacyLedger.from_json(data)

    def first_round_epsilon(self, dp: DpFedAvg, dimension: int | None) -> float | None:
        """ε of one round's event."""
        privacy = dp.privacy
        return epsilon([self.event(dp)], privacy.delta, privacy.accountant)

    def check_before_sampling(self, dp: DpFedAvg, record: Mapping[str, Any]) -> None:
        """Refuse a round whose event would take ε above the target."""
        if dp.privacy.target_epsilon is None:
            return
        after = self.ledger(dp, record["ledger"]).epsilon_if(self.event(dp))
        _refuse_above(dp.privacy, record, after)

    def spend(
        self,
        dp: DpFedAvg,
        record: dict[str, Any],
        state: ServerState,
        plan: RoundPlan,
        aggregate: Aggregate | None,
    ) -> None:
        """Compose the round's event; adaptive clipping moves the clip norm."""
        ledger = self.ledger(dp, record["ledger"])
        ledger.record(state.round_idx, self.event(dp))
        record["ledger"] = ledger.to_json()
        dp._cache["json"], dp._cache["ledger"] = record["ledger"], ledger
        record["epsilon"] = ledger.epsilon()
        fraction = (
            aggregate.measurements.get("dp/unclipped_fraction")
            if aggregate is not None
            else None
        )
        privacy = dp.privacy
        if privacy.target_quantile is not None and fraction is not None:
            step = -privacy.clip_learning_rate * (fraction - privacy.target_quantile)
            record["clip_norm"] = float(record["clip_norm"]) * math.exp(step)


@dataclass(frozen=True)
class RecordMechanism(DpMechanism):
    """DP-SGD inside each client, accounted per client from its records.

    The clients are asked (through the round's options) to run DP-SGD; the
    server aggregates with FedAvg's rule and weights and charges each
    sampled client the DP-SGD of its records
    (:func:`~fedshield.privacy.records.record_level_event`).
    """

    name: ClassVar[str] = "record"

    def validate(self, dp: DpFedAvg) -> None:
        """Each client's size known; ``δ < 1/n`` of the largest; PLD only."""
        privacy = dp.privacy
        if not dp.client_sizes:
            raise ConfigError("record mode needs each client's number of records")
        most = max(dp.client_sizes.values())
        if privacy.delta >= 1.0 / most:
            raise ConfigError(
                f"[privacy] delta = {privacy.delta:g} is not below 1/n = "
                f"1/{most} (n: the records of the largest client, the units "
                f"protected in record mode); choose delta < {1.0 / most:.3g}"
            )
        if privacy.accountant == "rdp":
            raise ConfigError(
                "record mode is accounted under replace-one, which only the PLD "
                'accountant supports for Poisson sampling: set accountant = "pld"'
            )

    def fresh(self, dp: DpFedAvg) -> dict[str, Any]:
        """Each client's rounds and ε."""
        return {"participation": {}, "client_epsilon": {}}

    def client_options(self, dp: DpFedAvg) -> Mapping[str, Any] | None:
        """DP-SGD's clip norm, noise multiplier and randomness."""
        privacy = dp.privacy
        return {
            DP_SGD_CLIP: privacy.clip_norm,
            DP_SGD_SIGMA: privacy.noise_multiplier,
            DP_SGD_SECURE: privacy.secure_rng,
        }

    def weight(self, dp: DpFedAvg, update: ClientUpdate) -> float:
        """FedAvg's weight (each client's records are protected by its DP-SGD)."""
        return dp.base.weight(update)

    def client_epsilon(self, dp: DpFedAvg, client_id: ClientId, rounds: int) -> float:
        """ε of one client's records after ``rounds`` rounds of DP-SGD."""
        assert dp.client_sizes is not None
        local = dp.base.local
        privacy = dp.privacy
        spec = record_level_event(
            int(dp.client_sizes[client_id]),
            batch_size=local.batch_size,
            epochs=local.epochs,
            noise_multiplier=privacy.noise_multiplier,
            rounds=rounds,
        )
        key = repr(spec)
        cached = dp._cache.setdefault("record", {}).get(key)
        if cached is None:
            cached = epsilon([spec], privacy.delta, privacy.accountant)
            dp._cache["record"][key] = cached
        return float(cached)

    def check_sampled(
        self,
        dp: DpFedAvg,
        record: Mapping[str, Any],
        clients: Sequence[ClientId],
        dimension: int,
    ) -> None:
        """Refuse a round that would take any sampled client above the target."""
        privacy = dp.privacy
        target = privacy.target_epsilon
        if target is None:
            return
        counts = record["participation"]
        for cid in clients:
            after = self.client_epsilon(dp, cid, int(counts.get(cid, 0)) + 1)
            if after > target:
                raise PrivacyBudgetExceeded(
                    f"the privacy budget is spent: one more round would take "
                    f"client {cid!r}'s epsilon to {after:.4g}, above "
                    f"target_epsilon = {target:g} (delta = {privacy.delta:g})"
                )

    def spend(
        self,
        dp: DpFedAvg,
        record: dict[str, Any],
        state: ServerState,
        plan: RoundPlan,
        aggregate: Aggregate | None,
    ) -> None:
        """Charge every sampled client, whether or not its update arrived.

        It may have trained (and spent) before dropping out.
        """
        counts = dict(record["participation"])
        spent = dict(record["client_epsilon"])
        for cid in plan.clients:
            counts[cid] = int(counts.get(cid, 0)) + 1
            spent[cid] = self.client_epsilon(dp, cid, counts[cid])
        record["participation"] = counts
        record["client_epsilon"] = spent
        record["epsilon"] = max(spent.values(), default=0.0)


@dataclass(frozen=True)
class LocalMechanism(DpMechanism):
    """Each client clips and noises its own update before it leaves.

    The clients are asked (through the round's options) to privatise their
    updates (:func:`fedshield.privacy.local.privatize`); the server averages
    them with equal weights and charges each sampled client one Gaussian
    mechanism of multiplier ``σ/2`` (sensitivity ``2C``) per round.
    """

    name: ClassVar[str] = "local"

    def client_options(self, dp: DpFedAvg) -> Mapping[str, Any] | None:
        """The clip norm and noise multiplier each client applies."""
        return {
            LOCAL_CLIP: dp.privacy.clip_norm,
            LOCAL_SIGMA: dp.privacy.noise_multiplier,
        }

    def summary(self, settings: PrivacySettings) -> dict[str, Any]:
        """Local noise is always secure; the sample buys no amplification."""
        return {"secure_rng": True, "amplification_by_sampling": False}

    def client_epsilon(self, dp: DpFedAvg, participations: int) -> float:
        """ε of a client that took part in ``participations`` rounds."""
        if participations == 0:
            return 0.0
        privacy = dp.privacy
        # Sensitivity 2C over noise σC: the multiplier of one release is σ/2.
        spec = DpEventSpec(
            noise_multiplier=privacy.noise_multiplier / 2.0, count=participations
        )
        return epsilon([spec], privacy.delta, privacy.accountant)

    def first_round_epsilon(self, dp: DpFedAvg, dimension: int | None) -> float | None:
        """ε of one release."""
        return self.client_epsilon(dp, 1)

    def check_before_sampling(self, dp: DpFedAvg, record: Mapping[str, Any]) -> None:
        """The worst case: a client that took part most takes part again."""
        if dp.privacy.target_epsilon is None:
            return
        most = max(dict(record["participation"]).values(), default=0)
        _refuse_above(dp.privacy, record, self.client_epsilon(dp, most + 1))

    def spend(
        self,
        dp: DpFedAvg,
        record: dict[str, Any],
        state: ServerState,
        plan: RoundPlan,
        aggregate: Aggregate | None,
    ) -> None:
        """Charge every sampled client; ε is that of the one that took part most."""
        counts = dict(record["participation"])
        for cid in plan.clients:
            counts[cid] = int(counts.get(cid, 0)) + 1
        record["participation"] = counts
        record["epsilon"] = self.client_epsilon(dp, max(counts.values(), default=0))


@dataclass(frozen=True)
class DistributedMechanism(DpMechanism):
    """The distributed discrete Gaussian under secure aggregation.

    Each client noises its share before masking; the round's rule is a
    :class:`DistributedSum`. Each completed round is one distributed
    discrete Gaussian release, charged (without amplification) to every
    sampled client; each client's releases are recorded as a histogram over
    the distinct events the run has seen (``events``).
    """

    name: ClassVar[str] = "distributed"

    charges_unfinished: ClassVar[bool] = False
    # An aborted round aborts before the sum is unmasked: nothing released.

    def check_settings(self, settings: PrivacySettings) -> None:
        """Validates the modulus bits and rounding's beta."""
        settings.distributed()

    def fresh(self, dp: DpFedAvg) -> dict[str, Any]:
        """Each client's histogram of releases, and the distinct releases."""
        return {"participation": {}, "events": []}

    def initial_aggregator(self, dp: DpFedAvg) -> Aggregator:
        """A :class:`DistributedSum` of the settings' mechanism."""
        return DistributedSum(dp.privacy.distributed())

    def round_aggregator(
        self, dp: DpFedAvg, record: Mapping[str, Any]
    ) -> Aggregator | None:
        """A :class:`DistributedSum` of the settings' mechanism."""
        return DistributedSum(dp.privacy.distributed())

    def summary(self, settings: PrivacySettings) -> dict[str, Any]:
        """Always accounted by its RDP bound, with secure noise, unamplified."""
        return {
            # The distributed discrete Gaussian is always accounted by its RDP
            # bound (fedshield.privacy.accounting.ddg_rdp), whatever [privacy]
            # accountant says.
            "accountant": "rdp",
            "secure_rng": True,  # always (see DistributedDp)
            "distributed_bits": settings.distributed_bits,
            "rounding_beta": settings.rounding_beta,
            "amplification_by_sampling": False,
        }

    def first_round_epsilon(self, dp: DpFedAvg, dimension: int | None) -> float | None:
        """ε of the costliest release of a round of the expected size."""
        if dimension is None:
            return None
        event = self.next_event(dp, dimension)
        return epsilon([event], dp.privacy.delta, dp.privacy.accountant)

    def check_sampled(
        self,
        dp: DpFedAvg,
        record: Mapping[str, Any],
        clients: Sequence[ClientId],
        dimension: int,
    ) -> None:
        """Refuse a round whose worst release would take ε above the target.

        Checked for the round as sampled and for every smaller number of
        clients that may finish training (its own granularity and noise
        share: a smaller round can cost more).
        """
        if not clients or dp.privacy.target_epsilon is None:
            return
        # The worst case: any client takes part again, in a round built for
        # any number of clients that trained and completed by any number of
        # survivors (ε is monotone in neither, so every pair is checked).
        releases = self.releases(dp, dimension, max(2, len(clients)))
        histograms = list(dict(record["participation"]).values()) or [{}]
        after = self.worst_epsilon(dp, record["events"], histograms, releases)
        _refuse_above(dp.privacy, record, after)

    def spend(
        self,
        dp: DpFedAvg,
        record: dict[str, Any],
        state: ServerState,
        plan: RoundPlan,
        aggregate: Aggregate | None,
    ) -> None:
        """Account a completed round for every sampled client."""
        assert aggregate is not None  # an unfinished round costs nothing
        self.charge(dp, record, plan, [_distributed_event(aggregate.measurements)])

    def charge_before(
        self, dp: DpFedAvg, state: ServerState, plan: RoundPlan
    ) -> ServerState:
        """Every release the round could make, charged to every sampled client.

        The release is known only once the sum is unmasked: every one the
        round could make that no other bounds at every RDP order
        (:meth:`releases`: usually one, which then bounds them all), each
        charged once, costs at least what the round will.
        """
        if not plan.clients:
            return state
        record = dict(dp._record(state))
        releases = self.releases(
            dp, state.params.spec.size, len(plan.clients), strict=False
        )
        self.charge(dp, record, plan, releases)
        record["rounds"] = int(record.get("rounds", 0)) + 1
        return state.evolve(metadata={**state.metadata, "privacy": record})

    def charge(
        self,
        dp: DpFedAvg,
        record: dict[str, Any],
        plan: RoundPlan,
        specs: Sequence[DpEventSpec],
    ) -> None:
        """Charge each of ``specs`` once to every client sampled in ``plan``."""
        events = list(record["events"])
        counts = {cid: dict(h) for cid, h in dict(record["participation"]).items()}
        for spec in specs:
            key = spec.to_json()
            if key not in events:
                events.append(key)
            index = str(events.index(key))
            for cid in plan.clients:
                histogram = counts.setdefault(cid, {})
                histogram[index] = int(histogram.get(index, 0)) + 1
        record["events"] = events
        record["participation"] = counts
        record["epsilon"] = self.worst_epsilon(dp, events, counts.values())

    def worst_epsilon(
        self,
        dp: DpFedAvg,
        events: Sequence[Mapping[str, Any]],
        histograms: Iterable[Mapping[str, int]],
        then: Sequence[DpEventSpec] = (),
    ) -> float:
        """The largest ε of any client (each client's rounds, composed).

        With ``then``: after one more round that every client takes part in
        and that releases any one of ``then`` (the worst is taken).
        """
        specs = [DpEventSpec.from_json(e) for e in events]
        rows = list(histograms)
        counts = np.zeros((len(rows), len(specs)))
        for i, histogram in enumerate(rows):
            for index, count in histogram.items():
                counts[i, int(index)] = count
        return ddg_worst_epsilon(specs, counts, dp.privacy.delta, then=then)

    def next_event(
        self, dp: DpFedAvg, dimension: int, num_clients: int | None = None
    ) -> DpEventSpec:
        """The costliest release, alone, of a round of ``num_clients``.

        For a round of ``num_clients`` (default: the expected number): of
        every release it can make (:meth:`releases`), the one whose single
        round costs the most ε.
        """
        n = max(2, num_clients or round(dp.expected_clients))
        events = self.releases(dp, dimension, n)
        costs = [epsilon([e], dp.privacy.delta) for e in events]
        return events[costs.index(max(costs))]

    def releases(
        self, dp: DpFedAvg, dimension: int, num_clients: int, *, strict: bool = True
    ) -> tuple[DpEventSpec, ...]:
        """Every release a round sampled with ``num_clients`` can make.

        Secure aggregation runs for the ``n'`` clients that trained, any
        number from ``min_clients`` (at least 2; fewer abort the round) to
        all sampled (some may fail at fit), with ``n'``'s own threshold and
        discrete Gaussian, and completes with any number of survivors from
        that threshold to ``n'`` (:func:`~fedshield.privacy.accounting.
        ddg_round_events`). ε is monotone in neither (a smaller ``n'`` has
        a finer granularity but fewer noise shares), so every pair counts;
        those another bounds at every order are left out (:func:`~fedshield.
        privacy.accounting.ddg_undominated_releases`). A ``n'`` whose round
        cannot be built (threshold or parameters refused) aborts: it
        releases nothing. The set for ``n`` is the set for ``n − 1`` plus
        round ``n``'s releases, so each is built once from the last one
        cached.

        Raises
        ------
        ConfigError
            With ``strict``, if the round as sampled cannot be built.
        """
        distributed = dp.privacy.distributed()
        threshold_for = dp.threshold_for

        def parameters(trained: int) -> Any:
            t = threshold_for(trained) if threshold_for is not None else trained
            return distributed.parameters(
                dimension=dimension, num_clients=trained, threshold=t
            )

        if strict:
            parameters(num_clients)  # the round as sampled: refused if it cannot run
        built: dict[int, tuple[DpEventSpec, ...]] = dp._cache.setdefault(
            f"ddg_releases/{dimension}", {}
        )
        if num_clients in built:
            return built[num_clients]
        lowest = max(2, dp.base.min_clients)
        below = [m for m in built if m < num_clients]
        trained = max(below) if below else lowest - 1
        releases = built[trained] if below else ()
        while trained < num_clients:
            trained += 1
            try:
                round_ = parameters(trained)
            except ConfigError:
                round_ = None  # such a round aborts in secure aggregation
            if round_ is not None:
                releases = ddg_undominated_releases(round_, releases)
            built[trained] = releases
        return releases


MECHANISMS: Registry[type[DpMechanism]] = Registry("privacy mode", "[privacy] mode")
"""The DP modes by name: each a :class:`DpMechanism` class.

Tags: ``client_side`` (the clients apply the mechanism: the server cannot
enforce it alone), ``amplified`` (accounted with amplification by client
sampling), ``needs_secagg`` (runs only under secure aggregation).
"""

MECHANISMS.add(
    "central",
    CentralMechanism,
    "user-level DP-FedAvg: the server clips each client's update and adds "
    "Gaussian noise to the sum",
    tags={"amplified"},
)
MECHANISMS.add(
    "record",
    RecordMechanism,
    "DP-SGD inside each client: each client's records are protected, "
    "accounted per client",
    tags={"client_side"},
)
MECHANISMS.add(
    "local",
    LocalMechanism,
    "each client clips and noises its own update before it leaves the client",
    tags={"client_side"},
)
MECHANISMS.add(
    "distributed",
    DistributedMechanism,
    "each client adds its share of discrete Gaussian noise before secure "
    "aggregation masks its update (needs [secagg])",
    tags={"client_side", "needs_secagg"},
)


def mechanism_for(mode: str | DpMechanism) -> DpMechanism:
    """The mechanism ``mode`` names (a mechanism is returned as it is).

    Raises
    ------
    ConfigError
        If no mode has that name (the message lists the registered ones).
    """
    if isinstance(mode, DpMechanism):
        return mode
    return MECHANISMS.get(mode)()


# --- the strategy ----------------------------------------------------------------


@dataclass(frozen=True)
class DpFedAvg:
    """FedAvg with user-level differential privacy, by a :class:`DpMechanism`.

    Composed of a :class:`FedAvg` (local training, server optimizer,
    ``min_clients``), a client sampler (:class:`PoissonSampler` by default,
    a :class:`CountSampler` for fixed-size sampling, accounted as sampling
    without replacement) and the mechanism of :class:`PrivacySettings`
    (:attr:`mechanism`), to which each mode-dependent step is delegated.

    Parameters
    ----------
    base
        The FedAvg whose round this privatises (its sampler is replaced by
        ``sampler``).
    privacy
        Mode, clipping, noise, accountant and budget.
    sampler
        How clients are sampled.
    num_clients
        ``N``, the number of clients (the population sampled from).
    client_sizes
        Record mode: each client's number of training records (the server
        accounts each client's DP-SGD from it, by the rule the client runs,
        :func:`fedshield.privacy.records.record_level_event`).
    threshold_for
        Distributed mode: secure aggregation's threshold for a round of so
        many clients (to predict a round's privacy cost for the budget).
    """

    base: FedAvg
    privacy: PrivacySettings
    sampler: ClientSampler
    num_clients: int
    client_sizes: Mapping[ClientId, int] | None = None
    threshold_for: Callable[[int], int] | None = None
    _expected: float = field(init=False, repr=False)
    _cache: dict[str, Any] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    is_stateful = False

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1; got {self.num_clients}")
        expected = (
            self.sampler.rate * self.num_clients
            if isinstance(self.sampler, PoissonSampler)
            else float(self.sampler.expected_count(self.num_clients))
        )
        object.__setattr__(self, "_expected", expected)
        self.mechanism.validate(self)

    @property
    def mechanism(self) -> DpMechanism:
        """The DP mode's mechanism (from :attr:`PrivacySettings.mechanism`)."""
        return self.privacy.mechanism

    # --- the strategy interface ---------------------------------------------

    @property
    def aggregator(self) -> Aggregator:
        """The aggregation rule before any round.

        Central mode: a :class:`DpMean` at the initial clip norm (each round
        builds its own, see :meth:`configure`); distributed mode: a
        :class:`DistributedSum`; local and record mode: FedAvg's mean.
        """
        return self.mechanism.initial_aggregator(self)

    @property
    def expected_clients(self) -> float:
        """``qN``: the fixed denominator of central mode."""
        return self._expected

    def init(self, params: Params) -> ServerState:
        """FedAvg's initial state plus an empty privacy ledger."""
        state = self.base.init(params)
        return state.evolve(metadata={**state.metadata, "privacy": self._fresh()})

    def check(self, num_available: int, dimension: int | None = None) -> None:
        """FedAvg's checks (``min_clients`` against the expected sample).

        With ``target_epsilon`` in central, local or distributed mode (and
        the model's ``dimension`` for distributed mode), also refuse a
        budget that not even one round of the expected size fits.

        Raises
        ------
        ConfigError
            If one round already costs more than ``target_epsilon``.
        """
        self.base.check(num_available)
        target = self.privacy.target_epsilon
        if target is None:
            return
        first = self.mechanism.first_round_epsilon(self, dimension)
        if first is not None and first > target:
            raise ConfigError(
                f"one round alone costs epsilon {first:.4g}, above target_epsilon = "
                f"{target:g} (delta = {self.privacy.delta:g}): raise noise_multiplier "
                "or target_epsilon"
            )

    def configure(
        self,
        state: ServerState,
        available: Sequence[ClientId],
        *,
        rng: np.random.Generator,
    ) -> RoundPlan:
        """Sample the round's clients and build its mechanism.

        Raises
        ------
        PrivacyBudgetExceeded
            If this round would take ε above ``target_epsilon``.
        """
        mechanism = self.mechanism
        record = self._record(state)
        mechanism.check_before_sampling(self, record)
        # With secure_rng who takes part is as secret as the noise (sampling's
        # amplification assumes it): drawn from the OS-keyed keystream.
        clients = self.sampler.sample(
            available,
            round_idx=state.round_idx,
            rng=SecureRandom() if self.privacy.secure_rng else rng,
        )
        mechanism.check_sampled(self, record, clients, state.params.spec.size)
        local = replace(self.base.local, round_idx=state.round_idx)
        options = mechanism.client_options(self)
        if options:
            local = replace(local, options={**local.options, **options})
        return RoundPlan(
            round_idx=state.round_idx,
            clients=tuple(clients),
            fit_config=local,
            min_clients=mechanism.min_clients(self),
            num_available=len(available),
            aggregator=mechanism.round_aggregator(self, record),
        )

    def weight(self, update: ClientUpdate) -> float:
        """An update's aggregation weight.

        Central and distributed: 1 (equal weights bound each client's
        influence); local: 1 (a local-DP client reports no example count,
        which would leave it un-noised); record: FedAvg's weight.
        """
        return self.mechanism.weight(self, update)

    def apply(
        self,
        state: ServerState,
        aggregate: Aggregate,
        *,
        plan: RoundPlan,
        rng: np.random.Generator,
    ) -> ServerState:
        """Server step, then record the round's DP event and update ε."""
        new = self.base.apply(state, aggregate, plan=plan, rng=rng)
        record = self._spend(state, plan, aggregate)
        return new.evolve(metadata={**new.metadata, "privacy": record})

    def charge_before(self, state: ServerState, plan: RoundPlan) -> ServerState:
        """``state`` charged for ``plan``'s round before its clients train.

        Central, local and record mode: :meth:`charge_unfinished` (the
        round's own cost). Distributed mode, whose release is known only
        once the sum is unmasked: every release the round could make that no
        other bounds at every RDP order (:meth:`DistributedMechanism.
        releases`: usually one, which then bounds them all), each charged
        once to every sampled client, which costs at least what the round
        will.
        """
        return self.mechanism.charge_before(self, state, plan)

    def charge_unfinished(self, state: ServerState, plan: RoundPlan) -> ServerState:
        """``state`` with the cost of a round that ended without an update.

        Conservative: central mode charges the round's Gaussian event (the
        clients were sampled and may have sent their updates); local and
        record mode charge every sampled client, which may have trained and
        released its update before the round aborted. Distributed mode
        charges nothing: its round aborts before the sum is unmasked, so
        nothing was released.
        """
        if not self.mechanism.charges_unfinished:
            return state
        record = self._spend(state, plan, None)
        return state.evolve(metadata={**state.metadata, "privacy": record})

    def released(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """What of a round's server-side metrics a DP run writes out.

        Nothing computed from the clients' data without noise leaves: no
        training loss or accuracy (un-noised averages of the clients'
        data), no per-round wall time (how long the sampled clients took).
        Central mode also keeps the clients that took part secret (Poisson
        sampling's amplification assumes the sample is), so it releases
        only the noised aggregate's own measurements (``dp/*``,
        ``update_norm``) and whether secure aggregation aborted, not the
        counts of sampled, failed, rejected or surviving clients. Federated
        evaluation (``federated_*``) is present only when the user turned
        it on, and is outside the guarantee (the summary says so).
        """
        return self.mechanism.released(metrics)

    def _spend(
        self, state: ServerState, plan: RoundPlan, aggregate: Aggregate | None
    ) -> dict[str, Any]:
        """The privacy record after ``plan``'s round (``aggregate``: None if none)."""
        record = dict(self._record(state))
        self.mechanism.spend(self, record, state, plan, aggregate)
        record["rounds"] = int(record.get("rounds", 0)) + 1
        return record

    # --- accounting ------------------------------------------------------------

    def epsilon_of(self, state: ServerState) -> float:
        """ε spent up to ``state`` (0 before the first round)."""
        return float(self._record(state).get("epsilon", 0.0))

    def _fresh(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "mode": self.privacy.mode,
            "accountant": self.privacy.accountant,
            "delta": self.privacy.delta,
            "noise_multiplier": self.privacy.noise_multiplier,
            "epsilon": 0.0,
            "rounds": 0,
            "clip_norm": self.privacy.clip_norm,
        }
        record.update(self.mechanism.fresh(self))
        return record

    def _record(self, state: ServerState) -> Mapping[str, Any]:
        record = state.metadata.get("privacy")
        if not isinstance(record, Mapping):
            return self._fresh()
        return record
