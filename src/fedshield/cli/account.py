"""``fedshield account``: ε of a subsampled Gaussian, or the σ for a target ε."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from fedshield.errors import ConfigError
from fedshield.privacy.accounting import (
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    AccountantKind,
    DpEventSpec,
    calibrate_noise_multiplier,
    epsilon_for,
    pld_value_discretization_interval,
)

__all__ = ["run_account"]


def run_account(
    *,
    sampling_rate: float,
    steps: int,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    accountant: AccountantKind = "pld",
    as_json: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Account ``steps`` Poisson-subsampled Gaussian releases, or calibrate σ.

    Give exactly one of ``noise_multiplier`` (report ε) and ``target_epsilon``
    (report the smallest σ that stays within it, and the ε it achieves).

    Parameters
    ----------
    sampling_rate
        q in (0, 1]: the probability that a record takes part in a step.
    steps
        Number of steps (or rounds), >= 1.
    delta
        Target δ in (0, 1).
    noise_multiplier
        σ > 0: noise std / L2 sensitivity.
    target_epsilon
        ε to calibrate σ for, > 0.
    accountant
        ``"pld"`` or ``"rdp"``.
    as_json
        Print nothing (the caller prints the returned dict as JSON).
    console
        Where the text summary goes (default: standard output).

    Returns
    -------
    dict
        ``epsilon``, ``delta``, ``accountant``, ``noise_multiplier``,
        ``sampling_rate``, ``steps``, and ``target_epsilon`` when calibrating;
        with PLD, ``pld_value_discretization_interval`` (the grid step used:
        coarser than 1e-3 only for tiny noise, to bound memory). Every value
        is valid JSON: where the accountant certifies no finite ε at
        ``delta`` (PLD below about 1e-15), ``epsilon`` is ``None`` and
        ``epsilon_unbounded`` says why.

    Raises
    ------
    ConfigError
        When both or neither of ``noise_multiplier`` and ``target_epsilon``
        are given, or a value is out of range (the message names it).
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError(
            "give exactly one of noise_multiplier (to get epsilon) and "
            "target_epsilon (to get the noise multiplier)"
        )
    summary: dict[str, Any] = {}
    if target_epsilon is not None:
        sigma = calibrate_noise_multiplier(
            target_epsilon,
            delta,
            sampling_rate=sampling_rate,
            steps=steps,
            accountant=accountant,
        )
        summary["target_epsilon"] = float(target_epsilon)
    else:
        assert noise_multiplier is not None
        sigma = float(noise_multiplier)
    eps = epsilon_for(sampling_rate, sigma, steps, delta, accountant)
    summary = {
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": float(delta),
        "accountant": accountant,
        "noise_multiplier": sigma,
        "sampling_rate": float(sampling_rate),
        "steps": int(steps),
        **summary,
    }
    if not math.isfinite(eps):
        summary["epsilon_unbounded"] = (
            f"the {accountant.upper()} accountant certifies no finite epsilon at "
            f"delta={delta:g}"
            + (
                " (it counts the tails it truncates, about 1e-15 of probability, "
                "as infinite privacy loss); use --accountant rdp or a larger delta"
                if accountant == "pld"
                else "; use a larger delta"
            )
        )
    if accountant == "pld":
        summary["pld_value_discretization_interval"] = (
            pld_value_discretization_interval(
                [
                    DpEventSpec(
                        sigma,
                        sampling="poisson",
                        sampling_rate=sampling_rate,
                        count=steps,
                    )
                ]
            )
        )
    if not as_json:
        _print_summary(summary, console or Console())
    return summary


def _print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    if "target_epsilon" in summary:
        table.add_row(
            "noise multiplier σ", f"[cyan]{summary['noise_multiplier']:.6g}[/]"
        )
        table.add_row(
            "ε achieved",
            f"{summary['epsilon']:.6g} (target {summary['target_epsilon']:g})",
        )
    elif summary["epsilon"] is None:
        table.add_row("ε", f"[red]unbounded[/]: {summary['epsilon_unbounded']}")
        table.add_row("noise multiplier σ", f"{summary['noise_multiplier']:g}")
    else:
        table.add_row("ε", f"[cyan]{summary['epsilon']:.6g}[/]")
        table.add_row("noise multiplier σ", f"{summary['noise_multiplier']:g}")
    table.add_row("δ", f"{summary['delta']:g}")
    table.add_row("sampling rate q", f"{summary['sampling_rate']:g}")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("accountant", summary["accountant"])
    interval = summary.get("pld_value_discretization_interval")
    if interval is not None and interval > PLD_VALUE_DISCRETIZATION_INTERVAL:
        table.add_row(
            "PLD grid step",
            f"{interval:.3g} (coarsened from {PLD_VALUE_DISCRETIZATION_INTERVAL:g} "
            "to bound memory: ε is an upper bound, looser than usual)",
        )
    console.print(table)
