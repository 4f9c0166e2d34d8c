"""``fedshield account`` as a user runs it, checked against dp_accounting directly."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from typer.testing import CliRunner

from fedshield.cli.main import app

DELTA = 1e-5


def invoke(*args: str):
    return CliRunner().invoke(app, ["account", *args])


def reference(kind: str, q: float, sigma: float, steps: int) -> float:
    accountant = (
        pld.PLDAccountant(value_discretization_interval=1e-3)
        if kind == "pld"
        else rdp.RdpAccountant()
    )
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        steps,
    )
    return accountant.compose(event).get_epsilon(DELTA)


def common(q: str = "0.01", steps: str = "1000", delta: str = "1e-5") -> list[str]:
    return ["--sampling-rate", q, "--steps", steps, "--delta", delta]


@pytest.mark.parametrize("kind", [None, "pld", "rdp"])
def test_json_epsilon_equals_dp_accounting(kind):
    extra = [] if kind is None else ["--accountant", kind]
    result = invoke(*common(), "--noise-multiplier", "1.1", *extra, "--format", "json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = reference(kind or "pld", 0.01, 1.1, 1000)
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert summary["delta"] == DELTA
    assert summary["accountant"] == (kind or "pld")
    assert summary["noise_multiplier"] == 1.1
    assert summary["sampling_rate"] == 0.01 and summary["steps"] == 1000


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_target_epsilon_prints_a_sigma_dp_accounting_confirms(kind):
    result = invoke(
        *common(), "--target-epsilon", "1.0", "--accountant", kind, "--format", "json"
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    sigma = summary["noise_multiplier"]
    assert reference(kind, 0.01, sigma, 1000) <= 1.0
    assert reference(kind, 0.01, 0.99 * sigma, 1000) > 1.0
    assert summary["epsilon"] <= 1.0
    assert summary["delta"] == DELTA and summary["accountant"] == kind


def test_text_format_prints_epsilon():
    result = invoke(*common(), "--noise-multiplier", "1.1")

    assert result.exit_code == 0, result.output
    expected = reference("pld", 0.01, 1.1, 1000)
    assert "ε" in result.stdout and f"{expected:.6g}" in result.stdout


def test_text_format_prints_sigma_for_a_target():
    result = invoke(*common(), "--target-epsilon", "2")

    assert result.exit_code == 0, result.output
    assert "noise multiplier" in result.stdout and "target 2" in result.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ["--noise-multiplier", "1.1", "--target-epsilon", "1.0"],
        [],
    ],
    ids=["both", "neither"],
)
def test_both_or_neither_is_a_usage_error(flags):
    result = invoke(*common(), *flags)

    assert result.exit_code == 2
    assert "exactly one of --noise-multiplier" in result.output


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ([*common(q="0"), "--noise-multiplier", "1"], "sampling_rate"),
        ([*common(q="1.5"), "--noise-multiplier", "1"], "sampling_rate"),
        ([*common(q="-0.1"), "--target-epsilon", "1"], "sampling_rate"),
        ([*common(), "--noise-multiplier", "0"], "noise_multiplier"),
        ([*common(), "--noise-multiplier", "-2"], "noise_multiplier"),
        ([*common(), "--noise-multiplier", "nan"], "noise_multiplier"),
        ([*common(steps="0"), "--noise-multiplier", "1"], "steps"),
        ([*common(steps="0"), "--target-epsilon", "1"], "steps"),
        ([*common(delta="0"), "--noise-multiplier", "1"], "delta"),
        ([*common(delta="1"), "--noise-multiplier", "1"], "delta"),
        ([*common(delta="1"), "--target-epsilon", "1"], "delta"),
        ([*common(), "--target-epsilon", "0"], "target_epsilon"),
        ([*common(), "--target-epsilon", "1e-9"], "unreachable"),
    ],
)
def test_bad_values_exit_10_and_say_what_to_change(args, names):
    result = invoke(*args)

    assert result.exit_code == 10, result.output
    assert names in result.output
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args", [["--accountant", "moments"], ["--format", "yaml"], ["--steps", "many"]]
)
def test_bad_choices_are_usage_errors(args):
    result = invoke(*common(), "--noise-multiplier", "1.0", *args)
    assert result.exit_code == 2
