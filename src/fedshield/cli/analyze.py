"""``fedshield analyze``: the security matrix of attacks × defences.

Every (attack, defence) pair asked for, plus a no-attack run (attack
``"none"``) per defence as its baseline, is one simulation of the same
configuration file. Each pair's configuration is the file with:

- ``[robust]`` set for the defence: ``rule``; ``f`` = ⌊fraction × clients
  per round⌋ for the rules that take it (tagged ``"needs_f"`` in
  :data:`~fedshield.strategies.robust.RULES`); ``max_norm`` for those that
  take a bound (``"needs_max_norm"``: ``norm_bound``; ``--max-norm``;
  default: the file's ``robust.max_norm``, else :data:`DEFAULT_MAX_NORM`).
  The file's keys that belong to one rule (``rule``, ``f``, ``m``,
  ``beta``, ``max_norm``, ``noise_std``) are dropped, the others
  (``root_size``) kept. ``--set robust.max_norm`` is
  ``norm_bound``'s bound too; ``--set robust.rule`` and ``robust.f`` are
  refused; another ``--set robust.KEY=V`` applies to every pair (a rule that
  does not take the key is then refused).
- ``attack.kind`` and ``attack.fraction`` set; other ``[attack]`` keys of the
  file (``target_label``, ``boost``, ...) kept.
- ``run.name = "<name>-<attack>-<defence>"`` and ``run.report = false``.

Each run writes its folder to ``OUT/runs/<attack>__<defence>``; the matrix
(:mod:`fedshield.report.matrix`) goes to ``OUT/matrix.{csv,png,html}``. A pair
that the configuration refuses (an unsupported rule, Bulyan's n ≥ 4f + 3,
...) becomes a row with status ``"refused"``, a run that raises one with
status ``"failed"``; neither stops the analysis.

The attack and defence names, and their descriptions, come from the
registries :data:`~fedshield.models.attacks.ATTACKS` and
:data:`~fedshield.strategies.robust.RULES` (:func:`attack_names`,
:func:`defence_names`): a rule registered there is a defence here.
"""

from __future__ import annotations

import difflib
import json
import math
import multiprocessing
import os
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedshield.api.config import (
    ExperimentConfig,
    apply_overrides,
    load_config,
    parse_config,
    resolve_paths,
)
from fedshield.errors import ConfigError, FedShieldError
from fedshield.models.attacks import ATTACKS
from fedshield.strategies.robust import RULES

if TYPE_CHECKING:
    from fedshield.report.matrix import MatrixFiles

__all__ = [
    "DEFAULT_MAX_NORM",
    "Pair",
    "attack_names",
    "defence_names",
    "parse_names",
    "plan_pairs",
    "run_analyze",
    "run_pair",
]


def attack_names() -> tuple[str, ...]:
    """The names ``--attacks`` accepts: those of ``[attack] kind`` (ATTACKS)."""
    return ATTACKS.names()


def defence_names() -> tuple[str, ...]:
    """The names ``--defences`` accepts: the robust rules (``fedavg``: the mean)."""
    return RULES.names()


DEFAULT_MAX_NORM: Final = 1.0
"""``norm_bound``'s L2 bound on each update when neither ``--max-norm`` nor the
file's ``robust.max_norm`` gives one.

Of the order of honest update norms of the bundled small models (logistic or
MLP on digits: 0.3 to 4, see ``robust/norm_median`` in ``metrics.jsonl``); a
bound well below them slows training, one well above them clips nothing.
"""

_NO_ATTACK: Final = "none"

_PER_RULE_KEYS: Final = frozenset({"rule", "f", "m", "beta", "max_norm", "noise_std"})
"""``[robust]`` keys of the file that belong to one rule: dropped, so that the
file's own rule's settings do not refuse the other columns."""


