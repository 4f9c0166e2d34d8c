"""The gRPC deployment as a backend of the one round loop.

:class:`GrpcBackend` is a :class:`~fedshield.simulation.backends.base.Backend`
like the sequential or Ray backends: the round loop hands it a
:class:`~fedshield.simulation.protocol.StageRequest` and gets one
:class:`~fedshield.simulation.protocol.StageReply` per client asked, in
request order. Here each client is a site elsewhere: its message becomes a
*task* (the wire codec's bytes, :func:`fedshield.simulation.wire.
encode_request`, for that one client) that the site pulls, and its reply a
result it pushes (:mod:`fedshield.transport.server`). A site that does not
answer before the stage's deadline is a ``timeout``; one that stopped
sending heartbeats is ``dropped`` as soon as that is known.

Persistence (:mod:`fedshield.transport.store`): tasks are recorded before
they can be pulled, replies when accepted, and a stage's outcome when it
closes. A server restarted on the same state folder replays the round from
its checkpoint: a stage already closed returns its recorded replies and
asks nobody; an open one asks only who had not answered, with
byte-identical tasks (a task whose bytes differ from the recorded one is a
:class:`~fedshield.transport.store.HistoryError`).

Randomness: a task carries its client's stage seed,
``derive_seed(seed, "stage", stage, round, client)`` (what every backend
uses), never the run's seed, from which the server's own draws (central DP
noise, sampling) derive.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fedshield.core import ClientId, derive_seed
from fedshield.errors import ProtocolError
from fedshield.simulation import wire
from fedshield.simulation.backends.base import ClientFn
from fedshield.simulation.protocol import (
    STAGES_WITH_RANDOMNESS,
    ClientFailure,
    FailureKind,
    StageReply,
    StageRequest,
)
from fedshield.transport.faults import crash_point
from fedshield.transport.store import HistoryError, ServerStore

__all__ = ["GrpcBackend", "Mailbox", "OpenTask", "stage_seed"]

logger = logging.getLogger(__name__)

SEED_BYTES = 32


def stage_seed(seed: int, stage: str, round_idx: int, client_id: ClientId) -> bytes:
    """The client's randomness for a stage, as every backend derives it."""
    if stage not in STAGES_WITH_RANDOMNESS:
        return b""
    entropy = derive_seed(seed, "stage", stage, round_idx, client_id).entropy
    assert isinstance(entropy, int)
    return entropy.to_bytes(SEED_BYTES, "little")


@dataclass
class OpenTask:
    """A task a site may pull now."""

    client_id: ClientId
    round_idx: int
    stage: str
    payload: bytes
    seed: bytes
    deadline: float
    """Server clock (``time.time()``)."""
    task_id: str = ""
    payload_digest: str = ""
    """SHA-256 (hex) of the payload alone (what ``FetchBlob`` serves)."""

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.payload)
        if not self.payload_digest:
            self.payload_digest = digest.hexdigest()
        if not self.task_id:
            digest.update(self.seed)  # SHA-256(payload || seed), one pass
            self.task_id = digest.hexdigest()


@dataclass
class _Site:
    last_seen: float | None = None
    status: str = "unknown"
    joined: bool = False


