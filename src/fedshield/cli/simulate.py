"""``fedshield simulate``: progress bar, summary table, exit status."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedshield.api.config import load_config
from fedshield.core import ServerState

if TYPE_CHECKING:
    from fedshield.api.experiment import Federation

__all__ = ["run_simulate"]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_simulate(
    config_path: Path,
    *,
    overrides: Sequence[str],
    out: Path | None,
    resume: bool,
    overwrite: bool,
    as_json: bool,
    console: Console,
) -> dict[str, Any]:
    """Load the config, run it with a progress bar, print the summary."""
    from fedshield.api.run import simulate

    config = load_config(config_path, overrides)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "acc [cyan]{task.fields[acc]}[/] loss [magenta]{task.fields[loss]}[/]"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=as_json,
    )
    task = progress.add_task(
        "round", total=config.run.rounds, acc="-", loss="-", start=False
    )

    def on_start(federation: Federation, state: ServerState) -> None:
        if not as_json:
            console.print(
                f"[bold]{config.run.name}[/]: {config.strategy.name} on "
                f"{federation.dataset} ({federation.partition.method}), "
                f"{len(federation.client_ids)} clients, "
                f"{federation.model.spec.size:,} parameters, "
                f"{config.run.rounds} rounds"
                + (f", resuming after round {state.round_idx}" if resume else ""),
                highlight=False,
            )
        progress.update(task, completed=state.round_idx)
        progress.start()
        progress.start_task(task)

    def on_round(state: ServerState, record: Mapping[str, Any]) -> None:
        fields: dict[str, Any] = {}
        if record.get("accuracy") is not None:
            fields = {"acc": _fmt(record["accuracy"]), "loss": _fmt(record["loss"])}
        progress.update(
            task,
            completed=state.round_idx,
            description=f"round {state.round_idx}",
            **fields,
        )

    last: dict[str, Any] = {}
    try:
        summary, run_dir = simulate(
            config,
            out=out,
            resume=resume,
            overwrite=overwrite,
            on_start=on_start,
            on_round=on_round,
            on_summary=last.update,
            prefetch_report=True,
        )
    except BaseException:
        # Scripts reading --format json get the summary of a failed run too.
        if as_json and last:
            from fedshield.simulation.rundir import dumps

            typer.echo(dumps(last, indent=2))
        raise
    finally:
        progress.stop()
    if not as_json:
        table = Table(
            title=f"{summary['name']}: {summary['status']}", show_header=False
        )
        for key in ("rounds", "accuracy", "loss", "roc_auc"):
            if summary.get(key) is not None:
                value = summary[key]
                table.add_row(
                    key, _fmt(value) if isinstance(value, float) else str(value)
                )
        privacy = summary.get("privacy")
        if isinstance(privacy, dict) and privacy.get("mode") not in (None, "none"):
            table.add_row(
                "epsilon",
                f"{float(privacy.get('epsilon', 0.0)):.4g} "
                f"(delta {privacy.get('delta')}, {privacy.get('mode')})",
            )
            outside = privacy.get("outside_guarantee")
            if outside:
                table.add_row(
                    "not covered by epsilon", ", ".join(str(o) for o in outside)
                )
        table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
        table.add_row("backend", str(summary.get("backend", "")))
        if summary.get("status") != "completed" and summary.get("error"):
            table.add_row("why", str(summary["error"]))
        console.print(table)
        report = run_dir / "report.html"
        if config.run.report:
            console.print(f"report: [bold]{report}[/]", highlight=False)
        else:
            console.print(
                f"run folder: [bold]{run_dir}[/] (report: fedshield report {run_dir})",
                highlight=False,
            )
    return summary
