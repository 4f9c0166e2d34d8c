"""What the pool backends share: the process pool and the Ray actor pool.

Both run clients in a fixed pool of workers (processes or Ray actors) and
differ only in the transport. This module holds the parts that do not depend
on it: the worker-side helpers, the routing of clients to workers within a
round, in-order buffering of replies, the bookkeeping of rounds, stages and
clients whose state was lost, and the failures handed out when a worker dies
or hangs. See :mod:`fedshield.simulation.backends.process` for the design.

What crosses between the parent and a worker
--------------------------------------------
Stage messages and replies cross as :mod:`fedshield.simulation.wire` bytes
(:func:`_encode_reply` on the worker, :func:`_read_reply` here), never as
pickles: a reply is a client's data, and unpickling it would run whatever
code it names. The one pickle is ``client_fn``, the server's own code, sent
from the parent to each worker (:func:`_load_client_fn`): it never travels
the other way.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from fedshield.core import Client, ClientId
from fedshield.errors import ConfigError, ProtocolError
from fedshield.simulation import wire
from fedshield.simulation.backends.base import ClientFn
from fedshield.simulation.protocol import (
    ClientFailure,
    FailureKind,
    StageReply,
    StageRequest,
)

logger = logging.getLogger("fedshield.simulation.backends")

# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


def _pin_torch_threads(num_threads: int) -> None:
    # Only once the client code has loaded torch (unpickling a DatasetClients
    # does; so may building a client): importing it up front would cost every
    # worker start 1-2 s even for torch-free clients, and this layer must not
    # import torch (see the import-linter contract).
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def _pinning(client_fn: ClientFn, num_threads: int) -> ClientFn:
    """``client_fn`` followed by pinning torch: building a client may load it."""

    def build(client_id: ClientId) -> Client:
        client = client_fn(client_id)
        _pin_torch_threads(num_threads)
        return client

    return build


def _failing_client_fn(message: str) -> ClientFn:
    def client_fn(client_id: ClientId) -> Client:
        raise RuntimeError(message)

    return client_fn


def _load_client_fn(payload: bytes, where: str) -> tuple[ClientFn, str | None]:
    """Unpickle ``client_fn``; a stand-in that fails every client if it cannot.

    The only pickle a worker reads: the simulation's client factory, sent
    by the process that starts the pool (the simulator's own code and what
    it gives the clients, such as their trust and key directory; never a
    reply from a client, and never through the round's server code).
    Replies go back as wire bytes.
    """
    try:
        client_fn: ClientFn = pickle.loads(payload)  # the simulator's, see above
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        return _failing_client_fn(f"{where} could not load client_fn: {error}"), error
    return client_fn, None


def _encode_reply(reply: StageReply, stage: str, where: str) -> bytes:
    """``reply`` as wire bytes; its client's failure if the wire cannot carry it."""
    try:
        return wire.encode_reply(reply)
    except Exception as err:  # a value the wire cannot carry fails its client only
        logger.warning(
            "client %s: its reply to stage %r cannot be sent from %s: %s",
            reply.client_id,
            stage,
            where,
            err,
        )
        return wire.encode_reply(
            _failure(
                reply.client_id,
                stage,
                FailureKind.ERROR,
                f"the reply could not be sent from {where}: "
                f"{type(err).__name__}: {err}",
            )
        )


def _stage_failure(client_id: ClientId, stage: str, where: str, why: str) -> bytes:
    """A client's failure when its worker could not read the stage's messages."""
    return wire.encode_reply(
        _failure(
            client_id,
            stage,
            FailureKind.ERROR,
            f"{where} could not read the stage's messages: {why}",
        )
    )


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


def _check_workers(num_workers: int | None, torch_threads: int) -> None:
    """Check ``num_workers`` (unless ``None``) and ``torch_threads``."""
    if num_workers is not None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int):
            raise ConfigError(
                f"`num_workers` must be an int; got {type(num_workers).__name__}"
            )
        if num_workers < 1:
            raise ConfigError(f"`num_workers` must be >= 1; got {num_workers}")
    if torch_threads < 1:
        raise ConfigError(f"`torch_threads` must be >= 1; got {torch_threads}")


def _check_deadlines(grace_s: float, start_timeout_s: float) -> None:
    if not grace_s >= 0:
        raise ConfigError(f"`grace_s` must be >= 0; got {grace_s}")
    if not start_timeout_s > 0:
        raise ConfigError(f"`start_timeout_s` must be > 0; got {start_timeout_s}")


def _failure(
    client_id: ClientId, stage: str, kind: FailureKind, message: str
) -> StageReply:
    return StageReply(client_id, failure=ClientFailure(client_id, stage, kind, message))


