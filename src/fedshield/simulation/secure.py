"""Secure aggregation's server half, and injected dropouts, in a round.

Under ``[secagg]`` a round's clients keep their updates: stage ``fit``
returns receipts, and the protocol's stages follow (SecAgg or SecAgg+, the
sans-I/O state machines of :mod:`fedshield.secagg.protocol`).
:class:`SecureSumRound` is the server's half: it announces the round's public
plan with the first stage, carries the protocol's bytes between the
:class:`~fedshield.secagg.protocol.SecAggServer` and the clients, stage by
stage, and decodes the unmasked sum. The clients' halves
(:mod:`fedshield.simulation.secure_client`) run wherever the backend holds
the clients: in this process, a worker process, a Ray actor, or later a
remote site.

Every client contributes ``[w_k Δ_k, w_k, o_k, w_k ℓ_k, w_k, w_k a_k,
w_k]``: its update weighted by ``w_k = n_k / max_examples`` (FedAvg's
weight, scaled to at most 1 so that the encoding's range bounds it), the
weight itself, the count ``o_k`` of its values that fell outside the
encoding's range (clipped to it, never silently: the sum of the counts is
reported), and its training loss and accuracy weighted likewise (each
extra word scaled into the range by a public bound, so none is clipped).
The server divides the summed update by the summed weight: the weighted
FedAvg mean, learned only in sum, as are ``train_loss`` and
``train_accuracy``. With distributed DP the vector is the noised update
alone, and no training metrics are reported.

:func:`secure_sum` runs both halves in this process over given updates, for
tests and benchmarks of the protocol alone.

:class:`Faults` draws, for each sampled client, whether it drops out and at
which stage (``[faults] dropout = p``), so that a user can watch the
protocol recover: a client that drops at a stage sends nothing from that
stage on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedshield.core import Aggregate, ClientId, ClientUpdate, Params, ParamSpec
from fedshield.errors import ConfigError, ProtocolError
from fedshield.simulation.protocol import (
    ClientFailure,
    FailureKind,
    FitReceipt,
    StageReply,
    StageRequest,
)
from fedshield.simulation.secure_client import (
    EXTRA_WORDS,
    LOSS_BOUND,
    METRIC_WORDS,
    SECURE_STAGES,
    InputPlan,
    SecureSetup,
    SecureStageIns,
    plan_digest,
)
from fedshield.strategies.secure_inputs import SecureInput

if TYPE_CHECKING:
    from fedshield.privacy.distributed import DistributedDp
    from fedshield.secagg.protocol import SecAggConfig, SecAggServer

__all__ = [
    "EXTRA_WORDS",
    "LOSS_BOUND",
    "Faults",
    "SecureAggregation",
    "SecureSumResult",
    "SecureSumRound",
    "secure_sum",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    """Injected dropouts: each sampled client drops with ``dropout`` probability.

    Parameters
    ----------
    dropout
        Probability in [0, 1) that a sampled client drops out in a round.
    """

    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"[faults] dropout must be in [0, 1); got {self.dropout}")

    def draw(
        self,
        clients: Sequence[ClientId],
        stages: Sequence[str],
        *,
        seed: int,
        round_idx: int,
    ) -> dict[ClientId, str]:
        """The stage at which each dropping client drops (uniform over ``stages``).

        Each client's fate comes from its own stream, ``derive_rng(seed,
        "faults", round_idx, client_id)``: whether a client drops does not
        depend on which other clients were sampled (a client added to the
        sample changes no other client's fate).
        """
        from fedshield.core import derive_rng

        if self.dropout == 0.0 or not stages:
            return {}
        drops: dict[ClientId, str] = {}
        for cid in clients:
            rng = derive_rng(seed, "faults", round_idx, cid)
            if rng.random() < self.dropout:
                drops[cid] = stages[int(rng.integers(len(stages)))]
        return drops


@dataclass(frozen=True)
class SecureAggregation:
    """What ``[secagg]`` asks for.

    Parameters
    ----------
    protocol
        ``"secagg"`` (Bonawitz et al. 2017, every pair of clients) or
        ``"secagg+"`` (Bell et al. 2020, a sparse random graph).
    threshold
        Fewest clients needed at every stage: a fraction of the round's
        clients in (0.5, 1] or, when > 1, a number of clients. None (the
        default): ``ceil(2 n / 3)``, and with ``malicious`` the smallest
        ``t > 2 n / 3`` (``2 n // 3 + 1``, Bonawitz et al. §6), which
        tolerates fewer than ``n / 3`` clients colluding with the server
        (:meth:`~fedshield.secagg.protocol.SecAggConfig.colluders_tolerated`).
    clip
        Range of each encoded value (``w_k Δ_k``): values outside
        ``[-clip, clip]`` are clipped and counted.
    precision_bits
        Fixed-point precision: ``2^precision_bits`` steps per ``clip``.
    neighbours
        SecAgg+'s ``k`` (None: chosen from the security parameter and the
        expected dropout). Below the secure minimum it is refused unless
        ``allow_insecure_neighbours``.
    malicious
        Signed key advertisements and the consistency check (Bonawitz §6).
        :meth:`check` logs a warning when ``2 t - n <= 1``: the protocol
        then tolerates no client colluding with the server.
    security_parameter
        SecAgg+'s statistical security parameter ``σ`` (bits).
    expected_dropout
        SecAgg+'s expected dropout rate, for choosing ``k``.
    allow_insecure_neighbours
        Accept an explicit ``neighbours`` below the secure minimum
        (:func:`~fedshield.secagg.protocol.check_neighbours`).
    workers
        With an in-process backend, worker processes that take over every
        other client's half after training (None: one on two or more cores
        from 32 clients in a round, else none; 0: all in the simulating
        process; see :class:`~fedshield.simulation.backends.offload.
        SecureOffload`).
    """

    protocol: Literal["secagg", "secagg+"] = "secagg"
    threshold: float | None = None
    clip: float = 1.0
    precision_bits: int = 24
    neighbours: int | None = None
    malicious: bool = False
    security_parameter: int = 40
    expected_dropout: float = 0.1
    workers: int | None = None
    allow_insecure_neighbours: bool = False

    def threshold_for(self, num_clients: int) -> int:
        """The threshold ``t`` for a round of ``num_clients`` clients.

        Raises
        ------
        ConfigError
            If ``t`` would exceed the clients, or be at most half of them
            (two disjoint halves could then each pass for the survivors).
        """
        if self.threshold is None:
            n = num_clients
            t = 2 * n // 3 + 1 if self.malicious else -(-2 * n // 3)
        elif self.threshold <= 1.0:
            t = math.ceil(self.threshold * num_clients - 1e-9)
        else:
            t = int(self.threshold)
        if t > num_clients:
            raise ConfigError(
                f"[secagg] threshold {t} is above the {num_clients} clients of the "
                "round; lower the threshold or sample more clients"
            )
        if 2 * t <= num_clients or t < 2:
            raise ConfigError(
                f"[secagg] threshold {t} of {num_clients} clients is weak: it must "
                "exceed half the clients (and be >= 2), or two disjoint groups could "
                "each pass for the survivors; raise it"
            )
        return t

    def protocol_config(
        self, num_clients: int, modulus_bits: int, vector_length: int
    ) -> SecAggConfig:
        """The protocol's configuration for a round of ``num_clients``."""
        from fedshield.secagg.protocol import SecAggConfig

        return SecAggConfig(
            protocol=self.protocol,
            threshold=self.threshold_for(num_clients),
            modulus_bits=modulus_bits,
            vector_length=vector_length,
            neighbours=self.neighbours,
            malicious=self.malicious,
            security_parameter=self.security_parameter,
            expected_dropout=self.expected_dropout,
            allow_insecure_neighbours=self.allow_insecure_neighbours,
        )

    def check(
        self,
        num_clients: int,
        vector_length: int,
        distributed: DistributedDp | None = None,
    ) -> None:
        """Refuse, before round 1, a setup no round of ``num_clients`` can run.

        ``vector_length`` is the model's size plus :data:`EXTRA_WORDS` (the
        weight, the out-of-range count and the training metrics ride along);
        with ``distributed`` DP the vector is the model's rotated, padded
        length instead.

        Raises
        ------
        ConfigError
            If the threshold is too high or weak for ``num_clients``, the
            modulus cannot hold ``num_clients`` sums, SecAgg+ finds no
            neighbour count that meets its bounds, or distributed DP's
            modulus is too small for ``num_clients`` and the model.
        """
        from fedshield.secagg.encoding import choose_encoding

        if distributed is not None:
            params = distributed.parameters(
                dimension=vector_length - EXTRA_WORDS,
                num_clients=num_clients,
                threshold=self.threshold_for(num_clients),
            )
            bits, vector_length = params.modulus_bits, params.padded
        else:
            bits = choose_encoding(
                num_clients, self.clip, precision_bits=self.precision_bits
            ).modulus_bits
        config = self.protocol_config(num_clients, bits, vector_length)
        config.check_clients(num_clients)
        config.neighbour_count(num_clients)
        if self.malicious and config.colluders_tolerated(num_clients) == 0:
            t = config.threshold
            logger.warning(
                "[secagg] malicious = true with threshold %d of %d clients "
                "(2t - n = %d): a malicious server colluding with a single client "
                "could unmask an honest client's update (it needs 2t - n > n_C "
                "colluders, Bonawitz et al. section 6); raise the threshold, e.g. "
                "leave it unset for %d (above 2n/3)",
                t,
                num_clients,
                2 * t - num_clients,
                2 * num_clients // 3 + 1,
            )

    def stages(self) -> tuple[str, ...]:
        """The protocol's stages in order (for fault injection)."""
        return tuple(
            s for s in SECURE_STAGES if self.malicious or s != "consistency_check"
        )