@dataclass
class Mailbox:
    """What the round thread and the gRPC handlers share, under one lock.

    The round thread opens a stage (:meth:`open_stage`) and waits for it
    (:meth:`wait_stage`); the handlers hand tasks to long polls
    (:meth:`take`) and accept results (:meth:`accept`). ``notify`` wakes
    the handlers' waiters (the server sets it to schedule on its event loop).
    """

    store: ServerStore
    offline_after_s: float
    sites: dict[ClientId, _Site] = field(default_factory=dict)
    finished: bool = False
    notify: Any = None
    on_close: Any = None
    """Called when a stage closes (the server drops partial uploads)."""
    _open: dict[ClientId, OpenTask] = field(default_factory=dict)
    _replies: dict[ClientId, tuple[bytes | bytearray, Any]] = field(
        default_factory=dict
    )
    _saving: dict[ClientId, bytes | bytearray] = field(default_factory=dict)
    _blobs: dict[str, bytes] = field(default_factory=dict)
    _owners: dict[str, ClientId] = field(default_factory=dict)
    _opened_at: float = 0.0
    _lock: threading.Condition = field(default_factory=threading.Condition)

    # -- sites -------------------------------------------------------------------

    def seen(self, client_id: ClientId, status: str | None = None) -> None:
        """A request from ``client_id`` arrived (it is online)."""
        with self._lock:
            site = self.sites.setdefault(client_id, _Site())
            site.last_seen = time.monotonic()
            if status:
                site.status = status
            self._lock.notify_all()

    def joined(self, client_id: ClientId) -> None:
        """``client_id`` joined (or rejoined) the run."""
        with self._lock:
            site = self.sites.setdefault(client_id, _Site())
            site.joined = True
            site.last_seen = time.monotonic()
            self._lock.notify_all()

    def online(self) -> list[ClientId]:
        """The sites seen within the offline window."""
        now = time.monotonic()
        with self._lock:
            return sorted(
                cid
                for cid, s in self.sites.items()
                if s.last_seen is not None and now - s.last_seen <= self.offline_after_s
            )

    def wait_for_sites(self, expected: list[ClientId], timeout_s: float) -> list[str]:
        """Wait until every expected site joined, or ``timeout_s``; return who did."""
        deadline = time.monotonic() + timeout_s
        last_report = 0.0
        with self._lock:
            while True:
                here = [c for c in expected if self.sites.get(c, _Site()).joined]
                left = deadline - time.monotonic()
                if len(here) == len(expected) or left <= 0:
                    return here
                if time.monotonic() - last_report > 10:
                    missing = sorted(set(expected) - set(here))
                    logger.info(
                        "waiting for %d of %d sites (%s), %.0f s left",
                        len(missing),
                        len(expected),
                        ", ".join(missing[:5]),
                        left,
                    )
                    last_report = time.monotonic()
                self._lock.wait(min(left, 1.0))

    # -- the round thread's side -------------------------------------------------

    def open_stage(self, tasks: dict[ClientId, OpenTask]) -> None:
        """Make ``tasks`` pullable (each replaces its site's previous task)."""
        with self._lock:
            self._open = dict(tasks)
            self._replies = {}
            self._blobs = {t.payload_digest: t.payload for t in tasks.values()}
            self._owners = {t.payload_digest: c for c, t in tasks.items()}
            self._opened_at = time.monotonic()
            self._lock.notify_all()
        if self.notify is not None:
            self.notify()

    def wait_stage(
        self, deadline: float
    ) -> tuple[dict[ClientId, tuple[bytes | bytearray, Any]], set[ClientId]]:
        """Wait for the open stage's replies; close it.

        Returns the accepted replies (their bytes and, when decoded
        already, the reply) and the sites found offline. Ends when every
        site replied, at ``deadline`` (server clock), or when every site
        still to reply is offline (no request for ``offline_after_s``); a
        reply being written to disk then is waited for.
        """
        with self._lock:
            while True:
                pending = [c for c in self._open if c not in self._replies]
                offline = {c for c in pending if self._is_offline(c)}
                if not pending or len(offline) == len(pending):
                    break
                left = deadline - time.time()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.5))
            self._open = {}  # nothing more is accepted
            while self._saving:  # replies on their way to disk count
                self._lock.wait(0.5)
            replies = dict(self._replies)
            self._replies = {}
            self._blobs = {}
            self._owners = {}
        if self.on_close is not None:
            self.on_close()
        return replies, offline

    def _is_offline(self, client_id: ClientId) -> bool:
        site = self.sites.get(client_id)
        now = time.monotonic()
        if site is None or site.last_seen is None:
            # Never seen: offline once a whole window passed since the stage opened.
            return now - self._opened_at > self.offline_after_s
        return now - site.last_seen > self.offline_after_s

    def finish(self) -> None:
        """The run is over: long polls answer ``finished``."""
        with self._lock:
            self.finished = True
            self._open = {}
            self._lock.notify_all()
        if self.notify is not None:
            self.notify()

    # -- the handlers' side ------------------------------------------------------

    def task_for(self, client_id: ClientId) -> OpenTask | None:
        """The site's open task it has not answered yet, if any."""
        with self._lock:
            task = self._open.get(client_id)
            if task is None or client_id in self._replies:
                return None
            return task

    def blob(self, digest: str) -> bytes | None:
        """An open task's payload by its digest."""
        with self._lock:
            return self._blobs.get(digest)

    def owner(self, digest: str) -> ClientId | None:
        """Whose open task has this payload digest (None: nobody's)."""
        with self._lock:
            return self._owners.get(digest)

    def task_owner(self, task_id: str) -> ClientId | None:
        """Whose open task ``task_id`` is (None: nobody's)."""
        with self._lock:
            for cid, task in self._open.items():
                if task.task_id == task_id:
                    return cid
        return None

    def accept(
        self,
        client_id: ClientId,
        task_id: str,
        data: bytes | bytearray,
        decoded: Any = None,
        *,
        file: Any = None,
        digest: str | None = None,
    ) -> str:
        """Record a result; ``accepted``, ``duplicate``, ``closed`` or ``conflict``.

        ``data`` has been decoded (``decoded``) and checked by the caller. A
        result for a task that is not this site's open task is ``closed``
        (too late, or not its task: the caller checks ownership first). The
        result is written to disk outside the lock (sites' results are
        saved in parallel); it counts once it is there.
        """
        with self._lock:
            task = self._open.get(client_id)
            if task is None or task.task_id != task_id:
                return "closed"
            known = self._replies.get(client_id)
            seen = known[0] if known is not None else self._saving.get(client_id)
            if seen is not None:
                return "duplicate" if seen == data else "conflict"
            self._saving[client_id] = data
        saved = False
        try:
            # Persisted before it counts: a restarted server finds it.
            self.store.add_reply(
                task.round_idx, task.stage, client_id, data, file=file, digest=digest
            )
            saved = True
        finally:
            with self._lock:
                del self._saving[client_id]
                if saved:
                    self._replies[client_id] = (data, decoded)
                self._lock.notify_all()
        crash_point("server.after_reply")
        return "accepted"

    def reply_digest(self, client_id: ClientId, task_id: str) -> str | None:
        """SHA-256 of the site's accepted reply to ``task_id`` (None: none)."""
        with self._lock:
            task = self._open.get(client_id)
            if task is None or task.task_id != task_id:
                return None
            known = self._replies.get(client_id)
            return None if known is None else hashlib.sha256(known[0]).hexdigest()


