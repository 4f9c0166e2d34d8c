"""10,000 clients, 100 per round, 20 rounds: memory stays under 2 GB.

``fedshield simulate examples/fashion_mnist.toml`` (small CNN, 2 label
shards per client) with 10,000 clients instead of 50, run as a subprocess so
that the peak resident memory measured is the command's own, for the default
backend (``auto``, which picks ``vectorised`` for the CNN) and for
``sequential``. Fashion-MNIST's 60,000 training images give each client 6
(3 per shard); the 10,000 test images are the centralised test set, evaluated
every 5 rounds. Digits (1,797 images) cannot be split over 10,000 disjoint
clients, so the digits variant goes through the Python API instead: 10,000
lazily built clients that each hold a bootstrap sample of digits (clients
overlap; it is not a partition — see ``many_clients_digits.py``).

Peak RSS is ``ru_maxrss`` of a wrapper process's children (the command
only, not pytest). Timings are wall-clock on a shared machine: noisy.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LIMIT_BYTES = 2 * 1024**3
EXIT_DATA_UNAVAILABLE = 12

SETTINGS = [
    "data.num_clients=10000",
    "data.min_samples=1",
    "data.client_test_fraction=0",
    "strategy.clients_per_round=100",
    "strategy.min_clients=50",
    "run.rounds=20",
    "run.eval_every=5",
    "run.federated_eval=false",
]

# Runs a command and writes the peak RSS of its process tree's largest
# waited-for process (ru_maxrss of RUSAGE_CHILDREN) to the file in argv[1].
_WRAPPER = """
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": rc, "peak_rss_bytes": peak * scale}, fh)
sys.exit(rc)
"""


def measured(
    cmd: list[str], tmp: Path
) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """Wall seconds, peak RSS in bytes and the finished process of ``cmd``."""
    stats = tmp / "rusage.json"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(stats), *cmd],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=1800,
    )
    wall = time.perf_counter() - started
    peak = int(json.loads(stats.read_text())["peak_rss_bytes"])
    return wall, peak, proc


def report(label: str, wall: float, peak: int, run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    seconds = [r["seconds"] for r in records]
    train_only = [r["seconds"] for r in records if r.get("accuracy") is None]
    print(
        f"\n{label}: backend {summary.get('backend')}, {summary['rounds']} rounds, "
        f"accuracy {summary['accuracy']:.4f}; whole command {wall:.1f} s "
        f"(in the run {summary['wall_seconds']:.1f} s); per round median "
        f"{statistics.median(seconds):.2f} s, mean {statistics.fmean(seconds):.2f} s "
        f"(without evaluation: median {statistics.median(train_only):.2f} s; "
        f"first round {seconds[0]:.2f} s); peak RSS {peak / 2**20:.0f} MiB"
    )
    return summary


@pytest.mark.bench
@pytest.mark.parametrize("backend", ["auto", "sequential"])
def test_ten_thousand_clients_fashion_mnist(backend: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        str(BIN / "fedshield"),
        "simulate",
        str(ROOT / "examples" / "fashion_mnist.toml"),
        "--out",
        str(run_dir),
        "--backend",
        backend,
        "--format",
        "json",
    ]
    for setting in SETTINGS:
        cmd += ["--set", setting]
    wall, peak, proc = measured(cmd, tmp_path)
    if proc.returncode == EXIT_DATA_UNAVAILABLE:
        pytest.skip(f"Fashion-MNIST is not installed: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = report(f"10,000 clients, fashion_mnist, {backend}", wall, peak, run_dir)
    partition = json.loads((run_dir / "partition.json").read_text())
    assert len(partition["clients"]) == 10_000
    assert summary["status"] == "completed"
    assert summary["rounds"] == 20
    assert peak < LIMIT_BYTES, f"peak RSS {peak / 2**20:.0f} MiB >= 2 GiB"


@pytest.mark.bench
def test_ten_thousand_bootstrap_clients_digits(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "bench" / "many_clients_digits.py"), str(run_dir)]
    wall, peak, proc = measured(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = report(
        "10,000 bootstrap clients, digits (Python API)", wall, peak, run_dir
    )
    assert summary["rounds"] == 20
    assert peak < LIMIT_BYTES, f"peak RSS {peak / 2**20:.0f} MiB >= 2 GiB"
