"""The security matrix: attacks × defences, as a CSV table, a heat map and a page.

``fedshield analyze`` runs one simulation per (attack, defence) pair, plus a
no-attack run (attack ``"none"``) per defence, and hands one row per run to
:func:`write_matrix`. This module only tabulates and draws: it does no
training and imports neither the simulation layers nor torch; matplotlib
loads when the heat map is drawn.

A row is a mapping with these keys (absent keys count as None):

``attack``, ``defence``
    The pair's names; attack ``"none"`` is the defence's baseline.
``status``
    ``"completed"`` (or another status a finished run reports, such as
    ``"budget_exhausted"``), ``"refused"`` (the configuration or the rule's
    own requirement refused the pair before round 1) or ``"failed"`` (the run
    raised).
``accuracy``
    Final test accuracy, a fraction in [0, 1]; None for a regression model.
``rmse``
    Final test RMSE of a regression model (``[model] task = "regression"``),
    in the label's unit; lower is better. None for a classifier.
``asr``
    Attack success rate of a backdoor (the share of triggered test inputs
    classified as the target), a fraction; None for other attacks.
``seconds_per_round``, ``rounds``, ``epsilon``, ``error``
    Mean wall time of a round, rounds completed, the privacy ε spent (DP
    runs only) and the error message of a refused or failed run.

Verdicts (:func:`classify`): a cell under attack *fails* when its accuracy
drop exceeds :data:`ACCURACY_DROP_THRESHOLD` or its ASR exceeds
:data:`ASR_THRESHOLD`. The accuracy drop is a fraction (not points): the
same defence's no-attack accuracy minus this accuracy, rounded to 4
decimals. A regression cell (a run with an RMSE and no accuracy) fails
instead when its RMSE rise (:func:`rmse_rise`: its RMSE minus the same
defence's no-attack RMSE, relative to the latter, rounded to 4 decimals)
exceeds :data:`RMSE_RISE_THRESHOLD`. A failure the literature predicts
(:func:`known_failure`) is *known*; any other is *unexpected*. A refused
pair is not a failure of the defence: it is reported as
``refused: <message>``.

The attacks' and defences' descriptions on the page, and which rules are no
defence at all (tag ``"not_robust"``), come from the registries
:data:`~fedshield.models.attacks.ATTACKS` and
:data:`~fedshield.strategies.robust.RULES`, imported when first needed
(neither imports torch).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from fedshield._version import __version__
from fedshield.report.html import _CSP, _CSS, _esc
from fedshield.report.plots import DPI, _new_figure

if TYPE_CHECKING:
    from fedshield.core.registry import Registry

__all__ = [
    "ACCURACY_DROP_THRESHOLD",
    "ASR_THRESHOLD",
    "COLUMNS",
    "KNOWN_FAILURES",
    "NO_ATTACK",
    "RMSE_RISE_THRESHOLD",
    "MatrixFiles",
    "Verdict",
    "accuracy_drop",
    "classify",
    "known_failure",
    "render_matrix",
    "rmse_rise",
    "tabulate",
    "write_matrix",
]

ACCURACY_DROP_THRESHOLD: Final = 0.05
"""A cell fails when its accuracy drop (a fraction: 0.05 = 5 points) exceeds this."""

ASR_THRESHOLD: Final = 0.5
"""A cell fails when its backdoor attack success rate exceeds this."""

RMSE_RISE_THRESHOLD: Final = 0.10
"""A regression cell fails when its RMSE rise exceeds this (0.10: an RMSE 10 %
above the same defence's no-attack RMSE)."""

NO_ATTACK: Final = "none"
"""The attack name of each defence's baseline run."""

COLUMNS: Final[tuple[str, ...]] = (
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
    "rmse",
    "rmse_rise",
)
"""Columns of ``matrix.csv``, in order. ``accuracy``, ``accuracy_drop`` and
``asr`` are fractions with 4 decimals; empty cells mean "not measured".
``rmse`` (regression models only; 6 significant digits, in the label's unit)
and ``rmse_rise`` (relative, 4 decimals: 0.1000 = 10 % worse than the
defence's no-attack run) come last so that the earlier columns keep their
positions."""

_ALIE_REASON = (
    "ALIE sends updates within a few standard deviations of the benign mean, "
    "designed to pass {rule} (Baruch et al., A Little Is Enough, NeurIPS 2019)"
)
_IPM_REASON = (
    "IPM's small negative multiple of the benign mean defeats {rule} in some "
    "settings (Xie et al., Fall of Empires, UAI 2020)"
)

KNOWN_FAILURES: Final[Mapping[tuple[str, str], str]] = {
    ("alie", "krum"): _ALIE_REASON.format(rule="Krum"),
    ("alie", "multi_krum"): _ALIE_REASON.format(rule="Multi-Krum"),
    ("alie", "median"): _ALIE_REASON.format(rule="the coordinate-wise median"),
    ("alie", "trimmed_mean"): _ALIE_REASON.format(rule="the trimmed mean"),
    ("alie", "bulyan"): _ALIE_REASON.format(rule="Bulyan"),
    ("ipm", "krum"): _IPM_REASON.format(rule="Krum"),
    ("ipm", "multi_krum"): _IPM_REASON.format(rule="Multi-Krum"),
    ("ipm", "median"): _IPM_REASON.format(rule="the coordinate-wise median"),
}
"""(attack, defence) pairs the literature reports as broken, with the reason.

Besides these, every attack breaks a rule that is no robust rule at all
(:func:`known_failure`)."""

_NOT_ROBUST_REASON = (
    "{rule} is not a robust rule: one client can move it anywhere (breakdown "
    "point 0; Blanchard et al., NeurIPS 2017)"
)


def _attacks() -> Registry[Any]:
    from fedshield.models.attacks import ATTACKS

    return ATTACKS


def _rules() -> Registry[Any]:
    from fedshield.strategies.robust import RULES

    return RULES


def known_failure(attack: str, defence: str) -> str | None:
    """Why the literature expects ``attack`` to break ``defence``; None if not.

    The pairs of :data:`KNOWN_FAILURES`, and any attack against a rule tagged
    ``"not_robust"`` in :data:`~fedshield.strategies.robust.RULES` (the
    weighted mean of FedAvg).

    Examples
    --------
    >>> known_failure("sign_flip", "fedavg")[:40]
    'fedavg is not a robust rule: one client '
    >>> known_failure("sign_flip", "median") is None
    True
    """
    reason = KNOWN_FAILURES.get((attack, defence))
    if reason is not None or attack == NO_ATTACK:
        return reason
    rules = _rules()
    if defence in rules and "not_robust" in rules.tags(defence):
        return _NOT_ROBUST_REASON.format(rule=defence)
    return None


Outcome = Literal[
    "baseline",
    "held",
    "known_failure",
    "unexpected_failure",
    "refused",
    "failed",
    "undetermined",
]

_REFUSED: Final = "refused"
_FAILED: Final = "failed"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a cell of the matrix says about its defence.

    Parameters
    ----------
    outcome
        ``"baseline"`` (a no-attack run), ``"held"``, ``"known_failure"``,
        ``"unexpected_failure"``, ``"refused"`` (not a failure of the
        defence), ``"failed"`` (the run raised: no verdict) or
        ``"undetermined"`` (no baseline to compare with).
    reasons
        Why, in words: the thresholds crossed, or the error message.
    reference
        For a pair the literature expects to fail (:func:`known_failure`),
        its reason.
    """

    outcome: Outcome
    reasons: tuple[str, ...] = ()
    reference: str | None = None

    @property
    def is_failure(self) -> bool:
        """Whether the defence failed against the attack (known or not)."""
        return self.outcome in ("known_failure", "unexpected_failure")


@dataclass(frozen=True, slots=True)
class MatrixFiles:
    """The files :func:`write_matrix` wrote."""

    csv: Path
    png: Path
    html: Path


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _is_run(row: Mapping[str, Any]) -> bool:
    """Whether the row is a run that finished with an accuracy or an RMSE."""
    return row.get("status") not in (_REFUSED, _FAILED) and (
        _number(row.get("accuracy")) is not None or _number(row.get("rmse")) is not None
    )


def _measure(row: Mapping[str, Any], key: str) -> float | None:
    """``row[key]`` as a finite number if the row is a finished run, else None."""
    return _number(row.get(key)) if _is_run(row) else None


def _is_regression(row: Mapping[str, Any]) -> bool:
    """Whether the row is a finished regression run (an RMSE, no accuracy)."""
    return _measure(row, "rmse") is not None and _measure(row, "accuracy") is None


def accuracy_drop(
    row: Mapping[str, Any], baseline: Mapping[str, Any] | None
) -> float | None:
    """The baseline's accuracy minus the row's, a fraction rounded to 4 decimals.

    Parameters
    ----------
    row
        A run under attack.
    baseline
        The same defence's no-attack run, or None.

    Returns
    -------
    float or None
        None when either run has no accuracy (refused, failed, missing).

    Examples
    --------
    >>> accuracy_drop({"accuracy": 0.85}, {"accuracy": 0.9})
    0.05
    >>> accuracy_drop({"accuracy": 0.95}, {"accuracy": 0.9})
    -0.05
    >>> accuracy_drop({"accuracy": 0.5}, {"status": "refused"}) is None
    True
    """
    if baseline is None:
        return None
    accuracy, base = _measure(row, "accuracy"), _measure(baseline, "accuracy")
    if accuracy is None or base is None:
        return None
    drop = base - accuracy
    # Rounded as the CSV shows it, so the verdict agrees with the table
    # (0.90 - 0.85 is 0.05000000000000004 in binary floating point).
    return round(drop, 4) + 0.0


def rmse_rise(
    row: Mapping[str, Any], baseline: Mapping[str, Any] | None
) -> float | None:
    """The row's RMSE above the baseline's, relative to it, rounded to 4 decimals.

    ``(rmse - baseline_rmse) / baseline_rmse``: 0.1 means 10 % worse than the
    same defence without attack; negative means better.

    Parameters
    ----------
    row
        A run under attack.
    baseline
        The same defence's no-attack run, or None.

    Returns
    -------
    float or None
        None when either run has no RMSE (a classifier, refused, failed,
        missing) or the baseline's RMSE is 0 (no relative rise exists).

    Examples
    --------
    >>> rmse_rise({"rmse": 0.55}, {"rmse": 0.5})
    0.1
    >>> rmse_rise({"rmse": 0.4}, {"rmse": 0.5})
    -0.2
    >>> rmse_rise({"rmse": 0.4}, {"rmse": 0.0}) is None
    True
    >>> rmse_rise({"rmse": 0.4}, {"status": "failed"}) is None
    True
    """
    if baseline is None:
        return None
    rmse, base = _measure(row, "rmse"), _measure(baseline, "rmse")
    if rmse is None or base is None or base == 0:
        return None
    # Rounded as the CSV shows it, so the verdict agrees with the table.
    return round((rmse - base) / base, 4) + 0.0


def _error(row: Mapping[str, Any]) -> str:
    error = row.get("error")
    return str(error) if error not in (None, "") else "no message"


def classify(row: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> Verdict:
    """The verdict of one cell.

    Parameters
    ----------
    row
        The run (see the module docstring for its keys).
    baseline
        The same defence's no-attack run, or None if there is none.

    Returns
    -------
    Verdict
        ``failure`` when the accuracy drop exceeds
        :data:`ACCURACY_DROP_THRESHOLD`, the ASR exceeds
        :data:`ASR_THRESHOLD` or (regression) the RMSE rise exceeds
        :data:`RMSE_RISE_THRESHOLD`; known when :func:`known_failure` gives
        a reason.

    Examples
    --------
    >>> classify({"attack": "alie", "defence": "krum", "accuracy": 0.6},
    ...          {"attack": "none", "defence": "krum", "accuracy": 0.9}).outcome
    'known_failure'
    >>> classify({"attack": "sign_flip", "defence": "median", "accuracy": 0.88},
    ...          {"attack": "none", "defence": "median", "accuracy": 0.9}).outcome
    'held'
    >>> classify({"attack": "none", "defence": "bulyan", "status": "refused",
    ...           "error": "Bulyan needs n >= 7"}, None).reasons
    ('refused: Bulyan needs n >= 7',)
    >>> classify({"attack": "gaussian", "defence": "median", "rmse": 0.6},
    ...          {"attack": "none", "defence": "median", "rmse": 0.5}).reasons
    ('RMSE rise 0.2000 > 0.1',)
    """
    status = row.get("status")
    if status == _REFUSED:
        return Verdict("refused", (f"refused: {_error(row)}",))
    if status == _FAILED or not _is_run(row):
        return Verdict("failed", (f"failed: {_error(row)}",))
    attack, defence = str(row.get("attack")), str(row.get("defence"))
    if attack == NO_ATTACK:
        return Verdict("baseline")
    reference = known_failure(attack, defence)
    drop = accuracy_drop(row, baseline)
    rise = rmse_rise(row, baseline)
    asr = _number(row.get("asr"))
    reasons = []
    if drop is not None and drop > ACCURACY_DROP_THRESHOLD:
        reasons.append(f"accuracy drop {drop:.4f} > {ACCURACY_DROP_THRESHOLD}")
    if rise is not None and rise > RMSE_RISE_THRESHOLD:
        reasons.append(f"RMSE rise {rise:.4f} > {RMSE_RISE_THRESHOLD}")
    if asr is not None and asr > ASR_THRESHOLD:
        reasons.append(f"attack success rate {asr:.4f} > {ASR_THRESHOLD}")
    if reasons:
        outcome: Outcome = "known_failure" if reference else "unexpected_failure"
        return Verdict(outcome, tuple(reasons), reference)
    if drop is None and rise is None:
        why = (
            "its no-attack run was refused"
            if baseline is not None and baseline.get("status") == _REFUSED
            else "its no-attack run did not finish"
        )
        if _is_regression(row):
            if baseline is not None and _measure(baseline, "rmse") == 0:
                why = "its no-attack RMSE is 0"
            measure = "RMSE"
        else:
            measure = "accuracy"
        return Verdict(
            "undetermined",
            (f"no baseline {measure} for {defence}: {why}",),
            reference,
        )
    return Verdict("held", (), reference)


def _order(values: Iterable[str], first: str | None = None) -> list[str]:
    seen = dict.fromkeys(values)
    ordered = list(seen)
    if first is not None and first in seen:
        ordered.remove(first)
        ordered.insert(0, first)
    return ordered


def tabulate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows with ``accuracy_drop``, ``rmse_rise`` and ``verdict`` filled in.

    Parameters
    ----------
    rows
        One per run; the baseline of a defence is its row with attack
        :data:`NO_ATTACK` (the last one if several).

    Returns
    -------
    list of dict
        Copies of ``rows`` in the same order, each with every key of
        :data:`COLUMNS` (None where not measured) and a ``"_verdict"``
        (:class:`Verdict`).
    """
    baselines = {
        str(row.get("defence")): row
        for row in rows
        if str(row.get("attack")) == NO_ATTACK
    }
    table = []
    for row in rows:
        baseline = baselines.get(str(row.get("defence")))
        verdict = classify(row, baseline)
        entry: dict[str, Any] = {key: row.get(key) for key in COLUMNS}
        entry.update({k: v for k, v in row.items() if k not in entry})
        is_baseline = str(row.get("attack")) == NO_ATTACK
        entry["accuracy_drop"] = None if is_baseline else accuracy_drop(row, baseline)
        entry["rmse_rise"] = None if is_baseline else rmse_rise(row, baseline)
        entry["verdict"] = verdict.outcome
        entry["_verdict"] = verdict
        table.append(entry)
    return table


# -- CSV ---------------------------------------------------------------------

_FOUR_DECIMALS: Final = frozenset(
    {"accuracy", "accuracy_drop", "asr", "seconds_per_round", "epsilon", "rmse_rise"}
)


_SIGNIFICANT: Final = frozenset({"rmse"})
"""Columns in the label's unit, of any scale: 6 significant digits."""


def _csv_value(key: str, value: object) -> str:
    if value is None:
        return ""
    number = _number(value)
    if key in _FOUR_DECIMALS and number is not None:
        return f"{number:.4f}"
    if key in _SIGNIFICANT and number is not None:
        return f"{number:.6g}"
    return str(value)


def _render_csv(table: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in table:
        writer.writerow([_csv_value(key, row.get(key)) for key in COLUMNS])
    return buffer.getvalue()


# -- heat map ----------------------------------------------------------------

_CELL_MARKS: Final[Mapping[str, str]] = {
    "known_failure": "FAIL (known)",
    "unexpected_failure": "FAIL",
    "undetermined": "no baseline",
}


def _regression_table(table: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the table is of a regression model: RMSEs and no accuracy."""
    return any(_is_regression(r) for r in table) and not any(
        _measure(r, "accuracy") is not None for r in table
    )


def _regression_lines(row: Mapping[str, Any]) -> list[str]:
    lines = [f"rmse {float(row['rmse']):.4g}"]
    rise = _number(row.get("rmse_rise"))
    if row["_verdict"].outcome == "baseline":
        lines.append("baseline")
    elif rise is not None:
        lines.append(f"{rise:+.1%}")
    return lines


def _cell_text(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "—"
    verdict: Verdict = row["_verdict"]
    if verdict.outcome == "refused":
        return "refused"
    if verdict.outcome == "failed":
        return "error"
    if _is_regression(row):
        lines = _regression_lines(row)
    else:
        lines = [f"{float(row['accuracy']):.2f}"]
    asr = _number(row.get("asr"))
    if asr is not None:
        lines.append(f"asr {asr:.2f}")
    mark = _CELL_MARKS.get(verdict.outcome)
    if mark:
        lines.append(mark)
    return "\n".join(lines)


def _heat_value(row: Mapping[str, Any] | None, regression: bool) -> float:
    """The colour value of a cell: accuracy, or (regression) the RMSE rise."""
    if row is None or not _is_run(row):
        return math.nan
    if not regression:
        accuracy = _number(row.get("accuracy"))
        return math.nan if accuracy is None else accuracy
    if row["_verdict"].outcome == "baseline":
        return 0.0  # the reference of its own column
    rise = _number(row.get("rmse_rise"))
    return math.nan if rise is None else rise


def _draw_heat_map(table: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """The heat map (attacks × defences) as PNG bytes.

    Classification: coloured by test accuracy, 0 (red) to 1 (green).
    Regression: by RMSE rise over the defence's no-attack run, 0 (green; the
    baselines, by definition) to ``2 * RMSE_RISE_THRESHOLD`` and above (red);
    the cells show the RMSE itself.
    """
    from matplotlib.patches import Rectangle

    regression = _regression_table(table)
    attacks = _order((str(r["attack"]) for r in table), first=NO_ATTACK)
    defences = _order(str(r["defence"]) for r in table)
    cells = {(str(r["attack"]), str(r["defence"])): r for r in table}
    values = np.full((len(attacks), len(defences)), np.nan)
    for (i, attack), (j, defence) in (
        (a, d) for a in enumerate(attacks) for d in enumerate(defences)
    ):
        values[i, j] = _heat_value(cells.get((attack, defence)), regression)

    fig = _new_figure(
        min(2.4 + 1.15 * len(defences), 16.0), min(1.6 + 0.62 * len(attacks), 12.0)
    )
    ax = fig.add_subplot()
    from matplotlib import colormaps
    from matplotlib.ticker import PercentFormatter

    if regression:
        # Lower is better: green at no rise, red from twice the threshold on
        # (values beyond either end take the end's colour).
        cmap = colormaps["RdYlGn_r"].with_extremes(bad="#d0d7de")
        vmax, label = 2 * RMSE_RISE_THRESHOLD, "RMSE rise over no-attack run"
    else:
        cmap = colormaps["RdYlGn"].with_extremes(bad="#d0d7de")
        vmax, label = 1.0, "test accuracy"
    image = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=cmap,
        vmin=0.0,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
    )
    colorbar = fig.colorbar(image, ax=ax, pad=0.01)
    colorbar.set_label(label)
    if regression:
        # 0, threshold / 2, threshold, ...: the threshold is a tick.
        colorbar.set_ticks([vmax * k / 4 for k in range(5)])
        colorbar.formatter = PercentFormatter(xmax=1.0, decimals=0)
        colorbar.update_ticks()
    ax.set_xticks(range(len(defences)))
    ax.set_xticklabels(defences, rotation=30, ha="right")
    ax.set_yticks(range(len(attacks)))
    ax.set_yticklabels(attacks)
    ax.set_xlabel("defence")
    ax.set_ylabel("attack")
    ax.set_title(title)
    for (i, j), _ in np.ndenumerate(values):
        row = cells.get((attacks[i], defences[j]))
        verdict = row["_verdict"] if row is not None else None
        is_failure = verdict is not None and verdict.is_failure
        ax.text(
            j,
            i,
            _cell_text(row),
            ha="center",
            va="center",
            fontsize=7,
            fontweight="bold" if is_failure else "normal",
            color="0.1",
            in_layout=False,
        )
        if is_failure:
            ax.add_patch(
                Rectangle(
                    (j - 0.48, i - 0.48),
                    0.96,
                    0.96,
                    fill=False,
                    edgecolor="#a40e26",
                    linewidth=2.0,
                    in_layout=False,
                )
            )
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    finally:
        fig.clear()
    return buffer.getvalue()


# -- HTML --------------------------------------------------------------------

_BADGES: Final[Mapping[str, tuple[str, str]]] = {
    "baseline": ("neutral", "baseline"),
    "held": ("ok", "held"),
    "known_failure": ("bad", "fails (known)"),
    "unexpected_failure": ("bad", "fails (unexpected)"),
    "refused": ("warn", "refused"),
    "failed": ("bad", "run failed"),
    "undetermined": ("neutral", "undetermined"),
}

_HEADERS: Final[tuple[tuple[str, str, bool], ...]] = (
    ("attack", "Attack", False),
    ("defence", "Defence", False),
    ("verdict", "Verdict", False),
    ("accuracy", "Accuracy", True),
    ("accuracy_drop", "Accuracy drop", True),
    ("asr", "ASR", True),
    ("seconds_per_round", "s / round", True),
    ("epsilon", "ε", True),
    ("note", "Note", False),
)

_REGRESSION_HEADERS: Final[Mapping[str, tuple[str, str, bool]]] = {
    "accuracy": ("rmse", "RMSE", True),
    "accuracy_drop": ("rmse_rise", "RMSE rise", True),
}
"""In a regression table, the accuracy columns give way to these."""


def _pair(row: Mapping[str, Any]) -> str:
    return f"{row['attack']} against {row['defence']}"


def _join(items: Sequence[str]) -> str:
    return "; ".join(items)


def _verdict_section(table: Sequence[Mapping[str, Any]]) -> str:
    attacked = [r for r in table if str(r["attack"]) != NO_ATTACK]
    by_outcome: dict[str, list[Mapping[str, Any]]] = {}
    for row in table:
        by_outcome.setdefault(row["_verdict"].outcome, []).append(row)
    known = by_outcome.get("known_failure", [])
    unexpected = by_outcome.get("unexpected_failure", [])
    judged = [
        r
        for r in attacked
        if r["_verdict"].outcome in ("held", "known_failure", "unexpected_failure")
    ]
    if _regression_table(table):
        rule = (
            f"Regression model (lower RMSE is better): a cell fails when its "
            f"RMSE rise (its RMSE minus the same defence's no-attack RMSE, "
            f"relative to the latter) exceeds {RMSE_RISE_THRESHOLD} "
            f"({RMSE_RISE_THRESHOLD:.0%} worse)."
        )
    else:
        rule = (
            f"A cell fails when its accuracy drop (the same defence's no-attack "
            f"accuracy minus its accuracy, as a fraction) exceeds "
            f"{ACCURACY_DROP_THRESHOLD} or the backdoor's attack success rate "
            f"exceeds {ASR_THRESHOLD}."
        )
    paragraphs = [rule]
    if not known and not unexpected:
        paragraphs.append(
            f"No cell fails: every defence held in the {len(judged)} attacked "
            "cells that could be judged."
        )
    else:
        paragraphs.append(
            f"{len(known) + len(unexpected)} of {len(judged)} judged attacked cells "
            f"fail: {len(known)} known, {len(unexpected)} unexpected."
        )
    if unexpected:
        paragraphs.append(
            "<strong>Unexpected failures</strong>: "
            + _join(
                [
                    f"{_esc(_pair(r))} ({_esc(', '.join(r['_verdict'].reasons))})"
                    for r in unexpected
                ]
            )
            + "."
        )
    if known:
        paragraphs.append(
            "<strong>Known failures</strong>, expected from the literature: "
            + _join(
                [
                    f"{_esc(_pair(r))} ({_esc(', '.join(r['_verdict'].reasons))}): "
                    f"{_esc(r['_verdict'].reference)}"
                    for r in known
                ]
            )
            + "."
        )
    held_known = [r for r in by_outcome.get("held", []) if r["_verdict"].reference]
    if held_known:
        paragraphs.append(
            "Held here although the literature reports breaks in some settings: "
            + _esc(", ".join(_pair(r) for r in held_known))
            + "."
        )
    refused = by_outcome.get("refused", [])
    if refused:
        groups: dict[tuple[str, str], list[str]] = {}
        for row in refused:
            key = (str(row["defence"]), _error(row))
            groups.setdefault(key, []).append(str(row["attack"]))
        paragraphs.append(
            "<strong>Refused</strong> (the configuration or the rule's own "
            "requirement, not a failure of the defence): "
            + _join(
                [
                    f"{_esc(defence)} under {_esc(', '.join(attacks))} — "
                    f"refused: {_esc(message)}"
                    for (defence, message), attacks in groups.items()
                ]
            )
            + "."
        )
    failed = by_outcome.get("failed", [])
    if failed:
        paragraphs.append(
            "<strong>Runs that failed</strong> (no verdict): "
            + _join([f"{_esc(_pair(r))}: {_esc(_error(r))}" for r in failed])
            + "."
        )
    undetermined = by_outcome.get("undetermined", [])
    if undetermined:
        paragraphs.append(
            "<strong>Undetermined</strong> (no baseline to compare with): "
            + _esc(", ".join(_pair(r) for r in undetermined))
            + "."
        )
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return f"<section><h2>Verdict</h2>{body}</section>"


def _html_cell(key: str, row: Mapping[str, Any]) -> str:
    verdict: Verdict = row["_verdict"]
    if key == "verdict":
        css, label = _BADGES[verdict.outcome]
        return f'<td><span class="badge {css}">{_esc(label)}</span></td>'
    if key == "note":
        note = list(verdict.reasons)
        if verdict.reference and verdict.outcome != "undetermined":
            note.append(verdict.reference)
        return f"<td>{_esc('; '.join(note))}</td>" if note else "<td></td>"
    value = row.get(key)
    number = _number(value)
    if number is not None and key in _SIGNIFICANT:
        return f'<td class="num">{number:.6g}</td>'
    if number is not None:
        return f'<td class="num">{number:.4f}</td>'
    if value is None:
        return '<td class="missing">—</td>'
    return f"<td>{_esc(value)}</td>"


def _table_section(table: Sequence[Mapping[str, Any]]) -> str:
    has_epsilon = any(_number(r.get("epsilon")) is not None for r in table)
    has_asr = any(_number(r.get("asr")) is not None for r in table)
    regression = _regression_table(table)
    headers = [
        _REGRESSION_HEADERS.get(h[0], h) if regression else h
        for h in _HEADERS
        if (h[0] != "epsilon" or has_epsilon) and (h[0] != "asr" or has_asr)
    ]
    num = ' class="num"'
    head = "".join(
        f'<th{num if is_num else ""} scope="col">{_esc(label)}</th>'
        for _, label, is_num in headers
    )
    body = "".join(
        "<tr>" + "".join(_html_cell(key, row) for key, _, _ in headers) + "</tr>"
        for row in table
    )
    note = (
        "RMSE is the final test root mean squared error, in the label's unit "
        "(lower is better). The RMSE rise is this RMSE minus the same "
        "defence's no-attack RMSE, relative to the latter (0.1000 = 10 % "
        "worse; negative: better)."
        if regression
        else "Accuracy, accuracy drop and ASR are fractions (0.05 = 5 points). "
        "The accuracy drop is the same defence's no-attack accuracy minus "
        "this accuracy."
    )
    return (
        "<section><h2>All runs</h2>"
        f'<p class="note">{note}</p>'
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div></section>"
    )


def _time_section(table: Sequence[Mapping[str, Any]]) -> str:
    times: dict[str, list[float]] = {}
    for row in table:
        seconds = _number(row.get("seconds_per_round"))
        if seconds is not None:
            times.setdefault(str(row["defence"]), []).append(seconds)
    if not times:
        return (
            "<section><h2>Time per round</h2>"
            '<p class="note">No run completed a round.</p></section>'
        )
    body = "".join(
        f'<tr><th scope="row">{_esc(defence)}</th>'
        f'<td class="num">{float(np.mean(values)):.4f}</td>'
        f'<td class="num">{max(values):.4f}</td>'
        f'<td class="num">{len(values)}</td></tr>'
        for defence, values in times.items()
    )
    return (
        "<section><h2>Time per round</h2>"
        '<p class="note">Wall seconds per round of each defence\'s runs '
        "(client training included; runs that ran in parallel share the "
        "machine).</p>"
        '<table><thead><tr><th scope="col">Defence</th>'
        '<th class="num" scope="col">mean s / round</th>'
        '<th class="num" scope="col">max s / round</th>'
        '<th class="num" scope="col">runs</th></tr></thead>'
        f"<tbody>{body}</tbody></table></section>"
    )


def _names_section(table: Sequence[Mapping[str, Any]]) -> str:
    """What each attack and defence of the table does (from the registries)."""
    rows = []
    for column, title, registry in (
        ("attack", "Attack", _attacks()),
        ("defence", "Defence", _rules()),
    ):
        described = registry.descriptions()
        for name in _order((str(r[column]) for r in table), first=NO_ATTACK):
            rows.append(
                f'<tr><th scope="row">{_esc(title)} {_esc(name)}</th>'
                f"<td>{_esc(described.get(name, ''))}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<section><h2>Attacks and defences</h2>"
        f'<table class="kv"><tbody>{"".join(rows)}</tbody></table></section>'
    )


def _settings_section(settings: Mapping[str, Any] | None) -> str:
    if not settings:
        return ""
    body = "".join(
        f'<tr><th scope="row">{_esc(key)}</th><td>{_esc(value)}</td></tr>'
        for key, value in settings.items()
    )
    return (
        "<section><h2>Settings</h2>"
        f'<table class="kv"><tbody>{body}</tbody></table></section>'
    )


def render_matrix(
    table: Sequence[Mapping[str, Any]],
    *,
    png: bytes | None,
    title: str,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """The matrix page: verdict in words, heat map, table, time per round.

    Parameters
    ----------
    table
        The output of :func:`tabulate`.
    png
        The heat map (PNG bytes), embedded as a ``data:`` URI; None: left out.
    title
        The page title.
    settings
        Shown as a key/value table (config file, fraction, f, rounds, ...).

    Returns
    -------
    str
        A self-contained HTML document (inline CSS, no script, no network).
    """
    import base64

    if _regression_table(table):
        heading, note, alt = (
            "RMSE under attack",
            "Rows: attacks (none = no attack); columns: defences. Each cell "
            "shows its test RMSE; the colour is its RMSE rise over the same "
            "defence's no-attack run, from green (0: the baselines) to red "
            f"({2 * RMSE_RISE_THRESHOLD:.0%} and above). Failing cells (a rise "
            f"above {RMSE_RISE_THRESHOLD:.0%}) are framed in red; grey cells "
            "have no RMSE rise.",
            "Heat map of test RMSE rise per attack and defence",
        )
    else:
        heading, note, alt = (
            "Accuracy under attack",
            "Rows: attacks (none = no attack); columns: defences. "
            "Failing cells are framed in red; grey cells have no accuracy.",
            "Heat map of test accuracy per attack and defence",
        )
    figure = (
        f"<section><h2>{heading}</h2>"
        f'<p class="note">{note}</p>'
        f'<img alt="{alt}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        "</section>"
        if png is not None
        else ""
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)} · fedshield security matrix</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<header><h1>{_esc(title)}</h1>",
        "<p>fedshield security matrix: attacks × defences</p></header>",
        _verdict_section(table),
        figure,
        _table_section(table),
        _time_section(table),
        _names_section(table),
        _settings_section(settings),
        f"<footer>Generated by fedshield {_esc(__version__)}. This page is "
        "self-contained and loads nothing from the network.</footer>",
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def write_matrix(
    rows: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    title: str = "Security matrix",
    settings: Mapping[str, Any] | None = None,
) -> MatrixFiles:
    """Write ``matrix.csv``, ``matrix.png`` and ``matrix.html`` into ``out_dir``.

    Parameters
    ----------
    rows
        One per run (see the module docstring), baselines (attack
        :data:`NO_ATTACK`) included.
    out_dir
        Created if missing; existing matrix files are replaced.
    title
        Title of the page and the heat map.
    settings
        Shown in the page's settings table.

    Returns
    -------
    MatrixFiles
        The three paths.

    Notes
    -----
    ``matrix.csv`` has the :data:`COLUMNS`; ``accuracy_drop`` is a fraction
    with 4 decimals (0.0500 = 5 points), empty for baselines and where a
    run has no accuracy. For a regression model ``accuracy`` and
    ``accuracy_drop`` are empty and ``rmse`` and ``rmse_rise`` (relative,
    4 decimals; empty for baselines) are filled instead.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = tabulate(rows)
    files = MatrixFiles(
        csv=out_dir / "matrix.csv",
        png=out_dir / "matrix.png",
        html=out_dir / "matrix.html",
    )
    files.csv.write_text(_render_csv(table), encoding="utf-8", newline="")
    png = _draw_heat_map(table, title) if table else None
    if png is not None:
        files.png.write_bytes(png)
    else:
        files.png.unlink(missing_ok=True)
    page = render_matrix(table, png=png, title=title, settings=settings)
    files.html.write_text(page, encoding="utf-8", newline="\n")
    return files