class GrpcBackend:
    """Runs each stage on the sites connected to a gRPC server.

    Parameters
    ----------
    mailbox
        Shared with the server's handlers.
    store
        The server's durable state.
    fit_timeout_s, stage_timeout_s
        Deadlines of ``fit``/``evaluate`` and of the secure stages, used
        when the request sets none.
    max_reply_bytes
        Largest reply accepted.
    """

    def __init__(
        self,
        mailbox: Mailbox,
        store: ServerStore,
        *,
        fit_timeout_s: float = 600.0,
        stage_timeout_s: float = 60.0,
        max_reply_bytes: int = wire.DEFAULT_MAX_BYTES,
    ) -> None:
        self.mailbox = mailbox
        self.store = store
        self.fit_timeout_s = fit_timeout_s
        self.stage_timeout_s = stage_timeout_s
        self.max_reply_bytes = max_reply_bytes

    def _timeout(self, request: StageRequest) -> float:
        if request.timeout_s is not None:
            return float(request.timeout_s)
        if request.stage in ("fit", "evaluate"):
            return self.fit_timeout_s
        return self.stage_timeout_s

    def run_stage(
        self, request: StageRequest, *, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        """Ask each site, wait for the stage, yield the replies in request order."""
        del client_fn  # the sites build their own clients
        round_idx, stage = request.round_idx, request.stage
        deadline = time.time() + self._timeout(request)
        tasks = {
            cid: OpenTask(
                cid,
                round_idx,
                stage,
                wire.encode_request(request, [cid], 0),
                stage_seed(seed, stage, round_idx, cid),
                deadline,
            )
            for cid in request.messages
        }
        record = self.store.stage(round_idx, stage)
        for cid, task in tasks.items():
            known = record.tasks.get(cid)
            if known is not None and known != task.task_id:
                raise HistoryError(
                    f"round {round_idx}, stage {stage!r}: the task for {cid!r} "
                    "differs from the one recorded before the restart; the "
                    "configuration or the checkpoint changed under the same "
                    "--state (start a new state folder)"
                )
        self.store.add_tasks(
            round_idx, stage, {cid: t.task_id for cid, t in tasks.items()}
        )
        stored: dict[ClientId, Any] = {
            cid: self.store.blobs.get(d) for cid, d in record.replies.items()
        }
        decoded: dict[ClientId, StageReply] = {}
        if not record.closed:
            ask = {cid: t for cid, t in tasks.items() if cid not in stored}
            if ask:
                self.mailbox.open_stage(ask)
                got, offline = self.mailbox.wait_stage(deadline)
                for cid, (data, reply) in got.items():
                    stored[cid] = data
                    if reply is not None:
                        decoded[cid] = reply
                for cid in ask:
                    if cid in got:
                        continue
                    kind = (
                        FailureKind.DROPPED if cid in offline else FailureKind.TIMEOUT
                    )
                    why = (
                        "the site went offline (no request within the window)"
                        if kind is FailureKind.DROPPED
                        else f"no reply before the stage's deadline "
                        f"({self._timeout(request):g} s)"
                    )
                    failure = ClientFailure(cid, stage, kind, why)
                    data = wire.encode_reply(StageReply(cid, failure=failure))
                    if not self.store.add_reply(round_idx, stage, cid, data):
                        # A reply reached the disk first: it is what counts.
                        fresh = self.store.stage(round_idx, stage).replies[cid]
                        data = self.store.blobs.get(fresh)
                    stored[cid] = data
            self.store.close_stage(round_idx, stage, sorted(stored))
            crash_point("server.after_stage_close")
        for cid in request.messages:
            if cid in decoded:  # checked when it arrived: not decoded twice
                yield decoded[cid]
                continue
            found = stored.get(cid)
            if found is None:  # a closed stage without this client: cannot happen
                failure = ClientFailure(cid, stage, FailureKind.DROPPED, "no record")
                yield StageReply(cid, failure=failure)
                continue
            try:
                yield wire.decode_reply(
                    found, max_bytes=self.max_reply_bytes, expect_client=cid
                )
            except ProtocolError as err:  # accepted replies were checked already
                failure = ClientFailure(cid, stage, FailureKind.REJECTED, str(err))
                yield StageReply(cid, failure=failure)

    def end_round(self) -> None:
        """Nothing is kept between rounds here (the sites keep their own)."""

    def close(self) -> None:
        """Tell the sites the run is over."""
        self.mailbox.finish()
