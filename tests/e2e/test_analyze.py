"""``fedshield analyze`` as a user runs it, on a tiny digits federation."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedshield.api.config import ExperimentConfig
from fedshield.cli.main import app

TINY_TOML = """
[run]
name = "analyze-tiny"
rounds = 2
seed = 1

[data]
dataset = "digits"
num_clients = 6

[model]
kind = "logistic"

[client]
lr = 0.1

[robust]
max_norm = 3.0  # replaced by each column's own settings
"""

HAS_ATTACKS = "attack" in ExperimentConfig.model_fields


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["analyze", *args])


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {(r["attack"], r["defence"]): r for r in csv.DictReader(handle)}


def run_summary(out: Path, attack: str, defence: str) -> dict[str, Any]:
    text = (out / "runs" / f"{attack}__{defence}" / "summary.json").read_text()
    summary: dict[str, Any] = json.loads(text)
    return summary


def run_config(out: Path, attack: str, defence: str) -> dict[str, Any]:
    text = (out / "runs" / f"{attack}__{defence}" / "config.toml").read_text()
    return tomllib.loads(text)


@pytest.mark.skipif(not HAS_ATTACKS, reason="[attack] is not in the config yet")
def test_matrix_of_an_attack_against_defences(tiny, tmp_path):
    out = tmp_path / "analysis"
    result = invoke(
        str(tiny),
        "--attacks",
        "sign_flip",
        "--defences",
        "fedavg,median,krum,bulyan,norm_bound",
        "--out",
        str(out),
        "--format",
        "json",
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["matrix_csv"] == str(out / "matrix.csv")
    assert summary["pairs"] == 10
    assert summary["status_counts"] == {"completed": 8, "refused": 2}
    for name in ("matrix.csv", "matrix.png", "matrix.html"):
        assert (out / name).is_file()

    rows = read_csv(out / "matrix.csv")
    assert set(rows) == {
        (a, d)
        for a in ("none", "sign_flip")
        for d in ("fedavg", "median", "krum", "bulyan", "norm_bound")
    }
    for defence in ("fedavg", "median", "krum"):
        base = run_summary(out, "none", defence)["accuracy"]
        attacked = run_summary(out, "sign_flip", defence)["accuracy"]
        row = rows[("sign_flip", defence)]
        # Second source: each run's own summary.json.
        assert float(row["accuracy"]) == pytest.approx(attacked, abs=5e-5)
        assert float(row["accuracy_drop"]) == pytest.approx(
            round(base - attacked, 4), abs=1e-9
        )
        assert row["asr"] == "" and row["status"] == "completed"
        assert float(row["seconds_per_round"]) > 0

    # 6 clients per round, fraction 0.2: f = 1 for Krum, none for the median;
    # Bulyan (n >= 4f + 3 = 7) is refused, not run, and named as refused.
    config = run_config(out, "sign_flip", "krum")
    assert config["robust"]["rule"] == "krum" and config["robust"]["f"] == 1
    assert "max_norm" not in config["robust"]
    assert config["attack"]["kind"] == "sign_flip"
    assert config["attack"]["fraction"] == 0.2
    assert config["run"]["name"] == "analyze-tiny-sign_flip-krum"
    assert config["run"]["report"] is False
    assert "f" not in run_config(out, "none", "median")["robust"]
    assert run_config(out, "none", "median")["attack"]["kind"] == "none"
    assert not (out / "runs" / "none__median" / "report.html").exists()
    # norm_bound takes the file's max_norm when --max-norm is not given.
    assert run_config(out, "sign_flip", "norm_bound")["robust"]["max_norm"] == 3.0
    bulyan = rows[("sign_flip", "bulyan")]
    assert bulyan["status"] == "refused" and "4f + 3" in bulyan["error"]
    assert not (out / "runs" / "sign_flip__bulyan").exists()
    page = (out / "matrix.html").read_text(encoding="utf-8")
    assert "refused: Bulyan with f=1 needs n &gt;= 4f + 3" in page


def test_no_attack_column_in_text_mode_goes_to_the_default_folder(
    tiny, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = invoke(str(tiny), "--attacks", "none", "--defences", "fedavg,median")

    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "analyze-tiny-analyze"
    rows = read_csv(out / "matrix.csv")
    assert set(rows) == {("none", "fedavg"), ("none", "median")}
    assert all(r["verdict"] == "baseline" for r in rows.values())
    assert "matrix.html" in result.output and "fedavg" in result.output


def test_parallel_workers_give_the_sequential_numbers(tiny, tmp_path):
    args = ["--attacks", "none", "--defences", "fedavg,median", "--format", "json"]
    one = invoke(str(tiny), *args, "--out", str(tmp_path / "one"))
    two = invoke(str(tiny), *args, "--out", str(tmp_path / "two"), "--workers", "2")

    assert one.exit_code == 0, one.output
    assert two.exit_code == 0, two.output
    sequential = read_csv(tmp_path / "one" / "matrix.csv")
    parallel = read_csv(tmp_path / "two" / "matrix.csv")
    for key, row in sequential.items():
        assert parallel[key]["accuracy"] == row["accuracy"]
        assert parallel[key]["status"] == "completed"


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--attacks", "sign_flp", "did you mean 'sign_flip'"),
        ("--attacks", "alie,nope", "free_rider"),
        ("--defences", "krumm", "did you mean 'krum'"),
        ("--defences", "fedavg,nope", "norm_bound"),
        ("--attacks", ",", "at least one"),
    ],
)
def test_unknown_names_are_refused_before_any_run(
    tiny, tmp_path, option, value, expected
):
    out = tmp_path / "analysis"
    result = invoke(str(tiny), option, value, "--out", str(out))

    assert result.exit_code == 10, result.output
    assert expected in " ".join(result.output.split())
    assert "valid:" in result.output
    assert not out.exists()


@pytest.mark.parametrize("fraction", ["0.5", "0.7", "0", "-0.1"])
def test_fraction_outside_zero_half_is_refused(tiny, tmp_path, fraction):
    out = tmp_path / "analysis"
    result = invoke(str(tiny), "--fraction", fraction, "--out", str(out))

    assert result.exit_code == 10, result.output
    assert "--fraction" in result.output and "(0, 0.5)" in result.output
    assert not out.exists()


def test_non_positive_max_norm_is_refused(tiny, tmp_path):
    out = tmp_path / "analysis"
    result = invoke(str(tiny), "--max-norm", "0", "--out", str(out))

    assert result.exit_code == 10, result.output
    assert "--max-norm" in result.output
    assert not out.exists()


def test_a_run_that_raises_is_recorded_and_the_analysis_goes_on(
    tiny, tmp_path, monkeypatch
):
    import fedshield.api.run

    real = fedshield.api.run.simulate

    def flaky(config, **kwargs):
        if config.robust.rule == "median":
            raise RuntimeError("boom")
        return real(config, **kwargs)

    monkeypatch.setattr(fedshield.api.run, "simulate", flaky)
    out = tmp_path / "analysis"
    result = invoke(
        str(tiny), "--attacks", "none", "--defences", "median,fedavg", "--out", str(out)
    )

    assert result.exit_code == 0, result.output
    rows = read_csv(out / "matrix.csv")
    assert rows[("none", "median")]["status"] == "failed"
    assert rows[("none", "median")]["error"] == "internal error: RuntimeError: boom"
    assert rows[("none", "fedavg")]["status"] == "completed"
    assert "Runs that failed" in (out / "matrix.html").read_text(encoding="utf-8")


def test_a_pair_the_configuration_refuses_is_a_refused_row(tmp_path):
    from fedshield.cli.analyze import Pair, run_pair

    pair = Pair("none", "nope", {}, ('robust.rule="nope"',), tmp_path / "run")
    row = run_pair(pair)

    assert row["status"] == "refused" and "robust.rule" in row["error"]
    assert "\n" not in row["error"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["robust.f=2", 'robust.rule="krum"'])
def test_set_of_what_analyze_sets_per_defence_is_refused(tiny, tmp_path, key):
    out = tmp_path / "analysis"
    result = invoke(str(tiny), "--set", key, "--out", str(out))

    assert result.exit_code == 10, result.output
    assert "sets it for each defence" in " ".join(result.output.split())
    assert not out.exists()


def test_set_max_norm_bounds_norm_bound_only(tiny, tmp_path):
    from fedshield.cli.analyze import plan_pairs

    pairs, _ = plan_pairs(
        tiny,
        attacks=["none"],
        defences=["median", "norm_bound"],
        fraction=0.2,
        max_norm=None,
        out_dir=tmp_path,
        overrides=["robust.max_norm=2.5"],
    )

    median, norm_bound = pairs
    assert "max_norm" not in median.base.get("robust", {})
    assert "robust.max_norm=2.5" in norm_bound.overrides
