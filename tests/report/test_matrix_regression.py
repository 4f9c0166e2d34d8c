"""The security matrix of a regression model: RMSE, RMSE rise and verdicts."""

from __future__ import annotations

import csv
import math
import re
from typing import Any

import pytest

from fedshield.report import matrix
from fedshield.report.matrix import (
    COLUMNS,
    RMSE_RISE_THRESHOLD,
    accuracy_drop,
    classify,
    rmse_rise,
    tabulate,
    write_matrix,
)

# The columns scripts read before regression existed, in their order.
CLASSIFICATION_COLUMNS = (
    "attack",
    "defence",
    "status",
    "verdict",
    "accuracy",
    "accuracy_drop",
    "asr",
    "seconds_per_round",
    "rounds",
    "epsilon",
    "error",
)


def _reg(attack: str, defence: str, rmse: float, **extra: Any) -> dict[str, Any]:
    """A finished regression run, as ``_row_of_run`` builds it."""
    row = {
        "attack": attack,
        "defence": defence,
        "status": "completed",
        "accuracy": None,
        "rmse": rmse,
        "mae": rmse * 0.8,
        "seconds_per_round": 0.25,
        "rounds": 3,
    }
    row.update(extra)
    return row


def _rows() -> list[dict[str, Any]]:
    return [
        _reg("none", "fedavg", 0.5),
        _reg("none", "median", 0.4),
        _reg("none", "geomed", 1.0),
        _reg("none", "krum", 0.0),  # a perfect fit: no relative rise exists
        {"attack": "none", "defence": "bulyan", "status": "refused", "error": "n<7"},
        _reg("sign_flip", "fedavg", 2.0),  # rise 3.0: known (FedAvg)
        _reg("sign_flip", "median", 0.42),  # rise 0.05: held
        _reg("gaussian", "median", 0.44),  # rise 0.1 exactly: held
        _reg("alie", "median", 0.5),  # rise 0.25: known (Baruch et al.)
        _reg("ipm", "geomed", 1.3),  # rise 0.3: unexpected
        _reg("ipm", "median", 0.36),  # rise -0.1: better than without attack
        _reg("sign_flip", "krum", 0.3),  # baseline RMSE 0: undetermined
        {
            "attack": "sign_flip",
            "defence": "bulyan",
            "status": "refused",
            "error": "n<7",
        },
        {"attack": "gaussian", "defence": "fedavg", "status": "failed", "error": "nan"},
    ]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> matrix.MatrixFiles:
    out = tmp_path_factory.mktemp("regression")
    return write_matrix(_rows(), out, title="regression demo")


def _csv(files: matrix.MatrixFiles) -> dict[tuple[str, str], dict[str, str]]:
    with files.csv.open(newline="", encoding="utf-8") as handle:
        return {(r["attack"], r["defence"]): r for r in csv.DictReader(handle)}


def test_threshold_is_the_documented_one() -> None:
    assert RMSE_RISE_THRESHOLD == 0.10
    assert "RMSE_RISE_THRESHOLD" in matrix.__all__ and "rmse_rise" in matrix.__all__


@pytest.mark.parametrize(
    ("baseline", "rmse", "rise"),
    [
        (0.5, 0.55, 0.1),
        (0.4, 0.44, 0.1),  # 0.10000000000000003 in binary, rounded as shown
        (0.5, 0.4, -0.2),
        (2.0, 2.0, 0.0),
        (3.0, 4.0, 0.3333),  # 4 decimals
        (1e-6, 3e-6, 2.0),  # relative: the label's scale does not matter
    ],
)
def test_rmse_rise_is_relative_to_the_baseline(
    baseline: float, rmse: float, rise: float
) -> None:
    assert rmse_rise({"rmse": rmse}, {"rmse": baseline}) == rise


