"""A site's side of the Fleet service (``fedshield join``).

The site opens every connection itself (it may sit behind NAT or a
firewall that allows only outbound traffic): it joins, learns the run's
public plan, builds its own client from its own data and its own copy of
the model code (the server never ships code), then pulls tasks with long
polls, runs each through :func:`~fedshield.simulation.protocol.
execute_stage`, and pushes the result in chunks. A heartbeat thread keeps
the site "online" while it trains.

Before every task the site's policy decides (:mod:`fedshield.transport.
policy`); a refusal is logged here with its reason and reaches the server
as a dropout with that reason. A task seen before (same id: the same bytes)
gets the cached reply: a retried or replayed request never makes the site
answer twice differently, which secure aggregation relies on.

Only ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` are retried (exponential
back-off with full jitter, 0.5 s to 20 s); everything else ends the site
with a specific error (:class:`SiteError` subclasses carry exit codes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedshield._version import __version__
from fedshield.core import ClientUpdate
from fedshield.errors import FedShieldError, ProtocolError, TransportError
from fedshield.simulation import wire
from fedshield.simulation.protocol import (
    ClientFailure,
    ClientSession,
    FailureKind,
    StageReply,
    execute_stage,
)
from fedshield.transport.auth import Identity, Signer
from fedshield.transport.faults import crash_point
from fedshield.transport.proto import fleet_pb2 as pb
from fedshield.transport.proto import fleet_pb2_grpc as pb_grpc
from fedshield.transport.server import PROTOCOL_VERSION

__all__ = [
    "SiteClient",
    "SiteError",
    "SiteRefusal",
    "SiteSetup",
    "TaskLedger",
    "run_site",
]

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class SiteError(TransportError):
    """The site cannot go on (exit code by kind: 40-47)."""


class _TlsError(SiteError):
    exit_code = 41


class _AuthRefused(SiteError):
    exit_code = 42


class _Denied(SiteError):
    exit_code = 43


class _Skew(SiteError):
    exit_code = 44


class _Version(SiteError):
    exit_code = 45


class SiteRefusal(FedShieldError):
    """Raised by a site's guard: it will not take part (``reason`` says why)."""

    exit_code = 43

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SiteSetup:
    """What the site built for a run from the server's plan.

    ``client_fn`` builds the site's client (its own data, its own model
    code); ``check_task(round_idx, stage)`` raises (anything with a
    ``reason``) to refuse a task; ``filter_metrics`` keeps what may leave.
    """

    client_fn: Callable[[str], Any]
    check_task: Callable[[int, str], None] | None = None
    filter_metrics: Callable[[Mapping[str, float]], dict[str, float]] | None = None
    check_message: Callable[[str, Any], None] | None = None
    """Checks a task's message against the plan (e.g. the DP options a
    ``fit`` asks the site to apply); raises to refuse it."""
    epsilon_after: Callable[[int], float] | None = None
    """The site's own ε after a run's first ``r`` rounds (its policy's
    accountant); with ``max_epsilon``, the ledger composes runs."""
    max_epsilon: float | None = None
    """The site's cap on ε over every run it took part in."""


