"""``fedshield analyze`` on a regression model: RMSE columns and verdicts.

The model is a user factory file (``[model] kind = "python"``): the built-in
``mlp`` and ``logistic`` models refuse ``task = "regression"`` today
(``num_classes`` must be >= 2; a regression has one output).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedshield.cli.analyze import _row_of_run
from fedshield.cli.main import app
from fedshield.report.matrix import COLUMNS, RMSE_RISE_THRESHOLD

SITES = ("north", "south", "east", "west")
WEIGHTS = (0.5, -1.0, 0.25)

MODEL_PY = """
import torch

def regressor():
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
"""

REGRESSION_TOML = """
[run]
name = "analyze-regression"
rounds = 3
seed = 2

[data]
dataset = "csv"
path = "clients"
label = "y"

[model]
kind = "python"
factory = "model.py:regressor"
task = "regression"

[client]
lr = 0.05
batch_size = 16
"""


def write_clients(folder: Path, *, rows: int = 40, seed: int = 0) -> None:
    """Four sites, one CSV each: y = 0.5 a - b + 0.25 c + 1 + noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for site in SITES:
        features = rng.normal(0.0, 1.0, size=(rows, len(WEIGHTS)))
        y = features @ np.asarray(WEIGHTS) + 1.0 + rng.normal(0.0, 0.1, size=rows)
        with (folder / f"{site}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["a", "b", "c", "y"])
            for x, target in zip(features, y, strict=True):
                writer.writerow([*(f"{v:.4f}" for v in x), f"{target:.4f}"])


@pytest.fixture
def regression(tmp_path: Path) -> Path:
    write_clients(tmp_path / "clients")
    (tmp_path / "model.py").write_text(MODEL_PY)
    path = tmp_path / "regression.toml"
    path.write_text(REGRESSION_TOML)
    return path


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {(r["attack"], r["defence"]): r for r in csv.DictReader(handle)}


def run_summary(out: Path, attack: str, defence: str) -> dict[str, Any]:
    text = (out / "runs" / f"{attack}__{defence}" / "summary.json").read_text()
    summary: dict[str, Any] = json.loads(text)
    return summary


def test_row_of_run_carries_rmse_and_mae(tmp_path: Path) -> None:
    summary = {"status": "completed", "accuracy": None, "rmse": 0.25, "mae": 0.2,
               "rounds": 3, "wall_seconds": 0.3}  # fmt: skip
    row = _row_of_run({"attack": "none", "defence": "median"}, summary, tmp_path)

    assert row["rmse"] == 0.25 and row["mae"] == 0.2 and row["accuracy"] is None
    assert row["seconds_per_round"] == pytest.approx(0.1)
    classifier = _row_of_run({}, {"status": "completed", "accuracy": 0.9}, tmp_path)
    assert classifier["rmse"] is None and classifier["mae"] is None


def test_matrix_of_a_regression_model(regression: Path, tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    result = CliRunner().invoke(
        app,
        ["analyze", str(regression), "--attacks", "sign_flip", "--defences",
         "fedavg,median", "--out", str(out), "--format", "json"],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status_counts"] == {"completed": 4}
    with (out / "matrix.csv").open(newline="", encoding="utf-8") as handle:
        assert tuple(next(csv.reader(handle))) == COLUMNS
    rows = read_csv(out / "matrix.csv")
    assert set(rows) == {
        (a, d) for a in ("none", "sign_flip") for d in ("fedavg", "median")
    }
    for (attack, defence), row in rows.items():
        # Second source: each run's own summary.json.
        run = run_summary(out, attack, defence)
        assert run["task"] == "regression" and run["accuracy"] is None
        assert row["status"] == "completed"
        assert row["verdict"] not in ("failed", "undetermined")
        assert row["accuracy"] == row["accuracy_drop"] == ""
        assert float(row["rmse"]) == pytest.approx(run["rmse"], rel=1e-5)
        assert float(row["rmse"]) > 0
    for defence in ("fedavg", "median"):
        base = run_summary(out, "none", defence)["rmse"]
        attacked = run_summary(out, "sign_flip", defence)["rmse"]
        rise = float(rows[("sign_flip", defence)]["rmse_rise"])
        assert rise == pytest.approx(round((attacked - base) / base, 4), abs=1e-9)
        expected = (
            ("known_failure" if defence == "fedavg" else "unexpected_failure")
            if rise > RMSE_RISE_THRESHOLD
            else "held"
        )
        assert rows[("sign_flip", defence)]["verdict"] == expected
        assert rows[("none", defence)]["verdict"] == "baseline"
        assert rows[("none", defence)]["rmse_rise"] == ""
    # Sign flipping every round wrecks FedAvg's mean (breakdown point 0).
    assert rows[("sign_flip", "fedavg")]["verdict"] == "known_failure"
    failures = {(f["attack"], f["defence"]) for f in summary["failures"]}
    assert ("sign_flip", "fedavg") in failures
    page = (out / "matrix.html").read_text(encoding="utf-8")
    assert "RMSE rise" in page and "<h2>RMSE under attack</h2>" in page
    assert (out / "matrix.png").read_bytes().startswith(b"\x89PNG")