def _encode_shares(
    request: StageRequest, groups: dict[int, list[ClientId]], seed: int, where: str
) -> tuple[dict[int, bytes], list[StageReply]]:
    """Each worker's share of ``request`` as wire bytes, and clients left out.

    A message the wire cannot carry (a server-side bug: a message type it
    does not know) fails its client with kind ``error``, as the sequential
    backend fails a client given a message it cannot run; the client is
    taken out of ``groups``.
    """
    shares: dict[int, bytes] = {}
    failed: list[StageReply] = []
    for index, client_ids in list(groups.items()):
        try:
            shares[index] = wire.encode_request(request, client_ids, seed)
            continue
        except ProtocolError:
            pass
        kept = []
        for client_id in client_ids:
            try:
                wire.encode_request(request, [client_id], seed)
            except ProtocolError as err:
                logger.error(
                    "client %s: the message of stage %r cannot be sent to %s: %s",
                    client_id,
                    request.stage,
                    where,
                    err,
                )
                failed.append(
                    _failure(
                        client_id,
                        request.stage,
                        FailureKind.ERROR,
                        f"the stage's message could not be sent to {where}: {err}",
                    )
                )
            else:
                kept.append(client_id)
        if kept:
            groups[index] = kept
            shares[index] = wire.encode_request(request, kept, seed)
        else:
            del groups[index]
    return shares, failed


def _read_reply(
    data: object, client_id: ClientId, stage: str, where: str, max_bytes: int
) -> StageReply:
    """The reply ``client_id``'s worker sent; a ``rejected`` failure if malformed.

    Nothing in ``data`` is run: it is read as wire bytes, and a reply that
    is not exactly one (truncated, oversized, another client's, not bytes)
    fails that client alone, and the round goes on.
    """
    try:
        return wire.decode_reply(
            data,  # type: ignore[arg-type]  # checked by decode_reply
            max_bytes=max_bytes,
            expect_client=client_id,
        )
    except ProtocolError as err:
        logger.warning(
            "client %s: its reply to stage %r from %s was refused: %s",
            client_id,
            stage,
            where,
            err,
        )
        return _failure(
            client_id,
            stage,
            FailureKind.REJECTED,
            f"its reply from {where} was refused: {err}",
        )


def _check_reply_limit(max_reply_bytes: int) -> None:
    if (
        isinstance(max_reply_bytes, bool)
        or not isinstance(max_reply_bytes, int)
        or max_reply_bytes < 1
    ):
        raise ConfigError(
            f"`max_reply_bytes` must be an int >= 1; got {max_reply_bytes!r}"
        )


def _in_order(
    order: list[ClientId], replies: Iterator[StageReply]
) -> Iterator[StageReply]:
    """Yield ``replies`` in ``order``, holding back those that come early."""
    waiting: dict[ClientId, StageReply] = {}
    position = 0
    try:
        for reply in replies:
            waiting[reply.client_id] = reply
            while position < len(order) and order[position] in waiting:
                yield waiting.pop(order[position])
                position += 1
        # Anything left (a reply for an unexpected id) goes out last.
        yield from waiting.values()
    finally:
        close: Callable[[], None] | None = getattr(replies, "close", None)
        if close is not None:
            close()


class _Slot(Protocol):
    """The parent's handle on one worker of a pool."""

    @property
    def index(self) -> int: ...

    @property
    def built(self) -> set[ClientId]:
        """Clients whose objects this worker holds in the current round."""

    @property
    def is_busy(self) -> bool: ...

    def pending_clients(self) -> list[ClientId]:
        """Clients of the open stage not yet answered, in order."""


SlotT = TypeVar("SlotT", bound=_Slot)


