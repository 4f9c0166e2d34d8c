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
from typing import Any, Literal, Protocol, runtime_checkable

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
from fedshield.simulation.protocol import (
    ClientFailure,
    EvaluateIns,
    FailureKind,
    FitIns,
    FitReceipt,
    HoldUpdate,
    StageReply,
    StageRequest,
)
from fedshield.simulation.secure import (
    Faults,
    SecureAggregation,
    SecureSumResult,
    SecureSumRound,
)
from fedshield.simulation.secure_client import SECURE_STAGES
from fedshield.strategies import PrivateRelease, RoundPlan, Strategy
from fedshield.strategies.secure_inputs import secure_input

__all__ = ["FitRound", "RoundOptions", "RoundResult", "StageObserver", "StageView"]

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
"""Rewrites colluding clients' updates together (see :class:`RoundOptions`)."""


@dataclass(frozen=True, slots=True)
class StageView:
    """One stage as the server sees it: what it sent and what came back.

    Under secure aggregation the replies of ``fit`` are receipts and those
    of the protocol's stages are its bytes: no client's update is in a view
    (simulated colluders aside: they hand theirs to the coalition).
    """

    round_idx: int
    stage: str
    request: StageRequest
    replies: tuple[StageReply, ...]


StageObserver = Callable[[StageView], None]
"""Called after each stage with what the server saw (privacy evaluation's view)."""


@dataclass(frozen=True, slots=True)
class RoundOptions:
    """How the rounds of a run are carried out, beyond the strategy.

    Parameters
    ----------
    federated_eval
        Run stage ``evaluate`` after the update.
    timeout_s
        Per-stage deadline in seconds (``None``: wait for all).
    max_examples
        Largest ``num_examples`` a client may claim (``None``: unbounded).
        Under secure aggregation FedAvg's weights are ``n_k /
        max_examples``; unset, the largest count the clients declared in
        their receipts.
    secure
        Aggregate with secure aggregation: the clients keep their updates,
        mask them in their own processes, and the server learns only their
        sum. A round whose protocol aborts below its threshold releases
        nothing and leaves the model as it was (``secagg/aborted`` = 1).
    faults
        Injected dropouts: each sampled client may drop at a random stage.
    colluders, collude
        Simulated colluding attackers (ALIE, IPM): the updates of
        ``colluders`` are held back until every reply is in, then rewritten
        together by ``collude(updates, n)`` (``n``: the round's valid
        updates), as clients that share their benign updates with each
        other would send them.
    on_stage
        Observers called after every stage with a :class:`StageView`.
    verify_keys
        Malicious mode: the clients' verification keys from the key
        directory (their certificates' keys, over a network); None takes
        each round's keys from the clients' receipts, which the clients
        then cannot check (no protection against a server enrolling
        identities of its own).
    on_failed_round
        ``"stop"`` (the default): a round with too few clients ends the run
        (:class:`~fedshield.errors.RoundFailedError`); ``"continue"``: it is
        recorded (``completed`` false) and the next round starts from the
        same model, as a server of a real deployment would go on.
    server_secret
        A secret the server keeps (``fedshield serve``: in its state
        folder): the secure rounds' server randomness is derived from it
        (:meth:`round_entropy`); None: from the operating system.
    """

    federated_eval: bool = False
    timeout_s: float | None = None
    max_examples: int | None = None
    secure: SecureAggregation | None = None
    faults: Faults | None = None
    colluders: Collection[str] = ()
    collude: CollusionFn | None = None
    on_stage: tuple[StageObserver, ...] = ()
    on_failed_round: Literal["stop", "continue"] = "stop"
    verify_keys: Mapping[str, bytes] | None = None
    server_secret: bytes | None = None

    def round_entropy(self, round_idx: int) -> bytes | None:
        """The secure round's server randomness for ``round_idx`` (None: the OS's).

        From ``server_secret`` when set: a networked server replaying a round
        after a crash sends byte-identical requests.
        """
        if self.server_secret is None:
            return None
        import hashlib

        return hashlib.blake2b(
            round_idx.to_bytes(8, "little"), key=self.server_secret[:64]
        ).digest()

    @property
    def colluding(self) -> frozenset[str]:
        """The simulated colluders (none without a ``collude`` rewrite)."""
        return frozenset(self.colluders) if self.collude is not None else frozenset()


@dataclass(slots=True)
class _FitOutcome:
    """What stage ``fit`` gathered."""

    accumulator: Accumulator | None
    extras: dict[str, Accumulator] = field(default_factory=dict)
    rows: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    receipts: dict[str, FitReceipt] = field(default_factory=dict)
    colluding: list[tuple[ClientUpdate, float]] = field(default_factory=list)
    rejected: int = 0


