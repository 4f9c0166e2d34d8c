"""The one round loop, shared by every backend and by the Python API."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedshield.core import ClientId, Params, ServerState, derive_rng
from fedshield.errors import ConfigError, RoundFailedError, RunDirectoryError
from fedshield.simulation.backends import Backend, ClientFn, SequentialBackend
from fedshield.simulation.protocol import RoundProtocol, StageRequest
from fedshield.simulation.rounds import CollusionFn, FitRound, RoundResult
from fedshield.simulation.rundir import FAILURES, METRICS, RunDirectory
from fedshield.simulation.secure import Faults, SecureAggregation
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
    protocol: RoundProtocol, backend: Backend, *, client_fn: ClientFn, seed: int
) -> RoundResult:
    """Carry a round's stages between its protocol and a backend until it ends."""
    step: object = protocol.start()
    while isinstance(step, StageRequest):
        replies = backend.run_stage(step, client_fn=client_fn, seed=seed)
        step = protocol.receive(replies)
    if not isinstance(step, RoundResult):
        raise TypeError(f"round protocol ended with {type(step).__name__}")
    return step


@dataclass(frozen=True, slots=True)
class _RoundSettings:
    seed: int
    federated_eval: bool
    timeout_s: float | None
    max_examples: int | None


def run_round(
    strategy: Strategy,
    state: ServerState,
    *,
    client_fn: ClientFn,
    client_ids: Sequence[ClientId],
    seed: int,
    backend: Backend | None = None,
    federated_eval: bool = False,
    timeout_s: float | None = None,
    max_examples: int | None = None,
    client_states: StateStore | None = None,
    secure: SecureAggregation | None = None,
    faults: Faults | None = None,
    colluders: Collection[ClientId] = (),
    collude: CollusionFn | None = None,
    before_fit: BeforeFitFn | None = None,
) -> RoundResult:
    """Plan and run round ``state.round_idx``; return how it ended.

    With ``secure``, the round's updates are combined by secure aggregation
    (only their sum is learned); with ``faults``, sampled clients drop out at
    a random stage of the round, drawn from ``seed``, the round and the
    client.

    A stateful strategy (SCAFFOLD) needs ``client_states``; the new client
    states of a completed round are written to it before this returns.

    ``before_fit(state, plan)`` is called once the round is planned, before
    its stage ``fit`` is sent to the clients (:func:`run_rounds` checkpoints
    a DP round's privacy cost there).

    Randomness comes from ``seed`` and the round index only, so the same
    round gives the same result whether it runs after round ``r − 1`` in one
    process or after a resume.
    """
    backend = backend if backend is not None else SequentialBackend()
    round_idx = state.round_idx
    plan = strategy.configure(
        state, client_ids, rng=derive_rng(seed, "configure", round_idx)
    )
    drop_at: dict[ClientId, str] = {}
    if faults is not None:
        stages = ("fit", *(secure.stages() if secure is not None else ()))
        drop_at = faults.draw(plan.clients, stages, seed=seed, round_idx=round_idx)
    if before_fit is not None:
        before_fit(state, plan)
    protocol = FitRound(
        strategy,
        state,
        plan,
        rng=derive_rng(seed, "aggregate", round_idx),
        federated_eval=federated_eval,
        timeout_s=timeout_s,
        max_examples=max_examples,
        client_states=client_states.get if client_states is not None else None,
        secure=secure,
        drop_at=drop_at,
        colluders=colluders,
        collude=collude,
    )
    try:
        result = drive_round(protocol, backend, client_fn=client_fn, seed=seed)
    finally:
        backend.end_round()
    if client_states is not None and result.completed:
        client_states.update(result.client_states, round_idx=result.state.round_idx)
    return result


