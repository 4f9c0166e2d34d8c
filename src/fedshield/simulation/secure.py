"""Secure aggregation and injected dropouts inside a simulated round.

:func:`secure_sum` runs one round of SecAgg or SecAgg+ (the sans-I/O state
machines of :mod:`fedshield.secagg.protocol`) over the updates the round's
clients trained. Each client's half is a :class:`~fedshield.secagg.protocol.
SecAggClient` that encodes the client's weighted update into integers mod
``2^b`` (:mod:`fedshield.secagg.encoding`) and masks it; the
:class:`~fedshield.secagg.protocol.SecAggServer` sees only the serialized
protocol messages and outputs the sum. In a simulation both halves run in
this process and the messages are handed over here; over a network the
client halves run on the clients and a transport carries the same bytes.

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

:class:`Faults` draws, for each sampled client, whether it drops out and at
which stage (``[faults] dropout = p``), so that a user can watch the
protocol recover: a client that drops at a stage sends nothing from that
stage on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedshield.core import Aggregate, ClientId, ClientUpdate, Params, ParamSpec
from fedshield.errors import ConfigError, ProtocolError

if TYPE_CHECKING:
    from fedshield.privacy.distributed import DistributedDp
    from fedshield.secagg.protocol import SecAggConfig, SecAggServer

__all__ = [
    "EXTRA_WORDS",
    "LOSS_BOUND",
    "Faults",
    "SecureAggregation",
    "SecureSumResult",
    "secure_sum",
]

logger = logging.getLogger(__name__)

FIT = "fit"

EXTRA_WORDS = 6
"""Words each client appends to its update in the secure sum: the weight, the
out-of-range count, and the training loss and accuracy with their weights."""

LOSS_BOUND = 1.0e4
"""Largest training loss a client's ``w * loss`` word carries (a larger or
non-finite one is left out of ``train_loss``)."""


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
        Worker processes that run some clients' halves in a simulation
        (None: one on two or more cores from 32 clients in a round, else
        none; 0: all in the simulating process).
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
        stages = ["advertise_keys", "share_keys", "masked_input"]
        if self.malicious:
            stages.append("consistency_check")
        stages.append("unmask")
        return tuple(stages)


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


def _random_bytes(secure: bool, rng: np.random.Generator) -> Callable[[int], bytes]:
    import os

    return os.urandom if secure else rng.bytes


def secure_sum(
    updates: Mapping[ClientId, ClientUpdate],
    *,
    settings: SecureAggregation,
    spec: ParamSpec,
    round_idx: int,
    max_examples: int,
    drop_at: Mapping[ClientId, str],
    rng: np.random.Generator,
    clip_norm: float | None = None,
    norm_bound: float | None = None,
    distributed: DistributedDp | None = None,
) -> SecureSumResult:
    """Aggregate ``updates`` with secure aggregation; the server sees only sums.

    Parameters
    ----------
    updates
        Each client's validated update (its own; only its SecAgg half reads it).
    settings
        The protocol and the encoding.
    spec
        Layout of the updates.
    round_idx
        The round (bound into every protocol message).
    max_examples
        The largest honest ``num_examples``; weights are ``n_k / max_examples``.
    drop_at
        Injected faults: the stage at which a client drops.
    rng
        The clients' stochastic rounding.
    clip_norm
        Central DP on top of secure aggregation: each client clips its own
        update to this L2 norm and weighs it 1 (the server adds the noise to
        the unmasked sum); the encoding's range is the clip norm, so nothing
        falls outside it. The third extra coordinate then carries the
        centred indicator ``1[‖Δ_k‖ ≤ C] − ½`` (adaptive clipping's count).
    norm_bound
        Norm bounding (Sun et al. 2019) under secure aggregation: each client
        clips its own update to this L2 norm, then weighs it as FedAvg does
        (the only robust rule that needs no individual update at the server).
    distributed
        Distributed DP: each client clips, rotates, rounds and noises its own
        update with its share of discrete Gaussian noise before masking
        (:func:`fedshield.privacy.distributed.encode`); the unmasked sum is
        decoded (:func:`~fedshield.privacy.distributed.decode_sum`) into
        ``total``, already noised. The round's ``ddp/*`` metrics hold what
        the accountant needs.

    Returns
    -------
    SecureSumResult
        The aggregate (None when the protocol aborted below its threshold,
        with the reason in ``message``), the round's ``secagg/*`` metrics
        and the clients that dropped, by stage.
    """
    from fedshield.secagg.encoding import choose_encoding, decode_sum, encode

    clients = sorted(updates)
    metrics: dict[str, float] = {"secagg/clients": float(len(clients))}
    if len(clients) < 2:
        return SecureSumResult(
            None,
            {**metrics, "secagg/aborted": 1.0},
            {},
            f"secure aggregation needs at least 2 clients; {len(clients)} trained",
        )
    try:
        threshold = settings.threshold_for(len(clients))
    except ConfigError as err:
        return SecureSumResult(None, {**metrics, "secagg/aborted": 1.0}, {}, str(err))
    if distributed is not None:
        return _distributed_sum(
            updates,
            clients,
            settings=settings,
            spec=spec,
            round_idx=round_idx,
            drop_at=drop_at,
            rng=rng,
            distributed=distributed,
            threshold=threshold,
            metrics=metrics,
        )
    clip_range = settings.clip if clip_norm is None else clip_norm
    enc = choose_encoding(
        len(clients), clip_range, precision_bits=settings.precision_bits
    )
    length = spec.size + EXTRA_WORDS
    try:
        config = settings.protocol_config(len(clients), enc.modulus_bits, length)
        config.neighbour_count(len(clients))
    except ConfigError as err:  # e.g. SecAgg+ finds no k for this many
        metrics["secagg/aborted"] = 1.0
        return SecureSumResult(None, metrics, {}, str(err))
    # The extra words, each scaled into the encoding's range [-r, r] by its
    # public bound so that it is never clipped: the weight (bound 1), the
    # out-of-range count (see _count_unit), then w * loss, w * 1[loss], w * acc,
    # w * 1[acc] (the training metrics, learned only as sums).
    r = enc.clip
    count_unit = _count_unit(length, settings.precision_bits)
    inputs: dict[ClientId, np.ndarray] = {}
    for cid in clients:
        update = updates[cid]
        delta = np.asarray(update.delta.flat, dtype=np.float64)
        values = np.zeros(length, dtype=np.float64)
        if clip_norm is None:
            weight = update.num_examples / max(1, max_examples)
            if norm_bound is not None:  # the client bounds its own update
                norm = float(np.linalg.norm(delta))
                delta = delta * min(1.0, norm_bound / max(norm, 1e-300))
            values[: spec.size] = delta * weight
            metric_weight = weight
        else:  # the client clips its own update (central DP)
            norm = float(np.linalg.norm(delta))
            # Here the word carries the centred indicator 1[‖Δ‖ ≤ C] − ½.
            weight = (1.0 if norm <= clip_norm else 0.0) - 0.5
            values[: spec.size] = delta * min(1.0, clip_norm / max(norm, 1e-300))
            metric_weight = 1.0
        values[spec.size] = weight * r
        for offset, key, bound in ((2, "loss", LOSS_BOUND), (4, "accuracy", 1.0)):
            value = update.metrics.get(key)
            if value is not None and math.isfinite(value) and abs(value) <= bound:
                values[spec.size + offset] = metric_weight * value / bound * r
                values[spec.size + offset + 1] = metric_weight * r
        encoded, count = encode(values, enc, rng)
        # The count rides along in the secure sum, scaled by its public bound
        # (the vector's length) as the other extra words are, so that it is
        # never clipped: one unit per `count_unit` values (see _count_unit).
        encoded_count, _ = encode(np.array([count / count_unit / enc.scale]), enc, rng)
        encoded[spec.size + 1] = encoded_count[0]
        inputs[cid] = encoded
    server, dropped, aborted = _sum_or_abort(
        config, settings, round_idx, inputs, drop_at, metrics
    )
    if aborted is not None:
        return aborted
    assert server is not None
    total = decode_sum(server.result(), enc, len(server.survivors))
    weight_sum = float(total[spec.size]) / r
    out_of_range = round(float(total[spec.size + 1]) * enc.scale * count_unit)
    _count_drops(metrics, dropped)
    metrics.update(
        {
            "secagg/aborted": 0.0,
            "secagg/survivors": float(len(server.survivors)),
            "secagg/threshold": float(threshold),
            "secagg/modulus_bits": float(enc.modulus_bits),
            "secagg/out_of_range": float(out_of_range),
        }
    )
    for offset, key, bound in ((2, "loss", LOSS_BOUND), (4, "accuracy", 1.0)):
        weights = float(total[spec.size + offset + 1]) / r
        if weights > 0:
            metrics[f"train_{key}"] = (
                float(total[spec.size + offset]) / r * bound / weights
            )
    if clip_norm is not None:
        return SecureSumResult(
            None,
            metrics,
            dropped,
            total=total[: spec.size],
            centred_unclipped=weight_sum,
        )
    if weight_sum <= 0:
        metrics["secagg/aborted"] = 1.0
        return SecureSumResult(
            None, metrics, dropped, "the survivors' weights sum to 0"
        )
    mean = (total[: spec.size] / weight_sum).astype(np.float32)
    aggregate = Aggregate(
        delta=Params.from_flat(mean, spec, copy=False),
        num_updates=len(server.survivors),
        total_weight=weight_sum * max_examples,
        measurements=metrics,
    )
    return SecureSumResult(aggregate, metrics, dropped)


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


def _sum_or_abort(
    config: SecAggConfig,
    settings: SecureAggregation,
    round_idx: int,
    inputs: Mapping[ClientId, np.ndarray],
    drop_at: Mapping[ClientId, str],
    metrics: dict[str, float],
) -> tuple[SecAggServer | None, dict[ClientId, str], SecureSumResult | None]:
    """Run the protocol; on abort, the result that releases nothing."""
    dropped: dict[ClientId, str] = {}
    try:
        server = _run_protocol(config, settings, round_idx, inputs, drop_at, dropped)
    except ProtocolError as err:
        _count_drops(metrics, dropped)
        metrics["secagg/aborted"] = 1.0
        return None, dropped, SecureSumResult(None, metrics, dropped, str(err))
    return server, dropped, None


def _run_protocol(
    config: SecAggConfig,
    settings: SecureAggregation,
    round_idx: int,
    inputs: Mapping[ClientId, np.ndarray],
    drop_at: Mapping[ClientId, str],
    dropped: dict[ClientId, str],
) -> SecAggServer:
    """Carry the protocol's messages between the server and the client halves.

    Each client's half is given its encoded input; ``dropped`` collects the
    clients that dropped (injected by ``drop_at``, or on a worker process
    that failed) and at which stage. Each reply goes to the server as it is
    produced (:meth:`~fedshield.secagg.protocol.SecAggServer.receive_one`),
    so the server holds one masked vector at a time. With
    ``settings.workers`` (or ``auto`` on two or more cores and at least
    :data:`~fedshield.simulation.secure_workers.AUTO_MIN_CLIENTS` clients),
    some client halves run on worker processes
    (:mod:`fedshield.simulation.secure_workers`).

    Raises
    ------
    ProtocolError
        When the protocol aborts (fewer than the threshold at a stage).
    """
    from fedshield.secagg import crypto
    from fedshield.secagg.protocol import SecAggClient, SecAggServer
    from fedshield.simulation.secure_workers import auto_workers, shared_workers

    clients = sorted(inputs)
    processes = (
        auto_workers(len(clients)) if settings.workers is None else settings.workers
    )
    pool = shared_workers(processes) if processes > 0 else None
    local = clients
    remote_public: dict[ClientId, bytes] = {}
    if pool is not None:
        local, remote_public = pool.begin(
            config, round_idx, inputs, malicious=settings.malicious
        )
    # The simulation is its own PKI: each client's signature key, and the
    # table of verification keys every party knows (malicious mode).
    signing = (
        {cid: crypto.generate_signing_key() for cid in local}
        if settings.malicious
        else {}
    )
    verify = {cid: key.public for cid, key in signing.items()}
    verify.update(remote_public)
    table = verify or None
    if pool is not None:
        pool.start(table)
    server = SecAggServer(config, round_idx, clients, verify_keys=table)
    halves: dict[ClientId, SecAggClient] = {}
    for cid in local:
        half = SecAggClient(
            config,
            round_idx,
            cid,
            signing_key=signing.get(cid),
            verify_keys=table,
            # Each request is handed over once here: no retransmissions, so
            # no client keeps its last reply (n masked inputs at once).
            idempotent=False,
        )
        half.set_input(inputs[cid])
        halves[cid] = half
    remote = pool.remote() if pool is not None else set()

    def refused(cid: ClientId, why: str) -> None:
        logger.warning("round %d: client %s refused: %s", round_idx + 1, cid, why)

    while server.stage not in ("done", "aborted"):
        stage = server.stage
        requests: dict[ClientId, bytes] = {}
        for cid, message in server.requests().items():
            if cid in drop_at and cid not in dropped and drop_at[cid] == stage:
                dropped[cid] = stage
            if cid not in dropped:
                requests[cid] = message
        if pool is not None:
            pool.send(requests)
        for cid, message in requests.items():
            if cid in remote:
                continue
            try:
                server.receive_one(cid, halves[cid].handle(message))
            except ProtocolError as err:
                refused(cid, str(err))
        if pool is not None:
            answers = pool.collect()
            for cid in requests:
                if cid not in remote:
                    continue
                answer = answers.get(cid)
                if isinstance(answer, bytes):
                    server.receive_one(cid, answer)
                elif isinstance(answer, str):
                    refused(cid, answer)
                else:  # its worker failed: the client is gone
                    dropped.setdefault(cid, stage)
        server.end_stage()
    return server


def _distributed_sum(
    updates: Mapping[ClientId, ClientUpdate],
    clients: Sequence[ClientId],
    *,
    settings: SecureAggregation,
    spec: ParamSpec,
    round_idx: int,
    drop_at: Mapping[ClientId, str],
    rng: np.random.Generator,
    distributed: DistributedDp,
    threshold: int,
    metrics: dict[str, float],
) -> SecureSumResult:
    """Secure aggregation of distributed-DP-noised updates (see secure_sum)."""
    from fedshield.privacy import distributed as ddg

    try:
        params = distributed.parameters(
            dimension=spec.size, num_clients=len(clients), threshold=threshold
        )
        config = settings.protocol_config(
            len(clients), params.modulus_bits, params.padded
        )
        config.neighbour_count(len(clients))
    except ConfigError as err:
        metrics["secagg/aborted"] = 1.0
        return SecureSumResult(None, metrics, {}, str(err))
    random_bytes = _random_bytes(distributed.secure_rng, rng)
    # The rotation's signs: public, fresh for each run and round (a real
    # server would announce the seed with the round).
    rotation_seed = int(rng.integers(2**62))
    inputs: dict[ClientId, np.ndarray] = {}
    for cid in clients:
        delta = np.asarray(updates[cid].delta.flat, dtype=np.float64)
        # Each client's half: clip, rotate, round, add its noise share, mod 2^b.
        inputs[cid], _ = ddg.encode(
            delta,
            params,
            clip_norm=distributed.clip_norm,
            rotation_seed=rotation_seed,
            random_bytes=random_bytes,
        )
    server, dropped, aborted = _sum_or_abort(
        config, settings, round_idx, inputs, drop_at, metrics
    )
    if aborted is not None:
        return aborted
    assert server is not None
    total, near = ddg.decode_sum(server.result(), params, rotation_seed=rotation_seed)
    _count_drops(metrics, dropped)
    survivors = len(server.survivors)
    metrics.update(
        {
            "secagg/aborted": 0.0,
            "secagg/survivors": float(survivors),
            "secagg/threshold": float(threshold),
            "secagg/modulus_bits": float(params.modulus_bits),
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
    return SecureSumResult(None, metrics, dropped, total=total)
