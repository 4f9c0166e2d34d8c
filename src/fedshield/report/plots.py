"""Figures for the HTML report, rendered to PNG ``data:`` URIs.

Matplotlib is imported inside the functions, so ``import fedshield.report``
stays cheap. Figures are built with the object-oriented API on an Agg canvas
and never go through :mod:`matplotlib.pyplot`: no GUI backend is touched, no
global figure registry grows, and the caller's own backend choice is left
alone (the approach matplotlib recommends for web servers).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "figure_to_data_uri",
    "metric_series",
    "plot_partition",
    "plot_training_curves",
    "round_number",
]

DPI = 100
"""Resolution of every report figure, in dots per inch."""

# Per-client tick labels are readable up to this many clients; beyond it the
# axis shows client indices instead.
MAX_LABELLED_CLIENTS = 50

# Write the count into each heat-map cell only while the cells stay legible.
_MAX_ANNOTATED_CELLS = 250
_MAX_TICK_LABEL_CHARS = 14

_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Accuracy",
        (
            ("accuracy", "test (centralised)"),
            ("federated_accuracy", "federated (client-side)"),
        ),
    ),
    (
        "RMSE",
        (
            ("rmse", "test (centralised)"),
            ("federated_rmse", "federated (client-side)"),
        ),
    ),
    (
        "Loss",
        (
            ("loss", "test (centralised)"),
            ("federated_loss", "federated (client-side)"),
            ("train_loss", "training"),
        ),
    ),
)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_data_uri(fig: Figure) -> str:
    """Render a figure to a base64 PNG ``data:`` URI and release it.

    Parameters
    ----------
    fig
        The figure to render; it is cleared afterwards and must not be reused.

    Returns
    -------
    str
        ``"data:image/png;base64,..."``, ready for an ``<img src>`` attribute.
    """
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    finally:
        fig.clear()
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/png;base64,{encoded}"


def _as_number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None if it is not one.

    Examples
    --------
    >>> _as_number(3), _as_number(0.5), _as_number(None), _as_number(True)
    (3.0, 0.5, None, None)
    >>> _as_number(float("nan")), _as_number("0.5")
    (None, None)
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def round_number(row: Mapping[str, Any], index: int) -> int:
    """Return the 1-based round of a metrics row, or ``index + 1`` if it has none.

    Parameters
    ----------
    row
        One metrics record.
    index
        Its 0-based position in the metrics log.

    Returns
    -------
    int
        The round number to show for this row.

    Examples
    --------
    >>> round_number({"round": 7}, 0), round_number({}, 4)
    (7, 5)
    """
    value = row.get("round")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return index + 1


def metric_series(
    metrics: Sequence[Mapping[str, Any]], key: str
) -> tuple[list[int], list[float]]:
    """Extract the rounds at which ``key`` has a finite value, and the values.

    Rounds where the metric is null, absent or not a number (for instance
    rounds skipped by ``eval_every``) are left out rather than plotted as 0.

    Parameters
    ----------
    metrics
        The per-round records, as :func:`fedshield.report.read_metrics` returns.
    key
        The metric to extract.

    Returns
    -------
    tuple of list
        The round numbers and the matching values.

    Examples
    --------
    >>> rows = [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": None},
    ...         {"round": 3, "accuracy": 0.75}]
    >>> metric_series(rows, "accuracy")
    ([1, 3], [0.5, 0.75])
    """
    rounds: list[int] = []
    values: list[float] = []
    for index, row in enumerate(metrics):
        value = _as_number(row.get(key))
        if value is not None:
            rounds.append(round_number(row, index))
            values.append(value)
    return rounds, values


def plot_training_curves(metrics: Sequence[Mapping[str, Any]]) -> str | None:
    """Plot accuracy and loss per round, side by side.

    The accuracy panel shows the centralised test accuracy and, when logged,
    the federated (client-side) accuracy; the loss panel shows test, federated
    and training loss, each when logged.

    Parameters
    ----------
    metrics
        The per-round records.

    Returns
    -------
    str or None
        A PNG ``data:`` URI, or None when no round has any of these metrics.
    """
    panels = [
        (title, [(label, *metric_series(metrics, key)) for key, label in series])
        for title, series in _PANELS
    ]
    if not any(rounds for _, series in panels for _, rounds, _ in series):
        return None
    # Accuracy for classification, RMSE for regression: the RMSE panel
    # shows only with data, and then replaces an empty accuracy panel.
    has = {title: any(r for _, r, _ in series) for title, series in panels}
    panels = [
        (title, series)
        for title, series in panels
        if has[title] or title == "Loss" or (title == "Accuracy" and not has["RMSE"])
    ]
    privacy = [("ε (δ fixed)", *metric_series(metrics, "epsilon"))]
    if privacy[0][1]:
        # A DP run: the accountant's ε after each round, beside accuracy.
        panels.append(("Privacy spent (accountant)", privacy))

    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(5.0 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels))
    for ax, (title, series) in zip(axes, panels, strict=True):
        plotted = 0
        for label, rounds, values in series:
            if not rounds:
                continue
            # Markers keep sparse series (eval_every > 1) visible as points.
            marker = "o" if len(rounds) <= 60 else None
            ax.plot(rounds, values, marker=marker, markersize=3.5, label=label)
            plotted += 1
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend(fontsize="small")
        else:
            ax.text(
                0.5,
                0.5,
                "not logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.5",
            )
    return figure_to_data_uri(fig)


def _tick_label(client_id: str) -> str:
    r"""Make a client id safe and short enough for a matplotlib tick label.

    A ``$`` would switch matplotlib to mathtext, where malformed input raises
    while drawing, so it is escaped.

    Examples
    --------
    >>> _tick_label("site-$3")
    'site-\\$3'
    >>> _tick_label("a-very-long-client-identifier")
    'a-very-long-c…'
    """
    if len(client_id) > _MAX_TICK_LABEL_CHARS:
        client_id = client_id[: _MAX_TICK_LABEL_CHARS - 1] + "…"
    return client_id.replace("$", r"\$")


_MAX_BARS = 500
"""Above this many clients, samples per client are drawn as one filled curve."""


def plot_partition(
    client_ids: Sequence[str],
    label_counts: NDArray[np.int64],
    num_samples: NDArray[np.int64],
) -> str:
    """Plot the per-client label distribution and the samples per client.

    Parameters
    ----------
    client_ids
        One id per client, in row order.
    label_counts
        Integer array of shape ``(num_clients, num_classes)``.
    num_samples
        Integer array of shape ``(num_clients,)``.

    Returns
    -------
    str
        A PNG ``data:`` URI: a heat map of counts (clients × classes, with a
        colorbar) and, sharing its client axis, a bar chart of samples.
    """
    key = (
        tuple(client_ids),
        label_counts.shape,
        np.ascontiguousarray(label_counts, dtype=np.int64).tobytes(),
        np.ascontiguousarray(num_samples, dtype=np.int64).tobytes(),
    )
    cached = _PARTITION_PLOTS.get(key)
    if cached is None:
        cached = _draw_partition(client_ids, label_counts, num_samples)
        _PARTITION_PLOTS.clear()  # one partition per process is the use
        _PARTITION_PLOTS[key] = cached
    return cached


# The last partition drawn: a report helper draws it early (see
# fedshield.report.prefetch) and the report reuses it.
_PARTITION_PLOTS: dict[tuple[Any, ...], str] = {}


def _draw_partition(
    client_ids: Sequence[str],
    label_counts: NDArray[np.int64],
    num_samples: NDArray[np.int64],
) -> str:
    from matplotlib.ticker import MaxNLocator

    num_clients = label_counts.shape[0]
    is_labelled = num_clients <= MAX_LABELLED_CLIENTS
    per_client = 0.26 if is_labelled else 0.06
    height = min(max(1.4 + per_client * num_clients, 3.0), 11.0)
    fig = _new_figure(10.0, height)
    grid = fig.add_gridspec(1, 2, width_ratios=(3.0, 1.2))
    ax_heat = fig.add_subplot(grid[0, 0])
    ax_bar = fig.add_subplot(grid[0, 1], sharey=ax_heat)

    image = ax_heat.imshow(
        label_counts, aspect="auto", cmap="Blues", interpolation="nearest"
    )
    colorbar = fig.colorbar(image, ax=ax_heat, pad=0.01)
    colorbar.set_label("samples")
    ax_heat.set_title("Label counts per client")
    ax_heat.set_xlabel("class")
    ax_heat.xaxis.set_major_locator(MaxNLocator(integer=True))
    if is_labelled:
        ax_heat.set_yticks(range(num_clients))
        ax_heat.set_yticklabels([_tick_label(c) for c in client_ids], fontsize=8)
        ax_heat.set_ylabel("client")
    else:
        ax_heat.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_heat.set_ylabel("client (row index)")
    if label_counts.size <= _MAX_ANNOTATED_CELLS:
        threshold = 0.6 * float(label_counts.max()) if label_counts.size else 0.0
        for (row, col), count in np.ndenumerate(label_counts):
            ax_heat.text(
                col,
                row,
                str(int(count)),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "0.25",
                # Cells sit inside the axes, so the layout pass need not
                # measure every label.
                in_layout=False,
            )

    if num_clients <= _MAX_BARS:
        ax_bar.barh(np.arange(num_clients), num_samples, color="#4c72b0", height=0.8)
    else:
        # One bar per client would cost seconds for 10,000 clients: draw the
        # sizes as one filled step curve over the same client axis instead.
        ax_bar.fill_betweenx(
            np.arange(num_clients), 0, num_samples, step="mid", color="#4c72b0"
        )
    ax_bar.set_title("Samples per client")
    ax_bar.set_xlabel("samples")
    ax_bar.tick_params(axis="y", labelleft=False)
    ax_bar.grid(True, axis="x", alpha=0.3)
    return figure_to_data_uri(fig)