@dataclass(frozen=True)
class SecureSumResult:
    """The outcome of one secure aggregation."""

    aggregate: Aggregate | None
    metrics: dict[str, float]
    dropped: dict[ClientId, str]
    message: str = ""
    total: np.ndarray | None = None
    """The unmasked sum of the (weighted or clipped) updates, float64."""
    centred_unclipped: float = 0.0
    """With client-side clipping: ``Σ_k (1[‖Δ_k‖ ≤ C] − ½)``, each client's
    bit centred so that one client moves it by at most ½ (adaptive
    clipping's count; the sensitivity its noise assumes)."""
    failures: tuple[ClientFailure, ...] = ()
    """Clients whose half failed at a stage (error, timeout, refusal)."""


class SecureSumRound:
    """The server's half of one secure aggregation, as stages (sans-I/O).

    It never sees an update: the clients that trained hold theirs
    (:func:`~fedshield.simulation.secure_client.hold_update`); it announces
    the round's public :class:`~fedshield.simulation.secure_client.
    SecureSetup` with the protocol's first stage, carries the protocol's
    bytes between the :class:`~fedshield.secagg.protocol.SecAggServer` and
    the clients' halves stage by stage, and decodes the unmasked sum.

    Parameters
    ----------
    settings
        The protocol and the encoding (``[secagg]``).
    spec
        Layout of the model's parameters.
    round_idx
        The round.
    receipts
        The clients that trained and hold an update, with their receipts.
    transform
        What the round's rule asks each client to do to its update.
    max_examples
        FedAvg's weights are ``n_k / max_examples``.
    drop_at
        Injected faults: the stage at which a client drops.
    rng
        The server's randomness (distributed DP's public rotation seed).
    timeout_s
        Each stage's deadline.
    replacements
        Simulated colluders: the update each one sends instead of its own.
    verify_keys
        Malicious mode: the clients' keys from the key directory (None:
        from their receipts).
    entropy
        The SecAgg server's randomness for the round, from a secret the
        server keeps (None: the operating system's): a networked server
        replaying a round after a crash sends the same requests again.
    """

    def __init__(
        self,
        *,
        settings: SecureAggregation,
        spec: ParamSpec,
        round_idx: int,
        receipts: Mapping[ClientId, FitReceipt],
        transform: SecureInput,
        max_examples: int,
        drop_at: Mapping[ClientId, str],
        rng: np.random.Generator,
        timeout_s: float | None = None,
        replacements: Mapping[ClientId, ClientUpdate] | None = None,
        verify_keys: Mapping[ClientId, bytes] | None = None,
        entropy: bytes | None = None,
    ) -> None:
        self._entropy = entropy
        self._settings = settings
        self._spec = spec
        self._round_idx = round_idx
        self._receipts = dict(receipts)
        self._transform = transform
        self._max_examples = max(1, max_examples)
        self._drop_at = drop_at
        self._rng = rng
        self._timeout_s = timeout_s
        self._replacements = dict(replacements or {})
        self._verify_keys = verify_keys
        self._clients = sorted(self._receipts)
        self._metrics: dict[str, float] = {"secagg/clients": float(len(self._clients))}
        self._dropped: dict[ClientId, str] = {}
        self._failures: list[ClientFailure] = []
        self._server: SecAggServer | None = None
        self._setups: dict[ClientId, SecureSetup] | None = None
        self._plan: InputPlan | None = None
        self._threshold = 0
        self._asked: tuple[str, frozenset[ClientId]] = ("", frozenset())

    # -- the stages -------------------------------------------------------------

    def start(self) -> StageRequest | SecureSumResult:
        """The protocol's first stage (or the result when it cannot start)."""
        n = len(self._clients)
        if n < 2:
            return self._abort(
                f"secure aggregation needs at least 2 clients; {n} trained"
            )
        try:
            self._threshold = self._settings.threshold_for(n)
            config, plan = self._configure(n)
        except ConfigError as err:  # e.g. SecAgg+ finds no k for this many
            return self._abort(str(err))
        from fedshield.secagg.protocol import SecAggServer

        table: dict[ClientId, bytes] | None = None
        if config.malicious:
            known = self._verify_keys
            if known is None:  # the clients' word, in their receipts
                known = {cid: self._receipts[cid].verify_key for cid in self._clients}
            unknown = [cid for cid in self._clients if cid not in known]
            if unknown:
                return self._abort(
                    f"no verification key for {unknown[:3]} in the key directory"
                )
            table = {cid: known[cid] for cid in self._clients}
        # Every party binds the plan into the round: clients shown different
        # plans cannot agree on it (malicious mode checks every signature).
        config = replace(config, context=plan_digest(plan))
        self._plan = plan
        self._server = SecAggServer(
            config,
            self._round_idx,
            self._clients,
            verify_keys=table,
            entropy=self._entropy,
        )
        replacements = self._replacements
        # Over a network the clients attest their keys with their
        # certificates; the server relays the attestations unchanged.
        attestations = {
            cid: self._receipts[cid].attestation
            for cid in self._clients
            if self._receipts[cid].attestation
        }
        self._setups = {
            cid: SecureSetup(
                self._round_idx,
                config,
                plan,
                table or {},
                replacements[cid].delta if cid in replacements else None,
                attestations if table else {},
            )
            for cid in self._clients
        }
        return self._next()

    def receive(self, replies: Iterable[StageReply]) -> StageRequest | SecureSumResult:
        """Hand one stage's replies to the protocol; the next stage or the result."""
        server = self._server
        assert server is not None
        stage, asked = self._asked
        for reply in replies:
            cid = reply.client_id
            if cid not in asked:
                logger.warning("ignoring unexpected reply from %r", cid)
                continue
            if reply.failure is not None:
                self._failures.append(reply.failure)
                self._dropped.setdefault(cid, stage)
                continue
            if not isinstance(reply.value, bytes):
                self._refused(cid, f"sent {type(reply.value).__name__}, not bytes")
                continue
            try:
                server.receive_one(cid, reply.value)
            except ProtocolError as err:
                self._refused(cid, str(err))
        self._record_refusals()
        try:
            server.end_stage()
        except ProtocolError as err:
            return self._abort(str(err))
        return self._next()

    def _record_refusals(self) -> None:
        """The protocol's own refusals (a bad signature...) as rejected failures."""
        server = self._server
        assert server is not None
        for cid, why in server.refused.items():
            if cid not in self._dropped:
                self._refused(cid, why)

    def _next(self) -> StageRequest | SecureSumResult:
        server = self._server
        assert server is not None
        while server.stage not in ("done", "aborted"):
            stage = server.stage
            messages: dict[ClientId, SecureStageIns] = {}
            setups = self._setups
            for cid, request in server.requests().items():
                if self._drop_at.get(cid) == stage and cid not in self._dropped:
                    self._dropped[cid] = stage  # injected: it sends nothing more
                if cid in self._dropped:
                    continue
                setup = setups.get(cid) if setups is not None else None
                messages[cid] = SecureStageIns(request, setup)
            self._setups = None  # the setup rides with the first stage only
            if messages:
                self._asked = (stage, frozenset(messages))
                return StageRequest(
                    stage=stage,
                    round_idx=self._round_idx,
                    messages=messages,
                    timeout_s=self._timeout_s,
                )
            try:
                server.end_stage()
            except ProtocolError as err:
                return self._abort(str(err))
        return self._finish()

    # -- setup and result ---------------------------------------------------------

    def _configure(self, n: int) -> tuple[SecAggConfig, InputPlan]:
        """The protocol's configuration and the clients' public input plan."""
        transform = self._transform
        size = self._spec.size
        if transform.kind == "distributed":
            assert transform.distributed is not None
            ddp = transform.distributed.parameters(
                dimension=size, num_clients=n, threshold=self._threshold
            )
            config = self._settings.protocol_config(n, ddp.modulus_bits, ddp.padded)
            config.neighbour_count(n)
            plan = InputPlan(
                "distributed",
                size,
                ddp.padded,
                modulus_bits=ddp.modulus_bits,
                bound=transform.distributed.clip_norm,
                ddp=ddp,
                # The rotation's signs: public, fresh for each run and round,
                # announced with the round.
                rotation_seed=int(self._rng.integers(2**62)),
                secure_rng=transform.distributed.secure_rng,
            )
            return config, plan
        from fedshield.secagg.encoding import choose_encoding

        clip_range = (
            transform.bound if transform.kind == "clipped" else self._settings.clip
        )
        enc = choose_encoding(
            n, clip_range, precision_bits=self._settings.precision_bits
        )
        length = size + EXTRA_WORDS
        config = self._settings.protocol_config(n, enc.modulus_bits, length)
        config.neighbour_count(n)
        plan = InputPlan(
            transform.kind,
            size,
            length,
            enc_clip=enc.clip,
            enc_scale=enc.scale,
            modulus_bits=enc.modulus_bits,
            count_unit=_count_unit(length, self._settings.precision_bits),
            max_examples=self._max_examples,
            bound=transform.bound,
        )
        return config, plan

    def _refused(self, cid: ClientId, why: str) -> None:
        """A reply the protocol refused: recorded, and the client is dropped."""
        stage = self._asked[0]
        logger.warning("round %d: client %s refused: %s", self._round_idx + 1, cid, why)
        self._failures.append(
            ClientFailure(cid, stage, FailureKind.REJECTED, f"reply refused: {why}")
        )
        self._dropped.setdefault(cid, stage)

    def _abort(self, message: str) -> SecureSumResult:
        _count_drops(self._metrics, self._dropped)
        self._metrics["secagg/aborted"] = 1.0
        return SecureSumResult(
            None,
            self._metrics,
            dict(self._dropped),
            message,
            failures=tuple(self._failures),
        )

    def _finish(self) -> SecureSumResult:
        server, plan = self._server, self._plan
        assert server is not None and plan is not None
        if server.stage == "aborted":
            return self._abort("the protocol aborted")
        metrics = self._metrics
        _count_drops(metrics, self._dropped)
        survivors = len(server.survivors)
        metrics.update(
            {
                "secagg/aborted": 0.0,
                "secagg/survivors": float(survivors),
                "secagg/threshold": float(self._threshold),
                "secagg/modulus_bits": float(plan.modulus_bits),
            }
        )
        failures = tuple(self._failures)
        dropped = dict(self._dropped)
        if plan.kind == "distributed":
            total = _decode_distributed(server, plan, metrics, self._round_idx)
            return SecureSumResult(
                None, metrics, dropped, total=total, failures=failures
            )
        total, weight_sum = _decode(server, plan, metrics)
        if plan.kind == "clipped":
            return SecureSumResult(
                None,
                metrics,
                dropped,
                total=total,
                centred_unclipped=weight_sum,
                failures=failures,
            )
        if weight_sum <= 0:
            metrics["secagg/aborted"] = 1.0
            return SecureSumResult(
                None,
                metrics,
                dropped,
                "the survivors' weights sum to 0",
                failures=failures,
            )
        mean = (total / weight_sum).astype(np.float32)
        aggregate = Aggregate(
            delta=Params.from_flat(mean, self._spec, copy=False),
            num_updates=survivors,
            total_weight=weight_sum * plan.max_examples,
            measurements=metrics,
        )
        return SecureSumResult(aggregate, metrics, dropped, failures=failures)