def test_rmse_rise_needs_two_rmses_and_a_nonzero_baseline() -> None:
    assert rmse_rise({"rmse": 0.5}, None) is None
    assert rmse_rise({"rmse": 0.5}, {"rmse": 0.0}) is None
    assert rmse_rise({"rmse": 0.5}, {"rmse": None}) is None
    assert rmse_rise({"rmse": 0.5}, {"status": "refused", "rmse": 0.4}) is None
    assert rmse_rise({"rmse": math.nan}, {"rmse": 0.4}) is None
    assert rmse_rise({"status": "failed"}, {"rmse": 0.4}) is None
    # A classifier's rows have no RMSE, a regression's no accuracy drop.
    assert rmse_rise({"accuracy": 0.8}, {"accuracy": 0.9}) is None
    assert accuracy_drop(_reg("x", "median", 0.5), _reg("none", "median", 0.4)) is None


def test_a_regression_run_is_a_completed_run_not_a_failed_one() -> None:
    verdict = classify(_reg("none", "median", 0.4), None)

    assert verdict.outcome == "baseline"


def test_rmse_rise_above_the_threshold_fails() -> None:
    baseline = _reg("none", "geomed", 1.0)

    failed = classify(_reg("ipm", "geomed", 1.3), baseline)
    held = classify(_reg("ipm", "geomed", 1.1), baseline)  # exactly 0.1

    assert failed.outcome == "unexpected_failure" and failed.is_failure
    assert failed.reasons == ("RMSE rise 0.3000 > 0.1",)
    assert held.outcome == "held" and held.reasons == ()


def test_a_regression_failure_in_the_literature_is_known() -> None:
    verdict = classify(_reg("alie", "median", 0.5), _reg("none", "median", 0.4))

    assert verdict.outcome == "known_failure"
    assert verdict.reasons == ("RMSE rise 0.2500 > 0.1",)
    assert verdict.reference is not None and "Baruch" in verdict.reference


def test_a_regression_cell_without_a_usable_baseline_is_undetermined() -> None:
    zero = classify(_reg("sign_flip", "krum", 0.3), _reg("none", "krum", 0.0))
    refused = classify(
        _reg("sign_flip", "bulyan", 0.3),
        {"attack": "none", "defence": "bulyan", "status": "refused"},
    )

    assert zero.outcome == "undetermined"
    assert zero.reasons == ("no baseline RMSE for krum: its no-attack RMSE is 0",)
    assert refused.outcome == "undetermined"
    assert refused.reasons == (
        "no baseline RMSE for bulyan: its no-attack run was refused",
    )


def test_tabulate_fills_rmse_rise_and_not_accuracy_drop() -> None:
    table = {(r["attack"], r["defence"]): r for r in tabulate(_rows())}

    assert table[("sign_flip", "fedavg")]["rmse_rise"] == 3.0
    assert table[("sign_flip", "median")]["rmse_rise"] == 0.05
    assert table[("ipm", "median")]["rmse_rise"] == -0.1
    assert table[("none", "median")]["rmse_rise"] is None  # baselines: none
    assert table[("sign_flip", "krum")]["rmse_rise"] is None
    assert all(r["accuracy_drop"] is None for r in table.values())
    assert all(r["verdict"] != "failed" for r in table.values() if r["rmse"])
    assert table[("none", "median")]["mae"] == pytest.approx(0.32)  # kept


def test_csv_appends_rmse_columns_after_the_old_ones(
    written: matrix.MatrixFiles,
) -> None:
    with written.csv.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))

    assert tuple(header) == COLUMNS == (*CLASSIFICATION_COLUMNS, "rmse", "rmse_rise")


