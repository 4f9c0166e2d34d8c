"""A user's own model file and per-client CSV files, end to end.

From ``fedshield simulate`` (plain, and with central DP on SecAgg+), from
``fs.simulate`` and from ``fs.fedavg(...).next``; ``fedshield analyze`` on
the same config; and every bad input refused before round 1 with exit code
10 and nothing written to the run folder.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fedshield as fs
from fedshield.cli.main import app

SITES = ("north", "south", "east", "west", "centre", "coast")
FEATURES = ("age", "income", "score")

MODEL_PY = """
import torch

def build():
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )

def regressor():
    return torch.nn.Linear(6, 1)

def not_a_module():
    return 42
"""

BASE_TOML = """
[run]
name = "own"
rounds = {rounds}
seed = 3

[data]
dataset = "csv"
path = "clients"
label = "{label}"

[model]
kind = "python"
factory = "model.py:{factory}"
task = "{task}"

[client]
lr = 0.1
batch_size = 16
"""

PRIVATE_TOML = """
[strategy]
clients_per_round = 6

[privacy]
mode = "central"
clip_norm = 1.0
noise_multiplier = 0.8
sampling = "fixed"
accountant = "rdp"

[secagg]
protocol = "secagg+"
"""


def write_clients(folder: Path, *, rows: int = 40, seed: int = 0) -> None:
    """Six sites, each its own CSV: two numeric columns, one categorical."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k, site in enumerate(SITES):
        with (folder / f"{site}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*FEATURES, "label", "value"])
            for i in range(rows):
                age = 30 + 5 * k + rng.normal(0, 8)  # sites differ in scale
                income = rng.normal(50 + 10 * k, 15)
                score = rng.choice(["low", "mid", "high"])
                cell = "" if i % 9 == 0 else f"{income:.2f}"  # some missing
                y = int(age - 5 * k + rng.normal(0, 3) > 32)
                value = 0.1 * (age - 5 * k) + (score == "high") + rng.normal(0, 0.1)
                writer.writerow([f"{age:.1f}", cell, score, "yes" if y else "no",
                                 f"{value:.4f}"])  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_clients(tmp_path / "clients")
    (tmp_path / "model.py").write_text(MODEL_PY)
    return tmp_path


def config(
    project: Path,
    *,
    private: bool = False,
    rounds: int = 4,
    label: str = "label",
    factory: str = "build",
    task: str = "classification",
    name: str = "own.toml",
) -> Path:
    text = BASE_TOML.format(rounds=rounds, label=label, factory=factory, task=task)
    if task == "classification":
        # The other label column is not a feature of the classifier.
        text = text.replace('label = "label"', 'label = "label"\nfeatures = '
                            '["age", "income", "score"]')  # fmt: skip
    else:
        text = text.replace(f'label = "{label}"', f'label = "{label}"\nfeatures = '
                            '["age", "income", "score"]')  # fmt: skip
    if private:
        # Under DP the schema is declared: nothing of the model's shape may
        # come from the records.
        text = text.replace(
            "[model]",
            'classes = ["no", "yes"]\nlevels = { score = ["high", "low", "mid"] }'
            '\nmissing = ["income"]\n\n[model]',
        )
    path = project / name
    path.write_text(text + (PRIVATE_TOML if private else ""))
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedshield.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        check=False,
    )


def test_user_model_and_per_client_csv_with_central_dp_on_secagg_plus(
    project, tmp_path
):
    path = config(project, private=True)
    out = tmp_path / "run"
    # Run from elsewhere: the config's relative paths are its folder's.
    proc = cli("simulate", str(path), "--out", str(out), "--format", "json",
               cwd=Path("/"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["model"] == "python" and summary["dataset"] == "csv"
    assert summary["partition"] == "natural" and summary["num_clients"] == 6
    assert summary["epsilon"] > 0 and summary["privacy"]["mode"] == "central"
    assert summary["accuracy"] is not None
    partition = json.loads((out / "partition.json").read_text())
    assert sorted(c["client_id"] for c in partition["clients"]) == sorted(SITES)
    # Every round went through the secure sum.
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["secagg/aborted"] == 0.0 for r in records)
    assert (out / "report.html").is_file()


def test_the_same_through_fs_simulate_and_fs_fedavg(project, tmp_path):
    import torch

    def model_fn() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        )

    path = config(project, private=True)
    summary, _ = fs.simulate(
        path, model_fn=model_fn, out=tmp_path / "py", write_report=False
    )
    assert summary["epsilon"] > 0 and summary["model"] == "python"

    from fedshield.data.user import UserDataSpec, load_user_data

    data = load_user_data(
        UserDataSpec(
            kind="csv", path=project / "clients", label="label",
            features=FEATURES,
        )
    )  # fmt: skip
    train = data.train
    assert train.groups is not None and data.client_ids == tuple(sorted(SITES))
    clients = {}
    for cid in data.client_ids:
        x = train.x[train.groups == cid]
        x = np.nan_to_num(x)  # the user's own preprocessing, at each site
        clients[cid] = (x, train.y[train.groups == cid])
    process = fs.fedavg(
        model_fn,
        privacy={"mode": "central", "clip_norm": 1.0, "noise_multiplier": 0.8,
                 "sampling": "fixed", "accountant": "rdp"},
        secagg={"protocol": "secagg+"},
        strategy={"clients_per_round": 6},
    )  # fmt: skip
    state = process.initialize()
    for _ in range(2):
        state, metrics = process.next(state, clients)
    assert metrics["epsilon"] > 0 and metrics["secagg/aborted"] == 0.0


