"""Spread the clients' halves of a large secure round over cores.

The clients' halves of SecAgg (key agreements, Shamir shares, masks) are
most of a large secure round's work, and they run where the clients run.
With the in-process backends (sequential, vectorised) that is one core.
:class:`SecureOffload` wraps such a backend: training and evaluation stay
with it, and in the protocol's first stage every other client's half is
handed (:class:`~fedshield.simulation.secure_client.HandedHalf`: its update,
its signing key, its checked setup; over the wire codec, no pickle) to a
:class:`~fedshield.simulation.backends.process.ProcessPoolBackend` worker,
which answers that client's later stages. The server's side sees the same
stages and bytes either way, and each client's randomness comes from
``(seed, stage, round, client)`` wherever it runs, so results are bitwise
those of the wrapped backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from fedshield.core import ClientId
from fedshield.errors import FedShieldError
from fedshield.simulation.backends.base import Backend, ClientFn
from fedshield.simulation.protocol import (
    ClientFailure,
    FailureKind,
    StageReply,
    StageRequest,
)
from fedshield.simulation.secure_client import (
    SECURE_STAGES,
    SecureStageIns,
    hand_over,
)

__all__ = ["SecureOffload", "half_client"]


class _Half:
    """A client whose half of a secure round was handed to this process."""

    takes_handed_halves = True
    """Only such a placeholder takes a :class:`HandedHalf` (a client that
    trains refuses one: it could come from the server)."""

    def __init__(self, client_id: ClientId) -> None:
        self.client_id = client_id

    def fit(self, *args: Any) -> Any:
        raise FedShieldError("a handed-over half does not train")

    def evaluate(self, *args: Any) -> Any:
        raise FedShieldError("a handed-over half does not evaluate")


def half_client(client_id: ClientId) -> Any:
    """The pool's client factory: a placeholder the handed half fills."""
    return _Half(client_id)


class SecureOffload:
    """An in-process backend whose secure stages use a process pool too.

    Parameters
    ----------
    inner
        The backend that trains and evaluates (sequential or vectorised).
    pool
        Worker processes for the handed halves (one on two cores: this
        process keeps the other half of the clients and the server).
    min_clients
        Fewest clients in the protocol's first stage for any half to be
        handed over (below, the pool's round trips cost more than they
        save).
    """

    def __init__(self, inner: Backend, pool: Backend, *, min_clients: int = 32) -> None:
        if not hasattr(inner, "session"):
            raise TypeError(f"{inner!r} does not expose its client sessions")
        self.inner = inner
        self.pool = pool
        self.min_clients = min_clients
        self._remote: set[ClientId] = set()

    def run_stage(
        self, request: StageRequest, *, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        """Secure stages: every other client on the pool; others: the inner backend."""
        if request.stage not in SECURE_STAGES:
            return self.inner.run_stage(request, client_fn=client_fn, seed=seed)
        return self._secure_stage(request, client_fn, seed)

    def _secure_stage(
        self, request: StageRequest, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        early: dict[ClientId, StageReply] = {}
        messages = dict(request.messages)
        if request.stage == SECURE_STAGES[0]:
            early = self._hand_over(messages)
        remote = {c: m for c, m in messages.items() if c in self._remote}
        local = {c: m for c, m in messages.items() if c not in self._remote}
        # The pool starts on its share now; this process answers its own.
        far = (
            self.pool.run_stage(
                replace(request, messages=remote), client_fn=half_client, seed=seed
            )
            if remote
            else iter(())
        )
        near = (
            self.inner.run_stage(
                replace(request, messages=local), client_fn=client_fn, seed=seed
            )
            if local
            else iter(())
        )
        if request.stage != SECURE_STAGES[0]:
            # The server takes this process's replies while the pool works;
            # a thread reads the pool's replies as they come, so that its
            # worker never stalls on a full pipe meanwhile.
            yield from early.values()
            yield from near
            yield from far
            return
        # The first stage in request order: who advertised first leads
        # (and seeds SecAgg+'s graph), as with the inner backend alone.
        replies = {r.client_id: r for r in (*near, *far)}
        replies.update(early)
        for client_id in request.messages:
            if client_id in replies:
                yield replies[client_id]

    def _hand_over(self, messages: dict[ClientId, Any]) -> dict[ClientId, StageReply]:
        """Hand every other client's half to the pool; failures of those refused."""
        self._remote = set()
        if len(messages) < self.min_clients:
            return {}
        holder: Any = self.inner
        refused: dict[ClientId, StageReply] = {}
        for index, client_id in enumerate(sorted(messages)):
            session = holder.session(client_id)
            message = messages[client_id]
            if index % 2 == 0 or session is None:
                continue
            if not isinstance(message, SecureStageIns) or message.setup is None:
                continue  # the inner backend reports the malformed message
            try:
                messages[client_id] = hand_over(session, message)
            except Exception as err:  # a client's failure must not stop the round
                failure = ClientFailure(
                    client_id,
                    SECURE_STAGES[0],
                    FailureKind.ERROR,
                    f"{type(err).__name__}: {err}",
                )
                refused[client_id] = StageReply(client_id, failure=failure)
                del messages[client_id]
                continue
            self._remote.add(client_id)
        return refused

    def end_round(self) -> None:
        """Both backends forget the round."""
        self._remote = set()
        self.inner.end_round()
        self.pool.end_round()

    def close(self) -> None:
        """Close both backends."""
        self._remote = set()
        try:
            self.inner.close()
        finally:
            self.pool.close()

    def __repr__(self) -> str:
        return f"SecureOffload({self.inner!r}, {self.pool!r})"