def _decode(
    server: SecAggServer, plan: InputPlan, metrics: dict[str, float]
) -> tuple[np.ndarray, float]:
    """The unmasked sum of the updates and of the weight word; metrics added."""
    from fedshield.secagg.encoding import Encoding, decode_sum

    enc = Encoding(plan.enc_clip, plan.enc_scale, plan.modulus_bits)
    size = plan.size
    total = decode_sum(server.result(), enc, len(server.survivors))
    r = enc.clip
    out_of_range = round(float(total[size + 1]) * enc.scale * plan.count_unit)
    metrics["secagg/out_of_range"] = float(out_of_range)
    for offset, key, bound in METRIC_WORDS:
        weights = float(total[size + offset + 1]) / r
        if weights > 0:
            metrics[f"train_{key}"] = float(total[size + offset]) / r * bound / weights
    return total[:size], float(total[size]) / r


def _decode_distributed(
    server: SecAggServer, plan: InputPlan, metrics: dict[str, float], round_idx: int
) -> np.ndarray:
    """Distributed DP's noised sum in the update's units; ``ddp/*`` metrics."""
    from fedshield.privacy import distributed as ddg

    params = plan.ddp
    assert params is not None
    total, near = ddg.decode_sum(
        server.result(), params, rotation_seed=plan.rotation_seed
    )
    survivors = len(server.survivors)
    metrics.update(
        {
            "ddp/gamma": params.gamma,
            "ddp/noise_std": params.noise_std,
            "ddp/l2_sensitivity": params.l2_sensitivity,
            "ddp/padded_dimension": float(params.padded),
            "ddp/summed_noise_std": math.sqrt(survivors)
            * params.noise_std
            * params.gamma,
            "ddp/near_wrap": float(near),
        }
    )
    if near:
        logger.warning(
            "round %d: %d coordinates of the distributed-DP sum lie near the "
            "modulus's edge: the sum may have wrapped around (raise [privacy] "
            "distributed_bits)",
            round_idx + 1,
            near,
        )
    return total


