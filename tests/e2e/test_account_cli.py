"""``fedshield account`` as a user runs it, checked against dp_accounting directly."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time

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


# --- tiny noise and tiny delta: bounded, quick, valid JSON (issue 11, item 10) --

MEMORY_CAP = 3 << 30  # bytes of address space the account command may map


def _limit_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_capped(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``fedshield account ARGS`` in a child with 3 GiB of address space."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedshield.cli", "account", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        preexec_fn=_limit_memory,
    )
    return proc, time.perf_counter() - start


def no_infinity(token: str) -> float:
    raise AssertionError(f"not JSON: {token}")


def test_pld_with_tiny_noise_is_refused_quickly_and_says_what_to_do():
    # The grid would have needed about 373 GiB: it used to die of an
    # ArrayMemoryError with a traceback.
    proc, seconds = run_capped(*common(), "--noise-multiplier", "1e-4")

    assert proc.returncode == 10, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert (
        "noise_multiplier 0.0001" in proc.stderr and "--accountant rdp" in proc.stderr
    )
    assert seconds < 30


def test_pld_with_small_noise_answers_in_seconds_within_the_memory_cap():
    # It used to run past a minute at 17 GB.
    proc, seconds = run_capped(
        *common(), "--noise-multiplier", "1e-3", "--format", "json"
    )

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout, parse_constant=no_infinity)
    assert math.isfinite(summary["epsilon"]) and summary["epsilon"] > 1e5
    assert summary["pld_value_discretization_interval"] > 1e-3
    assert seconds < 60


def test_the_default_grid_is_reported_and_unchanged_for_ordinary_noise():
    result = invoke(*common(), "--noise-multiplier", "1.1", "--format", "json")

    summary = json.loads(result.stdout)
    assert summary["pld_value_discretization_interval"] == 1e-3
    assert "grid step" not in invoke(*common(), "--noise-multiplier", "1.1").stdout


def test_the_coarser_grid_is_named_in_the_text_summary():
    result = invoke(*common(steps="10"), "--noise-multiplier", "0.01")

    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "PLD grid step" in text and "ε is an upper bound" in text


def test_a_delta_pld_cannot_certify_gives_null_and_the_reason_not_infinity():
    result = invoke(
        *common(delta="1e-300"), "--noise-multiplier", "1.1", "--format", "json"
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout, parse_constant=no_infinity)
    assert summary["epsilon"] is None
    assert "--accountant rdp" in summary["epsilon_unbounded"]
    text = " ".join(
        invoke(*common(delta="1e-300"), "--noise-multiplier", "1.1").stdout.split()
    )
    assert "ε unbounded: the PLD accountant" in text and "inf " not in text


def test_rdp_certifies_a_tiny_delta_with_a_finite_epsilon():
    result = invoke(
        *common(delta="1e-300"),
        "--noise-multiplier",
        "1.1",
        "--accountant",
        "rdp",
        "--format",
        "json",
    )

    summary = json.loads(result.stdout, parse_constant=no_infinity)
    expected = (
        rdp.RdpAccountant()
        .compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    0.01, dp_accounting.GaussianDpEvent(1.1)
                ),
                1000,
            )
        )
        .get_epsilon(1e-300)
    )
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert "epsilon_unbounded" not in summary
