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

Every round records its exact DP event in a :class:`PrivacyLedger` kept in
``ServerState.metadata["privacy"]``, so checkpoints carry the accountant and
a resumed run reports the same ε. With ``target_epsilon``, :meth:`configure`
raises :class:`~fedshield.errors.PrivacyBudgetExceeded` before a round that
would take ε above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

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
    "DistributedSum",
    "DpFedAvg",
    "DpMean",
    "PoissonSampler",
    "PrivacySettings",
    "adaptive_noise_split",
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
        ``"central"``, ``"local"``, ``"record"`` or ``"distributed"``.
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

    mode: Literal["central", "local", "record", "distributed"]
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

    def __post_init__(self) -> None:
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
        if self.mode == "distributed":
            self.distributed()  # validates the bits and beta

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


@dataclass(frozen=True)
class DpFedAvg:
    """FedAvg with user-level differential privacy (central or local).

    Composed of a :class:`FedAvg` (local training, server optimizer,
    ``min_clients``), a client sampler (:class:`PoissonSampler` by default,
    a :class:`CountSampler` for fixed-size sampling, accounted as sampling
    without replacement) and the mechanism of :class:`PrivacySettings`.

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
        if self.privacy.mode == "record":
            if not self.client_sizes:
                raise ConfigError("record mode needs each client's number of records")
            most = max(self.client_sizes.values())
            if self.privacy.delta >= 1.0 / most:
                raise ConfigError(
                    f"[privacy] delta = {self.privacy.delta:g} is not below 1/n = "
                    f"1/{most} (n: the records of the largest client, the units "
                    f"protected in record mode); choose delta < {1.0 / most:.3g}"
                )
        elif self.privacy.delta >= 1.0 / self.num_clients:
            raise ConfigError(
                f"[privacy] delta = {self.privacy.delta:g} is not below 1/N = "
                f"1/{self.num_clients} (N: the clients, the units protected in "
                f"{self.privacy.mode} mode); choose delta < "
                f"{1.0 / self.num_clients:.3g}"
            )
        if self.privacy.mode == "record" and self.privacy.accountant == "rdp":
            raise ConfigError(
                "record mode is accounted under replace-one, which only the PLD "
                'accountant supports for Poisson sampling: set accountant = "pld"'
            )
        if (
            isinstance(self.sampler, CountSampler)
            and self.privacy.accountant != "rdp"
            # Only central mode accounts the sampling of clients (local and
            # record mode charge each client for the rounds it took part in,
            # distributed mode claims no amplification), so only central
            # mode needs the RDP accountant for fixed-size sampling.
            and self.privacy.mode == "central"
        ):
            raise ConfigError(
                'fixed-size client sampling (sampling = "fixed") is accounted only '
                'by the RDP accountant: set [privacy] accountant = "rdp", or use '
                'sampling = "poisson"'
            )
        self._split()  # validates adaptive clipping's noise split

    # --- the strategy interface ---------------------------------------------

    @property
    def aggregator(self) -> Aggregator:
        """The aggregation rule before any round.

        Central mode: a :class:`DpMean` at the initial clip norm (each round
        builds its own, see :meth:`configure`); local and record mode:
        FedAvg's mean.
        """
        if self.privacy.mode == "distributed":
            return DistributedSum(self.privacy.distributed())
        if self.privacy.mode != "central":
            return self.base.aggregator
        return self._dp_mean(self.privacy.clip_norm)

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
        if target is None or self.privacy.mode == "record":
            return
        if self.privacy.mode == "central":
            first = epsilon(
                [self._central_event()], self.privacy.delta, self.privacy.accountant
            )
        elif self.privacy.mode == "local":
            first = self._local_epsilon(1)
        elif dimension is not None:
            event = self._next_distributed_event(dimension)
            first = epsilon([event], self.privacy.delta, self.privacy.accountant)
        else:
            return
        if first > target:
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
        record = self._record(state)
        if self.privacy.mode != "distributed":
            self._check_budget(record)
        # With secure_rng who takes part is as secret as the noise (sampling's
        # amplification assumes it): drawn from the OS-keyed keystream.
        clients = self.sampler.sample(
            available,
            round_idx=state.round_idx,
            rng=SecureRandom() if self.privacy.secure_rng else rng,
        )
        if self.privacy.mode == "record":
            self._check_record_budget(record, clients)
        elif self.privacy.mode == "distributed" and clients:
            # Checked for the round as sampled and for every smaller number
            # of clients that may finish training (its own granularity and
            # noise share: a smaller round can cost more).
            self._check_distributed_budget(record, state.params.spec.size, len(clients))
        local = replace(self.base.local, round_idx=state.round_idx)
        aggregator: Aggregator | None = None
        if self.privacy.mode == "central":
            aggregator = self._dp_mean(float(record["clip_norm"]))
        elif self.privacy.mode == "distributed":
            aggregator = DistributedSum(self.privacy.distributed())
        elif self.privacy.mode == "record":
            options = dict(local.options)
            options.update(
                {
                    DP_SGD_CLIP: self.privacy.clip_norm,
                    DP_SGD_SIGMA: self.privacy.noise_multiplier,
                    DP_SGD_SECURE: self.privacy.secure_rng,
                }
            )
            local = replace(local, options=options)
        else:
            options = dict(local.options)
            options.update(
                {
                    LOCAL_CLIP: self.privacy.clip_norm,
                    LOCAL_SIGMA: self.privacy.noise_multiplier,
                }
            )
            local = replace(local, options=options)
        return RoundPlan(
            round_idx=state.round_idx,
            clients=tuple(clients),
            fit_config=local,
            # Central mode never aborts for too few updates: whether a round
            # had enough would be a release of the clients' count outside
            # the guarantee. With its fixed denominator the round releases
            # the noised sum of whoever took part (DP-FedAvg's algorithm);
            # min_clients is checked against the expected sample (check()).
            min_clients=0 if self.privacy.mode == "central" else self.base.min_clients,
            num_available=len(available),
            aggregator=aggregator,
        )

    def weight(self, update: ClientUpdate) -> float:
        """An update's aggregation weight.

        Central and distributed: 1 (equal weights bound each client's
        influence); local: 1 (a local-DP client reports no example count,
        which would leave it un-noised); record: FedAvg's weight.
        """
        if self.privacy.mode in ("central", "distributed", "local"):
            return 1.0
        return self.base.weight(update)

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
        other bounds at every RDP order (:meth:`_distributed_releases`:
        usually one, which then bounds them all), each charged once to every
        sampled client, which costs at least what the round will.
        """
        if self.privacy.mode != "distributed":
            return self.charge_unfinished(state, plan)
        if not plan.clients:
            return state
        record = dict(self._record(state))
        releases = self._distributed_releases(
            state.params.spec.size, len(plan.clients), strict=False
        )
        self._charge_distributed(record, plan, releases)
        record["rounds"] = int(record.get("rounds", 0)) + 1
        return state.evolve(metadata={**state.metadata, "privacy": record})

    def charge_unfinished(self, state: ServerState, plan: RoundPlan) -> ServerState:
        """``state`` with the cost of a round that ended without an update.

        Conservative: central mode charges the round's Gaussian event (the
        clients were sampled and may have sent their updates); local and
        record mode charge every sampled client, which may have trained and
        released its update before the round aborted. Distributed mode
        charges nothing: its round aborts before the sum is unmasked, so
        nothing was released.
        """
        if self.privacy.mode == "distributed":
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
        if self.privacy.mode == "central":
            return {
                key: value
                for key, value in metrics.items()
                if key.startswith(("dp/", "federated_"))
                or key in ("update_norm", "secagg/aborted")
            }
        return {
            key: value
            for key, value in metrics.items()
            if not key.startswith("train_") and key != "seconds"
        }

    def _spend(
        self, state: ServerState, plan: RoundPlan, aggregate: Aggregate | None
    ) -> dict[str, Any]:
        """The privacy record after ``plan``'s round (``aggregate``: None if none)."""
        record = dict(self._record(state))
        if self.privacy.mode == "central":
            ledger = self._ledger(record["ledger"])
            ledger.record(state.round_idx, self._central_event())
            record["ledger"] = ledger.to_json()
            self._cache["json"], self._cache["ledger"] = record["ledger"], ledger
            record["epsilon"] = ledger.epsilon()
            fraction = (
                aggregate.measurements.get("dp/unclipped_fraction")
                if aggregate is not None
                else None
            )
            if self.privacy.target_quantile is not None and fraction is not None:
                step = -self.privacy.clip_learning_rate * (
                    fraction - self.privacy.target_quantile
                )
                record["clip_norm"] = float(record["clip_norm"]) * math.exp(step)
        elif self.privacy.mode == "distributed":
            assert aggregate is not None  # an unfinished round costs nothing
            self._record_distributed(record, plan, aggregate)
        elif self.privacy.mode == "record":
            # Every sampled client is accounted, whether or not its update
            # arrived: it may have trained (and spent) before dropping out.
            counts = dict(record["participation"])
            spent = dict(record["client_epsilon"])
            for cid in plan.clients:
                counts[cid] = int(counts.get(cid, 0)) + 1
                spent[cid] = self._record_epsilon(cid, counts[cid])
            record["participation"] = counts
            record["client_epsilon"] = spent
            record["epsilon"] = max(spent.values(), default=0.0)
        else:
            counts = dict(record["participation"])
            for cid in plan.clients:
                counts[cid] = int(counts.get(cid, 0)) + 1
            record["participation"] = counts
            record["epsilon"] = self._local_epsilon(max(counts.values(), default=0))
        record["rounds"] = int(record.get("rounds", 0)) + 1
        return record

    # --- accounting ------------------------------------------------------------

    def epsilon_of(self, state: ServerState) -> float:
        """ε spent up to ``state`` (0 before the first round)."""
        return float(self._record(state).get("epsilon", 0.0))

    def _central_event(self) -> DpEventSpec:
        sigma = self.privacy.noise_multiplier
        if isinstance(self.sampler, PoissonSampler):
            return DpEventSpec(
                noise_multiplier=sigma,
                sampling="poisson",
                sampling_rate=self.sampler.rate,
            )
        assert isinstance(self.sampler, CountSampler)
        # Fixed-size sampling is accounted under replace-one neighbours:
        # replacing one client moves the clipped sum by up to 2C (and the
        # centred unclipped count by up to 1, twice its add/remove
        # sensitivity), against noise σC, so the event's multiplier is σ/2.
        return DpEventSpec(
            noise_multiplier=sigma / 2.0,
            sampling="fixed",
            population=self.num_clients,
            sample_size=min(self.sampler.count, self.num_clients),
        )

    def _record_distributed(
        self, record: dict[str, Any], plan: RoundPlan, aggregate: Aggregate
    ) -> None:
        """Account a completed distributed round for every sampled client."""
        self._charge_distributed(
            record, plan, [_distributed_event(aggregate.measurements)]
        )

    def _charge_distributed(
        self, record: dict[str, Any], plan: RoundPlan, specs: Sequence[DpEventSpec]
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
        record["epsilon"] = self._distributed_epsilon(events, counts.values())

    def _distributed_epsilon(
        self,
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
        return ddg_worst_epsilon(specs, counts, self.privacy.delta, then=then)

    def _next_distributed_event(
        self, dimension: int, num_clients: int | None = None
    ) -> DpEventSpec:
        """The costliest release, alone, of a round of ``num_clients``.

        For a round of ``num_clients`` (default: the expected number): of
        every release it can make (:meth:`_distributed_releases`), the one
        whose single round costs the most ε.
        """
        n = max(2, num_clients or round(self._expected))
        events = self._distributed_releases(dimension, n)
        costs = [epsilon([e], self.privacy.delta) for e in events]
        return events[costs.index(max(costs))]

    def _distributed_releases(
        self, dimension: int, num_clients: int, *, strict: bool = True
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
        distributed = self.privacy.distributed()

        def parameters(trained: int) -> Any:
            t = (
                self.threshold_for(trained)
                if self.threshold_for is not None
                else trained
            )
            return distributed.parameters(
                dimension=dimension, num_clients=trained, threshold=t
            )

        if strict:
            parameters(num_clients)  # the round as sampled: refused if it cannot run
        built: dict[int, tuple[DpEventSpec, ...]] = self._cache.setdefault(
            f"ddg_releases/{dimension}", {}
        )
        if num_clients in built:
            return built[num_clients]
        lowest = max(2, self.base.min_clients)
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

    def _local_epsilon(self, participations: int) -> float:
        if participations == 0:
            return 0.0
        # Sensitivity 2C over noise σC: the multiplier of one release is σ/2.
        spec = DpEventSpec(
            noise_multiplier=self.privacy.noise_multiplier / 2.0, count=participations
        )
        return epsilon([spec], self.privacy.delta, self.privacy.accountant)

    def _ledger(self, data: Mapping[str, Any]) -> PrivacyLedger:
        # The ledger this strategy wrote last round, unless the state came
        # from elsewhere (a checkpoint): then rebuilt from its JSON.
        if self._cache.get("json") is data:
            ledger: PrivacyLedger = self._cache["ledger"]
            return ledger
        return PrivacyLedger.from_json(data)

    def _record_epsilon(self, client_id: ClientId, rounds: int) -> float:
        """ε of one client's records after ``rounds`` rounds of DP-SGD."""
        assert self.client_sizes is not None
        local = self.base.local
        spec = record_level_event(
            int(self.client_sizes[client_id]),
            batch_size=local.batch_size,
            epochs=local.epochs,
            noise_multiplier=self.privacy.noise_multiplier,
            rounds=rounds,
        )
        key = repr(spec)
        cached = self._cache.setdefault("record", {}).get(key)
        if cached is None:
            cached = epsilon([spec], self.privacy.delta, self.privacy.accountant)
            self._cache["record"][key] = cached
        return float(cached)

    def _check_record_budget(
        self, record: Mapping[str, Any], clients: Sequence[ClientId]
    ) -> None:
        target = self.privacy.target_epsilon
        if target is None:
            return
        counts = record["participation"]
        for cid in clients:
            after = self._record_epsilon(cid, int(counts.get(cid, 0)) + 1)
            if after > target:
                raise PrivacyBudgetExceeded(
                    f"the privacy budget is spent: one more round would take "
                    f"client {cid!r}'s epsilon to {after:.4g}, above "
                    f"target_epsilon = {target:g} (delta = {self.privacy.delta:g})"
                )

    def _check_distributed_budget(
        self, record: Mapping[str, Any], dimension: int, num_clients: int
    ) -> None:
        target = self.privacy.target_epsilon
        if target is None:
            return
        # The worst case: any client takes part again, in a round built for
        # any number of clients that trained and completed by any number of
        # survivors (ε is monotone in neither, so every pair is checked).
        releases = self._distributed_releases(dimension, max(2, num_clients))
        histograms = list(dict(record["participation"]).values()) or [{}]
        after = self._distributed_epsilon(record["events"], histograms, releases)
        self._refuse_above(target, record, after)

    def _refuse_above(
        self, target: float, record: Mapping[str, Any], after: float
    ) -> None:
        if after > target:
            raise PrivacyBudgetExceeded(
                f"the privacy budget is spent: one more round would take epsilon "
                f"from {float(record.get('epsilon', 0.0)):.4g} to {after:.4g}, above "
                f"target_epsilon = {target:g} (delta = {self.privacy.delta:g})"
            )

    def _check_budget(self, record: Mapping[str, Any]) -> None:
        target = self.privacy.target_epsilon
        if target is None or self.privacy.mode in ("record", "distributed"):
            return
        if self.privacy.mode == "central":
            ledger = self._ledger(record["ledger"])
            after = ledger.epsilon_if(self._central_event())
        else:
            # The worst case: a client that took part most takes part again.
            most = max(dict(record["participation"]).values(), default=0)
            after = self._local_epsilon(most + 1)
        self._refuse_above(target, record, after)

    def _fresh(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "mode": self.privacy.mode,
            "accountant": self.privacy.accountant,
            "delta": self.privacy.delta,
            "noise_multiplier": self.privacy.noise_multiplier,
            "epsilon": 0.0,
            "rounds": 0,
        }
        if self.privacy.mode == "central":
            record["clip_norm"] = self.privacy.clip_norm
            record["ledger"] = PrivacyLedger(
                self.privacy.accountant, self.privacy.delta
            ).to_json()
        else:
            record["clip_norm"] = self.privacy.clip_norm
            record["participation"] = {}
        if self.privacy.mode == "record":
            record["client_epsilon"] = {}
        if self.privacy.mode == "distributed":
            record["events"] = []
        return record

    def _record(self, state: ServerState) -> Mapping[str, Any]:
        record = state.metadata.get("privacy")
        if not isinstance(record, Mapping):
            return self._fresh()
        return record

    def _split(self) -> tuple[float, float | None]:
        """(σ_Δ, σ_b): the update's and the count's noise multipliers."""
        sigma = self.privacy.noise_multiplier
        if self.privacy.mode != "central" or self.privacy.target_quantile is None:
            return sigma, None
        count_std = self.privacy.clipped_count_stddev
        if count_std is None:
            count_std = self._expected / 20.0
        return adaptive_noise_split(sigma, count_std), count_std

    def _dp_mean(self, clip_norm: float) -> DpMean:
        sigma_delta, count_std = self._split()
        return DpMean(
            clip_norm=clip_norm,
            noise_std=sigma_delta * clip_norm,
            denominator=self._expected,
            count_stddev=count_std,
            secure_rng=self.privacy.secure_rng,
        )
