"""Real processes on 127.0.0.1 for the network tests: a CA, sites' data, runs.

Ports are chosen by the OS (``--listen 127.0.0.1:0 --port-file``); a server
is ready when its port file exists and its gRPC health service answers
SERVING (no sleeps). Every process a test starts is killed when it ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tomli_w
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedshield.transport import ca
from fedshield.transport.auth import Identity, load_identity

SITES = ("alpha", "beta", "gamma")
FLEET = "fedshield.fleet.v1.Fleet"


def make_ca(root: Path, sites: Sequence[str] = SITES) -> tuple[Path, dict[str, Path]]:
    """A CA for 127.0.0.1 and an identity folder per site."""
    ca_dir = root / "ca"
    ca.init_ca(ca_dir, "127.0.0.1")
    folders = {}
    for name in sites:
        folder = root / "sites" / name
        csr = ca.request(name, folder)
        ca.approve(csr, ca_dir, folder)
        folders[name] = folder
    return ca_dir, folders


def write_site_data(root: Path, sites: Sequence[str] = SITES) -> dict[str, Path]:
    """Each site's slice of digits as an .npz and its SITE.toml."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    files = {}
    for k, name in enumerate(sites):
        rows = order[k :: len(sites)][:300]
        folder = root / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "digits.npz", x=(x[rows] / 16).astype(np.float32), y=y[rows])
        toml = folder / "site.toml"
        toml.write_text('[data]\ndataset = "npz"\npath = "digits.npz"\n')
        files[name] = toml
    return files


def server_config(path: Path, sites: Sequence[str] = SITES, **sections: Any) -> Path:
    """A server TOML: 3 rounds of FedAvg on the sites' digits (64 features)."""
    config: dict[str, Any] = {
        "run": {"name": "net", "rounds": 3, "seed": 7, "federated_eval": True},
        "model": {"kind": "mlp", "hidden": [16]},
        "client": {"epochs": 3, "batch_size": 32, "lr": 0.1},
        "network": {
            "sites": list(sites),
            "input_shape": [64],
            "num_classes": 10,
            "poll_s": 5.0,
            "heartbeat_s": 1.0,
            "fit_timeout_s": 60.0,
            "stage_timeout_s": 30.0,
            "wait_for_sites_s": 60.0,
        },
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(tomli_w.dumps(config))
    return path


def _fedshield(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "fedshield.cli", *map(str, args)]


def _env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FEDSHIELD_FAULT", None)
    if fault:
        env["FEDSHIELD_FAULT"] = fault
    env["PYTHONUNBUFFERED"] = "1"
    # The same server secret in every run, so that two state folders give
    # the same run (an uninterrupted one to compare a crashed one with).
    env["FEDSHIELD_SERVER_SECRET"] = "5e" * 32
    return env


class Procs:
    """The processes a test started, killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, args: list[str], fault: str | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - kept open
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=_env(fault)
        )
        self.procs.append(proc)
        return proc

    def server(
        self,
        config: Path,
        state: Path,
        ca_dir: Path | None,
        *,
        fault: str | None = None,
        name: str = "server",
        port: int = 0,
    ) -> subprocess.Popen[bytes]:
        port_file = state.parent / f"{state.name}.port"
        port_file.unlink(missing_ok=True)
        security = ["--ca", str(ca_dir)] if ca_dir else ["--insecure"]
        args = _fedshield(
            "serve", config, *security, "--state", state,
            "--listen", f"127.0.0.1:{port}", "--port-file", port_file,
        )  # fmt: skip
        return self.start(name, args, fault)

    def site(
        self,
        port: int,
        name: str,
        identity: Path,
        data: Path,
        *,
        policy: Path | None = None,
        fault: str | None = None,
        connect_timeout: float = 60,
    ) -> subprocess.Popen[bytes]:
        args = _fedshield(
            "join", "--server", f"127.0.0.1:{port}", "--identity", identity,
            "--data", data, "--connect-timeout", str(connect_timeout),
        )  # fmt: skip
        if policy is not None:
            args += ["--policy", str(policy)]
        return self.start(f"site-{name}", args, fault)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def processes(root: Path) -> Iterator[Procs]:
    procs = Procs(root)
    try:
        yield procs
    finally:
        procs.kill_all()


def channel(port: int, identity: Identity | None) -> grpc.Channel:
    """A channel to the server as ``identity`` (None: insecure)."""
    if identity is None:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    creds = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def wait_ready(
    server: subprocess.Popen[bytes],
    state: Path,
    identity_dir: Path | None,
    timeout_s: float = 90,
) -> int:
    """The server's port once its health service says SERVING."""
    port_file = state.parent / f"{state.name}.port"
    deadline = time.monotonic() + timeout_s
    identity = load_identity(identity_dir) if identity_dir else None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}")
        if port_file.exists() and port_file.read_text().strip():
            port = int(port_file.read_text())
            with channel(port, identity) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                try:
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(service=FLEET), timeout=5
                    )
                except grpc.RpcError:
                    reply = None
                if reply and reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return port
        time.sleep(0.05)  # polling a file; not a wait for readiness itself
    raise AssertionError("the server did not become ready")


def wait_all(
    procs: Mapping[str, subprocess.Popen[bytes]], timeout_s: float
) -> dict[str, int]:
    """Each process's exit status (raises if one outlives ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    codes = {}
    for name, proc in procs.items():
        left = max(0.1, deadline - time.monotonic())
        codes[name] = proc.wait(timeout=left)
    return codes


def final_params(state: Path) -> np.ndarray:
    """The model in a run folder's checkpoint."""
    from fedshield.simulation import RunDirectory

    return RunDirectory(state).load_checkpoint().params.flat.copy()
