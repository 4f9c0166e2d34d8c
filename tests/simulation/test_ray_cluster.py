"""A real Ray cluster on loopback, joined as a new user would join one.

The module starts a head node and a worker node with ``ray start`` (one CPU
each, token authentication on, as Ray 2.60 has it once a token exists),
runs ``fedshield simulate --backend ray --ray-address 127.0.0.1:PORT`` in a
subprocess, and checks that the federation completed with clients on both
nodes; then that a driver without the token is told the remedy. About 25 s.

The cluster is this module's own: its own port, ``HOME`` (so the token and
``~/.ray`` are not the user's), temporary directory and process sessions.
It is stopped by signalling the ``ray start --block`` processes it started
(and killing whatever of their sessions is left), never with ``ray stop``,
which kills every Ray process on the machine, those of other tests
(``tests/contracts/test_ray_backend.py``) and other users included. Each
node runs under ``timeout``, so a cluster whose test process died stops by
itself after a few minutes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from fedshield.errors import TransportError
from fedshield.simulation.backends.ray import RayBackend, _join_error

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NODE_LIFETIME_S = 300
"""A node still running after this long (its test process died) stops."""
START_TIMEOUT_S = 90


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    """The environment of a process that may join (token mode, the token)."""
    logs: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [str(BIN / "ray"), "start", "--block", *args]
    if shutil.which("timeout"):
        command = ["timeout", "-k", "20", str(NODE_LIFETIME_S), *command]
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own session: stopped by id, below
        )


def _wait_started(node: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Ray runtime started" in text:
            return
        if node.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"`ray start` did not start a node:\n{text[-4000:]}")


def _session_members(sid: int) -> list[int]:
    """Processes of session ``sid`` (Linux; elsewhere none are found)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # pid (comm) state ppid pgrp session
                members.append(int(entry.name))
    return members


def _stop_node(node: subprocess.Popen) -> None:
    """Stop a node this module started, and everything in its session."""
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)  # `ray start --block` stops its node
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=20)
    for pid in [node.pid, *_session_members(node.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A head and a worker node on loopback, one CPU each, token auth on."""
    if not (BIN / "ray").exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    logs = tmp_path_factory.mktemp("ray-cluster")
    home = logs / "home"
    home.mkdir()
    # Ray's sockets live under --temp-dir; a pytest path can be too long for
    # a Unix socket's name, so a short one of its own.
    temp_dir = tempfile.mkdtemp(
        prefix="fsray", dir="/tmp" if os.name == "posix" else None
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))
    }
    env.update(
        HOME=str(home),
        RAY_USAGE_STATS_ENABLED="0",
        # No 30 s drain on SIGTERM: the nodes run nothing worth draining.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        COLUMNS="400",  # no wrapped log lines
    )
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    try:
        head_log = logs / "head.log"
        nodes.append(
            _start_node(
                [
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={port}",
                    "--num-cpus=1",
                    "--include-dashboard=false",
                    "--disable-usage-stats",
                    f"--temp-dir={temp_dir}",
                ],
                env,
                head_log,
            )
        )
        _wait_started(nodes[0], head_log)
        worker_log = logs / "worker.log"
        nodes.append(
            _start_node(
                [
                    f"--address={address}",
                    "--num-cpus=1",
                    "--disable-usage-stats",
                    f"--temp-dir={temp_dir}",
                ],
                env,
                worker_log,
            )
        )
        _wait_started(nodes[1], worker_log)
        yield Cluster(address, env, logs)
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _simulate(
    cluster: Cluster, env: dict[str, str], out: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "fedshield"),
            "simulate",
            str(ROOT / "examples" / "quickstart.toml"),
            "--backend",
            "ray",
            "--ray-address",
            cluster.address,
            "--set",
            "run.rounds=2",
            "--set",
            "run.workers=2",
            "--out",
            str(out),
            "--format",
            "json",
            "-v",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_a_federation_runs_on_a_cluster_of_two_nodes(cluster, tmp_path):
    import json

    done = _simulate(cluster, cluster.env, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert summary["backend"] == "ray"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # Each actor says where it runs once it holds client_fn: one actor of
    # one CPU per node, each with half of the 20 clients.
    nodes = set(
        re.findall(r"Ray worker \d \(pid \d+ on [^,]+, node (\w+)\)", done.stderr)
    )
    assert len(nodes) == 2, done.stderr[-4000:]
    assert "Ray joined" in done.stderr


def test_a_driver_without_the_token_is_told_the_remedy(cluster, tmp_path):
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    # Ray retries a refused connection for 20 s; two tries say as much.
    env["RAY_gcs_server_port_wait_time_s"] = "2"
    done = _simulate(cluster, env, tmp_path / "run")
    assert done.returncode == TransportError.exit_code, done.stderr[-4000:]
    message = " ".join(done.stderr.split())
    assert "could not join the Ray cluster" in message
    assert "token authentication" in message
    assert "export RAY_AUTH_MODE=token" in message
    assert "ray get-auth-token" in message and "RAY_AUTH_TOKEN" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- the remedy, without a cluster ---------------------------------------------


class FakeAuthError(Exception):
    """Stands in for ray.exceptions.AuthenticationError."""


def _failing_ray(error: BaseException) -> SimpleNamespace:
    def init(**kwargs):
        raise error

    return SimpleNamespace(
        init=init, exceptions=SimpleNamespace(AuthenticationError=FakeAuthError)
    )


def _refused() -> ConnectionError:
    # What Ray 2.60's ray.init raises when the cluster's GCS refuses the
    # driver for want of a token: the reason is only in the cause.
    try:
        try:
            raise RuntimeError(
                "Failed to connect to GCS. Last connection error: Traceback ...\n"
                "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: "
                "Authentication token is missing or incorrect."
            )
        except RuntimeError as cause:
            raise ConnectionError(
                "Failed to connect to Ray cluster at 10.0.0.1:6379"
            ) from cause
    except ConnectionError as err:
        return err


def test_a_refused_token_names_the_remedy(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    backend = RayBackend("10.0.0.1:6379")
    with pytest.raises(TransportError) as info:
        backend._init_ray(_failing_ray(_refused()))
    message = str(info.value)
    assert "could not join the Ray cluster at '10.0.0.1:6379'" in message
    assert "export RAY_AUTH_MODE=token" in message
    assert "ray get-auth-token" in message
    assert "docs/cluster.md" in message
    backend.close()


def test_the_remedy_for_a_missing_or_wrong_token_in_token_mode(monkeypatch):
    env = {"RAY_AUTH_MODE": "token"}
    for message in (
        _join_error("h:1", _refused(), env),
        _join_error("h:1", FakeAuthError("no token"), env, is_auth=True),
    ):
        assert "missing or not the cluster's" in message
        assert "export RAY_AUTH_MODE" not in message
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    backend = RayBackend("h:1")
    with pytest.raises(TransportError, match="missing or not the cluster's"):
        backend._init_ray(
            _failing_ray(FakeAuthError("no authentication token was found"))
        )
    backend.close()


def test_an_unreachable_cluster_names_both_causes():
    # Ray's error for an address where nothing answers says no more than
    # for a refused token: both remedies are named unless in token mode.
    error = ConnectionError("Failed to connect to Ray cluster at h:1")
    message = _join_error("h:1", error, {})
    assert "is a Ray cluster running there" in message
    assert "export RAY_AUTH_MODE=token" in message  # it may be the cause too
    message = _join_error("h:1", error, {"RAY_AUTH_MODE": "token"})
    assert "is a Ray cluster running there" in message
    assert "RAY_AUTH_MODE" not in message
