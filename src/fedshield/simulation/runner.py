"""The one round loop, shared by every backend and by the Python API."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedshield.core import ClientId, Params, ServerState, derive_rng
from fedshield.errors import ConfigError, RoundFailedError, RunDirectoryError
from fedshield.simulation.backends import Backend, ClientFn, SequentialBackend
from fedshield.simulation.protocol import RoundProtocol, StageReply, StageRequest
from fedshield.simulation.rounds import (
    FitRound,
    RoundOptions,
    RoundResult,
    StageObserver,
    StageView,
)
from fedshield.simulation.rundir import FAILURES, METRICS, RunDirectory
from fedshield.simulation.state_store import StateStore
from fedshield.strategies import PrivateRelease, RoundPlan, Strategy

__all__ = [
    "BeforeFitFn",
    "EvaluateFn",
    "RoundCallback",
    "drive_round",
    "run_round",
    "run_rounds",
]

logger = logging.getLogger(__name__)

EvaluateFn = Callable[[Params], Mapping[str, float]]
"""Centralised evaluation of the global model on the server's test set."""

RoundCallback = Callable[[ServerState, Mapping[str, Any]], None]
"""Called after each completed round with the new state and its record."""

BeforeFitFn = Callable[[ServerState, RoundPlan], None]
"""Called with a round's state and plan before its clients are asked to train."""


def drive_round(
    protocol: RoundProtocol,
    backend: Backend,
    *,
    client_fn: ClientFn,
    seed: int,
    on_stage: Sequence[StageObserver] = (),
) -> RoundResult:
    """Carry a round's stages between its protocol and a backend until it ends.

    Each observer in ``on_stage`` is called after every stage with what the
    server sent and received (:class:`~fedshield.simulation.rounds.StageView`);
    without observers the replies stream into the protocol one by one.
    """
    step: object = protocol.start()
    while isinstance(step, StageRequest):
        replies: Iterable[StageReply] = backend.run_stage(
            step, client_fn=client_fn, seed=seed
        )
        if on_stage:
            seen = tuple(replies)
            view = StageView(step.round_idx, step.stage, step, seen)
            for observer in on_stage:
                observer(view)
            replies = seen
        step = protocol.receive(replies)
    if not isinstance(step, RoundResult):
        raise TypeError(f"round protocol ended with {type(step).__name__}")
    return step


ProtocolFactory = Callable[..., RoundProtocol]
"""Builds a round's protocol: ``(strategy, state, plan, *, rng, options,
client_states, drop_at)``, as :class:`~fedshield.simulation.rounds.FitRound`."""


def run_round(
    strategy: Strategy,
    state: ServerState,
    *,
    client_fn: ClientFn,
    client_ids: Sequence[ClientId],
    seed: int,
    backend: Backend | None = None,
    options: RoundOptions | None = None,
    client_states: StateStore | None = None,
    before_fit: BeforeFitFn | None = None,
    protocol: ProtocolFactory = FitRound,
    **legacy: Any,
) -> RoundResult:
    """Plan and run round ``state.round_idx``; return how it ended.

    ``options`` (:class:`~fedshield.simulation.rounds.RoundOptions`, or its
    fields as keywords) says how: secure aggregation, injected faults (each
    sampled client drops at a random stage drawn from ``seed``, the round
    and the client), deadlines, observers. ``protocol`` builds the round's
    server side (:class:`~fedshield.simulation.rounds.FitRound`).

    A stateful strategy (SCAFFOLD) needs ``client_states``; the new client
    states of a completed round are written to it before this returns.

    ``before_fit(state, plan)`` is called once the round is planned, before
    its stage ``fit`` is sent to the clients (:func:`run_rounds` checkpoints
    a DP round's privacy cost there).

    Randomness comes from ``seed`` and the round index only, so the same
    round gives the same result whether it runs after round ``r − 1`` in one
    process or after a resume.
    """
    options = replace(options or RoundOptions(), **legacy)
    backend = backend if backend is not None else SequentialBackend()
    round_idx = state.round_idx
    plan = strategy.configure(
        state, client_ids, rng=derive_rng(seed, "configure", round_idx)
    )
    drop_at: dict[ClientId, str] = {}
    if options.faults is not None:
        secure = options.secure
        stages = ("fit", *(secure.stages() if secure is not None else ()))
        drop_at = options.faults.draw(
            plan.clients, stages, seed=seed, round_idx=round_idx
        )
    if before_fit is not None:
        before_fit(state, plan)
    machine = protocol(
        strategy,
        state,
        plan,
        rng=derive_rng(seed, "aggregate", round_idx),
        options=options,
        client_states=client_states.get if client_states is not None else None,
        drop_at=drop_at,
    )
    try:
        result = drive_round(
            machine, backend, client_fn=client_fn, seed=seed, on_stage=options.on_stage
        )
    finally:
        backend.end_round()
    if client_states is not None and result.completed:
        client_states.update(result.client_states, round_idx=result.state.round_idx)
    return result


