"""``on_failed_round``: a round with too few clients stops the run, or not."""

from __future__ import annotations

import json

import pytest

import fedshield as fs
from fedshield.errors import RoundFailedError


def _config(tmp_path, on_failed_round=None):  # type: ignore[no-untyped-def]
    run = {"name": "failed", "rounds": 3, "seed": 1, "report": False}
    if on_failed_round is not None:
        run["on_failed_round"] = on_failed_round
    return {
        "run": run,
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 4},
        "model": {"kind": "logistic"},
        # Every round drops about half its clients, below min_clients = 4.
        "faults": {"dropout": 0.5},
        "strategy": {"clients_per_round": 4, "min_clients": 4},
    }


def test_a_failed_round_stops_the_run_by_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RoundFailedError, match="min_clients is 4"):
        fs.simulate(_config(tmp_path), out=tmp_path / "run", write_report=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"


def test_continue_records_the_failed_round_and_goes_on(tmp_path) -> None:  # type: ignore[no-untyped-def]
    summary, path = fs.simulate(
        _config(tmp_path, "continue"), out=tmp_path / "run", write_report=False
    )
    rows = [json.loads(line) for line in (path / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    failed = [r for r in rows if r.get("completed") is False]
    assert failed, rows
    assert all("min_clients is 4" in r["error"] for r in failed)
    assert summary["status"] == "completed"
