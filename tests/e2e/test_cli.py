from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedshield.cli.main import app

ROOT = Path(__file__).parents[2]
TINY_TOML = """
[run]
name = "cli-tiny"
rounds = 3
seed = 1

[data]
dataset = "digits"
partition = "dirichlet"
alpha = 0.5
num_clients = 6

[model]
kind = "mlp"
hidden = [16]

[client]
lr = 0.1
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def test_simulate_end_to_end_as_a_user_runs_it(tiny, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedshield.cli",
            "simulate",
            str(tiny),
            "--out",
            str(out),
            "--format",
            "json",
            "--set",
            "model.hidden=[32,16]",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "completed" and summary["rounds"] == 3
    for key in ("accuracy", "loss", "rounds", "wall_seconds", "status"):
        assert key in summary
    assert summary["seed"] == 3
    files = {p.name for p in out.iterdir()}
    assert {
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "partition.json",
        "checkpoint.npz",
        "report.html",
    } <= files
    records = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in records] == [1, 2, 3]
    for key in ("round", "accuracy", "loss", "num_clients", "seconds"):
        assert key in records[-1]
    assert (
        "hidden = [\n    32,\n    16,\n]" in (out / "config.toml").read_text()
        or "32" in (out / "config.toml").read_text()
    )
    partition = json.loads((out / "partition.json").read_text())
    assert sum(c["num_samples"] for c in partition["clients"]) > 1000
    assert "data:image/png;base64," in (out / "report.html").read_text()


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def test_misspelt_key_exits_10_naming_key_and_suggestion(tiny, tmp_path):
    result = invoke(
        "simulate",
        str(tiny),
        "--set",
        "client.learning_rate=0.1",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 10
    assert "client.learning_rate: unknown key" in result.output
    assert not (tmp_path / "o").exists()


def test_missing_config_exits_11(tmp_path):
    result = invoke("simulate", str(tmp_path / "missing.toml"))
    assert result.exit_code == 11 and "not found" in result.output


def test_missing_dataset_exits_12_and_says_how_to_install(tiny, tmp_path):
    result = invoke(
        "simulate",
        str(tiny),
        "--set",
        "data.dataset=fashion_mnist",
        "--out",
        str(tmp_path / "o"),
        env={**os.environ, "FEDSHIELD_FASHION_MNIST_DIR": str(tmp_path)},
    )
    assert result.exit_code == 12
    assert "dataset-fashion-mnist" in result.output


def test_impossible_partition_exits_13_and_names_the_fix(tiny, tmp_path):
    result = invoke(
        "simulate",
        str(tiny),
        "--set",
        "data.alpha=0.01",
        "--set",
        "data.num_clients=200",
        "--set",
        "data.min_samples=5",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 13, result.output
    assert "min_samples" in result.output


def test_existing_run_needs_resume_or_overwrite(tiny, tmp_path):
    out = str(tmp_path / "o")
    assert (
        invoke(
            "simulate",
            str(tiny),
            "--set",
            "run.rounds=1",
            "--out",
            out,
            "--format",
            "json",
        ).exit_code
        == 0
    )
    again = invoke("simulate", str(tiny), "--set", "run.rounds=1", "--out", out)
    assert again.exit_code == 10 and "--resume" in again.output
    resumed = invoke(
        "simulate",
        str(tiny),
        "--set",
        "run.rounds=2",
        "--out",
        out,
        "--resume",
        "--format",
        "json",
    )
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["rounds"] == 2


def test_bad_format_is_a_usage_error(tiny):
    assert invoke("simulate", str(tiny), "--format", "yaml").exit_code == 2


def test_diverging_run_exits_30_and_still_prints_its_summary(tiny, tmp_path):
    out = tmp_path / "o"
    result = invoke(
        "simulate",
        str(tiny),
        "--set",
        "strategy.server_lr=1e30",
        "--out",
        str(out),
        "--format",
        "json",
    )
    assert result.exit_code == 30
    assert "NaN or infinite" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] < 3
    assert json.loads(result.stdout)["status"] == "failed"


def test_resume_with_changed_training_exits_14(tiny, tmp_path):
    out = str(tmp_path / "o")
    assert (
        invoke(
            "simulate",
            str(tiny),
            "--set",
            "run.rounds=1",
            "--out",
            out,
            "--format",
            "json",
        ).exit_code
        == 0
    )
    changed = invoke(
        "simulate", str(tiny), "--set", "client.lr=0.2", "--out", out, "--resume"
    )
    assert changed.exit_code == 14 and "different configuration" in changed.output
    fewer = invoke(
        "simulate", str(tiny), "--set", "run.rounds=0", "--out", out, "--resume"
    )
    assert fewer.exit_code == 10


def test_resume_cannot_go_back_in_rounds(tiny, tmp_path):
    out = str(tmp_path / "o")
    assert (
        invoke(
            "simulate",
            str(tiny),
            "--set",
            "run.rounds=2",
            "--out",
            out,
            "--format",
            "json",
        ).exit_code
        == 0
    )
    result = invoke(
        "simulate", str(tiny), "--set", "run.rounds=1", "--out", out, "--resume"
    )
    assert result.exit_code == 10 and "already completed 2 rounds" in result.output


def test_resume_and_overwrite_together_is_a_usage_error(tiny, tmp_path):
    result = invoke("simulate", str(tiny), "--resume", "--overwrite")
    assert result.exit_code == 2


def _no_constants(name: str) -> float:
    raise ValueError(f"not JSON: {name}")


def test_json_output_is_strict_when_epsilon_is_unbounded(tiny, tmp_path):
    # PLD gives no finite epsilon at delta = 1e-300: the summary says why, and
    # the JSON on stdout and on disk stays parseable by strict parsers.
    out = tmp_path / "inf"
    result = invoke(
        "simulate",
        str(tiny),
        "--set",
        "run.rounds=1",
        "--set",
        'privacy.mode="central"',
        "--set",
        "privacy.clip_norm=1.0",
        "--set",
        "privacy.noise_multiplier=1.0",
        "--set",
        "privacy.delta=1e-300",
        "--out",
        str(out),
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout, parse_constant=_no_constants)
    written = json.loads(
        (out / "summary.json").read_text(), parse_constant=_no_constants
    )
    for summary in (printed, written):
        assert summary["epsilon"] is None
        assert "no finite epsilon" in summary["privacy"]["epsilon_unbounded"]
