"""The Fleet server refuses what it must, says why, and loses nothing.

A real server (mutual TLS with a test CA, on a port the OS picks) in this
process; sites are raw gRPC stubs that sign their requests as a site does,
or attackers who do not. Each refusal is checked for its status, its words,
and that the stage goes on for the honest sites.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshield.core import EvalConfig, Params
from fedshield.simulation import wire
from fedshield.simulation.protocol import (
    EvaluateIns,
    FailureKind,
    StageReply,
    StageRequest,
)
from fedshield.transport import ca
from fedshield.transport.auth import Signer, load_identity
from fedshield.transport.backend import GrpcBackend, Mailbox
from fedshield.transport.proto import fleet_pb2 as pb
from fedshield.transport.proto import fleet_pb2_grpc as pb_grpc
from fedshield.transport.server import FleetServer, ServerSettings
from fedshield.transport.site import SiteClient, SiteError, SiteSetup
from fedshield.transport.store import ServerStore

from .netutil import channel, make_ca

pytestmark = pytest.mark.grpc

SITES = ("alpha", "beta", "gamma")
PARAMS = Params({"w": np.arange(3, dtype=np.float32)})


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca_dir, folders = make_ca(root, SITES)
    return root, ca_dir, folders


class Fleet:
    """A server, its mailbox, and a stage the test opens itself."""

    def __init__(self, ca_dir, state, *, max_upload_bytes=1 << 20, sites=SITES):
        self.store = ServerStore(state)
        self.mailbox = Mailbox(self.store, offline_after_s=30)
        settings = ServerSettings(
            listen="127.0.0.1:0",
            sites=tuple(sites),
            run_id="r1",
            plan_json=b'{"config": {}}',
            ca_dir=ca_dir,
            poll_s=1.0,
            chunk_bytes=4096,
            max_upload_bytes=max_upload_bytes,
        )
        self.server = FleetServer(settings, self.mailbox)
        self.port = self.server.start()
        self.backend = GrpcBackend(self.mailbox, self.store, fit_timeout_s=20)
        self.replies: list[StageReply] = []
        self._thread: threading.Thread | None = None

    def evaluate_stage(self, sites=SITES, params=PARAMS):
        """Open an evaluate stage for ``sites`` in a thread (replies: .replies)."""
        message = EvaluateIns(params, EvalConfig(round_idx=0))
        request = StageRequest("evaluate", 0, dict.fromkeys(sites, message), 20.0)

        def run():
            self.replies = list(self.backend.run_stage(request, client_fn=None, seed=1))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        for _ in range(200):  # the stage opens at once; wait for its tasks
            if all(self.mailbox.task_for(s) for s in sites):
                return
            threading.Event().wait(0.01)
        raise AssertionError("the stage did not open")

    def finish_stage(self):
        assert self._thread is not None
        self._thread.join(timeout=30)
        return {r.client_id: r for r in self.replies}

    def close(self):
        self.server.stop(grace_s=0.2)
        self.store.close()


@pytest.fixture
def fleet(pki, tmp_path):
    _, ca_dir, _ = pki
    f = Fleet(ca_dir, tmp_path / "state")
    yield f
    f.close()


class Raw:
    """A site speaking the protocol by hand (to send what a site would not)."""

    def __init__(self, port, folder, *, name=None):
        self.identity = load_identity(folder)
        self.channel = channel(port, self.identity)
        self.stub = pb_grpc.FleetStub(self.channel)
        self.signer = Signer(name or self.identity.name, self.identity.key_pem)

    def call(self, method, request):
        return getattr(self.stub, method)(self.signer.sign(method, request), timeout=10)

    def pull(self):
        return self.call("PullTask", pb.PullTaskRequest(run_id="r1"))

    def push(self, task_id, data, *, size=None, digest=None, chunks=None):
        digest = digest or hashlib.sha256(data).hexdigest()
        header = pb.ResultHeader(
            task_id=task_id, digest=digest, size=len(data) if size is None else size
        )
        self.signer.sign("PushResult", header)
        parts = [pb.ResultPart(header=header)]
        pieces = chunks if chunks is not None else [data]
        parts += [pb.ResultPart(chunk=pb.Chunk(data=p)) for p in pieces]
        return self.stub.PushResult(iter(parts), timeout=10)


def metrics_reply(name, loss=1.0):
    return wire.encode_reply(StageReply(name, value={"loss": loss}))


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# -- identity -----------------------------------------------------------------


def test_an_honest_exchange_works(fleet, pki):
    _, _, folders = pki
    fleet.evaluate_stage(sites=("alpha",))
    alpha = Raw(fleet.port, folders["alpha"])
    task = alpha.pull().task
    assert task.stage == "evaluate" and task.round == 0
    reply = alpha.push(task.task_id, metrics_reply("alpha"))
    assert reply.status == pb.PushResultReply.ACCEPTED
    got = fleet.finish_stage()
    assert got["alpha"].ok and got["alpha"].value == {"loss": 1.0}


def test_a_certificate_from_another_ca_fails_the_handshake(fleet, tmp_path):
    _, folders = make_ca(tmp_path / "other", ("alpha",))
    joined = SiteClient(
        f"127.0.0.1:{fleet.port}",
        load_identity(folders["alpha"]),
        lambda plan: SiteSetup(lambda name: None),
        connect_timeout_s=3,
    )
    with pytest.raises(SiteError) as info:
        joined.join()
    joined.close()
    # A handshake refused for a foreign CA: exit 41, naming TLS and the CA.
    assert info.value.exit_code == 41, info.value
    assert "TLS" in str(info.value)


def test_an_expired_certificate_is_refused(fleet, pki, tmp_path, monkeypatch):
    _, ca_dir, _ = pki
    folder = tmp_path / "old"
    csr = ca.request("omega", folder)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=ca.DAYS + 30)
    monkeypatch.setattr(ca, "_now", lambda: long_ago)
    ca.approve(csr, ca_dir, folder)
    monkeypatch.undo()
    site = Raw(fleet.port, folder)
    code, _ = code_of(lambda: site.call("Join", pb.JoinRequest(protocol=1)))
    # The TLS stack refuses an expired client certificate in the handshake.
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_a_revoked_site_is_refused_at_its_next_request(pki, tmp_path):
    _, ca_dir, _ = pki
    sites = ("delta",)
    folder = tmp_path / "delta"
    ca.approve(ca.request("delta", folder), ca_dir, folder)
    fleet = Fleet(ca_dir, tmp_path / "state", sites=sites)
    try:
        delta = Raw(fleet.port, folder)
        assert delta.call("Heartbeat", pb.HeartbeatRequest()).boot_id
        ca.revoke("delta", ca_dir)
        code, details = code_of(lambda: delta.call("Heartbeat", pb.HeartbeatRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in details
    finally:
        fleet.close()


def test_a_site_cannot_speak_for_another(fleet, pki):
    _, _, folders = pki
    liar = Raw(fleet.port, folders["alpha"], name="beta")
    code, details = code_of(lambda: liar.call("Heartbeat", pb.HeartbeatRequest()))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "'alpha'" in details and "'beta'" in details


def test_an_altered_request_fails_its_signature(fleet, pki):
    _, _, folders = pki
    alpha = Raw(fleet.port, folders["alpha"])
    request = alpha.signer.sign("PullTask", pb.PullTaskRequest(run_id="r1"))
    request.run_id = "r2"  # changed after signing
    code, details = code_of(lambda: alpha.stub.PullTask(request, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "signature" in details
    # Signed for another method: refused too.
    other = alpha.signer.sign("Heartbeat", pb.PullTaskRequest(run_id="r1"))
    code, _ = code_of(lambda: alpha.stub.PullTask(other, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_a_replayed_nonce_with_another_body_is_refused_a_retry_is_harmless(fleet, pki):
    _, _, folders = pki
    alpha = Raw(fleet.port, folders["alpha"])
    beat = alpha.signer.sign("Heartbeat", pb.HeartbeatRequest(status="waiting"))
    assert alpha.stub.Heartbeat(beat, timeout=5).boot_id  # the original
    assert alpha.stub.Heartbeat(beat, timeout=5).boot_id  # a byte-identical retry
    # The same nonce on another (validly signed) body: a replay, refused.
    other = pb.HeartbeatRequest(status="training")
    alpha.signer.sign("Heartbeat", other)
    other.envelope.nonce = beat.envelope.nonce
    other.envelope.signature = b""
    key = alpha.signer._key
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedshield.transport.auth import DOMAIN, body_digest

    other.envelope.signature = key.sign(
        DOMAIN + b"Heartbeat\0" + body_digest(other), ec.ECDSA(hashes.SHA256())
    )
    code, details = code_of(lambda: alpha.stub.Heartbeat(other, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "nonce" in details


def test_a_stale_or_future_clock_is_refused_with_the_offset(fleet, pki):
    _, _, folders = pki
    alpha = Raw(fleet.port, folders["alpha"])
    alpha.signer.offset_ms = -10 * 60 * 1000
    code, details = code_of(lambda: alpha.call("Heartbeat", pb.HeartbeatRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "-600" in details and "clock" in details


def test_a_stranger_with_a_valid_certificate_is_not_a_site_of_the_run(pki, tmp_path):
    _, ca_dir, folders = pki
    fleet = Fleet(ca_dir, tmp_path / "state", sites=("beta", "gamma"))
    try:
        alpha = Raw(fleet.port, folders["alpha"])
        code, details = code_of(lambda: alpha.call("Join", pb.JoinRequest(protocol=1)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "not a site of this run" in details
    finally:
        fleet.close()


def test_a_version_mismatch_is_named(fleet, pki):
    _, _, folders = pki
    alpha = Raw(fleet.port, folders["alpha"])
    code, details = code_of(
        lambda: alpha.call("Join", pb.JoinRequest(protocol=99, version="9.9"))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "version mismatch" in details


# -- tasks ----------------------------------------------------------------------


def test_a_site_cannot_fetch_or_answer_another_sites_task(fleet, pki):
    _, _, folders = pki
    big = Params({"w": np.ones(40_000, dtype=np.float32)})
    fleet.evaluate_stage(params=big)
    alpha, beta = Raw(fleet.port, folders["alpha"]), Raw(fleet.port, folders["beta"])
    beta_task = beta.pull().task
    assert not beta_task.payload  # too big to travel inline: fetched by digest
    code, _ = code_of(
        lambda: list(
            alpha.stub.FetchBlob(
                alpha.signer.sign(
                    "FetchBlob", pb.FetchBlobRequest(digest=beta_task.payload_digest)
                ),
                timeout=5,
            )
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Answering beta's task as alpha: refused, and beta's answer still counts.
    code, _ = code_of(lambda: alpha.push(beta_task.task_id, metrics_reply("alpha")))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    for site in (alpha, beta, Raw(fleet.port, folders["gamma"])):
        task = site.pull().task
        site.push(task.task_id, metrics_reply(site.identity.name))
    got = fleet.finish_stage()
    assert all(got[name].ok for name in SITES)


def test_oversized_overlong_malformed_and_equivocating_results(fleet, pki):
    _, _, folders = pki
    fleet.evaluate_stage()
    alpha, beta, gamma = (Raw(fleet.port, folders[n]) for n in SITES)
    a, b, g = alpha.pull().task, beta.pull().task, gamma.pull().task
    # Declared over the cap (1 MiB here): refused before a byte is read.
    code, details = code_of(lambda: alpha.push(a.task_id, b"x", size=2 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap" in details
    # More bytes than declared: refused, nothing kept.
    data = metrics_reply("alpha")
    code, _ = code_of(lambda: alpha.push(a.task_id, data, size=len(data) - 5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # The honest result still goes through afterwards.
    assert alpha.push(a.task_id, data).status == pb.PushResultReply.ACCEPTED
    # A second, different result for the same task: refused and logged.
    code, details = code_of(lambda: alpha.push(a.task_id, metrics_reply("alpha", 2.0)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "one result per task" in details
    # The same result again: a harmless duplicate.
    assert alpha.push(a.task_id, data).status == pb.PushResultReply.DUPLICATE
    # Garbage with a correct digest: rejected, recorded, the round goes on.
    code, details = code_of(lambda: beta.push(b.task_id, b"\x89FSU garbage"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details
    # Another site's words in a valid envelope: refused as malformed too.
    code, _ = code_of(lambda: gamma.push(g.task_id, metrics_reply("alpha")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    got = fleet.finish_stage()
    assert got["alpha"].ok and got["alpha"].value == {"loss": 1.0}
    assert got["beta"].failure.kind == FailureKind.REJECTED
    assert got["gamma"].failure.kind == FailureKind.REJECTED
    kinds = {(c, k) for _, c, k, _ in fleet.store.events()}
    assert {("alpha", "oversized"), ("alpha", "equivocation")} <= kinds
    assert ("beta", "malformed_result") in kinds


def test_an_upload_cut_short_resumes_from_the_server_offset(fleet, pki):
    _, _, folders = pki
    fleet.evaluate_stage(sites=("alpha",))
    alpha = Raw(fleet.port, folders["alpha"])
    task = alpha.pull().task
    data = metrics_reply("alpha") + b""
    half = len(data) // 2
    reply = alpha.push(task.task_id, data, chunks=[data[:half]])
    assert reply.status == pb.PushResultReply.PARTIAL and reply.received == half
    digest = hashlib.sha256(data).hexdigest()
    status = alpha.call(
        "UploadStatus", pb.UploadStatusRequest(task_id=task.task_id, digest=digest)
    )
    assert status.received == half
    header = pb.ResultHeader(
        task_id=task.task_id, digest=digest, size=len(data), offset=half
    )
    alpha.signer.sign("PushResult", header)
    parts = [
        pb.ResultPart(header=header),
        pb.ResultPart(chunk=pb.Chunk(data=data[half:])),
    ]
    assert alpha.stub.PushResult(iter(parts)).status == pb.PushResultReply.ACCEPTED
    assert fleet.finish_stage()["alpha"].value == {"loss": 1.0}


def test_a_site_that_says_nothing_is_a_timeout_and_one_that_goes_quiet_drops(
    pki, tmp_path
):
    _, ca_dir, folders = pki
    fleet = Fleet(ca_dir, tmp_path / "state")
    fleet.mailbox.offline_after_s = 1.0
    try:
        alpha = Raw(fleet.port, folders["alpha"])
        fleet.evaluate_stage(sites=("alpha", "beta"))
        task = alpha.pull().task
        alpha.push(task.task_id, metrics_reply("alpha"))
        got = fleet.finish_stage()  # beta never came: offline after 1 s
        assert got["alpha"].ok
        assert got["beta"].failure.kind == FailureKind.DROPPED
    finally:
        fleet.close()


def test_a_server_checks_peers_without_the_ca_key(pki, tmp_path):
    # The internet-facing server needs ca.crt and ca.crl only.
    import shutil

    _, ca_dir, folders = pki
    public = tmp_path / "ca-public"
    public.mkdir()
    for name in ("ca.crt", "ca.crl", "server.crt", "server.key"):
        shutil.copy(ca_dir / name, public / name)
    fleet = Fleet(public, tmp_path / "state")
    try:
        alpha = Raw(fleet.port, folders["alpha"])
        assert alpha.call("Heartbeat", pb.HeartbeatRequest()).boot_id
    finally:
        fleet.close()


def test_claimed_names_are_bounded_and_events_rate_limited(fleet, pki):
    _, _, folders = pki
    alpha = Raw(fleet.port, folders["alpha"], name="x" * 100_000)
    for _ in range(30):
        code, details = code_of(lambda: alpha.call("Heartbeat", pb.HeartbeatRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "64 characters" in details
    events = fleet.store.events()
    assert len(events) <= 11
    assert all(
        len(client) <= 65 and len(detail) <= 301 for _, client, _, detail in events
    )


def test_one_long_poll_per_site(fleet, pki):
    from concurrent.futures import ThreadPoolExecutor

    _, _, folders = pki
    alpha = Raw(fleet.port, folders["alpha"])
    fleet.server.settings = dataclasses.replace(fleet.server.settings, poll_s=12.0)

    def pull():
        request = alpha.signer.sign("PullTask", pb.PullTaskRequest(run_id="r1"))
        reply = alpha.stub.PullTask(request, timeout=60)
        return reply, time.monotonic()

    with ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        polls = [pool.submit(pull) for _ in range(8)]
        done = [p.result(timeout=90) for p in polls]
    # Each newer poll ends the older ones at their next look (within 5 s):
    # eight polls from one site never hold eight slots for the full 12 s.
    ended_early = [t - started for r, t in done if t - started < 8]
    assert len(ended_early) >= 7
    assert all(r.WhichOneof("outcome") == "wait" for r, _ in done)


def test_a_full_disk_asks_the_site_to_retry_and_loses_nothing(fleet, pki, monkeypatch):
    import errno

    _, _, folders = pki
    fleet.evaluate_stage(sites=("alpha",))
    alpha = Raw(fleet.port, folders["alpha"])
    task = alpha.pull().task

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fleet.store.blobs, "put", full)
    monkeypatch.setattr(fleet.store.blobs, "adopt", full)
    code, details = code_of(lambda: alpha.push(task.task_id, metrics_reply("alpha")))
    assert code == grpc.StatusCode.UNAVAILABLE  # a site retries UNAVAILABLE
    assert "disk" in details and "full" in details
    monkeypatch.undo()  # space freed
    reply = alpha.push(task.task_id, metrics_reply("alpha"))
    assert reply.status == pb.PushResultReply.ACCEPTED
    assert fleet.finish_stage()["alpha"].value == {"loss": 1.0}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_attestations_of_random_bytes_are_refused_with_a_protocol_error(data):
    from fedshield.errors import ProtocolError

    keys = _FUZZ_KEYS[0]
    with pytest.raises(ProtocolError):
        keys.check_table({"beta": b"k" * 32}, {"beta": data})


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_task_payloads_are_refused_not_crashing_the_site(data):
    from fedshield.errors import ProtocolError

    with pytest.raises(ProtocolError):
        wire.decode_request(data)


_FUZZ_KEYS: list = []


@pytest.fixture(autouse=True, scope="module")
def _fuzz_keys(pki):
    from fedshield.transport.secagg_keys import SiteKeys

    _, _, folders = pki
    _FUZZ_KEYS.append(SiteKeys(load_identity(folders["alpha"]), "r1", SITES))
    yield
    _FUZZ_KEYS.clear()
