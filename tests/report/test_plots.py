from __future__ import annotations

import base64

import numpy as np

from fedshield.report.plots import (
    metric_series,
    plot_partition,
    plot_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return base64.b64decode(uri[len(prefix) :], validate=True)


def test_metric_series_skips_null_absent_and_non_numeric() -> None:
    rows = [
        {"round": 1, "accuracy": None},
        {"round": 2, "accuracy": 0.5},
        {"round": 3},
        {"round": 4, "accuracy": "n/a"},
        {"round": 5, "accuracy": float("nan")},
        {"round": 6, "accuracy": 1},
    ]

    assert metric_series(rows, "accuracy") == ([2, 6], [0.5, 1.0])


def test_plot_training_curves_returns_png() -> None:
    rows = [{"round": r, "accuracy": 0.1 * r, "loss": 1.0 / r} for r in (1, 2, 3)]

    uri = plot_training_curves(rows)

    assert uri is not None
    assert _decode(uri).startswith(PNG_MAGIC)


def test_plot_training_curves_nothing_to_plot_returns_none() -> None:
    assert plot_training_curves([]) is None
    assert plot_training_curves([{"round": 1, "seconds": 0.2}]) is None


def test_plot_partition_returns_png() -> None:
    counts = np.array([[1, 0, 3], [0, 5, 0]], dtype=np.int64)

    uri = plot_partition(["a", "b"], counts, counts.sum(axis=1))

    assert _decode(uri).startswith(PNG_MAGIC)