def _count_unit(length: int, precision_bits: int) -> int:
    """Out-of-range values per unit of the count word (``secagg/out_of_range``).

    A word carries at most ``2^precision_bits`` units per client, and a
    client clips at most ``length`` values. With ``length <= 2^precision_bits``
    one unit is one value and the count is exact; above, one unit is
    ``ceil(length / 2^precision_bits)`` values and each client's count is
    rounded stochastically to it (unbiased, off by less than one unit per
    client) instead of saturating at ``2^precision_bits``.
    """
    return max(1, -(-length >> precision_bits))


def _count_drops(metrics: dict[str, float], dropped: Mapping[ClientId, str]) -> None:
    for stage in dropped.values():
        key = f"dropped/{stage}"
        metrics[key] = metrics.get(key, 0.0) + 1.0


def secure_sum(
    updates: Mapping[ClientId, ClientUpdate],
    *,
    settings: SecureAggregation,
    spec: ParamSpec,
    round_idx: int,
    max_examples: int,
    drop_at: Mapping[ClientId, str],
    rng: np.random.Generator,
    transform: SecureInput | None = None,
) -> SecureSumResult:
    """One secure aggregation of ``updates``, every party in this process.

    For tests and benchmarks of the protocol alone: each update is held by
    an in-process client half (:class:`~fedshield.simulation.protocol.
    ClientSession`), the server's half is :class:`SecureSumRound`, and the
    protocol's bytes are handed over here, stage by stage. A simulated or
    real round runs the same halves through its backend or transport.
    ``rng`` draws the clients' stochastic rounding (in client order) and the
    server's public randomness; ``transform`` says what the clients do to
    their updates (default: FedAvg's weighting; see
    :func:`~fedshield.strategies.secure_inputs.secure_input`).
    """
    from fedshield.simulation.protocol import ClientSession, HoldUpdate
    from fedshield.simulation.secure_client import hold_update, run_secure_stage

    transform = transform or SecureInput()
    lenient = transform.kind == "distributed"
    hold = HoldUpdate(malicious=settings.malicious, lenient=lenient)
    sessions: dict[ClientId, ClientSession] = {}
    receipts: dict[ClientId, FitReceipt] = {}
    for cid in sorted(updates):
        session = ClientSession(cid, None)  # type: ignore[arg-type]
        receipt = hold_update(session, updates[cid], hold, spec)
        if not receipt.rejected:
            sessions[cid], receipts[cid] = session, receipt
    machine = SecureSumRound(
        settings=settings,
        spec=spec,
        round_idx=round_idx,
        receipts=receipts,
        transform=transform,
        max_examples=max_examples,
        drop_at=drop_at,
        rng=rng,
    )
    step = machine.start()
    while isinstance(step, StageRequest):
        replies = []
        for cid, message in step.messages.items():
            try:
                value = run_secure_stage(sessions[cid], step.stage, message, rng)
            except ProtocolError as err:
                failure = ClientFailure(cid, step.stage, FailureKind.ERROR, str(err))
                replies.append(StageReply(cid, failure=failure))
                continue
            replies.append(StageReply(cid, value=value))
        step = machine.receive(replies)
    return step