def run_rounds(
    strategy: Strategy,
    state: ServerState,
    *,
    rounds: int,
    client_fn: ClientFn,
    client_ids: Sequence[ClientId],
    seed: int,
    backend: Backend | None = None,
    evaluate_fn: EvaluateFn | None = None,
    eval_every: int = 1,
    federated_eval: bool = False,
    timeout_s: float | None = None,
    max_examples: int | None = None,
    run_dir: RunDirectory | None = None,
    on_round: RoundCallback | None = None,
    client_states: StateStore | None = None,
    secure: SecureAggregation | None = None,
    faults: Faults | None = None,
    colluders: Collection[ClientId] = (),
    collude: CollusionFn | None = None,
) -> ServerState:
    """Run rounds ``state.round_idx .. rounds − 1``.

    After each round the record (``round`` 1-based, ``accuracy``, ``loss``,
    ``num_clients``, ``seconds``, ...) is appended to ``metrics.jsonl`` and
    the state checkpointed atomically, in that order, when ``run_dir`` is
    given (with ``client_states``, for stateful strategies); then
    ``on_round`` is called. The files reach the disk in the background
    (:class:`RunDirectory`); before returning or raising, this waits until
    they have.

    With a DP strategy (:class:`~fedshield.strategies.PrivateRelease`) and
    ``run_dir``, each round is charged before it releases anything: once
    the round is planned and before its clients are asked to train, the
    checkpoint is replaced by the old state charged for the round
    (:meth:`~fedshield.strategies.PrivateRelease.charge_before`: same
    round index and parameters), and this waits until it is on disk. The
    completed round's checkpoint (charged once, from the uncharged state)
    then replaces it. A run interrupted in between resumes from the charged
    state and runs the round again, which is charged again: the ledger
    counts every release the clients made (distributed mode: the
    interrupted one at the worst it could have cost).

    Raises
    ------
    RoundFailedError
        When fewer than ``min_clients`` clients succeed in a round. The last
        checkpoint is that of the previous round, so the run can be resumed.
    """
    if rounds < 1:
        raise ConfigError(f"`rounds` must be >= 1; got {rounds}")
    if eval_every < 1:
        raise ConfigError(f"`eval_every` must be >= 1; got {eval_every}")
    backend = backend if backend is not None else SequentialBackend()
    before_fit = _charge_first(strategy, run_dir, client_states)
    try:
        while state.round_idx < rounds:
            started = time.perf_counter()
            result = run_round(
                strategy,
                state,
                client_fn=client_fn,
                client_ids=client_ids,
                seed=seed,
                backend=backend,
                federated_eval=federated_eval,
                timeout_s=timeout_s,
                max_examples=max_examples,
                client_states=client_states,
                secure=secure,
                faults=faults,
                colluders=colluders,
                collude=collude,
                before_fit=before_fit,
            )
            round_number = state.round_idx + 1
            if run_dir is not None and result.failures:
                for failure in result.failures:
                    run_dir.append_jsonl(
                        FAILURES, {"round": round_number, **failure.to_json()}
                    )
            if not result.completed:
                spent = result.state if result.state is not state else None
                if spent is not None and run_dir is not None:
                    # The round released an aggregate before failing: its
                    # privacy cost stays in the checkpoint (a resumed run
                    # repeats the round and is charged again).
                    run_dir.save_checkpoint(spent, client_states=client_states)
                    run_dir.flush()
                raise RoundFailedError(
                    result.message
                    + ". Failures: "
                    + "; ".join(
                        f"{f.client_id} ({f.kind}): {f.message}"
                        for f in result.failures[:5]
                    ),
                    state=spent,
                )
            state = result.state
            record: dict[str, Any] = {"round": round_number}
            if evaluate_fn is not None and (
                round_number % eval_every == 0 or round_number == rounds
            ):
                record.update(
                    {k: float(v) for k, v in evaluate_fn(state.params).items()}
                )
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
                run_dir.save_checkpoint(state, client_states=client_states)
            if on_round is not None:
                on_round(state, record)
    except BaseException:
        if run_dir is not None:
            # Let the last completed round's files reach the disk, so the
            # run can be resumed from there; the original error matters more.
            with contextlib.suppress(RunDirectoryError):
                run_dir.flush()
        raise
    if run_dir is not None:
        run_dir.flush()  # the last rounds' files may still be on their way
    return state


def _charge_first(
    strategy: Strategy, run_dir: RunDirectory | None, client_states: StateStore | None
) -> BeforeFitFn | None:
    """Checkpoint a DP round's cost before its clients release anything."""
    if run_dir is None or not isinstance(strategy, PrivateRelease):
        return None

    def charge(state: ServerState, plan: RoundPlan) -> None:
        charged = strategy.charge_before(state, plan)
        if charged is state:
            return  # nothing to charge (no client sampled)
        run_dir.save_checkpoint(charged, client_states=client_states)
        run_dir.flush()  # on disk before the first client trains

    return charge
