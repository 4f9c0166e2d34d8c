"""The process-pool backend: clients run in parallel in worker processes.

Each worker is a separate Python process fed through a pipe. It receives the
``client_fn`` once (when it starts, and again only when ``run_stage`` is given
a different ``client_fn`` object), then batches of clients to run. Inside the
worker every client runs through :func:`run_client_stage`, the sequential
backend's own code, so randomness, errors and deadlines are handled exactly
as there.

Design
------
Context
    Workers start with ``"spawn"`` by default: a fresh interpreter, the same
    on Linux, macOS and Windows. ``"forkserver"`` (POSIX only; Python
    3.14's default on Linux) is accepted too. ``"fork"`` is refused: a forked
    child inherits torch's and BLAS's thread pools in whatever state the
    parent's threads left them, and can deadlock. A start costs about 0.3 s
    plus loading ``client_fn`` (1-2 s when that imports torch), once per
    worker and again only after a worker dies.
Routing
    Within a round a client always runs on the same worker, which keeps the
    client object built in the round's first stage until :meth:`end_round`;
    so a multi-stage protocol talks to one client object per round, as with
    the sequential backend. A client first asked in a round goes to the
    worker with the fewest clients in that stage (lowest index on a tie), so
    stage one is dealt round-robin in request order.
Ordering
    With ``ordered=True`` (the default) replies are yielded in request order:
    aggregation then adds floating-point updates in the same order as the
    sequential backend and the results are bitwise identical. Round-robin
    dealing keeps out-of-order replies waiting in a buffer of roughly one per
    worker when clients take similar time. ``ordered=False`` yields each
    reply as it arrives (results may then differ from the sequential backend
    in the last bits).
Failures
    A worker that dies (``os._exit``, a segfault, the OOM killer) costs only
    the client it was running: that client gets a failure of kind ``error``
    naming the dead worker; the worker is restarted and runs the rest of its
    batch. With a deadline ``timeout_s``, a client with no reply after
    ``timeout_s + grace_s`` seconds of its own running time gets a failure of
    kind ``timeout``, and its worker is stopped and restarted the same way.
    Clients whose objects lived in a worker that died keep no state: in later
    stages of that round they get a failure of kind ``error`` rather than a
    silently rebuilt client.
Serialisation
    The pipe carries byte frames only. A worker's share of a stage and each
    client's reply are :mod:`fedshield.simulation.wire` messages, read
    strictly: a reply that is not exactly one (truncated, over
    ``max_reply_bytes``, another client's) is a failure of kind
    ``rejected`` for that client and the round goes on; a reply the wire
    cannot carry (a metric that is not a number) fails its client in the
    worker. Nothing a worker sends is unpickled. The one pickle is
    ``client_fn``, the server's own code, sent to each worker once (not
    one per client): it travels from the parent to the workers only.

    ==========================  ===============================================
    frame (first byte)          content
    ==========================  ===============================================
    ``I`` parent → worker       generation (8 bytes); then one frame:
                                ``client_fn`` pickled
    ``S`` parent → worker       stage sequence number (8 bytes), the share
                                (:func:`~fedshield.simulation.wire.encode_request`)
    ``E``, ``X`` parent →       end the round; stop
    ``R`` worker → parent       :func:`~fedshield.simulation.wire.encode_ready`
    ``P`` worker → parent       sequence number, one client's reply
                                (:func:`~fedshield.simulation.wire.encode_reply`)
    ``U`` worker → parent       sequence number, why the share was unreadable
    ==========================  ===============================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import platform
import queue
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from fedshield.core import ClientId
from fedshield.errors import ConfigError, ProtocolError
from fedshield.simulation import wire
from fedshield.simulation.backends._pool import (
    _check_deadlines,
    _check_reply_limit,
    _check_workers,
    _encode_reply,
    _encode_shares,
    _failing_client_fn,
    _failure,
    _load_client_fn,
    _pin_torch_threads,
    _pinning,
    _PoolBackend,
    _read_reply,
)
from fedshield.simulation.backends.base import ClientFn
from fedshield.simulation.backends.sequential import run_client_stage
from fedshield.simulation.protocol import (
    ClientSession,
    FailureKind,
    StageReply,
    StageRequest,
)
from fedshield.simulation.secure_client import SECURE_STAGES

__all__ = ["ProcessPoolBackend"]

logger = logging.getLogger(__name__)

MpContext = Literal["spawn", "forkserver"]

_STOP_WAIT_S = 2.0
"""How long a worker asked to stop may take before it is killed."""

# Frame kinds (see the module docstring).
_INIT = b"I"
_STAGE = b"S"
_END_ROUND = b"E"
_STOP = b"X"
_READY = b"R"
_REPLY = b"P"
_UNREADABLE = b"U"
_WHERE = "the worker process"


def _number(value: int) -> bytes:
    return value.to_bytes(8, "big")


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


def _worker_main(conn: Connection, torch_threads: int) -> None:
    """Serve the parent's frames (see the module docstring) until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client_fn: ClientFn = _failing_client_fn("no client_fn was sent to the worker")
    cache: dict[ClientId, ClientSession] = {}
    # A secure stage's replies leave through a sender thread: a client's
    # half never waits on a full pipe while the parent answers its own
    # clients' halves (it reads when it can). Other stages send directly, so
    # that a worker that dies loses only the client it was running; the
    # parent collects every reply of a stage before it sends the next one,
    # so the two paths never reorder frames.
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    sender = threading.Thread(target=_send_all, args=(conn, outbox), daemon=True)
    sender.start()
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):  # the parent has gone
            return
        kind = frame[:1]
        if kind == _INIT:
            generation = int.from_bytes(frame[1:9], "big")
            try:
                payload = conn.recv_bytes()
            except (EOFError, OSError):
                return
            client_fn, error = _load_client_fn(payload, _WHERE)
            del payload
            _pin_torch_threads(torch_threads)
            ready = wire.WorkerReady(generation, os.getpid(), platform.node(), error)
            conn.send_bytes(_READY + wire.encode_ready(ready))
        elif kind == _STAGE:
            seq = frame[1:9]
            try:
                request, seed = wire.decode_request(memoryview(frame)[9:])
            except ProtocolError as err:
                conn.send_bytes(_UNREADABLE + seq + str(err).encode("utf-8", "replace"))
                continue
            del frame
            build = _pinning(client_fn, torch_threads)
            post = outbox.put if request.stage in SECURE_STAGES else conn.send_bytes
            for client_id in request.messages:
                _pin_torch_threads(torch_threads)
                reply = run_client_stage(
                    build, client_id, request, seed=seed, cache=cache
                )
                data = _encode_reply(reply, request.stage, _WHERE)
                del reply
                post(_REPLY + seq + data)
        elif kind == _END_ROUND:
            cache.clear()
        elif kind == _STOP:
            # Skip the interpreter's teardown: with torch loaded it takes
            # 0.5-2 s per worker, and a worker holds nothing that needs it
            # (as a forked multiprocessing child, it ends with os._exit).
            cache.clear()
            outbox.put(None)
            sender.join(timeout=5)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)


