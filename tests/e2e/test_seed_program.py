"""examples/seed_program.py: the TFF example in fedshield, plain and private."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from fedshield.errors import DataUnavailableError

ROOT = Path(__file__).resolve().parents[2]


def _program():
    spec = importlib.util.spec_from_file_location(
        "seed_program", ROOT / "examples" / "seed_program.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def program():
    module = _program()
    try:
        module.make_client_data()
    except DataUnavailableError:
        pytest.skip("Fashion-MNIST (dataset-fashion-mnist) is not installed")
    return module


def _rounds(output: str) -> list[str]:
    return re.findall(r"^round +\d+, metrics=\{.*\}$", output, flags=re.M)


def test_the_seed_program_trains(program, capsys):
    program.main(rounds=3, private=False)
    lines = _rounds(capsys.readouterr().out)
    assert len(lines) == 3
    losses = [float(re.search(r"'train_loss': ([0-9.]+)", x).group(1)) for x in lines]
    assert losses[-1] < losses[0]


def test_the_same_program_with_dp_and_secagg_reports_epsilon(program, capsys):
    program.main(rounds=2, private=True)
    lines = _rounds(capsys.readouterr().out)
    assert len(lines) == 2
    eps = [float(re.search(r"'epsilon': ([0-9.]+)", x).group(1)) for x in lines]
    assert 0 < eps[0] < eps[1]
    assert all("'secagg/aborted': 0.0" in x for x in lines)
    assert not any("train_loss" in x for x in lines)  # outside the guarantee
