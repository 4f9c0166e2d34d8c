"""Self-contained HTML report of a federated run.

The report is built from the plain-JSON files of a run directory
(``summary.json``, ``metrics.jsonl``, ``partition.json``, ``config.toml``),
so it never imports the simulation, data or model layers. The page loads
nothing from the network: styles are inline, figures are base64 PNG ``data:``
URIs, it contains no script, and a Content-Security-Policy forbids fetching
anything else. Every piece of run-supplied text is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import secrets
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from fedshield._version import __version__
from fedshield.errors import ConfigFileError
from fedshield.report.plots import (
    metric_series,
    plot_partition,
    plot_training_curves,
    round_number,
)

__all__ = ["read_metrics", "render_report", "write_report"]

_log = logging.getLogger(__name__)

REPORT_FILENAME: Final = "report.html"
"""Name of the page :func:`write_report` writes into the run directory."""

MAX_TABLE_ROWS: Final = 200
"""Longest per-round table; longer runs show every k-th round and the last."""

_SUMMARY_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("accuracy", "Final test accuracy"),
    ("rmse", "Final test RMSE"),
    ("mae", "Final test MAE"),
    ("loss", "Final test loss"),
    ("rounds", "Rounds"),
    ("wall_seconds", "Wall time"),
    ("dataset", "Dataset"),
    ("strategy", "Strategy"),
    ("num_clients", "Clients"),
)
# Shown in the page title rather than in the summary table.
_HEADER_FIELDS: Final = frozenset({"name", "status"})

_METRIC_LABELS: Final[Mapping[str, str]] = {
    "round": "Round",
    "accuracy": "Test accuracy",
    "loss": "Test loss",
    "federated_accuracy": "Federated accuracy",
    "rmse": "Test RMSE",
    "mae": "Test MAE",
    "federated_rmse": "Federated RMSE",
    "federated_loss": "Federated loss",
    "train_loss": "Train loss",
    "num_clients": "Clients",
    "failed_clients": "Failed clients",
    "rejected_updates": "Rejected updates",
    "seconds": "Seconds",
}

_PARTITION_LABELS: Final[Mapping[str, str]] = {
    "method": "Method",
    "num_clients": "Clients",
    "num_classes": "Classes",
}

_STATUS_CLASSES: Final[Mapping[str, str]] = {
    "completed": "ok",
    "running": "warn",
    "interrupted": "warn",
    "stopped": "warn",
    "failed": "bad",
    "aborted": "bad",
    "budget_exhausted": "bad",
}

_CSS: Final = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body {
  margin: 0; background: #f5f6f8; color: #1f2328; line-height: 1.5;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue",
    Arial, sans-serif;
}
main { max-width: 1080px; margin: 0 auto; padding: 2rem 1.25rem 3rem; }
header h1 { font-size: 1.65rem; margin: 0; overflow-wrap: anywhere; }
header p { margin: .25rem 0 0; color: #59636e; }
section {
  background: #fff; border: 1px solid #d8dee4; border-radius: 8px;
  padding: 1.25rem 1.5rem; margin-top: 1.25rem;
}
h2 { font-size: 1.15rem; margin: 0 0 .75rem; }
h3 { font-size: 1rem; margin: 1.25rem 0 .5rem; }
table { border-collapse: collapse; font-size: .875rem; }
th, td {
  border: 1px solid #d8dee4; padding: .3rem .65rem; text-align: left;
  vertical-align: top; overflow-wrap: anywhere;
}
th { background: #f6f8fa; font-weight: 600; }
thead th { overflow-wrap: normal; vertical-align: bottom; }
table.kv th { width: 14rem; }
table.kv { min-width: 28rem; max-width: 100%; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { overflow-wrap: normal; white-space: nowrap; }
td.missing { color: #8c959f; text-align: center; }
.scroll { max-height: 34rem; overflow: auto; border: 1px solid #d8dee4; }
.scroll table { border: 0; width: 100%; }
.scroll thead th { position: sticky; top: 0; box-shadow: 0 1px 0 #d8dee4; }
.scroll th, .scroll td { border-top: 0; }
img { display: block; max-width: 100%; height: auto; margin: .25rem 0; }
pre {
  margin: 0; padding: 1rem; background: #f6f8fa; border-radius: 6px;
  overflow-x: auto; font-size: .82rem; line-height: 1.45;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
}
.note { color: #59636e; margin: .25rem 0 .5rem; }
.badge {
  display: inline-block; vertical-align: middle; margin-left: .6rem;
  padding: .1rem .55rem; border-radius: 999px; font-size: .8rem;
  font-weight: 600; border: 1px solid transparent;
}
.badge.ok { background: #dafbe1; color: #116329; border-color: #aceebb; }
.badge.warn { background: #fff8c5; color: #7d4e00; border-color: #eedc82; }
.badge.bad { background: #ffebe9; color: #a40e26; border-color: #ffcecb; }
.badge.neutral { background: #eaeef2; color: #424a53; border-color: #d0d7de; }
footer { margin-top: 1.5rem; color: #8c959f; font-size: .8rem; text-align: center; }
"""