@dataclass(frozen=True, slots=True)
class Pair:
    """One run of the matrix.

    Parameters
    ----------
    attack, defence
        The pair's names.
    base
        The configuration file's contents (``[robust]``'s per-rule keys
        removed, ``--set`` applied), as nested dicts.
    overrides
        The pair's ``key=value`` overrides, applied to ``base``.
    out
        The run folder.
    """

    attack: str
    defence: str
    base: Mapping[str, Any]
    overrides: tuple[str, ...]
    out: Path


def parse_names(text: str, valid: Sequence[str], option: str) -> tuple[str, ...]:
    """Split a comma-separated list and check every name.

    Parameters
    ----------
    text
        For example ``"alie,ipm"``; blanks around names are ignored and
        repeats dropped.
    valid
        The accepted names.
    option
        The option's name, for the message (``"--attacks"``).

    Raises
    ------
    ConfigError
        If the list is empty or a name is unknown; the message lists the
        valid names.

    Examples
    --------
    >>> parse_names(" alie, ipm,alie ", ["alie", "ipm"], "--attacks")
    ('alie', 'ipm')
    """
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    listing = ", ".join(valid)
    if not names:
        raise ConfigError(f"{option} needs at least one name; valid: {listing}")
    unknown = [n for n in names if n not in valid]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
            hints.append(
                f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        raise ConfigError(
            f"{option}: unknown name{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(hints)}; valid: {listing}"
        )
    return names


def _check_fraction(fraction: float) -> None:
    if not (math.isfinite(fraction) and 0.0 < fraction < 0.5):
        raise ConfigError(
            f"--fraction (the share of malicious clients) must be in (0, 0.5); "
            f"got {fraction}: at half the clients or more no aggregation rule can "
            "tell the attackers apart"
        )


def _num_clients(config: ExperimentConfig) -> int:
    """The federation's clients: from the config, or (own data) once read."""
    known = config.expected_num_clients
    if known is not None:
        return known
    from fedshield.api import build_federation

    return len(build_federation(config).client_ids)


def _clients_per_round(config: ExperimentConfig, num_clients: int) -> int:
    """The round's expected number of clients, as ``[strategy]`` samples them."""
    s = config.strategy
    if s.clients_per_round is not None:
        return min(s.clients_per_round, num_clients)
    fraction = s.fraction if s.fraction is not None else 1.0
    return max(1, round(fraction * num_clients))


def plan_pairs(
    config_path: Path,
    *,
    attacks: Sequence[str],
    defences: Sequence[str],
    fraction: float,
    max_norm: float | None,
    out_dir: Path,
    overrides: Sequence[str] = (),
    workers: int = 1,
) -> tuple[list[Pair], dict[str, Any]]:
    """The runs of the matrix, baselines first, and the settings they share.

    Parameters
    ----------
    config_path
        The experiment's TOML file.
    attacks, defences
        Checked names; ``"none"`` is added to the attacks if missing.
    fraction
        Share of malicious clients, in (0, 0.5).
    max_norm
        ``norm_bound``'s bound; None: the file's ``robust.max_norm``, else
        :data:`DEFAULT_MAX_NORM`.
    out_dir
        The analysis folder; runs go to ``out_dir/runs/<attack>__<defence>``.
    overrides
        ``--set`` overrides applied to the file first.
    workers
        Above 1, every run is given ``run.torch_threads = 1``.

    Returns
    -------
    list of Pair, dict
        The pairs, attack-major in the order given, and the settings
        (shown on the page).

    Raises
    ------
    ConfigError
        If the file with ``overrides`` is not a valid configuration, or the
        fraction or ``max_norm`` is out of range.
    """
    _check_fraction(fraction)
    keys = {item.partition("=")[0].strip() for item in overrides}
    for key in ("robust.rule", "robust.f"):
        if key in keys:
            raise ConfigError(
                f"--set {key}: analyze sets it for each defence (the rule from "
                "--defences, f from --fraction); drop it"
            )
    config = load_config(config_path, overrides)  # the file, checked
    if max_norm is None:
        max_norm = config.robust.max_norm or DEFAULT_MAX_NORM
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError(f"--max-norm must be > 0; got {max_norm}")
    # Relative paths (own data, own model) resolve against the file's folder,
    # as load_config resolves them.
    data = resolve_paths(
        tomllib.loads(Path(config_path).read_text("utf-8")),
        Path(config_path).resolve().parent,
    )
    # Each column sets its rule from scratch: a [robust] key of the file
    # that another rule does not take would refuse that column.
    robust = data.get("robust")
    if isinstance(robust, dict):
        data["robust"] = {k: v for k, v in robust.items() if k not in _PER_RULE_KEYS}
    # robust.max_norm of --set, like the file's, is norm_bound's bound only.
    base = apply_overrides(
        data,
        [o for o in overrides if o.partition("=")[0].strip() != "robust.max_norm"],
    )
    num_clients = _num_clients(config)
    per_round = _clients_per_round(config, num_clients)
    # ⌊fraction × n⌋, safe from 0.29 × 100 = 28.999999999999996.
    f = math.floor(fraction * per_round + 1e-9)
    name = config.run.name
    ordered = (_NO_ATTACK, *(a for a in attacks if a != _NO_ATTACK))
    pairs = []
    for attack in ordered:
        for defence in defences:
            extra = [
                f"attack.kind={json.dumps(attack)}",
                f"attack.fraction={fraction!r}",
                f"robust.rule={json.dumps(defence)}",
            ]
            tags = RULES.tags(defence)
            if "needs_f" in tags:
                extra.append(f"robust.f={f}")
            if "needs_max_norm" in tags:
                extra.append(f"robust.max_norm={max_norm!r}")
            extra += [
                f"run.name={json.dumps(f'{name}-{attack}-{defence}')}",
                "run.report=false",
            ]
            if workers > 1:
                extra.append("run.torch_threads=1")
            pairs.append(
                Pair(
                    attack,
                    defence,
                    base,
                    tuple(extra),
                    out_dir / "runs" / f"{attack}__{defence}",
                )
            )
    settings = {
        "config": str(config_path),
        "attacks": ", ".join(ordered),
        "defences": ", ".join(defences),
        "malicious fraction": fraction,
        "clients per round": per_round,
        f"f (for {', '.join(sorted(RULES.names(tag='needs_f')))})": f,
        f"{', '.join(RULES.names(tag='needs_max_norm'))} max_norm": max_norm,
        "rounds": config.run.rounds,
        "data": f"{config.data.dataset} ({config.data.partition_method}), "
        f"{num_clients} clients",
        "model": config.model.kind,
        "strategy": config.strategy.name,
        "seed": config.run.seed,
        "workers": workers,
    }
    return pairs, settings


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _row_of_run(
    row: dict[str, Any], summary: Mapping[str, Any], run_dir: Path
) -> dict[str, Any]:
    from fedshield.report import read_metrics

    metrics_path = run_dir / "metrics.jsonl"
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
    seconds = [s for s in (_number(r.get("seconds")) for r in metrics) if s is not None]
    rounds = summary.get("rounds")
    wall = _number(summary.get("wall_seconds"))
    if seconds:
        per_round: float | None = sum(seconds) / len(seconds)
    elif wall is not None and isinstance(rounds, int) and rounds > 0:
        per_round = wall / rounds
    else:
        per_round = None
    asr = next(
        (
            a
            for a in (_number(r.get("asr")) for r in reversed(metrics))
            if a is not None
        ),
        _number(summary.get("asr")),
    )
    error = summary.get("error")
    row.update(
        status=summary.get("status"),
        accuracy=_number(summary.get("accuracy")),
        asr=asr,
        seconds_per_round=per_round,
        rounds=rounds,
        epsilon=_number(summary.get("epsilon")),
        error=_one_line(str(error)) if error else None,
        # Regression models (accuracy None): final test RMSE and MAE.
        rmse=_number(summary.get("rmse")),
        mae=_number(summary.get("mae")),
    )
    return row


def run_pair(pair: Pair) -> dict[str, Any]:
    """Run one pair and return its matrix row; never raises for a bad pair.

    Returns
    -------
    dict
        ``attack``, ``defence``, ``status`` (the run's, or ``"refused"``
        when the configuration or the rule's requirement refused it before
        round 1, or ``"failed"``), ``accuracy``, ``asr``,
        ``seconds_per_round``, ``rounds``, ``epsilon``, ``error``.
    """
    from fedshield.api.run import simulate

    row: dict[str, Any] = {"attack": pair.attack, "defence": pair.defence}
    try:
        config = parse_config(apply_overrides(pair.base, pair.overrides))
    except ConfigError as err:
        return {**row, "status": "refused", "error": _one_line(str(err))}
    started = False

    def on_start(*_: Any) -> None:
        nonlocal started
        started = True

    try:
        summary, run_dir = simulate(
            config, out=pair.out, overwrite=True, write_report=False, on_start=on_start
        )
    except ConfigError as err:
        # Before round 1 a ConfigError is a refusal (Krum's n > 2f + 2,
        # Bulyan's n >= 4f + 3, ...); during the rounds, a failure.
        status = "failed" if started else "refused"
        return {**row, "status": status, "error": _one_line(str(err))}
    except FedShieldError as err:
        return {**row, "status": "failed", "error": _one_line(str(err))}
    except Exception as err:  # one broken run must not end the analysis
        message = f"internal error: {type(err).__name__}: {err}"
        return {**row, "status": "failed", "error": _one_line(message)}
    return _row_of_run(row, summary, run_dir)


def _init_worker() -> None:
    # Before torch loads in this fresh (spawned) process: one thread each,
    # so that N workers use N cores.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"


def _run_pairs(
    pairs: Sequence[Pair], workers: int, advance: Callable[[Pair], None]
) -> list[dict[str, Any]]:
    if workers <= 1 or len(pairs) <= 1:
        rows = []
        for pair in pairs:
            rows.append(run_pair(pair))
            advance(pair)
        return rows
    results: dict[int, dict[str, Any]] = {}
    # spawn, not fork: forking a process that may hold torch's thread pools
    # can deadlock the children.
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(pairs)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
    )
    try:
        futures: dict[Future[dict[str, Any]], int] = {
            pool.submit(run_pair, pair): i for i, pair in enumerate(pairs)
        }
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as err:  # a worker died (BrokenProcessPool, ...)
                results[i] = {
                    "attack": pairs[i].attack,
                    "defence": pairs[i].defence,
                    "status": "failed",
                    "error": _one_line(f"worker failed: {type(err).__name__}: {err}"),
                }
            advance(pairs[i])
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [results[i] for i in range(len(pairs))]


