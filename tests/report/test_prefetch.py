"""The report helper process: same page as in-process, and never a lost report."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedshield.api.config import ExperimentConfig
from fedshield.api.run import simulate
from fedshield.report import write_report
from fedshield.report.prefetch import PrefetchError, ReportPrefetch

CONFIG = {
    "run": {"name": "prefetch", "rounds": 2, "seed": 0},
    "data": {"dataset": "digits", "num_clients": 4},
    "model": {"kind": "logistic"},
}


def _run(tmp_path: Path, name: str, *, prefetch: bool) -> Path:
    config = ExperimentConfig.model_validate(CONFIG)
    _, run_dir = simulate(config, out=tmp_path / name, prefetch_report=prefetch)
    return run_dir


def test_the_helper_writes_the_page_the_run_would_write_itself(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "helper", prefetch=True)
    by_helper = (run_dir / "report.html").read_bytes()
    write_report(run_dir)  # the same folder, drawn in this process
    assert (run_dir / "report.html").read_bytes() == by_helper
    assert b"data:image/png;base64," in by_helper


def test_a_helper_that_cannot_start_costs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_process(*_args: object, **_kwargs: object) -> None:
        raise OSError("no more processes")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert ReportPrefetch.start() is None
    run_dir = _run(tmp_path, "no-helper", prefetch=True)
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()


def test_a_helper_that_dies_is_replaced_by_writing_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[ReportPrefetch] = []
    real_start = ReportPrefetch.start

    def start_then_kill() -> ReportPrefetch | None:
        helper = real_start()
        assert helper is not None
        helper._process.kill()
        helper._process.wait()
        started.append(helper)
        return helper

    monkeypatch.setattr(ReportPrefetch, "start", staticmethod(start_then_kill))
    run_dir = _run(tmp_path, "dead-helper", prefetch=True)
    assert started, "the helper was not used"
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()


def test_a_failing_report_is_answered_not_hung(tmp_path: Path) -> None:
    helper = ReportPrefetch.start()
    assert helper is not None
    with pytest.raises(PrefetchError, match="summary"):
        helper.write(tmp_path / "not-a-run", timeout_s=60)
    assert helper._process.poll() is not None  # stopped after answering


def test_a_silent_helper_times_out_and_is_stopped(tmp_path: Path) -> None:
    # `sleep` reads nothing and answers nothing: a helper that hangs.
    process = subprocess.Popen(
        ["sleep", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    helper = ReportPrefetch(process)
    with pytest.raises(PrefetchError, match="no answer"):
        helper.write(tmp_path, timeout_s=0.5)
    assert process.poll() is not None


def test_a_wrong_answer_is_refused(tmp_path: Path) -> None:
    process = subprocess.Popen(
        ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    helper = ReportPrefetch(process)
    # cat sends our request back: valid JSON, but no "ok".
    with pytest.raises(PrefetchError, match="failed"):
        helper.write(tmp_path, timeout_s=10)
    assert process.poll() is not None


def test_the_helper_exits_at_the_end_of_its_input() -> None:
    helper = ReportPrefetch.start()
    assert helper is not None
    helper.close()
    assert helper._process.returncode == 0
    helper.close()  # a second close is harmless