# Even if something slipped past escaping, the browser would run no script and
# fetch nothing: only inline styles and data: images are allowed.
_CSP: Final = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(value: object) -> str:
    """HTML-escape ``str(value)``, quotes included.

    Examples
    --------
    >>> _esc('<script>alert("x")</script>')
    '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;'
    """
    return html.escape(str(value), quote=True)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
    return None


def _format_value(value: object) -> str:
    """Format a JSON value for a table cell (plain text, not yet escaped).

    Examples
    --------
    >>> [_format_value(v) for v in (None, 3, 12345, 0.93125, 1.5e-5, True)]
    ['—', '3', '12,345', '0.9313', '1.50e-05', 'true']
    >>> _format_value(float("inf")), _format_value({"b": 1, "a": [2]})
    ('∞', '{"a": [2], "b": 1}')
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        magnitude = abs(value)
        if magnitude >= 10_000:
            return f"{value:,.0f}"
        if magnitude >= 1_000:
            return f"{value:,.1f}"
        if 0 < magnitude < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4f}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _format_accuracy(value: object) -> str:
    """Format an accuracy in [0, 1] as a percentage.

    Examples
    --------
    >>> _format_accuracy(0.9312), _format_accuracy(87.5)
    ('93.12 %', '87.5000')
    """
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return f"{100 * value:.2f} %"
    return _format_value(value)


def _format_duration(value: object) -> str:
    """Format a number of seconds for people.

    Examples
    --------
    >>> _format_duration(12.34), _format_duration(123), _format_duration(7384)
    ('12.3 s', '2 min 03 s', '2 h 03 min')
    """
    seconds = _finite(value)
    if seconds is None:
        return _format_value(value)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _select_rows(count: int, limit: int) -> list[int]:
    """Pick at most ``limit`` evenly spaced indices out of ``count``, last included.

    Examples
    --------
    >>> _select_rows(4, 200)
    [0, 1, 2, 3]
    >>> _select_rows(11, 4)
    [0, 4, 8, 10]
    """
    if count <= limit:
        return list(range(count))
    step = math.ceil((count - 1) / (limit - 1))
    indices = list(range(0, count, step))
    if indices[-1] != count - 1:
        indices.append(count - 1)
    return indices


def _cell(value: object, *, text: str | None = None) -> str:
    shown = _format_value(value) if text is None else text
    if value is None:
        return f'<td class="missing">{_esc(shown)}</td>'
    css = ' class="num"' if _is_number(value) else ""
    return f"<td{css}>{_esc(shown)}</td>"


def _kv_table(rows: Iterable[tuple[str, object, str | None]]) -> str:
    body = "".join(
        f'<tr><th scope="row">{_esc(label)}</th>{_cell(value, text=text)}</tr>'
        for label, value, text in rows
    )
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _last_evaluated(
    metrics: Sequence[Mapping[str, Any]], key: str
) -> tuple[int, float] | None:
    rounds, values = metric_series(metrics, key)
    return (rounds[-1], values[-1]) if rounds else None


def _summary_section(
    summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]
) -> str:
    rows: list[tuple[str, object, str | None]] = []
    for key, label in _SUMMARY_FIELDS:
        value = summary.get(key)
        if value is None and key in ("accuracy", "rmse", "mae", "loss"):
            # A run that stopped early has no final numbers; the last
            # evaluated round is the next best thing, labelled as such.
            last = _last_evaluated(metrics, key)
            if last is not None:
                last_round, last_value = last
                noun = {"rmse": "RMSE", "mae": "MAE"}.get(key, key)
                label = f"Last test {noun} (round {last_round})"
                value = last_value
        if value is None:
            continue
        if key == "accuracy":
            text: str | None = _format_accuracy(value)
        elif key == "wall_seconds":
            text = _format_duration(value)
        else:
            text = None
        rows.append((label, value, text))
    known = {key for key, _ in _SUMMARY_FIELDS} | _HEADER_FIELDS | {"privacy"}
    for key in sorted(k for k in summary if k not in known):
        rows.append((key, summary[key], None))
    if not rows:
        return (
            '<section><h2>Summary</h2><p class="note">No results were recorded.</p>'
            "</section>"
        )
    return f"<section><h2>Summary</h2>{_kv_table(rows)}</section>"


_PRIVACY_FIELDS = (
    ("mode", "Mode"),
    ("epsilon", "ε spent"),
    ("delta", "δ"),
    ("target_epsilon", "Target ε (budget)"),
    ("accountant", "Accountant"),
    ("noise_multiplier", "Noise multiplier σ"),
    ("clip_norm", "Clip norm (final)"),
    ("sampling", "Client sampling"),
    ("amplification_by_sampling", "Amplification by sampling claimed"),
    ("distributed_bits", "Distributed DP: secure-sum modulus bits"),
)


_OUTSIDE_REASONS: Final[Mapping[str, str]] = {
    "seeded_randomness": "the noise and the sample are reproducible from the "
    "seed in config.toml (set [privacy] secure_rng = true)",
    "federated_eval": "the clients' own evaluation is reported without noise",
}


def _privacy_section(privacy: object) -> str:
    """The accountant's verdict, and where the noise came from."""
    if not isinstance(privacy, Mapping):
        return ""
    rows: list[tuple[str, object, str | None]] = [
        (label, privacy[key], None)
        for key, label in _PRIVACY_FIELDS
        if privacy.get(key) is not None
    ]
    secure = bool(privacy.get("secure_rng"))
    rows.append(
        (
            "Noise source",
            "secure" if secure else "seeded",
            "the operating system's cryptographic randomness (secure_rng = true)"
            if secure
            else "a seeded generator: reproducible, for simulation only; set "
            "[privacy] secure_rng = true for a real deployment",
        )
    )
    outside = privacy.get("outside_guarantee")
    if isinstance(outside, list | tuple) and outside:
        # What this run released that its epsilon does not cover, and why
        # (README, "What leaves a DP run, and what ε covers").
        reasons = "; ".join(
            f"{item}: {_OUTSIDE_REASONS.get(str(item), 'see the README')}"
            for item in outside
        )
        rows.append(
            (
                "Released outside the guarantee",
                ", ".join(str(item) for item in outside),
                f"not covered by ε: {reasons}",
            )
        )
    return f"<section><h2>Differential privacy</h2>{_kv_table(rows)}</section>"


