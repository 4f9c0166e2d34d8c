"""The foundation issue's bars, measured (``make bench``).

Timings are ratios or wall times of whole commands measured in the same run;
figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _timed(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)
    return time.perf_counter() - started, proc


@pytest.mark.bench
def test_quickstart_bar(tmp_path: Path) -> None:
    floor, _ = _timed([sys.executable, "-c", "import torch"], tmp_path)
    wall, proc = _timed(
        [
            str(BIN / "fedshield"),
            "simulate",
            str(ROOT / "examples" / "quickstart.toml"),
            "--out",
            str(tmp_path / "run"),
            "--format",
            "json",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    records = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    per_round = sorted(r["seconds"] for r in records)[len(records) // 2]
    print(
        f"\nquickstart: accuracy {summary['accuracy']:.4f}, "
        f"whole command {wall:.2f} s (in-run {summary['wall_seconds']:.2f} s, "
        f"median round {per_round * 1000:.0f} ms); `import torch` alone {floor:.2f} s"
    )
    assert summary["accuracy"] >= 0.90
    assert wall < 60.0


@pytest.mark.bench
def test_heart_federated_beats_every_hospital_alone() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "heart_local_vs_federated.py"),
            "--seeds",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    print("\n" + proc.stdout)
    table = json.loads(proc.stdout.strip().splitlines()[-1])
    federated = table.pop("federated")["mean"]
    assert federated >= 0.78
    assert all(federated > row["mean"] for row in table.values())