def _print_matrix(
    console: Console, table_rows: Sequence[Mapping[str, Any]], files: MatrixFiles
) -> None:
    attacks = list(dict.fromkeys(str(r["attack"]) for r in table_rows))
    defences = list(dict.fromkeys(str(r["defence"]) for r in table_rows))
    cells = {(str(r["attack"]), str(r["defence"])): r for r in table_rows}
    regression = any(
        r.get("accuracy") is None and r.get("rmse") is not None for r in table_rows
    )
    metric = "rmse" if regression else "accuracy"
    table = Table(title=f"{'RMSE' if regression else 'accuracy'} (attack × defence)")
    table.add_column("attack")
    for defence in defences:
        table.add_column(defence, justify="right")
    styles = {
        "known_failure": "bold yellow",
        "unexpected_failure": "bold red",
        "refused": "dim",
        "failed": "red",
    }
    for attack in attacks:
        shown = []
        for defence in defences:
            row = cells.get((attack, defence))
            if row is None:
                shown.append("")
                continue
            outcome = row["verdict"]
            if outcome == "refused":
                text = "refused"
            elif outcome == "failed" or row.get(metric) is None:
                text = "error"
            else:
                text = f"{row[metric]:.4g}" if regression else f"{row[metric]:.4f}"
                if outcome == "known_failure":
                    text += " (known)"
                elif outcome == "unexpected_failure":
                    text += " FAIL"
            style = styles.get(outcome)
            shown.append(f"[{style}]{escape(text)}[/]" if style else escape(text))
        table.add_row(escape(attack), *shown)
    console.print(table)
    console.print(f"matrix: [bold]{files.html}[/] ({files.csv})", highlight=False)


