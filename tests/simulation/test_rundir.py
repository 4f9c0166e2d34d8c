from __future__ import annotations

import json

import pytest

from fedshield.core import ServerState
from fedshield.errors import CheckpointError, ConfigError, RunDirectoryError
from fedshield.simulation import RunDirectory

from .fakes import SPEC_PARAMS


def test_prepare_refuses_to_clobber_a_previous_run(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.append_jsonl("metrics.jsonl", {"round": 1})
    with pytest.raises(ConfigError, match="--resume"):
        run_dir.prepare(resume=False, overwrite=False)
    assert (tmp_path / "metrics.jsonl").exists()
    run_dir.prepare(resume=False, overwrite=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_without_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        RunDirectory(tmp_path).prepare(resume=True, overwrite=False)


def test_truncate_records_keeps_rounds_the_checkpoint_covers(tmp_path):
    run_dir = RunDirectory(tmp_path)
    for r in (1, 2, 3):
        run_dir.append_jsonl("metrics.jsonl", {"round": r})
        run_dir.append_jsonl("failures.jsonl", {"round": r, "client_id": "x"})
    run_dir.truncate_records(2)
    assert [r["round"] for r in run_dir.read_metrics()] == [1, 2]
    failures = (tmp_path / "failures.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in failures] == [1, 2]


def test_json_files_are_strict_json_and_world_readable(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.write_json("summary.json", {"loss": float("nan"), "x": [float("inf")]})
    run_dir.append_jsonl("metrics.jsonl", {"round": 1, "loss": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "loss": None,
        "x": [None],
    }
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


def test_run_folder_that_is_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(RunDirectoryError, match="not a folder"):
        RunDirectory(target).prepare(resume=False, overwrite=False)


def test_checkpoint_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    run_dir = RunDirectory(tmp_path)
    state = ServerState(round_idx=4, params=SPEC_PARAMS, metadata={"k": "v"})
    run_dir.save_checkpoint(state)
    assert run_dir.load_checkpoint() == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="corrupt"):
        RunDirectory(tmp_path).load_checkpoint()