@dataclass(frozen=True, slots=True)
class _Loop:
    """What :func:`run_rounds` does around each round."""

    rounds: int
    evaluate_fn: EvaluateFn | None
    eval_every: int
    run_dir: RunDirectory | None
    on_round: RoundCallback | None
    client_states: StateStore | None
    on_failed_round: str = "stop"


def run_rounds(
    strategy: Strategy,
    state: ServerState,
    *,
    rounds: int,
    client_fn: ClientFn,
    client_ids: Sequence[ClientId],
    seed: int,
    backend: Backend | None = None,
    options: RoundOptions | None = None,
    evaluate_fn: EvaluateFn | None = None,
    eval_every: int = 1,
    run_dir: RunDirectory | None = None,
    on_round: RoundCallback | None = None,
    client_states: StateStore | None = None,
    **legacy: Any,
) -> ServerState:
    """Run rounds ``state.round_idx .. rounds − 1``.

    ``options`` (or its fields as keywords) says how each round is carried
    out (:class:`~fedshield.simulation.rounds.RoundOptions`). Each round's
    record goes to ``metrics.jsonl``, then its state to the checkpoint, when
    ``run_dir`` is given; then ``on_round`` is called (see
    :func:`_after_round`). A DP round is charged on disk before its clients
    train (:func:`_charge_first`).

    Raises
    ------
    RoundFailedError
        When fewer than ``min_clients`` clients succeed in a round and
        ``options.on_failed_round`` is ``"stop"`` (the default). The last
        checkpoint is that of the previous round, so the run can be resumed.
    """
    if rounds < 1:
        raise ConfigError(f"`rounds` must be >= 1; got {rounds}")
    if eval_every < 1:
        raise ConfigError(f"`eval_every` must be >= 1; got {eval_every}")
    options = replace(options or RoundOptions(), **legacy)
    backend = backend if backend is not None else SequentialBackend()
    loop = _Loop(rounds, evaluate_fn, eval_every, run_dir, on_round, client_states)
    loop = replace(loop, on_failed_round=options.on_failed_round)
    one_round = functools.partial(
        run_round,
        client_fn=client_fn,
        client_ids=client_ids,
        seed=seed,
        backend=backend,
        options=options,
        client_states=client_states,
        before_fit=_charge_first(strategy, run_dir, client_states),
    )
    with _flushed(run_dir):
        while state.round_idx < rounds:
            started = time.perf_counter()
            result = one_round(strategy, state)
            state = _after_round(strategy, state, result, loop, started)
    return state


@contextlib.contextmanager
def _flushed(run_dir: RunDirectory | None) -> Iterator[None]:
    """Wait until the run folder's files are on disk, however the rounds end."""
    try:
        yield
    except BaseException:
        if run_dir is not None:
            # Let the last completed round's files reach the disk, so the
            # run can be resumed from there; the original error matters more.
            with contextlib.suppress(RunDirectoryError):
                run_dir.flush()
        raise
    if run_dir is not None:
        run_dir.flush()  # the last rounds' files may still be on their way