class TaskLedger:
    """What a site answered: one answer per run, round and stage, on its disk.

    A server could otherwise ask a site the same round twice with other
    parameters (two noised releases for one round of its accountant, or
    two updates to difference), evaluate the site's data as often as it
    likes, or take the rounds backwards. The ledger refuses a second task
    for a (run, round, stage) already answered, a ``fit`` for a round
    earlier than one already trained, and, after the site restarted (its
    replies are no longer cached), the same task again. Kept in
    ``--identity DIR/ledger.json`` (in memory without a folder).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._runs: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            try:
                self._runs = _ledger_runs(json.loads(path.read_text()))
            except (OSError, ValueError) as err:
                raise SiteError(
                    f"{path} (this site's record of what it answered) is "
                    f"unreadable: {err}; refusing to start without it"
                ) from None

    def check(
        self, run_id: str, round_idx: int, stage: str, task_id: str, cached: bool
    ) -> None:
        """Raise :class:`SiteRefusal` if the site must not answer this task."""
        run = self._runs.get(run_id, {})
        answered = run.get("answered", {})
        key = f"{stage}:{round_idx}"
        known = answered.get(key)
        if known is not None and known != task_id:
            raise SiteRefusal(
                f"already answered {stage} of round {round_idx + 1} in this run "
                "(another task); a site answers each round's stage once"
            )
        if known is not None and not cached:
            raise SiteRefusal(
                f"answered {stage} of round {round_idx + 1} before it restarted; "
                "not again"
            )
        if stage == "fit" and known is None and round_idx < run.get("last_fit", -1):
            raise SiteRefusal(
                f"a fit for round {round_idx + 1} after round "
                f"{run['last_fit'] + 1}: rounds do not go back"
            )

    def spent_elsewhere(self, run_id: str) -> float:
        """The ε this site spent in its other runs (basic composition: a sum)."""
        return float(
            sum(r.get("epsilon", 0.0) for k, r in self._runs.items() if k != run_id)
        )

    def record(
        self,
        run_id: str,
        round_idx: int,
        stage: str,
        task_id: str,
        epsilon: float | None = None,
        *,
        ran: bool = True,
    ) -> None:
        """Remember an answer (on disk, synced, before the answer leaves).

        ``ran``: the stage ran (a refusal moves no round forward).
        """
        run = self._runs.setdefault(run_id, {"answered": {}, "last_fit": -1})
        run["answered"][f"{stage}:{round_idx}"] = task_id
        if stage == "fit" and ran:
            run["last_fit"] = max(run["last_fit"], round_idx)
        if epsilon is not None:
            run["epsilon"] = max(float(run.get("epsilon", 0.0)), epsilon)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as fh:
                fh.write(json.dumps(self._runs, sort_keys=True))
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self.path)

    def forget(self) -> None:
        """Forget everything (a test harness that asks the same tasks again)."""
        self._runs = {}


def _ledger_runs(data: Any) -> dict[str, dict[str, Any]]:
    """A ledger file's runs, checked field by field (ValueError otherwise)."""
    if not isinstance(data, dict):
        raise ValueError("not a map of runs")
    for run_id, run in data.items():
        if not (
            isinstance(run, dict)
            and isinstance(run.get("answered", {}), dict)
            and all(isinstance(v, str) for v in run.get("answered", {}).values())
            and isinstance(run.get("last_fit", -1), int)
            and isinstance(run.get("epsilon", 0.0), int | float)
        ):
            raise ValueError(f"run {run_id!r} is malformed")
    return data