class FitRound:
    """Server side of one FedAvg-family round (sans-I/O).

    Stage ``fit`` streams every valid update into the round's aggregator;
    under secure aggregation the clients keep their updates and the
    protocol's stages (:class:`~fedshield.simulation.secure.SecureSumRound`)
    follow, so that the server learns only their sum; stage ``evaluate``
    (optional) comes last.

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
    options
        How the round is carried out (:class:`RoundOptions`).
    client_states
        Each client's persistent state, for stateful strategies
        (``plan.is_stateful``); sent to the client in ``FitConfig.state``.
    drop_at
        Injected faults: the stage (``"fit"`` or a protocol stage) at which
        each of these clients drops out.
    **legacy
        The options as keywords (``federated_eval=``, ``secure=``...), for
        callers written before :class:`RoundOptions`.
    """

    def __init__(
        self,
        strategy: Strategy,
        state: ServerState,
        plan: RoundPlan,
        *,
        rng: np.random.Generator,
        options: RoundOptions | None = None,
        client_states: Callable[[str], Mapping[str, Params]] | None = None,
        drop_at: Mapping[str, str] | None = None,
        **legacy: Any,
    ) -> None:
        if plan.is_stateful and client_states is None:
            raise ValueError("a stateful round needs client_states")
        options = replace(options or RoundOptions(), **legacy)
        self._options = options
        self._client_states = client_states
        self._new_client_states: dict[str, Mapping[str, Params]] = {}
        self._strategy = strategy
        self._state = state
        self._plan = plan
        self._rng = rng
        self._failures: list[ClientFailure] = []
        self._metrics: dict[str, Any] = {}
        self._new_state: ServerState | None = None
        # A failed round that released something (its server step failed
        # after the aggregate was computed): the old parameters with the
        # strategy's new metadata, so that the release stays accounted.
        self._spent_state: ServerState | None = None
        self._stage = "init"
        self._drop_at = dict(drop_at or {})
        self._colluders = options.colluding
        self._secure_round: SecureSumRound | None = None
        self._fit: _FitOutcome | None = None

    @property
    def _rule(self) -> Any:
        return self._plan.aggregator or self._strategy.aggregator

    def start(self) -> StageRequest:
        """Stage ``fit`` to every sampled client."""
        self._stage = "fit"
        config = self._plan.fit_config
        params = self._state.params
        hold = self._hold()

        def message(cid: str) -> FitIns:
            own = config
            if self._client_states is not None and self._plan.is_stateful:
                own = replace(config, state=self._client_states(cid))
            if hold is not None and cid in self._colluders:
                return FitIns(params, own, replace(hold, share=True))
            return FitIns(params, own, hold)

        shared = None if self._plan.is_stateful or self._colluders else message("")
        return StageRequest(
            stage="fit",
            round_idx=self._plan.round_idx,
            messages={
                cid: shared if shared is not None else message(cid)
                for cid in self._plan.clients
            },
            timeout_s=self._options.timeout_s,
        )

    def _hold(self) -> HoldUpdate | None:
        """Under secure aggregation, what the clients do with their updates."""
        secure = self._options.secure
        if secure is None:
            return None
        kind = secure_input(self._rule).kind
        return HoldUpdate(
            malicious=secure.malicious,
            lenient=kind == "distributed",
            max_examples=self._options.max_examples,
            count=kind == "weighted",
        )

    def receive(self, replies: Iterable[StageReply]) -> StageRequest | RoundResult:
        """Consume the current stage's replies."""
        if self._stage == "fit":
            return self._receive_fit(replies)
        if self._secure_round is not None and self._stage in SECURE_STAGES:
            step = self._secure_round.receive(replies)
            return self._secure_step(step)
        if self._stage == "evaluate":
            return self._receive_evaluate(replies)
        raise RuntimeError(f"receive() called in stage {self._stage!r}")

    # -- stage fit ---------------------------------------------------------------

    def _receive_fit(self, replies: Iterable[StageReply]) -> StageRequest | RoundResult:
        spec = self._state.params.spec
        secure = self._options.secure is not None
        # Under secure aggregation nothing is added in the clear (and a
        # distributed-DP rule refuses to open an accumulator).
        fit = _FitOutcome(None if secure else self._rule.begin(spec, rng=self._rng))
        self._fit = fit
        for reply in self._answers(self._without_dropped(replies, "fit"), "fit"):
            try:
                self._take(fit, reply)
            except InvalidUpdateError as err:
                fit.rejected += 1
                logger.warning("round %d: %s", self._plan.round_idx, err)
                self._failures.append(
                    ClientFailure(
                        reply.client_id, "fit", FailureKind.REJECTED, str(err)
                    )
                )
        replacements = self._rewrite_colluders(fit)
        if not self._enough(fit):
            return self._failed_fit(len(fit.rows))
        if secure:
            return self._start_secure(fit, replacements)
        assert fit.accumulator is not None
        return self._apply(fit.accumulator.result())

    def _take(self, fit: _FitOutcome, reply: StageReply) -> None:
        """One client's reply to ``fit``: checked, then aggregated or held."""
        if isinstance(reply.value, FitReceipt):
            self._take_receipt(fit, reply.client_id, reply.value)
            return
        if self._options.secure is not None:
            raise InvalidUpdateError(
                f"client {reply.client_id!r} sent its update in the clear to a "
                "secure round (it should have kept it); refused unread"
            )
        update = validate_update(
            reply.value,
            self._state.params.spec,
            max_examples=self._options.max_examples,
        )
        if update.client_id != reply.client_id:
            raise InvalidUpdateError(
                f"update claims to come from {update.client_id!r} but was "
                f"sent by {reply.client_id!r}"
            )
        if update.client_id in self._colluders:
            fit.colluding.append((update, self._strategy.weight(update)))
        else:
            assert fit.accumulator is not None
            fit.accumulator.add(update, self._strategy.weight(update))
        spec = self._state.params.spec
        for key, tensor in update.extras.items():
            if key not in fit.extras:
                fit.extras[key] = _EXTRAS_RULE.begin(spec, rng=self._rng)
            fit.extras[key].add(
                ClientUpdate(update.client_id, tensor, update.num_examples), 1.0
            )
        if self._plan.is_stateful:
            self._new_client_states[update.client_id] = update.state
        fit.rows.append((float(update.num_examples), _finite_numbers(update.metrics)))

    def _take_receipt(self, fit: _FitOutcome, cid: str, receipt: FitReceipt) -> None:
        """A secure round's receipt: the client holds a valid update."""
        if self._options.secure is None:
            raise InvalidUpdateError(
                f"client {cid!r} sent a receipt, not an update, to a round "
                "without secure aggregation"
            )
        if receipt.client_id != cid:
            raise InvalidUpdateError(
                f"receipt claims to come from {receipt.client_id!r} but was sent "
                f"by {cid!r}"
            )
        if receipt.rejected:
            raise InvalidUpdateError(
                f"update from client {cid!r} rejected: {receipt.rejected}"
            )
        n = receipt.num_examples
        limit = self._options.max_examples
        if type(n) is not int or n < 1 or (limit is not None and n > limit):
            raise InvalidUpdateError(
                f"client {cid!r} declared an example count that is not an "
                f"integer in 1..{limit if limit is not None else 'any'}"
            )
        if cid in self._colluders:
            shared = receipt.shared
            if shared is None:
                raise InvalidUpdateError(f"colluder {cid!r} shared no update")
            update = validate_update(
                shared, self._state.params.spec, max_examples=limit
            )
            fit.colluding.append((update, self._strategy.weight(update)))
        fit.receipts[cid] = replace(receipt, shared=None)
        fit.rows.append((float(n), {}))

    def _rewrite_colluders(self, fit: _FitOutcome) -> dict[str, ClientUpdate]:
        """The colluders' rewritten updates (aggregated now, or held for SecAgg)."""
        collude = self._options.collude
        if not fit.colluding or collude is None:
            return {}
        rewritten = collude([u for u, _ in fit.colluding], len(fit.rows))
        held: dict[str, ClientUpdate] = {}
        for update, (_, weight) in zip(rewritten, fit.colluding, strict=True):
            if fit.accumulator is not None:
                fit.accumulator.add(update, weight)
            else:  # the colluder sends the rewrite through the protocol
                held[update.client_id] = update
        return held

    def _enough(self, fit: _FitOutcome) -> bool:
        succeeded = len(fit.rows)
        fit_drops = sum(1 for stage in self._drop_at.values() if stage == "fit")
        if self._drop_at:
            self._metrics["dropped/fit"] = float(fit_drops)
        self._metrics.update(
            {
                "num_clients": succeeded,
                "sampled_clients": len(self._plan.clients),
                "failed_clients": len(self._plan.clients) - succeeded - fit.rejected,
                "rejected_updates": fit.rejected,
            }
        )
        return succeeded >= self._plan.min_clients

    def _failed_fit(self, succeeded: int) -> RoundResult:
        # The sampled clients may have released something before the round
        # aborted (their updates reached the server): a DP strategy charges
        # it, and the checkpoint keeps the charge.
        self._spent_state = self._charged(self._state)
        message = (
            f"round {self._plan.round_idx + 1}: only {succeeded} of "
            f"{len(self._plan.clients)} clients returned a valid update; "
            f"min_clients is {self._plan.min_clients}"
        )
        return self._finish(completed=False, message=message)

    # -- secure aggregation ------------------------------------------------------

    def _start_secure(
        self, fit: _FitOutcome, replacements: Mapping[str, ClientUpdate]
    ) -> StageRequest | RoundResult:
        secure = self._options.secure
        assert secure is not None
        max_examples = self._options.max_examples or max(
            (r.num_examples for r in fit.receipts.values()), default=1
        )
        self._secure_round = SecureSumRound(
            settings=secure,
            spec=self._state.params.spec,
            round_idx=self._plan.round_idx,
            receipts=fit.receipts,
            transform=secure_input(self._rule),
            max_examples=max_examples,
            drop_at=self._drop_at,
            rng=self._rng,
            timeout_s=self._options.timeout_s,
            replacements=replacements,
            verify_keys=self._options.verify_keys,
            entropy=self._options.round_entropy(self._plan.round_idx),
        )
        return self._secure_step(self._secure_round.start())

    def _secure_step(
        self, step: StageRequest | SecureSumResult
    ) -> StageRequest | RoundResult:
        if isinstance(step, StageRequest):
            self._stage = step.stage
            return step
        aggregate = self._secure_outcome(step)
        if aggregate is None:
            return self._finish(completed=True)
        return self._apply(aggregate)

    def _secure_outcome(self, result: SecureSumResult) -> Aggregate | None:
        """The release of a finished secure sum; None (state kept) when it aborted.

        With central DP (the round's rule is a :class:`~fedshield.strategies.
        dp.DpMean`), the clients clipped their own updates, and the noise is
        added here to the unmasked sum, which is then divided by the rule's
        fixed denominator. With distributed DP the clients added the noise
        themselves before masking, and the unmasked sum is already noised.
        """
        self._metrics.update(result.metrics)
        self._failures.extend(result.failures)
        failed = {f.client_id for f in result.failures}
        for cid, stage in result.dropped.items():
            if cid not in failed:
                self._failures.append(
                    ClientFailure(
                        cid, stage, FailureKind.DROPPED, f"dropped out at stage {stage}"
                    )
                )
        rule = self._rule
        if isinstance(rule, ClippedSumRelease) and result.total is not None:
            return rule.release(
                result.total,
                centred_unclipped=result.centred_unclipped,
                count=int(result.metrics.get("secagg/survivors", 0)),
                spec=self._state.params.spec,
                rng=self._rng,
                measurements=result.metrics,
            )
        if result.aggregate is not None:
            return result.aggregate
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

    # -- the update ----------------------------------------------------------------

    def _apply(self, aggregate: Aggregate) -> StageRequest | RoundResult:
        """Apply the round's aggregate; then stage ``evaluate`` or the result."""
        fit = self._fit
        assert fit is not None
        if fit.extras:
            aggregate = replace(
                aggregate,
                extras={key: acc.result().delta for key, acc in fit.extras.items()},
            )
        self._metrics.update(aggregate.measurements)
        self._metrics["update_norm"] = aggregate.delta.norm()
        if self._options.secure is None:
            # Under secure aggregation the training metrics come from the
            # secure sum (train_loss/train_accuracy): the server learns them
            # only as sums (and not at all with distributed DP).
            self._metrics.update(
                _weighted_means(fit.rows, ("loss", "accuracy", "mae"), prefix="train_")
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
        if not self._options.federated_eval:
            return self._finish(completed=True)
        self._stage = "evaluate"
        message_eval = EvaluateIns(
            new_state.params, EvalConfig(round_idx=self._plan.round_idx)
        )
        return StageRequest(
            stage="evaluate",
            round_idx=self._plan.round_idx,
            messages=dict.fromkeys(self._plan.clients, message_eval),
            timeout_s=self._options.timeout_s,
        )

    def _without_dropped(
        self, replies: Iterable[StageReply], stage: str
    ) -> Iterator[StageReply]:
        """The replies of clients that did not drop (injected) at ``stage``."""
        for reply in replies:
            if self._drop_at.get(reply.client_id) == stage:
                continue  # never delivered: _answers records it as dropped
            yield reply

    def _charged(self, state: ServerState) -> ServerState | None:
        """``state`` charged for this round by a DP strategy (None: no charge)."""
        if not isinstance(self._strategy, PrivateRelease):
            return None
        charged = self._strategy.charge_unfinished(state, self._plan)
        return charged if charged is not state else None

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
