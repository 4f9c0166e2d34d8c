"""The Fleet service: sites join, pull their tasks, push their results.

A ``grpc.aio`` server on its own thread and event loop; the round loop runs
elsewhere (:class:`~fedshield.transport.backend.GrpcBackend`) and the two
meet in the :class:`~fedshield.transport.backend.Mailbox`. Handlers parse,
authenticate (:class:`~fedshield.transport.auth.RequestGuard`), check that
the request concerns the caller's own task, and hand over; decoding and
disk writes run off the event loop.

Every write is idempotent: a result pushed twice with the same bytes is a
``DUPLICATE`` (success) and changes nothing; another result for the same
task is refused and logged as a security event; a result after its stage
closed is ``STAGE_CLOSED`` (the site counted as a dropout). Sizes are
checked against the declared size and the cap before anything is buffered;
uploads are written to ``STATE/uploads`` as they arrive and resume from the
offset the server reports (``UploadStatus``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from fedshield._version import __version__
from fedshield.errors import ConfigError, ProtocolError, TransportError
from fedshield.simulation import wire
from fedshield.simulation.protocol import ClientFailure, FailureKind, StageReply
from fedshield.transport.auth import AuthError, RequestGuard, peer_certificate
from fedshield.transport.backend import Mailbox
from fedshield.transport.proto import fleet_pb2 as pb
from fedshield.transport.proto import fleet_pb2_grpc as pb_grpc
from fedshield.transport.store import disk_full

__all__ = ["PROTOCOL_VERSION", "FleetServer", "ServerSettings"]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
INLINE_BYTES = 64 * 1024
"""Task payloads up to this size travel in the ``PullTask`` reply."""


@dataclass(frozen=True)
class ServerSettings:
    """What the Fleet server needs to know (from ``[network]`` and the flags)."""

    listen: str
    sites: tuple[str, ...]
    run_id: str
    plan_json: bytes
    ca_dir: Path | None
    """The federation CA (None: ``--insecure``, loopback only)."""
    poll_s: float = 25.0
    heartbeat_s: float = 5.0
    chunk_bytes: int = 1 << 20
    max_upload_bytes: int = 16 << 30
    clock_skew_s: float = 120.0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _printable(text: str, limit: int) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "…"


class _Servicer(pb_grpc.FleetServicer):
    def __init__(self, server: FleetServer) -> None:
        self.s = server

    async def _auth(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> str:
        try:
            cid = self.s.guard.check(method, request, peer_certificate(context))
        except AuthError as err:
            self.s.event(request.envelope.client_id or "?", "auth_refused", str(err))
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if err.code == "permission_denied"
                else grpc.StatusCode.UNAUTHENTICATED
            )
            await context.abort(code, str(err))
        if cid not in self.s.settings.sites:
            self.s.event(cid, "not_a_site", method)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{cid!r} is not a site of this run (sites: "
                f"{', '.join(self.s.settings.sites)})",
            )
        self.s.mailbox.seen(cid)
        return cid

    async def Join(self, request: Any, context: Any) -> Any:
        cid = await self._auth("Join", request, context)
        if request.protocol != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"version mismatch: the site speaks protocol {request.protocol} "
                f"(fedshield {request.version}), this server {PROTOCOL_VERSION} "
                f"(fedshield {__version__}); install the same fedshield version",
            )
        logger.info("site %s joined (fedshield %s)", cid, request.version)
        st = self.s.settings
        return pb.JoinReply(
            run_id=st.run_id,
            plan_json=st.plan_json,
            server_time_ms=_now_ms(),
            boot_id=self.s.boot_id,
            protocol=PROTOCOL_VERSION,
            version=__version__,
            poll_s=st.poll_s,
            heartbeat_s=st.heartbeat_s,
            chunk_bytes=st.chunk_bytes,
        )

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        cid = await self._auth("Heartbeat", request, context)
        self.s.mailbox.seen(cid, request.status[:32])
        return pb.HeartbeatReply(server_time_ms=_now_ms(), boot_id=self.s.boot_id)

    async def PullTask(self, request: Any, context: Any) -> Any:
        cid = await self._auth("PullTask", request, context)
        st = self.s.settings
        if request.run_id != st.run_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {request.run_id!r} is not this server's run ({st.run_id!r}); "
                "join again",
            )
        self.s.mailbox.joined(cid)  # ready: its client is built
        # One long poll per site: a newer one ends this one (within 5 s, at
        # its next look; waking every poll would cost O(sites) each time).
        ticket = self.s._polls[cid] = self.s._polls.get(cid, 0) + 1
        deadline = time.monotonic() + st.poll_s
        while True:
            changed = self.s.changed
            task = self.s.mailbox.task_for(cid)
            if task is not None:
                inline = len(task.payload) <= INLINE_BYTES
                return pb.PullTaskReply(
                    run_id=st.run_id,
                    task=pb.Task(
                        task_id=task.task_id,
                        round=task.round_idx,
                        stage=task.stage,
                        deadline_ms=int(task.deadline * 1000),
                        payload=task.payload if inline else b"",
                        payload_size=len(task.payload),
                        payload_digest=task.payload_digest,
                        stage_seed=task.seed,
                    ),
                )
            if self.s.mailbox.finished:
                return pb.PullTaskReply(run_id=st.run_id, finished=True)
            left = deadline - time.monotonic()
            if left <= 0 or self.s.stopping or self.s._polls.get(cid) != ticket:
                return pb.PullTaskReply(run_id=st.run_id, wait=True)
            try:
                await asyncio.wait_for(changed.wait(), timeout=min(left, 5.0))
            except TimeoutError:
                self.s.mailbox.seen(cid)

    async def FetchBlob(self, request: Any, context: Any) -> AsyncIterator[Any]:
        cid = await self._auth("FetchBlob", request, context)
        owner = self.s.mailbox.owner(request.digest)
        if owner != cid:
            self.s.event(cid, "foreign_blob", request.digest[:16])
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "no open task of this site has that payload (another site's "
                "task, or the stage closed)",
            )
        data = self.s.mailbox.blob(request.digest)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "the stage has closed")
        assert data is not None
        step = self.s.settings.chunk_bytes
        view = memoryview(data)
        for start in range(int(request.offset), len(data), step):
            yield pb.Chunk(data=bytes(view[start : start + step]))

    async def UploadStatus(self, request: Any, context: Any) -> Any:
        cid = await self._auth("UploadStatus", request, context)
        part = self.s.part_path(cid, request.task_id, request.digest)
        tag = part.with_suffix(".digest")
        same = part.exists() and tag.exists() and tag.read_text() == request.digest
        return pb.UploadStatusReply(received=part.stat().st_size if same else 0)

    async def PushResult(self, request_iterator: Any, context: Any) -> Any:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a result starts with its header"
            )
        assert first is not None
        header = first.header
        cid = await self._auth("PushResult", header, context)
        s = self.s
        size = int(header.size)
        cap = min(s.settings.max_upload_bytes, s.max_reply_bytes)
        if size > cap:
            s.event(cid, "oversized", f"{size} bytes declared")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a result of {size} bytes is over this server's cap of {cap} "
                "bytes; refused before reading it",
            )
        owner = s.mailbox.task_owner(header.task_id)
        if owner is not None and owner != cid:
            s.event(cid, "foreign_task", header.task_id[:16])
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "that task is another site's: a site answers only its own tasks",
            )
        task = s.mailbox.task_for(cid)
        if task is None or task.task_id != header.task_id:
            done = s.mailbox.reply_digest(cid, header.task_id)
            if done is not None and done == header.digest:
                return pb.PushResultReply(status=pb.PushResultReply.DUPLICATE)
            if done is not None:
                s.event(cid, "equivocation", header.task_id[:16])
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "a different result for a task already answered: refused and "
                    "logged (one result per task)",
                )
            return pb.PushResultReply(status=pb.PushResultReply.STAGE_CLOSED)
        key = (cid, header.task_id)
        if key in s.uploading:
            await context.abort(
                grpc.StatusCode.ABORTED,
                "an upload of this task is already in progress; one at a time",
            )
        s.uploading.add(key)
        try:
            return await self._receive(header, cid, task, request_iterator, context)
        finally:
            s.uploading.discard(key)

    async def _receive(
        self, header: Any, cid: str, task: Any, request_iterator: Any, context: Any
    ) -> Any:
        s = self.s
        size, offset = int(header.size), int(header.offset)
        part = s.part_path(cid, header.task_id, header.digest)
        have = s.part_size(part, header.digest)
        if offset > have:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the upload resumes at byte {have}, not {offset}",
            )
        received = offset
        buf = bytearray()
        hasher = hashlib.sha256()  # as the bytes arrive, not in one pass after
        with open(part, "r+b" if part.exists() else "wb") as fh:
            # One upload per site and task: bytes before ``offset`` are kept
            # (same site, task and digest: the same content), later ones and
            # any other result's partial upload are dropped.
            fh.truncate(offset)
            if offset:
                buf += fh.read(offset)
                hasher.update(buf)
            fh.seek(offset)
            async for item in request_iterator:
                if item.WhichOneof("part") != "chunk":
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "one header per result"
                    )
                received += len(item.chunk.data)
                if received > size:
                    fh.close()
                    part.unlink(missing_ok=True)
                    s.event(cid, "overlong", f"{received} > {size}")
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"more bytes than the {size} declared; upload discarded",
                    )
                fh.write(item.chunk.data)
                buf += item.chunk.data
                hasher.update(item.chunk.data)
        if received < size:
            return pb.PushResultReply(
                status=pb.PushResultReply.PARTIAL, received=received
            )
        status, message = await asyncio.to_thread(
            s.take_result, cid, task, part, header.digest, buf, hasher.hexdigest()
        )
        if status == "accepted":
            return pb.PushResultReply(status=pb.PushResultReply.ACCEPTED)
        if status == "duplicate":
            return pb.PushResultReply(status=pb.PushResultReply.DUPLICATE)
        if status == "closed":
            return pb.PushResultReply(status=pb.PushResultReply.STAGE_CLOSED)
        if status == "unavailable":  # the site retries, as for a restart
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        code = (
            grpc.StatusCode.FAILED_PRECONDITION
            if status == "conflict"
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        await context.abort(code, message)
        raise AssertionError  # abort raises


class FleetServer:
    """The Fleet gRPC server, on a thread of its own.

    ``start()`` binds (``port 0``: one the OS picks) and returns the port;
    ``stop()`` ends it.
    """

    def __init__(
        self,
        settings: ServerSettings,
        mailbox: Mailbox,
        *,
        max_reply_bytes: int = wire.DEFAULT_MAX_BYTES,
        on_event: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.mailbox = mailbox
        self.max_reply_bytes = max_reply_bytes
        self.guard = RequestGuard(settings.ca_dir, skew_s=settings.clock_skew_s)
        self.boot_id = uuid.uuid4().hex
        self.stopping = False
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._changed: asyncio.Event | None = None
        self._event_window: list[float] = [0.0, 0]
        self._polls: dict[str, int] = {}
        self.uploading: set[tuple[str, str]] = set()
        self._uploads = mailbox.store.dir / "uploads"
        self._uploads.mkdir(exist_ok=True)
        self.port = 0

    # -- helpers for the handlers ------------------------------------------------

    @property
    def changed(self) -> asyncio.Event:
        """Set when the mailbox changes (a new stage, the run's end)."""
        assert self._changed is not None
        return self._changed

    def _wake(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        if old is not None:
            old.set()

    def event(self, client_id: str, kind: str, detail: str) -> None:
        """Log a refused request or a site's refusal (and keep it in the store).

        What a peer claims is cut to a printable 64 (id) / 300 (detail)
        characters, and at most 10 events a second are kept, so refused
        requests cannot fill the disk or the log.
        """
        client_id = _printable(client_id, 64)
        detail = _printable(detail, 300)
        now = time.monotonic()
        if now - self._event_window[0] >= 1.0:
            self._event_window = [now, 0]
        self._event_window[1] += 1
        if self._event_window[1] > 10:
            return
        logger.warning("%s: %s (%s)", client_id, kind, detail)
        try:
            self.mailbox.store.log_event(client_id, kind, detail)
        except Exception:  # logging must never take the server down
            logger.exception("could not record an event")
        if self._on_event is not None:
            self._on_event(client_id, kind, detail)

    def part_path(self, client_id: str, task_id: str, digest: str) -> Path:
        """Where a site's upload in progress for a task is kept (one per task)."""
        del digest  # one partial upload per site and task, whatever its digest
        safe = hashlib.sha256(f"{client_id}\0{task_id}".encode()).hexdigest()
        return self._uploads / f"{safe}.part"

    def part_size(self, part: Path, digest: str) -> int:
        """Bytes kept of an upload of ``digest`` (0: none, or another digest's)."""
        tag = part.with_suffix(".digest")
        if not part.exists() or not tag.exists() or tag.read_text() != digest:
            part.unlink(missing_ok=True)
            tag.write_text(digest)
            return 0
        return part.stat().st_size

    def clear_uploads(self) -> None:
        """Drop every partial upload (a stage closed: they can no longer count)."""
        for path in self._uploads.iterdir():
            path.unlink(missing_ok=True)

    def take_result(
        self,
        client_id: str,
        task: Any,
        part: Path,
        digest: str,
        data: bytearray,
        received: str,
    ) -> tuple[str, str]:
        """Check a complete upload and hand it to the mailbox (off the loop).

        ``data`` is the upload (also in ``part``, which, once checked,
        becomes the reply's stored copy: it is not written twice);
        ``received`` the SHA-256 of what arrived.
        """
        if received != digest:
            part.unlink(missing_ok=True)
            self.event(client_id, "bad_digest", task.task_id[:16])
            return "invalid", "the result's bytes do not match its digest; resend"
        try:
            reply = wire.decode_reply(
                data, max_bytes=self.max_reply_bytes, expect_client=client_id
            )
            if reply.failure is not None and reply.failure.stage != task.stage:
                raise ProtocolError(
                    f"a failure for stage {reply.failure.stage!r} in reply to "
                    f"{task.stage!r}"
                )
        except ProtocolError as err:
            # Rejected and logged; the round goes on without this site.
            self.event(client_id, "malformed_result", str(err))
            failure = ClientFailure(
                client_id, task.stage, FailureKind.REJECTED, f"malformed result: {err}"
            )
            part.unlink(missing_ok=True)
            self.mailbox.accept(
                client_id,
                task.task_id,
                wire.encode_reply(StageReply(client_id, failure=failure)),
            )
            return "invalid", f"malformed result, rejected: {err}"
        if reply.failure is not None:
            logger.info(
                "%s declined %s of round %d: %s",
                client_id,
                task.stage,
                task.round_idx,
                reply.failure.message,
            )
        try:
            status = self.mailbox.accept(
                client_id, task.task_id, data, reply, file=part, digest=digest
            )
        except (OSError, sqlite3.OperationalError) as err:
            full = disk_full(err, self.mailbox.store.dir)
            if full is None:
                raise
            logger.error("%s", full)
            return "unavailable", f"the server cannot record results now: {full}"
        if status == "conflict":
            self.event(client_id, "equivocation", task.task_id[:16])
            return status, (
                "a different result for a task already answered: refused and "
                "logged (one result per task)"
            )
        return status, ""

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> int:
        """Start serving; return the bound port.

        Raises
        ------
        TransportError
            If the address cannot be bound.
        """
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start())
            except BaseException as err:
                failure.append(err)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name="fleet-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TransportError("the gRPC server did not start in time")
        if failure:
            err = failure[0]
            if isinstance(err, TransportError | ConfigError):
                raise err
            raise TransportError(f"could not start the gRPC server: {err}") from err
        self.mailbox.notify = lambda: self._call(self._wake)
        self.mailbox.on_close = self.clear_uploads
        return self.port

    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    async def _start(self) -> None:
        st = self.settings
        self._changed = asyncio.Event()
        limit = max(st.chunk_bytes + (64 << 10), 4 << 20)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.keepalive_time_ms", 120_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 60_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", 0),
            ],
            # Long polls take slots: one per site, plus room for the rest.
            maximum_concurrent_rpcs=4 * len(st.sites) + 64,
        )
        pb_grpc.add_FleetServicer_to_server(  # type: ignore[no-untyped-call]
            _Servicer(self), server
        )
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        host = st.listen
        try:
            if st.ca_dir is None:
                port = server.add_insecure_port(host)
            else:
                port = server.add_secure_port(host, _server_credentials(st.ca_dir))
        except RuntimeError as err:
            raise TransportError(f"cannot listen on {host}: {err}") from None
        if not port:
            raise TransportError(
                f"cannot listen on {host} (in use, or not an address of this machine)"
            )
        self.port = port
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await health.set(
            "fedshield.fleet.v1.Fleet", health_pb2.HealthCheckResponse.SERVING
        )
        self._server, self._health = server, health

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving (long polls end; the state stays on disk)."""
        self.stopping = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def shutdown() -> None:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            self._wake()
            if self._server is not None:
                await self._server.stop(grace_s)

        future = asyncio.run_coroutine_threadsafe(shutdown(), loop)
        try:
            future.result(timeout=grace_s + 5)
        except Exception:  # already stopping
            logger.debug("server stop", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)


def _server_credentials(ca_dir: Path) -> grpc.ServerCredentials:
    from fedshield.transport.ca import CaPaths

    paths = CaPaths(Path(ca_dir))
    for path in (paths.cert, paths.server_key, paths.server_cert):
        if not path.exists():
            raise ConfigError(
                f"{path} is missing: `fedshield ca init {ca_dir} --server-host HOST` "
                "makes the CA and the server's certificate"
            )
    return grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
        root_certificates=paths.cert.read_bytes(),
        require_client_auth=True,
    )