def _classify(err: grpc.RpcError, server: str) -> SiteError:
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if "clock" in details:
            return _Skew(f"the server refused the site's clock: {details}")
        return _AuthRefused(f"the server refused this site's identity: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return _Denied(f"the server refused: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION and "version" in details:
        return _Version(details)
    if code == grpc.StatusCode.UNAVAILABLE and (
        "ssl" in details.lower() or "handshake" in details.lower()
    ):
        return _TlsError(
            f"TLS with {server} failed ({details}); check that the server's "
            "certificate is from this federation's CA (ca.crt in --identity) and "
            "names the host you connect to"
        )
    return SiteError(f"{code.name}: {details}")


class SiteClient:
    """One site's connection to a server, and its loop.

    Parameters
    ----------
    server
        ``HOST:PORT`` of the server.
    identity
        The site's credentials (None with ``insecure``: a name is needed).
    build
        Builds the site's client and checks from the plan (a dict).
    name
        The site's name when ``insecure`` (otherwise the certificate's).
    connect_timeout_s
        How long to keep retrying an unreachable server.
    status
        Called with each status change (connected, waiting, training,
        uploading, done).
    ledger
        What the site answered (:class:`TaskLedger`; ``fedshield join``
        keeps it in the identity folder).
    run_lock
        Held while the site runs a stage (sites in threads of one process
        that share one model object: :mod:`fedshield.transport.loopback`).
    """

    def __init__(
        self,
        server: str,
        identity: Identity | None,
        build: Callable[[dict[str, Any]], SiteSetup],
        *,
        insecure: bool = False,
        name: str | None = None,
        connect_timeout_s: float = 300.0,
        status: Callable[[str], None] | None = None,
        run_lock: Any = None,
        ledger: TaskLedger | None = None,
    ) -> None:
        if identity is None and not insecure:
            raise SiteError("a site needs --identity (or --insecure on loopback)")
        self.server = server
        self.identity = identity
        self.name = identity.name if identity is not None else (name or "")
        self.build = build
        self.connect_timeout_s = connect_timeout_s
        self._status_cb = status
        self._run_lock = run_lock if run_lock is not None else contextlib.nullcontext()
        self.signer = Signer(self.name, identity.key_pem if identity else None)
        self._channel = self._open_channel(insecure)
        self.stub = pb_grpc.FleetStub(self._channel)  # type: ignore[no-untyped-call]
        self.run_id = ""
        self.plan: dict[str, Any] = {}
        self.setup: SiteSetup | None = None
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self.ledger = ledger if ledger is not None else TaskLedger()
        self._refused: set[str] = set()
        self._ran = False
        self._sessions: dict[int, ClientSession] = {}
        self._status = "connecting"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.chunk_bytes = 1 << 20
        self.poll_s = 25.0
        self.heartbeat_s = 5.0
        self.tasks_done = 0

    def _open_channel(self, insecure: bool) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
            ("grpc.keepalive_time_ms", 120_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if insecure:
            return grpc.insecure_channel(self.server, options=options)
        assert self.identity is not None
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.identity.ca_pem,
            private_key=self.identity.key_pem,
            certificate_chain=self.identity.cert_pem,
        )
        return grpc.secure_channel(self.server, creds, options=options)

    # -- plumbing ----------------------------------------------------------------

    def set_status(self, status: str) -> None:
        """Record (and report) the site's status."""
        if status != self._status:
            self._status = status
            if self._status_cb is not None:
                self._status_cb(status)

    def _call(self, method: str, request: Any, timeout: float, **kw: Any) -> Any:
        """One unary call, re-signed and retried on transient failures."""
        delay, started = 0.5, time.monotonic()
        while True:
            self.signer.sign(method, request)
            try:
                return getattr(self.stub, method)(request, timeout=timeout, **kw)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise _classify(err, self.server) from None
                if "ssl" in (err.details() or "").lower():
                    raise _classify(err, self.server) from None
                if time.monotonic() - started > self.connect_timeout_s:
                    raise SiteError(
                        f"the server at {self.server} has been unreachable for "
                        f"{self.connect_timeout_s:g} s ({err.details()}); check the "
                        "address and that `fedshield serve` is running"
                    ) from None
                self.set_status("reconnecting")
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 20.0)

    # -- the protocol ------------------------------------------------------------

    def join(self) -> None:
        """Join the run; (re)build the site's client when the run is new."""
        sent = time.time()
        reply = self._call(
            "Join",
            pb.JoinRequest(protocol=PROTOCOL_VERSION, version=__version__),
            timeout=15,
        )
        received = time.time()
        local_ms = int((sent + received) / 2 * 1000)
        self.signer.offset_ms = int(reply.server_time_ms) - local_ms
        if abs(self.signer.offset_ms) > 5000:
            logger.warning(
                "this site's clock is %+.1f s off the server's; requests are "
                "corrected for it",
                -self.signer.offset_ms / 1000,
            )
        self.poll_s = reply.poll_s or self.poll_s
        self.heartbeat_s = reply.heartbeat_s or self.heartbeat_s
        self.chunk_bytes = int(reply.chunk_bytes) or self.chunk_bytes
        self._start_heartbeats()
        if reply.run_id != self.run_id:
            self.set_status("preparing")
            self.run_id = reply.run_id
            self.plan = json.loads(reply.plan_json)
            self._cache.clear()
            self._sessions.clear()
            self.setup = self.build(self.plan)
        self.set_status("connected")

    def _start_heartbeats(self) -> None:
        if self._beat is None or not self._beat.is_alive():
            self._stop.clear()
            self._beat = threading.Thread(
                target=self._heartbeats, name="heartbeat", daemon=True
            )
            self._beat.start()

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.signer_heartbeat()
            except FedShieldError:
                continue

    def signer_heartbeat(self) -> None:
        """Send one heartbeat (the site is alive, even while training)."""
        request = pb.HeartbeatRequest(status=self._status)
        self.signer.sign("Heartbeat", request)
        with contextlib.suppress(grpc.RpcError):
            self.stub.Heartbeat(request, timeout=10)

    def run(self) -> int:
        """Join and serve tasks until the run is over; return tasks answered."""
        self.join()
        try:
            while True:
                self.set_status("waiting")
                try:
                    reply = self._call(
                        "PullTask",
                        pb.PullTaskRequest(run_id=self.run_id),
                        timeout=self.poll_s + 15,
                    )
                except SiteError as err:
                    if "join again" in str(err):
                        self.join()
                        continue
                    raise
                outcome = reply.WhichOneof("outcome")
                if outcome == "finished":
                    self.set_status("done")
                    return self.tasks_done
                if outcome == "task":
                    self._serve(reply.task)
        finally:
            self._stop_heartbeats()

    def _stop_heartbeats(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=15)
            self._beat = None

    def close(self) -> None:
        """Stop the heartbeats and close the channel."""
        self._stop_heartbeats()
        self._channel.close()

    # -- one task ----------------------------------------------------------------

    def _serve(self, task: Any) -> None:
        if task.task_id in self._refused:
            # The server refused this site's result for the task; it will not
            # take another. Wait for the next stage rather than spin.
            self._stop.wait(min(self.poll_s, 5.0))
            return
        cached = self._cache.get(task.task_id)
        if cached is None:
            payload = self._payload(task)
            cached = self._answer(task, payload)
            self._cache[task.task_id] = cached
            # What the site refused costs nothing and moves no round forward.
            self.ledger.record(
                self.run_id,
                int(task.round),
                task.stage,
                task.task_id,
                self._cost(task.stage, int(task.round)) if self._ran else None,
                ran=self._ran,
            )
            while len(self._cache) > 64:
                self._cache.popitem(last=False)
        self.set_status("uploading")
        self._push(task.task_id, cached)
        self.tasks_done += 1

    def _payload(self, task: Any) -> Any:
        data: bytes | bytearray
        if task.payload or task.payload_size == 0:
            data = bytes(task.payload)
        else:
            data = self._fetch(task.payload_digest, int(task.payload_size))
        digest = hashlib.sha256(data)
        if digest.hexdigest() != task.payload_digest:
            raise SiteError("a task's payload does not match its digest")
        digest.update(task.stage_seed)  # SHA-256(payload || seed), one pass
        if digest.hexdigest() != task.task_id:
            raise SiteError("a task's id does not match its content")
        return data

    def _fetch(self, digest: str, size: int) -> bytearray:
        buf = bytearray()
        attempts = 0
        while len(buf) < size:
            request = pb.FetchBlobRequest(digest=digest, offset=len(buf))
            self.signer.sign("FetchBlob", request)
            try:
                for chunk in self.stub.FetchBlob(request, timeout=600):
                    buf += chunk.data
                    if len(buf) > size:
                        raise SiteError("the server sent more bytes than announced")
            except grpc.RpcError as err:
                attempts += 1
                if err.code() not in RETRYABLE or attempts > 8:
                    raise _classify(err, self.server) from None
                time.sleep(min(0.5 * 2**attempts, 20.0) * random.random())
        return buf

    def _answer(self, task: Any, payload: Any) -> bytes:
        """Run the task (or refuse it); the reply's wire bytes."""
        assert self.setup is not None
        self._ran = False
        stage, round_idx = task.stage, int(task.round)
        try:
            # The payload's size was announced and its digest checked: the
            # codec's default ceiling does not apply (models over 2 GiB).
            request, _ = wire.decode_request(
                payload, max_bytes=max(len(payload), wire.DEFAULT_MAX_BYTES)
            )
        except ProtocolError as err:
            failure = ClientFailure(self.name, stage, FailureKind.REJECTED, str(err))
            return wire.encode_reply(StageReply(self.name, failure=failure))
        if list(request.messages) != [self.name]:
            raise SiteError(
                f"the server sent a task for {sorted(request.messages)}, not for "
                f"this site ({self.name!r})"
            )
        if request.stage != stage or request.round_idx != round_idx:
            raise SiteError("a task's header disagrees with its payload")
        setup = self.setup
        try:  # the site's own checks, before anything runs
            self.ledger.check(self.run_id, round_idx, stage, task.task_id, cached=False)
            if setup.check_task is not None:
                setup.check_task(round_idx, stage)
            if setup.check_message is not None:
                setup.check_message(stage, request.messages[self.name])
            cost = self._cost(stage, round_idx)
            if cost is not None and setup.max_epsilon is not None:
                total = self.ledger.spent_elsewhere(self.run_id) + cost
                if total > setup.max_epsilon:
                    raise SiteRefusal(
                        f"epsilon over this site's runs would be {total:.4g} "
                        f"(this run {cost:.4g} after round {round_idx + 1}), above "
                        f"its max_epsilon = {setup.max_epsilon:g}"
                    )
        except Exception as err:
            reason = getattr(err, "reason", None) or str(err)
            logger.warning(
                "site policy: refused %s of round %d: %s", stage, round_idx, reason
            )
            failure = ClientFailure(
                self.name, stage, FailureKind.DROPPED, f"site policy: {reason}"
            )
            return wire.encode_reply(StageReply(self.name, failure=failure))
        rng = (
            np.random.default_rng(
                np.random.SeedSequence(int.from_bytes(task.stage_seed, "little"))
            )
            if task.stage_seed
            else None
        )
        self.set_status("training" if stage == "fit" else "working")
        if stage == "fit":
            crash_point("site.mid_fit")
        try:
            with self._run_lock:
                value = self._execute(round_idx, stage, request, rng)
        except Exception as err:  # reported as the site's failure, as in simulation
            logger.warning("%s of round %d failed: %s", stage, round_idx, err)
            failure = ClientFailure(
                self.name, stage, FailureKind.ERROR, f"{type(err).__name__}: {err}"
            )
            return wire.encode_reply(StageReply(self.name, failure=failure))
        self._ran = True
        value = self._filtered(value)
        return wire.encode_reply(StageReply(self.name, value=value))

    def _cost(self, stage: str, round_idx: int) -> float | None:
        """The run's ε once the site trained round ``round_idx`` (fit only)."""
        setup = self.setup
        if stage != "fit" or setup is None or setup.epsilon_after is None:
            return None
        return float(setup.epsilon_after(round_idx + 1))

    def forget_sessions(self) -> None:
        """Drop the round's client and the replies kept for retried tasks.

        A test harness's ``end_round``: it asks the same tasks again.
        """
        with self._run_lock:
            self._sessions = {}
            self._cache.clear()
            self.ledger.forget()

    def _execute(
        self, round_idx: int, stage: str, request: Any, rng: np.random.Generator | None
    ) -> Any:
        assert self.setup is not None
        session = self._sessions.get(round_idx)
        if session is None:  # a new round: a new client, as in simulation
            self._sessions = {}
            session = ClientSession(self.name, self.setup.client_fn(self.name))
            self._sessions[round_idx] = session
        return execute_stage(session, stage, request.messages[self.name], rng=rng)

    def _filtered(self, value: Any) -> Any:
        keep = self.setup.filter_metrics if self.setup is not None else None
        if keep is None:
            return value
        if isinstance(value, ClientUpdate):
            return replace(value, metrics=keep(value.metrics))
        if isinstance(value, Mapping):
            return keep(value)
        return value

    def _push(self, task_id: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        offset, attempts = 0, 0
        while True:
            header = pb.ResultHeader(
                task_id=task_id, digest=digest, size=len(data), offset=offset
            )
            self.signer.sign("PushResult", header)
            try:
                reply = self.stub.PushResult(
                    _parts(header, data, offset, self.chunk_bytes), timeout=600
                )
            except grpc.RpcError as err:
                attempts += 1
                if err.code() not in RETRYABLE or attempts > 8:
                    error = _classify(err, self.server)
                    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        logger.error("the server rejected a result: %s", err.details())
                        self._refused.add(task_id)
                        return
                    if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        if "resumes at byte" in (err.details() or ""):
                            offset = 0  # start the upload again
                            continue
                        logger.error("the server refused a result: %s", err.details())
                        self._refused.add(task_id)
                        return
                    raise error from None
                time.sleep(min(0.5 * 2**attempts, 20.0) * random.random())
                status = pb.UploadStatusRequest(task_id=task_id, digest=digest)
                try:
                    offset = int(
                        self._call("UploadStatus", status, timeout=15).received
                    )
                except SiteError:
                    offset = 0
                continue
            if reply.status == pb.PushResultReply.PARTIAL:
                offset = int(reply.received)
                continue
            if reply.status == pb.PushResultReply.STAGE_CLOSED:
                logger.warning("a result arrived after its stage closed")
            return


def _parts(header: Any, data: bytes, offset: int, step: int) -> Iterator[Any]:
    yield pb.ResultPart(header=header)
    view = memoryview(data)
    for start in range(offset, len(data), step):
        yield pb.ResultPart(chunk=pb.Chunk(data=bytes(view[start : start + step])))


def run_site(client: SiteClient) -> int:
    """Run ``client`` until the run ends; close it however it ends."""
    try:
        return client.run()
    finally:
        client.close()