def run_analyze(
    config_path: Path,
    *,
    attacks: str,
    defences: str,
    fraction: float,
    max_norm: float | None,
    out: Path | None,
    workers: int,
    overrides: Sequence[str],
    as_json: bool,
    console: Console,
) -> dict[str, Any]:
    """Check the request, run every pair with a progress bar, write the matrix.

    Returns
    -------
    dict
        ``matrix_csv``, ``matrix_html``, ``matrix_png``, ``out``, ``pairs``,
        counts by ``status`` (``completed``, ``refused``, ``failed``, ...),
        ``failures`` (attack, defence, known, reasons) and ``wall_seconds``.

    Raises
    ------
    ConfigError
        Before any run, for an unknown attack or defence, a fraction outside
        (0, 0.5), a bad ``max_norm`` or an invalid configuration file.
    """
    from fedshield.report.matrix import tabulate, write_matrix

    started = time.perf_counter()
    attack_list = parse_names(attacks, attack_names(), "--attacks")
    defence_list = parse_names(defences, defence_names(), "--defences")
    _check_fraction(fraction)
    base_config = load_config(config_path, overrides)
    out_dir = (
        out if out is not None else Path("runs") / f"{base_config.run.name}-analyze"
    )
    pairs, settings = plan_pairs(
        config_path,
        attacks=attack_list,
        defences=defence_list,
        fraction=fraction,
        max_norm=max_norm,
        out_dir=out_dir,
        overrides=overrides,
        workers=workers,
    )
    if not as_json:
        console.print(
            f"[bold]{escape(base_config.run.name)}[/]: {len(pairs)} runs "
            f"({len({p.attack for p in pairs})} attacks incl. none × "
            f"{len(defence_list)} defences), {base_config.run.rounds} rounds each, "
            f"{workers} worker{'s' if workers > 1 else ''}",
            highlight=False,
        )
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=as_json,
    )
    task = progress.add_task("pairs", total=len(pairs))

    def advance(pair: Pair) -> None:
        progress.update(task, advance=1, description=f"{pair.attack} × {pair.defence}")

    with progress:
        rows = _run_pairs(pairs, workers, advance)
    files = write_matrix(
        rows,
        out_dir,
        title=f"{base_config.run.name}: security matrix",
        settings=settings,
    )
    table = tabulate(rows)
    counts: dict[str, int] = {}
    for row in rows:
        status = str(row.get("status"))
        counts[status] = counts.get(status, 0) + 1
    failures = [
        {
            "attack": r["attack"],
            "defence": r["defence"],
            "known": r["verdict"] == "known_failure",
            "reasons": list(r["_verdict"].reasons),
        }
        for r in table
        if r["_verdict"].is_failure
    ]
    summary: dict[str, Any] = {
        "matrix_csv": str(files.csv),
        "matrix_html": str(files.html),
        "matrix_png": str(files.png),
        "out": str(out_dir),
        "pairs": len(rows),
        "status_counts": counts,
        "failures": failures,
        "refused": [
            {"attack": r["attack"], "defence": r["defence"], "error": r.get("error")}
            for r in table
            if r["verdict"] == "refused"
        ],
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    if not as_json:
        _print_matrix(console, table, files)
    return summary
