"""The FedAvg-family round as a two-stage protocol: fit, then evaluate.

Stage ``fit`` sends the global model to the sampled clients and streams every
valid update into the strategy's aggregator as it arrives (O(d) memory with a
streaming rule). Malformed updates are refused and recorded; the round goes
on. Stage ``evaluate`` (optional) asks the same clients to evaluate the new
model on their local test splits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedshield.core import (
    Accumulator,
    Aggregate,
    ClientUpdate,
    EvalConfig,
    Params,
    ParamSpec,
    ServerState,
    WeightedMean,
    metric_problems,
    validate_update,
)
from fedshield.errors import InvalidUpdateError
from fedshield.privacy.distributed import DistributedDp
from fedshield.simulation.protocol import (
    ClientFailure,
    EvaluateIns,
    FailureKind,
    FitIns,
    StageReply,
    StageRequest,
)
from fedshield.simulation.secure import SecureAggregation
from fedshield.strategies import PrivateRelease, RoundPlan, Strategy

__all__ = ["FitRound", "RoundResult"]

logger = logging.getLogger(__name__)

_EXTRAS_RULE = WeightedMean()
"""``ClientUpdate.extras`` are averaged with equal weights (SCAFFOLD, Alg. 1)."""


@dataclass(frozen=True, slots=True)
class RoundResult:
    """How a round ended.

    Parameters
    ----------
    state
        The new server state (the old one when the round failed).
    completed
        Whether enough clients succeeded for the update to be applied.
    metrics
        Round metrics (``num_clients``, ``failed_clients``, ``train_loss``...).
    failures
        Every client that contributed nothing, and why.
    message
        Why the round failed (empty when it completed).
    client_states
        New persistent state of each client whose update was used (stateful
        strategies only); the caller stores it when the round completed.
    """

    state: ServerState
    completed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: tuple[ClientFailure, ...] = ()
    message: str = ""
    client_states: Mapping[str, Mapping[str, Params]] = field(default_factory=dict)


def _finite_numbers(values: Mapping[str, Any]) -> dict[str, float]:
    # Only called on metrics that passed ``metric_problems``.
    return {k: float(v) for k, v in values.items()}


def _weighted_means(
    rows: list[tuple[float, dict[str, float]]], keys: Iterable[str], prefix: str
) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in keys:
        pairs = [(w, m[key]) for w, m in rows if key in m and w > 0]
        total = sum(w for w, _ in pairs)
        if total > 0:
            out[f"{prefix}{key}"] = float(sum(w * v for w, v in pairs) / total)
    return out


@runtime_checkable
class ClippedSumRelease(Protocol):
    """A rule that releases a sum of updates the clients clipped themselves.

    Central DP on top of secure aggregation (DP-FedAvg's ``DpMean``).
    """

    clip_norm: float

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
        """The released aggregate of ``total`` (``Σ_k clip(Δ_k)``)."""


CollusionFn = Callable[[list[ClientUpdate], int], list[ClientUpdate]]
"""Rewrites colluding clients' updates together (see :class:`FitRound`)."""


class FitRound:
    """Server side of one FedAvg-family round (sans-I/O).

    Parameters
    ----------
    strategy
        Sampler, aggregator and server optimizer.
    state
        The state at the start of the round.
    plan
        The strategy's plan for this round (clients, config).
    rng
        Randomness for aggregation and the server step.
    federated_eval
        Whether to run stage ``evaluate`` after the update.
    timeout_s
        Per-stage deadline in seconds (``None``: wait for all).
    max_examples
        Largest ``num_examples`` a client may claim (``None``: unbounded).
    client_states
        Each client's persistent state, for stateful strategies
        (``plan.is_stateful``); sent to the client in ``FitConfig.state``.
    secure
        Aggregate with secure aggregation (:func:`~fedshield.simulation.
        secure.secure_sum`): the updates are masked and only their sum is
        learned. A round whose protocol aborts below its threshold releases
        nothing and leaves the model as it was (``secagg/aborted`` = 1).
    drop_at
        Injected faults: the stage (``"fit"`` or a protocol stage) at which
        each of these clients drops out.
    colluders, collude
        Simulated colluding attackers (ALIE, IPM): the updates of
        ``colluders`` are held back until every reply is in, then rewritten
        together by ``collude(updates, n)`` (``n``: the round's valid
        updates) before they are aggregated, as clients that share their
        benign updates with each other would send them.
    """

    def __init__(
        self,
        strategy: Strategy,
        state: ServerState,
        plan: RoundPlan,
        *,
        rng: np.random.Generator,
        federated_eval: bool = False,
        timeout_s: float | None = None,
        max_examples: int | None = None,
        client_states: Callable[[str], Mapping[str, Params]] | None = None,
        secure: SecureAggregation | None = None,
        drop_at: Mapping[str, str] | None = None,
        colluders: Collection[str] = (),
        collude: CollusionFn | None = None,
    ) -> None:
        if plan.is_stateful and client_states is None:
            raise ValueError("a stateful round needs client_states")
        self._client_states = client_states
        self._new_client_states: dict[str, Mapping[str, Params]] = {}
        self._strategy = strategy
        self._state = state
        self._plan = plan
        self._rng = rng
        self._federated_eval = federated_eval
        self._timeout_s = timeout_s
        self._max_examples = max_examples
        self._failures: list[ClientFailure] = []
        self._metrics: dict[str, Any] = {}
        self._new_state: ServerState | None = None
        # A failed round that released something (its server step failed
        # after the aggregate was computed): the old parameters with the
        # strategy's new metadata, so that the release stays accounted.
        self._spent_state: ServerState | None = None
        self._stage = "init"
        self._secure = secure
        self._drop_at = dict(drop_at or {})
        self._colluders = frozenset(colluders) if collude is not None else frozenset()
        self._collude = collude

    def start(self) -> StageRequest:
        """Stage ``fit`` to every sampled client."""
        self._stage = "fit"
        config = self._plan.fit_config
        messages: dict[str, FitIns]
        if self._client_states is not None and self._plan.is_stateful:
            get = self._client_states
            messages = {
                cid: FitIns(self._state.params, replace(config, state=get(cid)))
                for cid in self._plan.clients
            }
        else:
            messages = dict.fromkeys(
                self._plan.clients, FitIns(self._state.params, config)
            )
        return StageRequest(
            stage="fit",
            round_idx=self._plan.round_idx,
            messages=messages,
            timeout_s=self._timeout_s,
        )

    def receive(self, replies: Iterable[StageReply]) -> StageRequest | RoundResult:
        """Consume the current stage's replies."""
        if self._stage == "fit":
            return self._receive_fit(replies)
        if self._stage == "evaluate":
            return self._receive_evaluate(replies)
        raise RuntimeError(f"receive() called in stage {self._stage!r}")

    def _receive_fit(self, replies: Iterable[StageReply]) -> StageRequest | RoundResult:
        spec = self._state.params.spec
        rule = self._plan.aggregator or self._strategy.aggregator
        # Under secure aggregation nothing is added in the clear (and a
        # distributed-DP rule refuses to open an accumulator).
        accumulator = (
            None if self._secure is not None else rule.begin(spec, rng=self._rng)
        )
        extras: dict[str, Accumulator] = {}
        train_rows: list[tuple[float, dict[str, float]]] = []
        held: dict[str, ClientUpdate] = {}  # secure aggregation: the clients' own
        colluding: list[tuple[ClientUpdate, float]] = []
        rejected = 0
        for reply in self._answers(self._without_dropped(replies, "fit"), "fit"):
            try:
                update = validate_update(
                    self._as_encoded(reply.value), spec, max_examples=self._max_examples
                )
                if update.client_id != reply.client_id:
                    raise InvalidUpdateError(
                        f"update claims to come from {update.client_id!r} but was "
                        f"sent by {reply.client_id!r}"
                    )
                if update.client_id in self._colluders:
                    colluding.append((update, self._strategy.weight(update)))
                elif self._secure is not None:
                    # Each client's secure-aggregation half holds its update;
                    # nothing is added in the clear.
                    held[update.client_id] = update
                else:
                    assert accumulator is not None
                    accumulator.add(update, self._strategy.weight(update))
            except InvalidUpdateError as err:
                rejected += 1
                logger.warning("round %d: %s", self._plan.round_idx, err)
                self._failures.append(
                    ClientFailure(
                        reply.client_id, "fit", FailureKind.REJECTED, str(err)
                    )
                )
                continue
            for key, tensor in update.extras.items():
                if key not in extras:
                    extras[key] = _EXTRAS_RULE.begin(spec, rng=self._rng)
                extras[key].add(
                    ClientUpdate(update.client_id, tensor, update.num_examples), 1.0
                )
            if self._plan.is_stateful:
                self._new_client_states[update.client_id] = update.state
            train_rows.append(
                (float(update.num_examples), _finite_numbers(update.metrics))
            )
        if colluding and self._collude is not None:
            rewritten = self._collude([u for u, _ in colluding], len(train_rows))
            for update, (_, weight) in zip(rewritten, colluding, strict=True):
                if self._secure is not None:
                    held[update.client_id] = update
                else:
                    assert accumulator is not None
                    accumulator.add(update, weight)
        succeeded = len(train_rows)
        fit_drops = sum(1 for stage in self._drop_at.values() if stage == "fit")
        if self._drop_at:
            self._metrics["dropped/fit"] = float(fit_drops)
        self._metrics.update(
            {
                "num_clients": succeeded,
                "sampled_clients": len(self._plan.clients),
                "failed_clients": len(self._plan.clients) - succeeded - rejected,
                "rejected_updates": rejected,
            }
        )
        if succeeded < self._plan.min_clients:
            # The sampled clients may have released something before the
            # round aborted (their updates reached the server): a DP
            # strategy charges it, and the checkpoint keeps the charge.
            self._spent_state = self._charged(self._state)
            message = (
                f"round {self._plan.round_idx + 1}: only {succeeded} of "
                f"{len(self._plan.clients)} clients returned a valid update; "
                f"min_clients is {self._plan.min_clients}"
            )
            return self._finish(completed=False, message=message)
        if self._secure is not None:
            outcome = self._secure_aggregate(held)
            if outcome is None:
                return self._finish(completed=True)
            aggregate = outcome
        else:
            assert accumulator is not None
            aggregate = accumulator.result()
        if extras:
            aggregate = replace(
                aggregate,
                extras={key: acc.result().delta for key, acc in extras.items()},
            )
        self._metrics.update(aggregate.measurements)
        self._metrics["update_norm"] = aggregate.delta.norm()
        if self._secure is None:
            # Under secure aggregation the training metrics come from the
            # secure sum (secure_sum's train_loss/train_accuracy): the server
            # learns them only as sums (and not at all with distributed DP).
            self._metrics.update(
                _weighted_means(
                    train_rows, ("loss", "accuracy", "mae"), prefix="train_"
                )
            )
        new_state = self._strategy.apply(
            self._state, aggregate, plan=self._plan, rng=self._rng
        )
        if not new_state.params.is_finite():
            # The aggregate was released (to the server) before the step
            # failed: keep what the strategy recorded of it (its privacy
            # ledger), not its parameters.
            self._spent_state = self._state.evolve(metadata=new_state.metadata)
            message = (
                f"round {self._plan.round_idx + 1}: the server step produced NaN or "
                "infinite parameters (update norm "
                f"{self._metrics['update_norm']:.3g}); lower strategy.server_lr or "
                "client.lr"
            )
            return self._finish(completed=False, message=message)
        self._new_state = new_state
        if not self._federated_eval:
            return self._finish(completed=True)
        self._stage = "evaluate"
        message_eval = EvaluateIns(
            self._new_state.params, EvalConfig(round_idx=self._plan.round_idx)
        )
        return StageRequest(
            stage="evaluate",
            round_idx=self._plan.round_idx,
            messages=dict.fromkeys(self._plan.clients, message_eval),
            timeout_s=self._timeout_s,
        )

    def _as_encoded(self, value: object) -> object:
        """A reply as the server may check it.

        With distributed DP each client's half of secure aggregation encodes
        the client's own update (:func:`fedshield.privacy.distributed.
        encode`, which takes a NaN or infinite update as zero) and reports
        no training metrics: neither is seen, so neither is rejected, in the
        clear (whether local training diverged depends on the client's
        data). Other rounds check what the client sent.
        """
        if (
            self._secure is None
            or self._distributed() is None
            or not isinstance(value, ClientUpdate)
            or not isinstance(value.delta, Params)
        ):
            return value
        delta = value.delta
        if delta.spec == self._state.params.spec and not delta.is_finite():
            delta = Params.zeros(delta.spec)
        return replace(value, delta=delta, metrics={})

    def _without_dropped(
        self, replies: Iterable[StageReply], stage: str
    ) -> Iterator[StageReply]:
        """The replies of clients that did not drop (injected) at ``stage``."""
        for reply in replies:
            if self._drop_at.get(reply.client_id) == stage:
                continue  # never delivered: _answers records it as dropped
            yield reply

    def _secure_aggregate(self, held: Mapping[str, ClientUpdate]) -> Aggregate | None:
        """Secure aggregation of ``held``; None (state kept) when it aborts.

        With central DP (the round's rule is a :class:`~fedshield.strategies.
        dp.DpMean`), the clients clip their own updates, the protocol sums
        them, and the noise is added here to the unmasked sum, which is then
        divided by the rule's fixed denominator: the server never holds an
        individual update, and the release is DP-FedAvg's. With distributed
        DP (:class:`~fedshield.strategies.dp.DistributedSum`) the clients
        add the noise themselves before masking, and the unmasked sum is
        already noised.
        """
        from fedshield.simulation.secure import secure_sum

        assert self._secure is not None
        dp_rule = self._dp_rule()
        result = secure_sum(
            held,
            settings=self._secure,
            spec=self._state.params.spec,
            round_idx=self._plan.round_idx,
            max_examples=self._max_examples
            or max((u.num_examples for u in held.values()), default=1),
            drop_at=self._drop_at,
            rng=self._rng,
            clip_norm=dp_rule.clip_norm if dp_rule is not None else None,
            norm_bound=self._norm_bound(),
            # Distributed DP (strategies.dp.DistributedSum): the clients noise.
            distributed=self._distributed(),
        )
        self._metrics.update(result.metrics)
        for cid, stage in result.dropped.items():
            self._failures.append(
                ClientFailure(
                    cid, stage, FailureKind.DROPPED, f"dropped out at stage {stage}"
                )
            )
        if dp_rule is not None and result.total is not None:
            return dp_rule.release(
                result.total,
                centred_unclipped=result.centred_unclipped,
                count=int(result.metrics.get("secagg/survivors", 0)),
                spec=self._state.params.spec,
                rng=self._rng,
                measurements=result.metrics,
            )
        if result.aggregate is None:
            logger.warning(
                "round %d: secure aggregation aborted, nothing released: %s",
                self._plan.round_idx + 1,
                result.message,
            )
            self._metrics["secagg/abort_reason"] = result.message
            # Charged as if it had released (conservative): see
            # PrivateRelease.charge_unfinished.
            charged = self._charged(self._state) or self._state
            self._new_state = charged.evolve(round_idx=self._state.round_idx + 1)
            return None
        return result.aggregate

    def _charged(self, state: ServerState) -> ServerState | None:
        """``state`` charged for this round by a DP strategy (None: no charge)."""
        if not isinstance(self._strategy, PrivateRelease):
            return None
        charged = self._strategy.charge_unfinished(state, self._plan)
        return charged if charged is not state else None

    def _norm_bound(self) -> float | None:
        """Norm bounding's ``max_norm``, applied by each client under SecAgg."""
        from fedshield.strategies.robust import NormBound

        rule = self._plan.aggregator or self._strategy.aggregator
        return rule.max_norm if isinstance(rule, NormBound) else None

    def _dp_rule(self) -> ClippedSumRelease | None:
        """The round's central-DP rule (DP-FedAvg's ``DpMean``), or None."""
        rule = self._plan.aggregator
        return rule if isinstance(rule, ClippedSumRelease) else None

    def _distributed(self) -> DistributedDp | None:
        """Distributed DP's mechanism (strategies.dp.DistributedSum), or None."""
        mechanism = getattr(self._dp_rule(), "distributed", None)
        return mechanism if isinstance(mechanism, DistributedDp) else None

    def _receive_evaluate(self, replies: Iterable[StageReply]) -> RoundResult:
        # Evaluation failures never fail a round, but they are recorded.
        rows: list[tuple[float, dict[str, float]]] = []
        for reply in self._answers(replies, "evaluate"):
            problems = metric_problems(reply.value)
            if isinstance(reply.value, Mapping) and "num_examples" not in reply.value:
                problems.append("evaluation metrics lack 'num_examples'")
            if problems:
                message = (
                    f"evaluation from client {reply.client_id!r} rejected: "
                    + "; ".join(problems)
                )
                logger.warning("round %d: %s", self._plan.round_idx, message)
                self._failures.append(
                    ClientFailure(
                        reply.client_id, "evaluate", FailureKind.REJECTED, message
                    )
                )
                continue
            values = _finite_numbers(reply.value)
            rows.append((values["num_examples"], values))
        self._metrics["federated_eval_clients"] = len(rows)
        means = _weighted_means(rows, ("accuracy", "loss", "mae"), prefix="federated_")
        if "federated_loss" in means and any("rmse" in m for _, m in rows):
            # Regression: the loss is the mean squared error, so the RMSE of
            # every client's test rows together is its square root (a mean
            # of the clients' RMSEs would not be).
            means["federated_rmse"] = math.sqrt(max(means["federated_loss"], 0.0))
        self._metrics.update(means)
        return self._finish(completed=True)

    def _answers(
        self, replies: Iterable[StageReply], stage: str
    ) -> Iterator[StageReply]:
        """The replies that carry a value; records failures and dropouts.

        A reply from a client that was not asked, or a second one, is ignored;
        a client with no reply at all is recorded as dropped.
        """
        asked = set(self._plan.clients)
        seen: set[str] = set()
        for reply in replies:
            if reply.client_id not in asked or reply.client_id in seen:
                logger.warning("ignoring unexpected reply from %r", reply.client_id)
                continue
            seen.add(reply.client_id)
            if reply.failure is not None:
                self._failures.append(reply.failure)
                continue
            yield reply
        for client_id in self._plan.clients:
            if client_id not in seen:
                self._failures.append(
                    ClientFailure(client_id, stage, FailureKind.DROPPED, "no reply")
                )

    def _finish(self, *, completed: bool, message: str = "") -> RoundResult:
        self._stage = "done"
        if completed and self._new_state:
            state = self._new_state
        else:
            state = self._spent_state or self._state
        return RoundResult(
            state=state,
            completed=completed,
            metrics=self._metrics,
            failures=tuple(self._failures),
            message=message,
            client_states=self._new_client_states if completed else {},
        )