class _PoolBackend(Generic[SlotT]):
    """Round, stage and routing bookkeeping shared by the pool backends.

    A subclass sets ``_slots`` (its list of workers, ``None`` where none
    runs) and ``_finalizer`` (which stops them), calls :meth:`_init_pool`,
    and provides :meth:`_set_client_fn`, :meth:`_discard`,
    :meth:`_end_round_on` and :meth:`_take_pending`.
    """

    _worker_noun: ClassVar[str]
    """How failure messages name a worker (``"worker process"``)."""

    ordered: bool
    grace_s: float
    _slots: list[SlotT | None]
    _finalizer: Callable[[], Any]
    _client_fn: ClientFn | None

    def _init_pool(self) -> None:
        self._client_fn = None
        self._generation = 0
        self._round: int | None = None
        self._assignment: dict[ClientId, int] = {}
        self._lost: dict[ClientId, str] = {}
        """Clients of this round whose objects died with their worker, and why."""
        self._seq = 0
        self._open_seq: int | None = None
        self._closed = False

    # -- hooks -----------------------------------------------------------------

    def _set_client_fn(self, client_fn: ClientFn) -> None:
        raise NotImplementedError

    def _discard(self, index: int) -> None:
        """Stop worker ``index`` and forget it."""
        raise NotImplementedError

    def _end_round_on(self, slot: SlotT) -> None:
        """Tell ``slot``'s worker to drop the clients of the round."""
        raise NotImplementedError

    def _take_pending(self, slot: SlotT) -> Iterable[ClientId]:
        """Take ``slot``'s unanswered clients off it, to fail them."""
        raise NotImplementedError

    def _release(self) -> None:
        """Drop what the backend holds besides its workers (on close)."""

    # -- the Backend protocol ------------------------------------------------

    def end_round(self) -> None:
        """Drop the clients of the round in every worker."""
        self._abandon_stage()
        self._forget_round()
        self._round = None

    def close(self) -> None:
        """Stop every worker (idempotent; also done when garbage-collected)."""
        if self._closed:
            return
        self._abandon_stage()
        self._finalizer()
        self._client_fn = None
        self._release()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- stages ----------------------------------------------------------------

    def _open_stage(
        self, request: StageRequest, client_fn: ClientFn
    ) -> tuple[int, list[ClientId], list[StageReply], dict[int, list[ClientId]]]:
        """Open a stage: its sequence number, order, early replies and groups.

        Within a round a client goes to the worker it went to before; a
        client first asked goes to the worker with the fewest clients in the
        stage (lowest index on a tie). A client whose state was lost gets its
        failure among the early replies.
        """
        self._abandon_stage()
        if request.round_idx != self._round:
            self._forget_round()
            self._round = request.round_idx
        if client_fn is not self._client_fn:
            self._set_client_fn(client_fn)
        self._seq += 1
        seq = self._seq
        order = list(request.messages)
        early: list[StageReply] = []
        groups: dict[int, list[ClientId]] = {}
        loads = [0] * len(self._slots)
        for client_id in order:
            if client_id in self._lost:
                early.append(self._lost_reply(client_id, request.stage))
                continue
            index = self._assignment.get(client_id)
            if index is None:
                index = min(range(len(self._slots)), key=loads.__getitem__)
                self._assignment[client_id] = index
            loads[index] += 1
            groups.setdefault(index, []).append(client_id)
        self._open_seq = seq
        return seq, order, early, groups

    def _arrange(
        self, order: list[ClientId], replies: Iterator[StageReply]
    ) -> Iterator[StageReply]:
        """``replies`` in request order, or as they come if not ``ordered``."""
        if not self.ordered:
            return replies
        return _in_order(order, replies)

    def _stage_done(self, seq: int) -> None:
        """Close stage ``seq`` if it is open and no worker is busy with it."""
        if self._open_seq == seq and not any(
            s is not None and s.is_busy for s in self._slots
        ):
            self._open_seq = None

    def _client_deadline(self, clock: float, request: StageRequest) -> float:
        """When a client that started running at ``clock`` is hung."""
        if request.timeout_s is None:
            return float("inf")
        return clock + request.timeout_s + self.grace_s

    def _hang_limit(self, request: StageRequest, stopped: str) -> tuple[float, str]:
        """How long a hung client ran, and its failure's message."""
        limit = (request.timeout_s or 0.0) + self.grace_s
        message = (
            f"no reply within {limit:.3f} s (deadline {request.timeout_s} s plus "
            f"{self.grace_s} s grace); {stopped}"
        )
        return limit, message

    # -- workers lost ----------------------------------------------------------

    def _forget_round(self) -> None:
        for slot in self._slots:
            if slot is None:
                continue
            slot.built.clear()
            self._end_round_on(slot)
        self._assignment.clear()
        self._lost.clear()

    def _slot_lost(self, index: int, why: str) -> None:
        """Forget worker ``index`` and mark the clients it held as lost."""
        slot = self._slots[index]
        if slot is None:
            return
        for client_id in slot.built:
            self._lost.setdefault(
                client_id, f"its {self._worker_noun} {why} earlier in this round"
            )
        self._discard(index)

    def _abandon_stage(self) -> None:
        """Stop workers still busy with a stage whose replies nobody reads."""
        if self._open_seq is None:
            return
        self._open_seq = None
        for index, slot in enumerate(self._slots):
            if slot is not None and slot.is_busy:
                slot.built.update(slot.pending_clients())
                self._slot_lost(index, "was stopped with a stage unfinished")

    def _lost_reply(self, client_id: ClientId, stage: str) -> StageReply:
        failure = ClientFailure(
            client_id,
            stage,
            FailureKind.ERROR,
            f"client state lost: {self._lost[client_id]}",
        )
        return StageReply(client_id, failure=failure)

    def _fail_all(self, slot: SlotT, stage: str, message: str) -> Iterator[StageReply]:
        """Fail every client ``slot`` has not answered, with ``message``."""
        for client_id in self._take_pending(slot):
            slot.built.add(client_id)
            yield _failure(client_id, stage, FailureKind.ERROR, message)

    def _replace(
        self, slot: SlotT, remaining: list[ClientId], stage: str, why: str
    ) -> tuple[list[StageReply], list[ClientId]]:
        """Lose ``slot``; split ``remaining`` into failures and clients to rerun.

        Those whose objects (from an earlier stage of this round) died with
        the worker fail: a rebuilt client would lack the state the protocol
        relies on.
        """
        self._slot_lost(slot.index, why)
        rerun = [c for c in remaining if c not in self._lost]
        failed = [self._lost_reply(c, stage) for c in remaining if c in self._lost]
        return failed, rerun