def test_csv_values_and_verdicts_of_a_regression_matrix(
    written: matrix.MatrixFiles,
) -> None:
    rows = _csv(written)

    failing = rows[("sign_flip", "fedavg")]
    assert failing["rmse"] == "2" and failing["rmse_rise"] == "3.0000"
    assert failing["verdict"] == "known_failure"
    held = rows[("sign_flip", "median")]
    assert held["rmse"] == "0.42" and held["rmse_rise"] == "0.0500"
    assert held["verdict"] == "held" and held["accuracy"] == ""
    assert held["accuracy_drop"] == ""
    assert rows[("gaussian", "median")]["verdict"] == "held"  # 0.1 is not > 0.1
    assert rows[("gaussian", "median")]["rmse_rise"] == "0.1000"
    assert rows[("alie", "median")]["verdict"] == "known_failure"
    assert rows[("ipm", "geomed")]["verdict"] == "unexpected_failure"
    assert rows[("ipm", "median")]["rmse_rise"] == "-0.1000"
    baseline = rows[("none", "median")]
    assert baseline["verdict"] == "baseline" and baseline["rmse"] == "0.4"
    assert baseline["rmse_rise"] == ""
    assert rows[("sign_flip", "krum")]["verdict"] == "undetermined"
    assert rows[("sign_flip", "bulyan")]["verdict"] == "refused"
    assert rows[("gaussian", "fedavg")]["verdict"] == "failed"
    assert rows[("gaussian", "fedavg")]["rmse"] == ""


@pytest.mark.parametrize(
    ("rmse", "shown"),
    [(0.000123456789, "0.000123457"), (12345.678, "12345.7"), (0.4, "0.4")],
)
def test_csv_rmse_keeps_six_significant_digits_in_the_labels_unit(
    rmse: float, shown: str
) -> None:
    assert matrix._csv_value("rmse", rmse) == shown


def test_classification_rows_leave_the_rmse_columns_empty() -> None:
    (row,) = tabulate([{"attack": "none", "defence": "fedavg", "accuracy": 0.9}])

    assert row["rmse"] is None and row["rmse_rise"] is None
    assert row["verdict"] == "baseline"


def test_heat_map_colours_by_rmse_rise_and_shows_the_rmse() -> None:
    table = {(r["attack"], r["defence"]): r for r in tabulate(_rows())}

    assert matrix._heat_value(table[("none", "median")], True) == 0.0
    assert matrix._heat_value(table[("sign_flip", "fedavg")], True) == 3.0
    assert matrix._heat_value(table[("ipm", "median")], True) == -0.1
    assert math.isnan(matrix._heat_value(table[("sign_flip", "krum")], True))
    assert math.isnan(matrix._heat_value(table[("gaussian", "fedavg")], True))
    assert matrix._cell_text(table[("none", "median")]) == "rmse 0.4\nbaseline"
    assert (
        matrix._cell_text(table[("sign_flip", "fedavg")])
        == "rmse 2\n+300.0%\nFAIL (known)"
    )
    assert matrix._cell_text(table[("sign_flip", "median")]) == "rmse 0.42\n+5.0%"
    assert matrix._regression_table(list(table.values()))


def _words(page: str, heading: str) -> str:
    section = re.search(rf"<h2>{heading}</h2>(.*?)</section>", page, re.DOTALL)
    assert section is not None
    return re.sub(r"<[^>]+>", " ", section.group(1))


def test_html_speaks_of_rmse_and_its_rule(written: matrix.MatrixFiles) -> None:
    page = written.html.read_text(encoding="utf-8")

    assert written.png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    verdict = _words(page, "Verdict")
    assert "RMSE rise" in verdict and "exceeds 0.1 (10% worse)" in verdict
    assert "accuracy drop" not in verdict
    assert "3 of 6 judged attacked cells fail: 2 known, 1 unexpected" in verdict
    assert "ipm against geomed (RMSE rise 0.3000 &gt; 0.1)" in verdict
    runs = _words(page, "All runs")
    assert " RMSE " in runs and "RMSE rise" in runs and "Accuracy" not in runs
    assert "0.42" in runs and "0.0500" in runs
    assert "<h2>RMSE under attack</h2>" in page
    assert "Heat map of test RMSE rise" in page
