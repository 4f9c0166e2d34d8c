"""Helpers shared by the network benchmarks: processes, CA, memory, machine.

Every benchmark here starts real ``fedshield`` processes on 127.0.0.1 the
way a user does (``python -m fedshield.cli serve|join``), waits for the
server's port file, and kills whatever it started when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS_JSON = Path(__file__).resolve().parent / "results.json"


def fedshield_cmd(*args: str | Path) -> list[str]:
    """``python -m fedshield.cli ARGS`` with this interpreter."""
    return [sys.executable, "-m", "fedshield.cli", *map(str, args)]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FEDSHIELD_FAULT", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Processes:
    """Processes started by a benchmark; all killed on exit."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - kept open
        proc = subprocess.Popen(
            list(args), stdout=log, stderr=subprocess.STDOUT, env=child_env(self.env)
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@contextlib.contextmanager
def processes(log_dir: Path, env: dict[str, str] | None = None) -> Iterator[Processes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = Processes(log_dir, env)
    try:
        yield procs
    finally:
        procs.kill_all()


def wait_port(proc: subprocess.Popen[bytes], port_file: Path, timeout_s: float) -> int:
    """The port a ``fedshield serve`` wrote to ``--port-file``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if port_file.exists():
            text = port_file.read_text().strip()
            if text:
                return int(text)
        time.sleep(0.05)
    raise RuntimeError("the server did not write its port file in time")


def make_ca(root: Path, sites: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """A fresh federation CA for 127.0.0.1 and one identity folder per site."""
    from fedshield.transport import ca

    ca_dir = root / "ca"
    ca.init_ca(ca_dir, "127.0.0.1")
    folders = {}
    for name in sites:
        folder = root / "identities" / name
        csr = ca.request(name, folder)
        ca.approve(csr, ca_dir, folder)
        folders[name] = folder
    return ca_dir, folders


class PeakRss:
    """Samples a process's VmRSS and reads its VmHWM (kernel's peak) at the end."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid = pid
        self.every_s = every_s
        self.samples_peak_kib = 0
        self.hwm_kib = 0
        self.cpu_s = 0.0
        """User + system CPU seconds, as last sampled (threads included)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, int]:
        out = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out

    def _cpu(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (
                Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            )
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            self.cpu_s = max(self.cpu_s, ticks / os.sysconf("SC_CLK_TCK"))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._cpu()
            values = self._read()
            if not values:
                continue
            self.samples_peak_kib = max(self.samples_peak_kib, values.get("VmRSS", 0))
            self.hwm_kib = max(self.hwm_kib, values.get("VmHWM", 0))

    def stop(self) -> None:
        values = self._read()  # the process may still exist (zombie: no values)
        self.hwm_kib = max(self.hwm_kib, values.get("VmHWM", 0))
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def peak_mib(self) -> float:
        return max(self.hwm_kib, self.samples_peak_kib) / 1024


class LineWatcher:
    """When each line of a growing file appeared (``time.perf_counter``).

    Under DP a run's ``metrics.jsonl`` carries no ``seconds`` (the round's
    wall time is not covered by epsilon), so a round's duration is the time
    between two records appearing. Polled every ``every_s``.
    """

    def __init__(self, path: Path, every_s: float = 0.005) -> None:
        self.path = path
        self.every_s = every_s
        self.stamps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _count(self) -> int:
        try:
            return self.path.read_bytes().count(b"\n")
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            now = time.perf_counter()
            n = self._count()
            while len(self.stamps) < n:
                self.stamps.append(now)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.stamps


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "git": source_version(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "gpu": "none",
        "loadavg_at_start": [round(v, 2) for v in load],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def source_version() -> dict[str, Any]:
    """The commit measured, and whether src/ had changes not committed."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            return ""

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "src_uncommitted": git("status", "--porcelain", "src").splitlines(),
    }


def update_results(key: str, value: Any) -> None:
    """Merge ``{key: value}`` into bench/network/results.json."""
    data: dict[str, Any] = {}
    if RESULTS_JSON.exists():
        data = json.loads(RESULTS_JSON.read_text())
    data[key] = value
    RESULTS_JSON.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
