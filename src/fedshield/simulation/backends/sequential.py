"""The sequential backend: every client in this process, one after another.

It is the reference implementation that every other backend must match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from fedshield.core import ClientId, derive_rng
from fedshield.simulation.backends.base import ClientFn
from fedshield.simulation.protocol import (
    STAGES_WITH_RANDOMNESS,
    ClientFailure,
    ClientSession,
    FailureKind,
    StageReply,
    StageRequest,
    execute_stage,
)

__all__ = ["SequentialBackend", "run_client_stage"]

logger = logging.getLogger(__name__)


def run_client_stage(
    client_fn: ClientFn,
    client_id: ClientId,
    request: StageRequest,
    *,
    seed: int,
    cache: dict[ClientId, ClientSession] | None = None,
) -> StageReply:
    """Build (or reuse) one client and run its half of ``request``.

    ``cache`` keeps each client's :class:`~fedshield.simulation.protocol.
    ClientSession` for the round, so that later stages reach the same client.

    Any exception, from building the client or from the stage, becomes a
    :class:`ClientFailure` of kind ``error``; a reply slower than
    ``request.timeout_s`` becomes one of kind ``timeout``.
    """
    started = time.perf_counter()
    rng = (
        derive_rng(seed, "stage", request.stage, request.round_idx, client_id)
        if request.stage in STAGES_WITH_RANDOMNESS
        else None
    )
    try:
        session = cache.get(client_id) if cache is not None else None
        if session is None:
            session = ClientSession(client_id, client_fn(client_id))
            if cache is not None:
                cache[client_id] = session
        value = execute_stage(
            session, request.stage, request.messages[client_id], rng=rng
        )
    except Exception as err:  # a client's failure must not stop the round
        logger.warning(
            "client %s failed in stage %r of round %d: %s: %s",
            client_id,
            request.stage,
            request.round_idx,
            type(err).__name__,
            err,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )
        failure = ClientFailure(
            client_id, request.stage, FailureKind.ERROR, f"{type(err).__name__}: {err}"
        )
        return StageReply(client_id, failure=failure)
    elapsed = time.perf_counter() - started
    if request.timeout_s is not None and elapsed > request.timeout_s:
        failure = ClientFailure(
            client_id,
            request.stage,
            FailureKind.TIMEOUT,
            f"replied after {elapsed:.3f} s; the deadline was {request.timeout_s} s",
        )
        return StageReply(client_id, failure=failure)
    return StageReply(client_id, value=value)


class SequentialBackend:
    """Runs clients one at a time in this process (the reference backend).

    Clients are built lazily with ``client_fn`` the first time they are asked
    in a round and kept until :meth:`end_round`, so a multi-stage protocol
    talks to the same client object in every stage. The deadline applies to
    each client's own running time, as if the clients ran in parallel.
    """

    def __init__(self) -> None:
        self._clients: dict[ClientId, ClientSession] = {}
        self._round: int | None = None

    def run_stage(
        self, request: StageRequest, *, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        """Yield each client's reply as soon as it is computed."""
        if request.round_idx != self._round:
            self._clients.clear()
            self._round = request.round_idx
        for client_id in request.messages:
            yield run_client_stage(
                client_fn, client_id, request, seed=seed, cache=self._clients
            )

    def session(self, client_id: ClientId) -> ClientSession | None:
        """The client's session in the current round (None: not built)."""
        return self._clients.get(client_id)

    def end_round(self) -> None:
        """Drop the clients of the round."""
        self._clients.clear()
        self._round = None

    def close(self) -> None:
        """Nothing to release."""
        self.end_round()

    def __repr__(self) -> str:
        return "SequentialBackend()"