def _after_round(
    strategy: Strategy,
    state: ServerState,
    result: RoundResult,
    loop: _Loop,
    started: float,
) -> ServerState:
    """Record a round's outcome; the state the next round starts from.

    The record (``round`` 1-based, ``accuracy``, ``loss``, ``num_clients``,
    ``seconds``, ...) is appended to ``metrics.jsonl`` and the state
    checkpointed atomically, in that order (with the client states, for
    stateful strategies); the files reach the disk in the background, and
    :func:`run_rounds` waits for them before it returns or raises.
    """
    round_number = state.round_idx + 1
    run_dir = loop.run_dir
    if run_dir is not None and result.failures:
        for failure in result.failures:
            run_dir.append_jsonl(FAILURES, {"round": round_number, **failure.to_json()})
    record: dict[str, Any] = {"round": round_number}
    if not result.completed:
        state = _failed_round(state, result, loop)
        record.update({"completed": False, "error": result.message, "accuracy": None})
        record["loss"] = None
    else:
        state = result.state
        if loop.evaluate_fn is not None and (
            round_number % loop.eval_every == 0 or round_number == loop.rounds
        ):
            evaluated = loop.evaluate_fn(state.params)
            record.update({k: float(v) for k, v in evaluated.items()})
        else:
            record.update({"accuracy": None, "loss": None})
    metrics = {**result.metrics, "seconds": time.perf_counter() - started}
    if isinstance(strategy, PrivateRelease):
        # A DP run writes only what its guarantee covers.
        metrics = strategy.released(metrics)
    record.update(metrics)
    privacy = state.metadata.get("privacy")
    if isinstance(privacy, Mapping):
        # The accountant's epsilon after this round (delta fixed).
        record["epsilon"] = privacy.get("epsilon")
        record["delta"] = privacy.get("delta")
    if run_dir is not None:
        run_dir.append_jsonl(METRICS, record)
        run_dir.save_checkpoint(state, client_states=loop.client_states)
    if loop.on_round is not None:
        loop.on_round(state, record)
    return state


def _failed_round(state: ServerState, result: RoundResult, loop: _Loop) -> ServerState:
    """A round with too few clients: stop the run, or go on from ``state``.

    Going on, the next round starts from the same model, with the round
    counted (and, under DP, charged: the failed round may have released).
    """
    spent = result.state if result.state is not state else None
    if loop.on_failed_round == "continue":
        logger.warning("%s; going on with the next round", result.message)
        base = spent or state
        return base.evolve(round_idx=state.round_idx + 1)
    if spent is not None and loop.run_dir is not None:
        # The round released an aggregate before failing: its privacy cost
        # stays in the checkpoint (a resumed run repeats the round and is
        # charged again).
        loop.run_dir.save_checkpoint(spent, client_states=loop.client_states)
        loop.run_dir.flush()
    raise RoundFailedError(
        result.message
        + ". Failures: "
        + "; ".join(
            f"{f.client_id} ({f.kind}): {f.message}" for f in result.failures[:5]
        ),
        state=spent,
    )


def _charge_first(
    strategy: Strategy, run_dir: RunDirectory | None, client_states: StateStore | None
) -> BeforeFitFn | None:
    """Checkpoint a DP round's cost before its clients release anything.

    With a DP strategy (:class:`~fedshield.strategies.PrivateRelease`) and
    ``run_dir``, once a round is planned and before its clients are asked
    to train, the checkpoint is replaced by the old state charged for the
    round (:meth:`~fedshield.strategies.PrivateRelease.charge_before`: same
    round index and parameters), on disk before anything is released. The
    completed round's checkpoint (charged once, from the uncharged state)
    then replaces it. A run interrupted in between resumes from the charged
    state and runs the round again, which is charged again: the ledger
    counts every release the clients made (distributed mode: the
    interrupted one at the worst it could have cost).
    """
    if run_dir is None or not isinstance(strategy, PrivateRelease):
        return None

    def charge(state: ServerState, plan: RoundPlan) -> None:
        charged = strategy.charge_before(state, plan)
        if charged is state:
            return  # nothing to charge (no client sampled)
        run_dir.save_checkpoint(charged, client_states=client_states)
        run_dir.flush()  # on disk before the first client trains

    return charge