def test_in_memory_clients_through_fs_simulate(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    clients = {}
    for k in range(4):
        x = rng.normal(size=(30, 3)).astype(np.float32)
        clients[f"s{k}"] = (x, (x[:, 0] > 0).astype(np.int64))
    summary, _ = fs.simulate(
        {"run": {"rounds": 10, "report": False}, "client": {"lr": 0.5}},
        model_fn=lambda: torch.nn.Linear(3, 2),
        clients=clients,
        out=tmp_path / "mem",
    )
    assert summary["num_clients"] == 4 and summary["partition"] == "natural"
    assert summary["dataset"] == "python" and summary["accuracy"] > 0.5


def test_regression_from_the_command_line(project, tmp_path):
    path = config(project, label="value", factory="regressor", task="regression",
                  rounds=8)  # fmt: skip
    out = tmp_path / "reg"
    proc = cli("simulate", str(path), "--out", str(out), cwd=project)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "regression" and summary["accuracy"] is None
    assert 0 < summary["rmse"] < 1.0 and summary["mae"] > 0
    page = (out / "report.html").read_text()
    assert "Final test RMSE" in page


def test_analyze_runs_on_a_user_model_and_data_config(project, tmp_path):
    path = config(project, rounds=2)
    out = tmp_path / "analysis"
    result = CliRunner().invoke(
        app,
        ["analyze", str(path), "--attacks", "sign_flip", "--defences",
         "fedavg,median", "--out", str(out), "--format", "json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status_counts"] == {"completed": 4}
    with (out / "matrix.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["attack"], r["defence"]) for r in rows} == {
        (a, d) for a in ("none", "sign_flip") for d in ("fedavg", "median")
    }
    assert all(float(r["accuracy"]) > 0 for r in rows)


def test_dp_without_a_declared_schema_is_refused(project, tmp_path):
    path = config(project, private=True)
    text = path.read_text().replace('classes = ["no", "yes"]\n', "")
    path.write_text(text)
    proc = cli("simulate", str(path), "--out", str(tmp_path / "r"), cwd=project)
    assert proc.returncode == 10 and "data.classes" in proc.stderr
    path.write_text(
        text.replace("[model]", 'classes = ["no", "yes"]\n[model]').replace(
            'levels = { score = ["high", "low", "mid"] }', ""
        )
    )
    proc = cli("simulate", str(path), "--out", str(tmp_path / "r"), cwd=project)
    # score's text is then a non-numeric value in a numeric column
    assert proc.returncode == 10 and "score" in proc.stderr
    assert "data.levels" in proc.stderr


def _refused(project: Path, tmp_path: Path, *sets: str) -> str:
    path = config(project)
    out = tmp_path / "refused"
    args = ["simulate", str(path), "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    proc = cli(*args, cwd=project)
    assert proc.returncode == 10, (proc.returncode, proc.stderr)
    assert not out.exists()  # nothing written before round 1
    return proc.stderr + proc.stdout


def test_missing_label_column_is_refused_naming_file_and_columns(project, tmp_path):
    message = _refused(project, tmp_path, "data.label=lable")
    assert "lable" in message and "label" in message


def test_a_client_file_with_other_columns_is_refused(project, tmp_path):
    odd = project / "clients" / "south.csv"
    lines = odd.read_text().splitlines()
    odd.write_text("\n".join([lines[0].replace("income", "salary"), *lines[1:]]))
    message = _refused(project, tmp_path)
    assert "south.csv" in message and "salary" in message


def test_non_numeric_value_is_refused_with_file_column_and_row(project, tmp_path):
    bad = project / "clients" / "east.csv"
    lines = bad.read_text().splitlines()
    fields = lines[5].split(",")
    fields[0] = "forty"
    lines[5] = ",".join(fields)
    bad.write_text("\n".join(lines) + "\n")
    message = _refused(project, tmp_path)
    assert "east.csv" in message and "age" in message and "forty" in message
    assert "6" in message  # line 6 of the file (the header is line 1)


def test_missing_model_file_and_function_are_refused(project, tmp_path):
    message = _refused(project, tmp_path, 'model.factory="nowhere.py:build"')
    assert "nowhere.py" in message and "not found" in message
    message = _refused(project, tmp_path, 'model.factory="model.py:missing"')
    assert "missing" in message and "build" in message
    message = _refused(project, tmp_path, 'model.factory="model.py:not_a_module"')
    assert "int" in message


def test_output_size_must_match_the_classes(project, tmp_path):
    message = _refused(project, tmp_path, 'model.factory="model.py:regressor"')
    assert "2 classes" in message


def test_a_builtin_model_on_regression_data(tmp_path):
    rng = np.random.default_rng(2)
    clients = {}
    for k in range(3):
        x = rng.normal(size=(40, 4)).astype(np.float32)
        clients[f"s{k}"] = (x, x @ np.array([1.0, -1.0, 0.5, 0.0], np.float32))
    summary, _ = fs.simulate(
        {
            "run": {"rounds": 30, "report": False},
            "model": {"kind": "mlp", "hidden": [16], "task": "regression"},
            "client": {"lr": 0.1},
        },
        clients=clients,
        out=tmp_path / "mlp",
    )
    assert summary["task"] == "regression" and summary["accuracy"] is None
    assert summary["rmse"] < 0.6  # the labels' own spread is about 1.5


def test_resume_refuses_data_files_that_changed(project, tmp_path):
    path = config(project, rounds=2)
    out = tmp_path / "resumed"
    assert cli("simulate", str(path), "--out", str(out), cwd=project).returncode == 0
    south = project / "clients" / "south.csv"
    south.write_text("\n".join(south.read_text().splitlines()[:-5]) + "\n")
    proc = cli(
        "simulate", str(path), "--out", str(out), "--resume",
        "--set", "run.rounds=3", cwd=project,
    )  # fmt: skip
    assert proc.returncode == 14, proc.stderr
    assert "other data" in proc.stderr + proc.stdout
