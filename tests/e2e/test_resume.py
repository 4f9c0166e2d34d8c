from __future__ import annotations

import json

import pytest

from fedshield.api import parse_config, simulate
from fedshield.errors import CheckpointError
from fedshield.simulation import RunDirectory

TINY = {
    "run": {"name": "tiny", "rounds": 4, "seed": 7},
    "data": {
        "dataset": "digits",
        "partition": "dirichlet",
        "alpha": 1.0,
        "num_clients": 5,
    },
    "model": {"kind": "mlp", "hidden": [16]},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.5},
    "strategy": {"clients_per_round": 3},
}


def _config(**run):
    data = {k: dict(v) for k, v in TINY.items()}
    data["run"].update(run)
    return parse_config(data)


def _strip_times(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    # Uninterrupted reference.
    full, _ = simulate(_config(), out=tmp_path / "full", write_report=False)

    # Interrupted after round 2 (as Ctrl-C would), then resumed.
    def stop_after_two(state, record):
        if state.round_idx == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(
            _config(),
            out=tmp_path / "part",
            on_round=stop_after_two,
            write_report=False,
        )
    stopped = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["rounds"] == 2
    resumed, _ = simulate(
        _config(), out=tmp_path / "part", resume=True, write_report=False
    )

    a = RunDirectory(tmp_path / "full")
    b = RunDirectory(tmp_path / "part")
    assert b.load_checkpoint().params == a.load_checkpoint().params  # bitwise
    assert _strip_times(b.read_metrics()) == _strip_times(a.read_metrics())
    assert resumed["accuracy"] == full["accuracy"] and resumed["status"] == "completed"


def test_resume_can_extend_rounds_but_not_change_training(tmp_path):
    simulate(_config(rounds=2), out=tmp_path, write_report=False)
    extended, _ = simulate(
        _config(rounds=3), out=tmp_path, resume=True, write_report=False
    )
    assert extended["rounds"] == 3
    changed = parse_config({**TINY, "client": {**TINY["client"], "lr": 0.2}})
    with pytest.raises(CheckpointError, match="different configuration"):
        simulate(changed, out=tmp_path, resume=True, write_report=False)


def test_failed_data_load_leaves_previous_run_untouched(tmp_path, monkeypatch):
    simulate(_config(rounds=1), out=tmp_path, write_report=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setenv("FEDSHIELD_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    data = {k: dict(v) for k, v in TINY.items()}
    data["data"]["dataset"] = "fashion_mnist"
    from fedshield.errors import DataUnavailableError

    with pytest.raises(DataUnavailableError):
        simulate(parse_config(data), out=tmp_path, overwrite=True, write_report=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