def _metric_columns(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    present: set[str] = set()
    for row in metrics:
        present.update(row)
    known = [key for key in _METRIC_LABELS if key in present or key == "round"]
    return known + sorted(present - set(_METRIC_LABELS))


def _metrics_table(metrics: Sequence[Mapping[str, Any]]) -> str:
    columns = _metric_columns(metrics)
    head = "".join(
        f'<th scope="col" title="{_esc(key)}">{_esc(_METRIC_LABELS.get(key, key))}</th>'
        for key in columns
    )
    indices = _select_rows(len(metrics), MAX_TABLE_ROWS)
    body: list[str] = []
    for index in indices:
        row = metrics[index]
        cells = [_cell(round_number(row, index))]
        cells.extend(_cell(row.get(key)) for key in columns[1:])
        body.append(f"<tr>{''.join(cells)}</tr>")
    note = ""
    if len(indices) < len(metrics):
        note = (
            f'<p class="note">{len(metrics)} rounds: showing {len(indices)} of '
            f"them (one in every {indices[1] - indices[0]}, and the last).</p>"
        )
    return (
        f"<h3>Per-round metrics</h3>{note}"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _training_section(
    summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]
) -> str:
    title = "<h2>Training progress</h2>"
    if not metrics:
        status = summary.get("status")
        ended = f" The run ended with status “{_esc(status)}”." if status else ""
        return (
            f'<section>{title}<p class="note">No round completed, so there are '
            f"no curves or per-round metrics to show.{ended}</p></section>"
        )
    uri = plot_training_curves(metrics)
    if uri is None:
        figure = '<p class="note">No accuracy or loss was logged.</p>'
    else:
        figure = f'<img src="{uri}" alt="Accuracy and loss per round">'
    return f"<section>{title}{figure}{_metrics_table(metrics)}</section>"


@dataclass(frozen=True, slots=True)
class _PartitionTable:
    client_ids: list[str]
    label_counts: NDArray[np.int64]
    num_samples: NDArray[np.int64]


def _as_count(value: object) -> int:
    number = _finite(value)
    return max(int(number), 0) if number is not None else 0


def _parse_partition(partition: Mapping[str, Any]) -> _PartitionTable | None:
    clients = partition.get("clients")
    if not isinstance(clients, list) or not clients:
        return None
    client_ids: list[str] = []
    counts: list[list[int]] = []
    samples: list[int] = []
    for index, client in enumerate(clients):
        if not isinstance(client, Mapping):
            _log.warning("partition.json: client entry %d is not an object", index)
            client = {}
        raw_counts = client.get("label_counts")
        row = [_as_count(c) for c in raw_counts] if isinstance(raw_counts, list) else []
        num_samples = client.get("num_samples")
        client_ids.append(str(client.get("client_id", index)))
        counts.append(row)
        samples.append(_as_count(num_samples) if num_samples is not None else sum(row))
    declared = partition.get("num_classes")
    width = max(max(len(row) for row in counts), _as_count(declared))
    matrix = np.zeros((len(counts), max(width, 1)), dtype=np.int64)
    for index, row in enumerate(counts):
        matrix[index, : len(row)] = row
    return _PartitionTable(client_ids, matrix, np.asarray(samples, dtype=np.int64))


def _partition_section(partition: Mapping[str, Any] | None) -> str:
    title = "<h2>Data partition</h2>"
    if partition is None:
        return (
            f'<section>{title}<p class="note">No partition was recorded for this '
            "run.</p></section>"
        )
    rows: list[tuple[str, object, str | None]] = [
        (label, partition[key], None)
        for key, label in _PARTITION_LABELS.items()
        if partition.get(key) is not None
    ]
    rows.extend(
        (key, value, None)
        for key, value in sorted(partition.items())
        if key not in _PARTITION_LABELS and key != "clients"
    )
    table = _parse_partition(partition)
    if table is None:
        figure = '<p class="note">The partition lists no clients.</p>'
    else:
        sizes = table.num_samples.tolist()
        rows.append(("Total samples", int(sum(sizes)), None))
        spread = f"{min(sizes):,} / {statistics.median(sizes):,.0f} / {max(sizes):,}"
        rows.append(("Samples per client (min / median / max)", spread, None))
        uri = plot_partition(table.client_ids, table.label_counts, table.num_samples)
        figure = f'<img src="{uri}" alt="Label distribution and samples per client">'
    return f"<section>{title}{_kv_table(rows)}{figure}</section>"


def _config_section(config_text: str | None) -> str:
    title = "<h2>Configuration</h2>"
    if config_text is None:
        return (
            f'<section>{title}<p class="note">No configuration was recorded for '
            "this run.</p></section>"
        )
    return f"<section>{title}<pre>{_esc(config_text)}</pre></section>"


def render_report(
    *,
    summary: Mapping[str, Any],
    metrics: Sequence[Mapping[str, Any]],
    partition: Mapping[str, Any] | None = None,
    config_text: str | None = None,
) -> str:
    """Render the HTML report of a run as one self-contained page.

    Parameters
    ----------
    summary
        The run summary (``summary.json``): name, status, final accuracy and
        loss, rounds, wall time, data set, strategy, clients. Missing keys are
        left out; unknown keys are listed after the known ones.
    metrics
        One record per completed round (``metrics.jsonl``). Null or absent
        accuracy and loss (rounds skipped by ``eval_every``) are not plotted.
        May be empty, for a run that stopped before round 1 finished.
    partition
        The client partition (``partition.json``), or None if not recorded.
    config_text
        The resolved configuration as TOML text, shown verbatim, or None.

    Returns
    -------
    str
        A complete HTML document. It loads nothing from the network (inline
        CSS, figures as base64 PNG ``data:`` URIs, no script) and escapes all
        run-supplied text.

    Examples
    --------
    >>> page = render_report(summary={"name": "demo", "status": "failed"}, metrics=[])
    >>> page.startswith("<!DOCTYPE html>")
    True
    >>> "No round completed" in page
    True
    """
    name = summary.get("name")
    title = str(name) if name not in (None, "") else "Unnamed run"
    status = summary.get("status")
    badge = ""
    if status is not None:
        css = _STATUS_CLASSES.get(str(status), "neutral")
        badge = f'<span class="badge {css}">{_esc(status)}</span>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)} · fedshield report</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<header><h1>{_esc(title)}{badge}</h1>",
        "<p>fedshield federated run report</p></header>",
        _summary_section(summary, metrics),
        _privacy_section(summary.get("privacy")),
        _training_section(summary, metrics),
        _partition_section(partition),
        _config_section(config_text),
        f"<footer>Generated by fedshield {_esc(__version__)}. This page is "
        "self-contained and loads nothing from the network.</footer>",
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` log, skipping lines that cannot be used.

    Parameters
    ----------
    path
        The JSON-lines file: one object per completed round, with a positive
        integer ``"round"``. Unknown keys are kept.

    Returns
    -------
    list of dict
        The records, in file order. Blank lines are ignored; a line that is
        not valid JSON (for instance one truncated by a crash), not an object,
        or has no positive integer ``"round"`` is skipped with a warning on
        this module's logger.

    Raises
    ------
    OSError
        If the file cannot be opened.
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as err:
                _log.warning(
                    "%s:%d: skipping a line that is not valid JSON (%s)",
                    path,
                    line_number,
                    err,
                )
                continue
            if not isinstance(record, dict):
                _log.warning(
                    "%s:%d: skipping a line that is not a JSON object",
                    path,
                    line_number,
                )
                continue
            round_value = record.get("round")
            if (
                not isinstance(round_value, int)
                or isinstance(round_value, bool)
                or round_value < 1
            ):
                _log.warning(
                    "%s:%d: skipping a record without a positive integer 'round'",
                    path,
                    line_number,
                )
                continue
            records.append(record)
    return records


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise ConfigFileError(
            f"{run_dir} does not look like a fedshield run directory: "
            "it has no summary.json."
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigFileError(f"cannot read {path}: {err}") from err
    if not isinstance(summary, dict):
        raise ConfigFileError(
            f"{path} must hold a JSON object; got {type(summary).__name__}."
        )
    return summary


def _read_partition(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        partition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        # The partition only feeds one figure; losing it should not cost the
        # whole report.
        _log.warning("ignoring %s: %s", path, err)
        return None
    if not isinstance(partition, dict):
        _log.warning("ignoring %s: not a JSON object", path)
        return None
    return partition


def _write_atomic(target: Path, text: str) -> None:
    # A uniquely named sibling, renamed over the target: readers see the old
    # page or the new one, never a half-written file.
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        with temporary.open("x", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def prerender_partition(run_dir: Path) -> None:
    """Draw ``run_dir``'s partition figure now; :func:`write_report` reuses it.

    Nothing happens when the folder has no readable ``partition.json``.
    """
    partition = _read_partition(Path(run_dir) / "partition.json")
    if partition is not None:
        _partition_section(partition)


def write_report(run_dir: Path) -> Path:
    """Write ``report.html`` into a run directory.

    Parameters
    ----------
    run_dir
        A run directory holding ``summary.json`` and, optionally,
        ``metrics.jsonl``, ``partition.json`` and ``config.toml``.

    Returns
    -------
    Path
        The path of the report, ``run_dir / "report.html"``.

    Raises
    ------
    fedshield.errors.ConfigFileError
        If ``run_dir`` has no ``summary.json`` (it does not look like a run
        directory) or the summary is not a readable JSON object.

    Notes
    -----
    The page is written to a temporary file in ``run_dir`` and renamed over
    ``report.html`` (:func:`os.replace`), so an existing report is replaced
    atomically and a failure leaves it untouched. A corrupt ``partition.json``
    is ignored with a warning; corrupt lines of ``metrics.jsonl`` are skipped
    (see :func:`read_metrics`).
    """
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
    config_path = run_dir / "config.toml"
    config_text = (
        config_path.read_text(encoding="utf-8", errors="replace")
        if config_path.is_file()
        else None
    )
    page = render_report(
        summary=summary,
        metrics=metrics,
        partition=_read_partition(run_dir / "partition.json"),
        config_text=config_text,
    )
    target = run_dir / REPORT_FILENAME
    _write_atomic(target, page)
    return target