def _send_all(conn: Connection, outbox: queue.SimpleQueue[bytes | None]) -> None:
    """A worker's sender thread: each frame in order, until None or the pipe dies."""
    while True:
        frame = outbox.get()
        if frame is None:
            return
        try:
            conn.send_bytes(frame)
        except (EOFError, OSError):  # the parent has gone
            return


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    """The parent's handle on one worker process."""

    index: int
    process: BaseProcess
    conn: Connection
    started_at: float
    generation: int | None = None
    """Which ``client_fn`` the worker holds (``None``: none sent yet)."""
    is_ready: bool = False
    """Whether the worker has loaded its ``client_fn``."""
    pending: deque[ClientId] = field(default_factory=deque)
    """Clients of the open stage sent to it and not yet answered, in order."""
    clock: float = 0.0
    """When the first pending client started running (as seen from here)."""
    built: set[ClientId] = field(default_factory=set)
    """Clients whose objects this process holds in the current round."""

    @property
    def is_busy(self) -> bool:
        return bool(self.pending)

    def pending_clients(self) -> list[ClientId]:
        """Clients of the open stage not yet answered, in order."""
        return list(self.pending)


def _default_num_workers() -> int:
    count: int | None
    if hasattr(os, "process_cpu_count"):  # Python >= 3.13
        count = os.process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:
        count = os.cpu_count()
    return max(1, count or 1)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class ProcessPoolBackend(_PoolBackend[_Worker]):
    """Runs clients in parallel in a pool of worker processes.

    Gives the same replies as :class:`SequentialBackend` for the same seed:
    each worker runs its clients with :func:`run_client_stage`, so a client's
    randomness comes from ``(seed, stage, round_idx, client_id)`` and errors
    and deadlines are handled identically. See the module docstring for how
    clients are routed, ordered and recovered when a worker dies or hangs.

    ``client_fn`` must be picklable (a module-level function or class, or a
    :func:`functools.partial` of one, such as the API's ``DatasetClients``):
    each worker gets one copy, not one per client. Close the backend (or use
    it as a context manager) to stop its workers.

    Parameters
    ----------
    num_workers
        Worker processes (default: the CPUs this process may use). Workers
        start on first use, only as many as a stage needs.
    torch_threads
        Intra-op threads torch uses in each worker, set as soon as the
        client code has loaded torch (workers never import it themselves).
    mp_context
        How workers start: ``"spawn"`` (default, portable) or
        ``"forkserver"`` (POSIX only).
    ordered
        Yield replies in request order, so results are bitwise identical to
        the sequential backend's (default); ``False`` yields them as they
        arrive.
    grace_s
        With a deadline, seconds beyond ``timeout_s`` a client may run before
        its worker is stopped as hung.
    start_timeout_s
        Seconds a new worker may take to start and load ``client_fn``.
    max_reply_bytes
        Largest reply read from a worker; a larger one is refused (a
        failure of kind ``rejected`` for its client).

    Raises
    ------
    ConfigError
        If a parameter is out of range or ``mp_context`` is not allowed.

    Examples
    --------
    >>> with ProcessPoolBackend(num_workers=2) as backend:  # doctest: +SKIP
    ...     run_rounds(strategy, state, backend=backend, ...)
    """

    _worker_noun = "worker process"

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        torch_threads: int = 1,
        mp_context: MpContext = "spawn",
        ordered: bool = True,
        grace_s: float = 5.0,
        start_timeout_s: float = 300.0,
        max_reply_bytes: int = wire.DEFAULT_MAX_BYTES,
    ) -> None:
        if num_workers is None:
            num_workers = _default_num_workers()
        _check_workers(num_workers, torch_threads)
        method: str = mp_context
        if method not in ("spawn", "forkserver"):
            raise ConfigError(
                f"`mp_context` must be 'spawn' or 'forkserver'; got {method!r}"
                + (
                    " (a forked worker inherits torch's and BLAS's thread pools "
                    "and can deadlock)"
                    if method == "fork"
                    else ""
                )
            )
        _check_deadlines(grace_s, start_timeout_s)
        _check_reply_limit(max_reply_bytes)
        self.num_workers = num_workers
        self.torch_threads = torch_threads
        self.mp_context = mp_context
        self.ordered = ordered
        self.grace_s = float(grace_s)
        self.start_timeout_s = float(start_timeout_s)
        self.max_reply_bytes = max_reply_bytes
        # Typed loosely: typeshed gives a method chosen at run time the
        # BaseContext type, which lacks the Process and Pipe factories.
        try:
            self._ctx: Any = get_context(method)
        except ValueError as err:
            raise ConfigError(
                f"`mp_context` {method!r} is not available on this platform: {err}"
            ) from err
        self._workers: list[_Worker | None] = [None] * num_workers
        self._slots = self._workers
        self._init_pool()
        self._payload_bytes: bytes | None = None
        # Refers to the list, not to self, so a dropped backend is collected
        # and its workers stopped (at interpreter exit at the latest).
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    # -- the Backend protocol ------------------------------------------------

    def run_stage(
        self, request: StageRequest, *, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        """Send ``request`` to the workers now; yield one reply per client.

        Raises
        ------
        ConfigError
            If ``client_fn`` cannot be pickled (workers need a copy).
        RuntimeError
            If the backend is closed.
        """
        if self._closed:
            raise RuntimeError("this ProcessPoolBackend is closed")
        seq, order, early, groups = self._open_stage(request, client_fn)
        shares, unsent = _encode_shares(request, groups, seed, _WHERE)
        self._dispatch(seq, groups, shares)
        return self._arrange(order, self._collect(request, seed, seq, early + unsent))

    def __repr__(self) -> str:
        return (
            f"ProcessPoolBackend(num_workers={self.num_workers}, "
            f"torch_threads={self.torch_threads}, mp_context={self.mp_context!r})"
        )

    # -- workers -------------------------------------------------------------

    def _set_client_fn(self, client_fn: ClientFn) -> None:
        try:
            payload = pickle.dumps(client_fn, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise ConfigError(
                "ProcessPoolBackend ships `client_fn` to its worker processes, so "
                "it must be picklable (a module-level function or class instance, "
                f"or a functools.partial of one); {client_fn!r} is not: "
                f"{type(err).__name__}: {err}"
            ) from err
        self._client_fn = client_fn
        self._generation += 1
        self._payload_bytes = payload

    def _payload(self) -> bytes:
        """``client_fn`` pickled (kept only until the next dispatch is sent)."""
        if self._payload_bytes is None:
            self._payload_bytes = pickle.dumps(
                self._client_fn, protocol=pickle.HIGHEST_PROTOCOL
            )
        return self._payload_bytes

    def _start_worker(self, index: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self.torch_threads),
            name=f"fedshield-worker-{index}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        worker = _Worker(index, process, parent_conn, started_at=time.monotonic())
        self._workers[index] = worker
        return worker

    def _discard(self, index: int) -> None:
        worker = self._workers[index]
        if worker is not None:
            self._workers[index] = None
            _stop_process(worker)

    def _dispatch(
        self,
        seq: int,
        groups: Mapping[int, list[ClientId]],
        shares: Mapping[int, bytes],
    ) -> None:
        """Start and initialise the workers ``groups`` needs, then send work."""
        started = []
        for index in groups:
            worker = self._workers[index]
            if worker is not None and not worker.process.is_alive():
                self._slot_lost(index, "died while idle")
                worker = None
            if worker is None:
                worker = self._start_worker(index)
            started.append(worker)
        for worker in started:
            if worker.generation != self._generation:
                self._send_init(worker, self._payload())
            self._send_stage(worker, seq, groups[worker.index], shares[worker.index])
        # Workers keep their copy; the parent need not hold a second one.
        self._payload_bytes = None

    def _send_init(self, worker: _Worker, payload: bytes) -> None:
        worker.generation = self._generation
        worker.is_ready = False
        worker.started_at = time.monotonic()
        if _post(worker.conn, _INIT + _number(self._generation)):
            _post(worker.conn, payload)

    def _send_stage(
        self, worker: _Worker, seq: int, client_ids: list[ClientId], share: bytes
    ) -> None:
        worker.pending = deque(client_ids)
        worker.clock = time.monotonic()
        _post(worker.conn, _STAGE + _number(seq) + share)

    def _end_round_on(self, slot: _Worker) -> None:
        _post(slot.conn, _END_ROUND)

    def _take_pending(self, slot: _Worker) -> Iterator[ClientId]:
        # One at a time, as they are asked for.
        while slot.pending:
            yield slot.pending.popleft()

    # -- collecting replies ---------------------------------------------------

    def _collect(
        self,
        request: StageRequest,
        seed: int,
        seq: int,
        early: list[StageReply],
    ) -> Iterator[StageReply]:
        try:
            yield from early
            while True:
                busy = [w for w in self._workers if w is not None and w.is_busy]
                if not busy:
                    break
                now = time.monotonic()
                deadline = min(self._deadline(w, request) for w in busy)
                timeout = None if deadline == float("inf") else max(0.0, deadline - now)
                waitables: list[Any] = [w.conn for w in busy]
                waitables += [w.process.sentinel for w in busy]
                wait(waitables, timeout)
                for worker in busy:
                    yield from self._drain(worker, request, seq)
                    if worker.is_busy and not worker.process.is_alive():
                        yield from self._drain(worker, request, seq)
                        if worker.is_busy:
                            yield from self._on_death(worker, request, seed, seq)
                now = time.monotonic()
                for worker in busy:
                    if worker.is_busy and now >= self._deadline(worker, request):
                        yield from self._on_hang(worker, request, seed, seq)
        finally:
            self._stage_done(seq)

    def _deadline(self, worker: _Worker, request: StageRequest) -> float:
        if not worker.is_ready:
            return worker.started_at + self.start_timeout_s
        return self._client_deadline(worker.clock, request)

    def _drain(
        self, worker: _Worker, request: StageRequest, seq: int
    ) -> Iterator[StageReply]:
        """Yield every reply ``worker`` has sent so far."""
        while worker.is_busy:
            try:
                if not worker.conn.poll():
                    return
                frame = worker.conn.recv_bytes()
            except (EOFError, OSError):
                return  # the worker died; its sentinel tells
            kind = frame[:1]
            if kind == _READY:
                self._on_ready(worker, frame)
                continue
            if kind in (_REPLY, _UNREADABLE) and len(frame) >= 9:
                if int.from_bytes(frame[1:9], "big") != seq:
                    continue  # a stale frame from an abandoned stage
                if kind == _UNREADABLE:
                    why = frame[9:].decode("utf-8", "replace")
                    message = f"the worker process could not read the stage: {why}"
                    yield from self._fail_all(worker, request.stage, message)
                    return
                data: object = memoryview(frame)[9:]
            else:
                data = frame  # not a frame: refused as the next client's reply
            client_id = worker.pending.popleft()  # replies come in order
            worker.built.add(client_id)
            worker.clock = time.monotonic()
            yield _read_reply(
                data, client_id, request.stage, _WHERE, self.max_reply_bytes
            )

    def _on_ready(self, worker: _Worker, frame: bytes) -> None:
        try:
            ready = wire.decode_ready(memoryview(frame)[1:])
        except ProtocolError as err:
            logger.warning("worker %d sent a malformed greeting: %s", worker.index, err)
            ready = wire.WorkerReady(worker.generation or 0, 0, "?", None)
        if ready.generation != worker.generation:
            return
        worker.is_ready = True
        worker.clock = time.monotonic()
        if ready.error is not None:
            logger.warning(
                "worker %d could not load client_fn: %s", worker.index, ready.error
            )

    def _on_death(
        self, worker: _Worker, request: StageRequest, seed: int, seq: int
    ) -> Iterator[StageReply]:
        why = _describe_exit(worker.process.exitcode)
        if not worker.is_ready:
            # Dying before client_fn was loaded would kill every client in
            # turn; fail them all and start afresh in the next stage.
            message = (
                f"the worker process died while starting ({why}); "
                "it could not load client_fn"
            )
            yield from self._fail_all(worker, request.stage, message)
            self._slot_lost(worker.index, f"died ({why})")
            return
        client_id = worker.pending.popleft()
        worker.built.add(client_id)
        message = (
            f"the worker process running this client died ({why}); "
            "it was restarted for the other clients"
        )
        logger.warning(
            "client %s: worker %d died in stage %r of round %d (%s)",
            client_id,
            worker.index,
            request.stage,
            request.round_idx,
            why,
        )
        yield _failure(client_id, request.stage, FailureKind.ERROR, message)
        yield from self._restart(worker, request, seed, seq, f"died ({why})")

    def _on_hang(
        self, worker: _Worker, request: StageRequest, seed: int, seq: int
    ) -> Iterator[StageReply]:
        if not worker.is_ready:
            message = (
                f"the worker process did not start and load client_fn within "
                f"{self.start_timeout_s} s"
            )
            yield from self._fail_all(worker, request.stage, message)
            self._slot_lost(worker.index, "did not start")
            return
        client_id = worker.pending.popleft()
        worker.built.add(client_id)
        limit, message = self._hang_limit(request, "its worker process was stopped")
        logger.warning(
            "client %s: no reply in stage %r of round %d within %.3f s; "
            "stopping worker %d",
            client_id,
            request.stage,
            request.round_idx,
            limit,
            worker.index,
        )
        yield _failure(client_id, request.stage, FailureKind.TIMEOUT, message)
        yield from self._restart(worker, request, seed, seq, "was stopped as hung")

    def _restart(
        self, worker: _Worker, request: StageRequest, seed: int, seq: int, why: str
    ) -> Iterator[StageReply]:
        """Replace ``worker`` and hand it the clients it had not started."""
        remaining = list(worker.pending)
        worker.pending.clear()
        failed, rerun = self._replace(worker, remaining, request.stage, why)
        yield from failed
        if rerun:
            fresh = self._start_worker(worker.index)
            self._send_init(fresh, self._payload())
            # These clients' messages were sent once: they encode again.
            share = wire.encode_request(request, rerun, seed)
            self._send_stage(fresh, seq, rerun, share)
            self._payload_bytes = None


def _stop_process(worker: _Worker) -> None:
    """Stop ``worker``'s process now (terminate, then kill) and release it."""
    process = worker.process
    if process.is_alive():
        process.terminate()
        process.join(1.0)
    if process.is_alive():
        process.kill()
        process.join()
    worker.conn.close()
    process.close()


def _shutdown(workers: list[_Worker | None]) -> None:
    """Ask every worker to stop; stop those still running after a while."""
    for worker in workers:
        if worker is not None:
            _post(worker.conn, _STOP)
    deadline = time.monotonic() + _STOP_WAIT_S
    for index, worker in enumerate(workers):
        if worker is not None:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            _stop_process(worker)
            workers[index] = None


def _post(conn: Connection, frame: bytes) -> bool:
    """Send ``frame``; ``False`` if the worker is gone.

    A dead worker is not an error here: the parent notices it through the
    process sentinel while collecting replies, and handles it there.
    """
    try:
        conn.send_bytes(frame)
    except OSError:
        return False
    return True
