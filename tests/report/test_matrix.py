from __future__ import annotations

import base64
import csv
import re
from pathlib import Path
from typing import Any

import pytest

from fedshield.report import matrix
from fedshield.report.matrix import (
    ACCURACY_DROP_THRESHOLD,
    ASR_THRESHOLD,
    COLUMNS,
    KNOWN_FAILURES,
    accuracy_drop,
    classify,
    tabulate,
    write_matrix,
)

EXTERNAL_REFERENCE = re.compile(
    r"""(?:src|href|action|srcset)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE
)
BULYAN_REFUSAL = (
    "Bulyan with f=1 needs n >= 4f + 3 = 7 updates per round; got n=6. "
    "Sample at least 7 clients per round"
)


def _run(attack: str, defence: str, accuracy: float, **extra: Any) -> dict[str, Any]:
    row = {
        "attack": attack,
        "defence": defence,
        "status": "completed",
        "accuracy": accuracy,
        "seconds_per_round": 0.25,
        "rounds": 2,
    }
    row.update(extra)
    return row


def _refused(attack: str, defence: str, error: str) -> dict[str, Any]:
    return {"attack": attack, "defence": defence, "status": "refused", "error": error}


def _rows() -> list[dict[str, Any]]:
    rows = [
        _run("none", "fedavg", 0.90),
        _run("none", "krum", 0.88, seconds_per_round=0.5),
        _run("none", "median", 0.89),
        _refused("none", "bulyan", BULYAN_REFUSAL),
        _run("sign_flip", "fedavg", 0.40),  # drop 0.50: unexpected
        _run("sign_flip", "krum", 0.87, seconds_per_round=0.75),  # drop 0.01
        _run("sign_flip", "median", 0.91),  # drop -0.02: held
        _refused("sign_flip", "bulyan", BULYAN_REFUSAL),
        _run("alie", "fedavg", 0.85),  # drop exactly 0.05: held
        _run("alie", "krum", 0.60),  # drop 0.28: known (Baruch et al.)
        _run("alie", "median", 0.88),  # drop 0.01: a known pair that held
        _refused("alie", "bulyan", BULYAN_REFUSAL),
        _run("backdoor", "fedavg", 0.89, asr=0.93),  # fails by ASR only
        _run("backdoor", "krum", 0.88, asr=0.10),
        {
            "attack": "backdoor",
            "defence": "median",
            "status": "failed",
            "error": "round 1 failed: <script>alert(1)</script>",
        },
        _refused("backdoor", "bulyan", BULYAN_REFUSAL),
    ]
    return rows


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> matrix.MatrixFiles:
    out = tmp_path_factory.mktemp("matrix") / "new"  # created by write_matrix
    return write_matrix(_rows(), out, title="demo <matrix>", settings={"f": 1})


def _csv(files: matrix.MatrixFiles) -> list[dict[str, str]]:
    with files.csv.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _cell(rows: list[dict[str, str]], attack: str, defence: str) -> dict[str, str]:
    (row,) = [r for r in rows if r["attack"] == attack and r["defence"] == defence]
    return row


def test_thresholds_are_the_documented_ones():
    assert ACCURACY_DROP_THRESHOLD == 0.05
    assert ASR_THRESHOLD == 0.5


def test_csv_has_the_contract_columns_one_row_per_run(written):
    with written.csv.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == COLUMNS
    assert {"attack", "defence", "accuracy", "accuracy_drop", "asr"} <= set(header)
    rows = _csv(written)
    assert [(r["attack"], r["defence"]) for r in rows] == [
        (r["attack"], r["defence"]) for r in _rows()
    ]


def test_csv_values_are_hand_computed_fractions_with_four_decimals(written):
    rows = _csv(written)
    assert _cell(rows, "sign_flip", "fedavg")["accuracy"] == "0.4000"
    assert _cell(rows, "sign_flip", "fedavg")["accuracy_drop"] == "0.5000"
    assert _cell(rows, "sign_flip", "krum")["accuracy_drop"] == "0.0100"
    assert _cell(rows, "sign_flip", "median")["accuracy_drop"] == "-0.0200"
    assert _cell(rows, "alie", "krum")["accuracy_drop"] == "0.2800"
    assert _cell(rows, "backdoor", "fedavg")["asr"] == "0.9300"
    # ASR only where the run measured one; no drop for baselines.
    assert _cell(rows, "sign_flip", "fedavg")["asr"] == ""
    assert _cell(rows, "none", "fedavg")["accuracy_drop"] == ""
    assert _cell(rows, "none", "fedavg")["verdict"] == "baseline"
    assert _cell(rows, "sign_flip", "krum")["seconds_per_round"] == "0.7500"


def test_csv_records_refusals_and_failures_without_numbers(written):
    rows = _csv(written)
    refused = _cell(rows, "alie", "bulyan")
    assert refused["status"] == refused["verdict"] == "refused"
    assert refused["error"].startswith("Bulyan with f=1 needs n >= 4f + 3")
    assert refused["accuracy"] == refused["accuracy_drop"] == ""
    failed = _cell(rows, "backdoor", "median")
    assert failed["verdict"] == "failed" and "round 1 failed" in failed["error"]


def test_csv_verdicts(written):
    verdicts = {(r["attack"], r["defence"]): r["verdict"] for r in _csv(written)}
    # FedAvg is not robust: its failures are known ones
    assert verdicts[("sign_flip", "fedavg")] == "known_failure"
    assert verdicts[("sign_flip", "krum")] == "held"
    assert verdicts[("alie", "fedavg")] == "held"  # 0.05 is not > 0.05
    assert verdicts[("alie", "krum")] == "known_failure"
    assert verdicts[("alie", "median")] == "held"
    assert verdicts[("backdoor", "fedavg")] == "known_failure"
    assert verdicts[("backdoor", "krum")] == "held"


@pytest.mark.parametrize(
    ("baseline", "accuracy", "drop"),
    [(0.9, 0.85, 0.05), (0.9, 0.95, -0.05), (0.8125, 0.5, 0.3125), (0.5, 0.5, 0.0)],
)
def test_accuracy_drop_is_baseline_minus_accuracy(baseline, accuracy, drop):
    assert accuracy_drop({"accuracy": accuracy}, {"accuracy": baseline}) == drop


def test_accuracy_drop_needs_two_accuracies():
    assert accuracy_drop({"accuracy": 0.5}, None) is None
    assert accuracy_drop({"accuracy": 0.5}, _refused("none", "krum", "x")) is None
    assert accuracy_drop({"status": "failed"}, {"accuracy": 0.9}) is None


def test_alie_against_krum_is_a_known_failure_citing_baruch():
    verdict = classify(_run("alie", "krum", 0.6), _run("none", "krum", 0.9))

    assert verdict.outcome == "known_failure" and verdict.is_failure
    assert verdict.reasons == ("accuracy drop 0.3000 > 0.05",)
    assert verdict.reference is not None and "Baruch" in verdict.reference
    assert "Krum" in verdict.reference


def test_ipm_against_median_is_a_known_failure_citing_xie():
    verdict = classify(_run("ipm", "median", 0.6), _run("none", "median", 0.9))

    assert verdict.outcome == "known_failure"
    assert verdict.reference is not None and "Xie" in verdict.reference


def test_known_failures_cover_the_literature_pairs():
    for pair in [("alie", "krum"), ("alie", "median"), ("ipm", "krum")]:
        assert pair in KNOWN_FAILURES


def test_a_failure_outside_the_literature_is_unexpected():
    verdict = classify(_run("alie", "geomed", 0.6), _run("none", "geomed", 0.9))

    assert verdict.outcome == "unexpected_failure" and verdict.reference is None


def test_asr_above_half_fails_even_without_accuracy_drop():
    baseline = _run("none", "geomed", 0.9)

    failed = classify(_run("backdoor", "geomed", 0.9, asr=0.51), baseline)
    held = classify(_run("backdoor", "geomed", 0.9, asr=0.5), baseline)

    assert failed.outcome == "unexpected_failure"
    assert failed.reasons == ("attack success rate 0.5100 > 0.5",)
    assert held.outcome == "held"


def test_refused_and_failed_runs_are_not_failures_of_the_defence():
    refused = classify(_refused("alie", "bulyan", BULYAN_REFUSAL), None)
    failed = classify({"attack": "alie", "defence": "krum", "status": "failed"}, None)

    assert refused.outcome == "refused" and not refused.is_failure
    assert refused.reasons == (f"refused: {BULYAN_REFUSAL}",)
    assert failed.outcome == "failed" and not failed.is_failure


def test_no_baseline_is_undetermined():
    verdict = classify(
        _run("sign_flip", "bulyan", 0.2), _refused("none", "bulyan", "no")
    )

    assert verdict.outcome == "undetermined" and not verdict.is_failure
    assert "refused" in verdict.reasons[0]


def test_tabulate_keeps_order_and_fills_every_column():
    table = tabulate(_rows())

    assert len(table) == len(_rows())
    for row in table:
        assert set(COLUMNS) <= row.keys()
    assert table[4]["accuracy_drop"] == 0.5


def test_png_is_written_and_embedded_in_the_page(written):
    png = written.png.read_bytes()
    page = written.html.read_text(encoding="utf-8")

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    (uri,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(uri) == png


def test_html_is_self_contained(written):
    page = written.html.read_text(encoding="utf-8")

    assert page.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in page
    assert "<script" not in page.lower()
    assert EXTERNAL_REFERENCE.search(page) is None
    assert "<link" not in page.lower()
    # Run-supplied text is escaped.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "demo &lt;matrix&gt;" in page


def _verdict_text(page: str) -> str:
    section = re.search(r"<h2>Verdict</h2>(.*?)</section>", page, re.DOTALL)
    assert section is not None
    return re.sub(r"<[^>]+>", "", section.group(1))


def test_html_says_in_words_which_cells_fail(written):
    words = _verdict_text(written.html.read_text(encoding="utf-8"))

    assert "accuracy drop" in words and "0.05" in words and "0.5" in words
    assert "3 of 8 judged attacked cells fail: 3 known, 0 unexpected" in words
    known = words.split("Known failures")[1]
    assert "alie against krum" in known and "Baruch" in words
    assert "sign_flip against fedavg" in known
    assert "backdoor against fedavg" in known
    assert "Unexpected failures" not in words
    assert "bulyan against" not in known
    assert "Held here although" in words and "alie against median" in words


def test_html_shows_refusals_as_refused_with_the_message(written):
    page = written.html.read_text(encoding="utf-8")
    words = _verdict_text(page)

    assert (
        "bulyan under none, sign_flip, alie, backdoor — refused: Bulyan with f=1 "
        "needs n &gt;= 4f + 3" in words
    )
    assert "refused: Bulyan with f=1 needs n &gt;= 4f + 3" in page.split("All runs")[1]
    assert "Runs that failed" in words and "backdoor against median" in words


def test_html_has_table_time_per_round_and_settings(written):
    page = written.html.read_text(encoding="utf-8")

    assert "<h2>All runs</h2>" in page and "<h2>Time per round</h2>" in page
    # krum: mean of 0.5 (none), 0.75 (sign_flip), 0.25 and 0.25.
    assert re.search(r"<th scope=\"row\">krum</th><td class=\"num\">0\.4375</td>", page)
    assert "<h2>Settings</h2>" in page


def test_write_matrix_replaces_previous_files(tmp_path: Path):
    first = write_matrix([_run("none", "fedavg", 0.9)], tmp_path)
    second = write_matrix([_run("none", "fedavg", 0.8)], tmp_path)

    assert first == second
    assert _cell(_csv(second), "none", "fedavg")["accuracy"] == "0.8000"
