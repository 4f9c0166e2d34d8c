from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fedshield.report
from fedshield.errors import ConfigFileError
from fedshield.report import html as report_html
from fedshield.report import read_metrics, render_report, write_report

EXTERNAL_REFERENCE = re.compile(
    r"""(?:src|href|action|srcset)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE
)


def _summary(**overrides: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "name": "quickstart",
        "status": "completed",
        "rounds": 3,
        "accuracy": 0.9312,
        "loss": 0.25,
        "wall_seconds": 12.3,
        "dataset": "digits",
        "strategy": "fedavg",
        "num_clients": 4,
    }
    summary.update(overrides)
    return summary


def _metrics(rounds: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "round": r,
            "accuracy": 0.5 + 0.1 * r,
            "loss": 2.0 / r,
            "num_clients": 4,
            "seconds": 0.1,
            "train_loss": 2.5 / r,
            "federated_accuracy": 0.45 + 0.1 * r,
            "federated_loss": 2.2 / r,
            "failed_clients": 0,
            "rejected_updates": 0,
        }
        for r in range(1, rounds + 1)
    ]


def _partition(num_clients: int = 4, num_classes: int = 3) -> dict[str, Any]:
    clients = [
        {
            "client_id": str(i),
            "num_samples": 10 * (i + 1),
            "label_counts": [(i + c) % 5 for c in range(num_classes)],
        }
        for i in range(num_clients)
    ]
    return {
        "method": "dirichlet",
        "num_clients": num_clients,
        "num_classes": num_classes,
        "clients": clients,
    }


def _write_run(run_dir: Path, *, rounds: int = 3) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(_summary()), encoding="utf-8")
    lines = [json.dumps(row) for row in _metrics(rounds)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (run_dir / "partition.json").write_text(json.dumps(_partition()), "utf-8")
    (run_dir / "config.toml").write_text('name = "quickstart"\n', encoding="utf-8")
    return run_dir


def _table_rows(page: str) -> int:
    match = re.search(r'<div class="scroll">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert match is not None
    return match.group(1).count("<tr>")


# --- render_report ---------------------------------------------------------


def test_render_report_full_run_is_self_contained() -> None:
    # Execute
    page = render_report(
        summary=_summary(),
        metrics=_metrics(),
        partition=_partition(),
        config_text="# docs: https://example.org\nseed = 1\n",
    )

    # Assert
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    assert EXTERNAL_REFERENCE.search(page) is None
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert page.count("data:image/png;base64,") == 2  # curves + partition


def test_render_report_shows_run_name_and_final_accuracy() -> None:
    page = render_report(summary=_summary(), metrics=_metrics())

    assert "<title>quickstart" in page
    assert "<h1>quickstart" in page
    assert "Final test accuracy" in page
    assert "93.12 %" in page
    assert "digits" in page
    assert "fedavg" in page


def test_render_report_shows_config_verbatim_and_escaped() -> None:
    config = 'name = "a<b>"\n[strategy]\nrounds = 3\n'

    page = render_report(summary=_summary(), metrics=[], config_text=config)

    assert "<pre>name = &quot;a&lt;b&gt;&quot;\n[strategy]\nrounds = 3\n</pre>" in page


@pytest.mark.parametrize(
    "field",
    ["name", "status", "dataset", "extra", "client_id", "metric_key", "config"],
)
def test_render_report_malicious_text_is_escaped(field: str) -> None:
    # Prepare
    evil = '<script>alert("x")</script>'
    summary = _summary()
    metrics = _metrics()
    partition = _partition()
    config_text = None
    if field in ("name", "status", "dataset", "extra"):
        summary[field] = evil
    elif field == "client_id":
        partition["clients"][0]["client_id"] = evil
    elif field == "metric_key":
        metrics[0][evil] = evil
    else:
        config_text = evil

    # Execute
    page = render_report(
        summary=summary, metrics=metrics, partition=partition, config_text=config_text
    )

    # Assert: client ids only appear inside the PNG; everything else as text.
    assert "<script" not in page.lower()
    if field != "client_id":
        assert "&lt;script&gt;" in page


def test_render_report_eval_every_gaps_render_as_missing() -> None:
    # Prepare: evaluation every second round, null or absent in between.
    metrics = _metrics(4)
    metrics[0]["accuracy"] = None
    metrics[0]["loss"] = None
    del metrics[2]["accuracy"]
    del metrics[2]["loss"]

    # Execute
    page = render_report(summary=_summary(rounds=4), metrics=metrics)

    # Assert
    assert "data:image/png;base64," in page
    assert _table_rows(page) == 4
    assert page.count('<td class="missing">—</td>') == 4
    assert "0.7000" in page  # round 2 accuracy is still listed


def test_render_report_without_final_accuracy_shows_last_evaluated() -> None:
    metrics = _metrics(3)
    metrics[2]["accuracy"] = None

    page = render_report(summary=_summary(accuracy=None), metrics=metrics)

    assert "Last test accuracy (round 2)" in page
    assert "70.00 %" in page


def test_render_report_zero_rounds_says_so_instead_of_plotting() -> None:
    page = render_report(summary=_summary(status="failed", rounds=0), metrics=[])

    assert "No round completed" in page
    assert "failed" in page
    assert "data:image/png;base64," not in page
    assert "<table><thead>" not in page


def test_render_report_empty_summary_renders() -> None:
    page = render_report(summary={}, metrics=[])

    assert "Unnamed run" in page
    assert "No results were recorded." in page


def test_render_report_unknown_metric_keys_get_a_column() -> None:
    metrics = _metrics()
    for row in metrics:
        row["epsilon"] = 3.1415

    page = render_report(summary=_summary(), metrics=metrics)

    assert '<th scope="col" title="epsilon">epsilon</th>' in page
    assert page.count("3.1415") == 3


def test_render_report_long_run_table_is_thinned() -> None:
    metrics = _metrics(450)

    page = render_report(summary=_summary(rounds=450), metrics=metrics)

    rows = _table_rows(page)
    assert rows <= report_html.MAX_TABLE_ROWS
    assert "450 rounds: showing" in page
    assert '<td class="num">450</td>' in page  # the last round is kept


def test_render_report_without_metrics_keys_notes_nothing_to_plot() -> None:
    page = render_report(summary=_summary(), metrics=[{"round": 1, "seconds": 0.1}])

    assert "No accuracy or loss was logged." in page
    assert _table_rows(page) == 1


def test_render_report_partition_tolerates_ragged_and_missing_fields() -> None:
    partition = {
        "clients": [
            {"client_id": "a", "label_counts": [1, 2]},
            {"client_id": "b", "num_samples": 7, "label_counts": [1, 2, 4]},
            {"label_counts": None},
            "not a client",
        ]
    }

    page = render_report(summary=_summary(), metrics=[], partition=partition)

    assert page.count("data:image/png;base64,") == 1
    assert "Total samples" in page


def test_render_report_partition_many_clients_renders() -> None:
    partition = _partition(num_clients=120, num_classes=10)
    partition["clients"][5]["client_id"] = "$\\frac"  # broken mathtext

    page = render_report(summary=_summary(), metrics=[], partition=partition)

    assert page.count("data:image/png;base64,") == 1


def test_render_report_partition_without_clients_says_so() -> None:
    page = render_report(
        summary=_summary(), metrics=[], partition={"method": "iid", "clients": []}
    )

    assert "The partition lists no clients." in page
    assert "data:image/png;base64," not in page


# --- read_metrics ----------------------------------------------------------


def test_read_metrics_skips_corrupt_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a crash truncated the last line.
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"round": 1, "accuracy": 0.5}\n\n'
        '{"round": 2, "accuracy": null}\n'
        '{"round": 3, "acc',
        encoding="utf-8",
    )

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedshield.report.html"):
        records = read_metrics(path)

    # Assert
    assert records == [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": None}]
    assert len(caplog.records) == 1
    assert "metrics.jsonl:4" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "line", ["[1, 2]", '"text"', '{"accuracy": 0.5}', '{"round": 0}', '{"round": true}']
)
def test_read_metrics_skips_records_without_a_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, line: str
) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{line}\n{{"round": 1, "epsilon": 2.0}}\n', encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="fedshield.report.html"):
        records = read_metrics(path)

    assert records == [{"round": 1, "epsilon": 2.0}]
    assert len(caplog.records) == 1


def test_read_metrics_invalid_utf8_does_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"round": 1}\n\xff\xfe garbage\n{"round": 2}\n')

    assert [r["round"] for r in read_metrics(path)] == [1, 2]


# --- write_report ----------------------------------------------------------


def test_write_report_writes_report_html(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run")

    path = write_report(run_dir)

    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "quickstart" in page
    assert page.count("data:image/png;base64,") == 2
    assert "<pre>name = &quot;quickstart&quot;\n</pre>" in page
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.toml",
        "metrics.jsonl",
        "partition.json",
        "report.html",
        "summary.json",
    ]


def test_write_report_replaces_existing_report(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run")
    (run_dir / "report.html").write_text("old", encoding="utf-8")

    write_report(run_dir)

    assert (run_dir / "report.html").read_text(encoding="utf-8") != "old"


def test_write_report_failure_keeps_old_report_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    run_dir = _write_run(tmp_path / "run")
    (run_dir / "report.html").write_text("old", encoding="utf-8")
    renamed: list[tuple[str, str]] = []

    def failing_replace(src: str, dst: str) -> None:
        renamed.append((str(src), str(dst)))
        raise OSError("disk full")

    monkeypatch.setattr(report_html.os, "replace", failing_replace)

    # Execute
    with pytest.raises(OSError, match="disk full"):
        write_report(run_dir)

    # Assert: the page went to a sibling temp file, which is cleaned up.
    [(src, dst)] = renamed
    assert Path(src).parent == run_dir
    assert Path(dst) == run_dir / "report.html"
    assert (run_dir / "report.html").read_text(encoding="utf-8") == "old"
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())


def test_write_report_minimal_run_dir(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"name": "early", "status": "failed"}')

    page = write_report(tmp_path).read_text(encoding="utf-8")

    assert "No round completed" in page
    assert "No partition was recorded" in page
    assert "No configuration was recorded" in page


def test_write_report_corrupt_partition_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _write_run(tmp_path / "run")
    (run_dir / "partition.json").write_text("{not json", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="fedshield.report.html"):
        page = write_report(run_dir).read_text(encoding="utf-8")

    assert "No partition was recorded" in page
    assert "partition.json" in caplog.text


def test_write_report_missing_summary_raises_config_file_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigFileError, match="not look like a fedshield run") as info:
        write_report(tmp_path)

    assert str(tmp_path) in str(info.value)
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("content", ["{broken", "[1, 2]"])
def test_write_report_unreadable_summary_raises_config_file_error(
    tmp_path: Path, content: str
) -> None:
    (tmp_path / "summary.json").write_text(content, encoding="utf-8")

    with pytest.raises(ConfigFileError, match=r"summary\.json"):
        write_report(tmp_path)


# --- package ---------------------------------------------------------------


def test_all_names_exist() -> None:
    for name in fedshield.report.__all__:
        assert hasattr(fedshield.report, name), name
    assert sorted(fedshield.report.__all__) == [
        "read_metrics",
        "render_report",
        "write_report",
    ]


def test_import_is_cheap_and_stays_off_heavy_layers() -> None:
    code = (
        "import sys, fedshield.report; "
        "heavy = ['matplotlib', 'torch', 'fedshield.simulation', 'fedshield.data', "
        "'fedshield.models']; "
        "print([m for m in heavy if m in sys.modules])"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
