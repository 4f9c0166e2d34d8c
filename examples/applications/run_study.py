"""Finance and IoT on real data: local-only vs federated vs pooled, and central DP.

Two applications, each loaded from the user's own CSV files through the
generic loaders (``dataset = "csv"``) of its TOML:

* **finance** — ``examples/finance/caravan.toml``: Caravan insurance
  (CoIL 2000), the ten customer main types are the ten clients (natural
  partition), ~6 % positives, the user's own PyTorch MLP (``model.py``);
* **iot** — ``examples/iot/italy_power.toml``: ItalyPowerDemand day
  profiles, the pooled training file split over ten simulated meters with a
  Dirichlet(0.5) label split, builtin MLP.

For every seed and application it measures, on the server's held-out test
set (the same rows for every method):

* ``local`` — each client alone: the same model, the same local settings
  (batch size, learning rate, momentum, weight decay) for ``rounds × epochs``
  epochs on the client's own training rows (as
  ``bench/heart_local_vs_federated.py`` does); mean, min and max over the
  clients;
* ``federated`` — FedAvg as the TOML says (``fedshield.api.simulate``);
* ``pooled`` — one model trained on every client's training rows together
  (the same preprocessed rows the federation trains on), for the same number
  of epochs as ``local``;
* ``dp_eps8_clip1`` / ``dp_eps1_clip1`` — FedAvg with central (user-level)
  DP, ``privacy.mode = "central"``, ``clip_norm = 1.0``, σ calibrated from
  ``target_epsilon`` ∈ {8, 1} for the configured rounds (δ = 1e-5, Poisson
  sampling at ``strategy.fraction`` = 1, PLD accountant). ``clip_norm = 1.0``
  is fixed in advance (it is ``caravan_private.toml``'s); the only other
  point of the clip grid, ``clip_norm = 0.1`` (``dp_eps*_clip0.1``), is
  reported next to it, never picked per ε;
* ``federated_std_per_meter`` (iot only) — FedAvg with
  ``data.standardize = true``, i.e. each meter z-scores the features with its
  own statistics: the reason ``italy_power.toml`` sets ``standardize =
  false``.

Metrics: ROC AUC (the headline: accuracy is near-meaningless on Caravan,
where always answering "no" scores 0.94) and accuracy. Writes
``results.json`` and ``applications.png`` next to this script and prints the
markdown tables (mean ± sd over the seeds) that ``RESULTS.md`` copies.

Usage (from the repository root)::

    .venv/bin/python examples/applications/run_study.py            # 3 seeds
    .venv/bin/python examples/applications/run_study.py --quick    # smoke test
    .venv/bin/python examples/applications/run_study.py --tables-only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

APPS: dict[str, dict[str, Any]] = {
    "finance": {
        "config": ROOT / "examples" / "finance" / "caravan.toml",
        "title": "Finance: Caravan insurance, 10 customer types",
        "natural": True,  # the same ten clients in every seed
        "positive": "`yes`",
    },
    "iot": {
        "config": ROOT / "examples" / "iot" / "italy_power.toml",
        "title": "IoT: ItalyPowerDemand, 10 meters (Dirichlet 0.5)",
        "natural": False,  # the meters are re-drawn in every seed
        "positive": "season `2`",
    },
}
CLIP_GRID = (1.0, 0.1)  # the first is the headline, fixed in advance
EPSILONS = (8.0, 1.0)
METRICS = ("roc_auc", "accuracy")


def _variants(app: str) -> dict[str, list[str]]:
    """Federated runs: name -> overrides on top of the app's TOML."""
    runs: dict[str, list[str]] = {"federated": []}
    for clip in CLIP_GRID:
        for eps in EPSILONS:
            runs[f"dp_eps{eps:g}_clip{clip:g}"] = [
                'privacy.mode="central"',
                f"privacy.clip_norm={clip}",
                f"privacy.target_epsilon={eps}",
            ]
    if app == "iot":
        runs["federated_std_per_meter"] = ["data.standardize=true"]
    return runs


def _metrics(m: dict[str, Any]) -> dict[str, float | None]:
    return {k: (None if m.get(k) is None else float(m[k])) for k in METRICS}


def run_app(app: str, seed: int, rounds: int | None, tmp: Path) -> dict[str, Any]:
    from fedshield.api import build_federation, load_config, simulate
    from fedshield.core import FitConfig, derive_rng

    base = [f"run.seed={seed}", "run.report=false"]
    if rounds is not None:
        base.append(f"run.rounds={rounds}")
    path = APPS[app]["config"]
    out: dict[str, Any] = {"app": app, "seed": seed, "runs": {}}

    for name, extra in _variants(app).items():
        config = load_config(path, base + extra)
        started = time.perf_counter()
        summary, _ = simulate(
            config, out=tmp / f"{app}-{name}-{seed}", overwrite=True, write_report=False
        )
        if summary["status"] != "completed":
            raise RuntimeError(f"{app} {name} seed {seed}: {summary['status']}")
        privacy = summary.get("privacy") or {}
        out["runs"][name] = {
            **_metrics(summary),
            "epsilon": summary.get("epsilon"),
            "noise_multiplier": privacy.get("noise_multiplier"),
            "clip_norm": privacy.get("clip_norm"),
            "seconds": round(time.perf_counter() - started, 2),
        }

    # Local-only and pooled: the federation's own model, rows and test set.
    config = load_config(path, base)
    federation = build_federation(config)
    model, c = federation.model, config.client
    init = model.init_params(seed)
    fit = FitConfig(
        round_idx=0,
        epochs=config.run.rounds * c.epochs,
        batch_size=c.batch_size,
        lr=c.lr,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
    )
    local: dict[str, Any] = {}
    all_rows = []
    started = time.perf_counter()
    for cid in federation.client_ids:
        rows, _ = federation.client_fn.local_split(cid)
        all_rows.append(rows)
        x, y = federation.train.x[rows], federation.train.y[rows]
        params, _ = model.train(init, x, y, fit, rng=derive_rng(seed, "local", cid))
        local[cid] = {
            **_metrics(federation.evaluate(params)),
            "train_rows": len(rows),
            "label_counts": np.bincount(y, minlength=2).tolist(),
        }
    out["local_seconds"] = round(time.perf_counter() - started, 2)
    out["local"] = local
    rows = np.sort(np.concatenate(all_rows))
    started = time.perf_counter()
    params, _ = model.train(
        init,
        federation.train.x[rows],
        federation.train.y[rows],
        fit,
        rng=derive_rng(seed, "pooled"),
    )
    out["runs"]["pooled"] = {
        **_metrics(federation.evaluate(params)),
        "train_rows": len(rows),
        "seconds": round(time.perf_counter() - started, 2),
    }
    for metric in METRICS:
        values = [v[metric] for v in local.values() if v[metric] is not None]
        out["runs"][f"local_mean_{metric}"] = statistics.fmean(values)
        out["runs"][f"local_min_{metric}"] = min(values)
        out["runs"][f"local_max_{metric}"] = max(values)
    out["test_rows"] = len(federation.test.y)
    out["test_positives"] = int((federation.test.y == 1).sum())
    return out


# ----------------------------------------------------------------------------
# Tables and plot


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


ROWS = (
    ("local_mean", "local only, mean over clients"),
    ("local_min", "local only, worst client"),
    ("local_max", "local only, best client"),
    ("federated", "federated (FedAvg)"),
    ("pooled", "pooled (all rows, one model)"),
    ("dp_eps8_clip1", "federated + central DP, ε = 8, clip 1.0"),
    ("dp_eps1_clip1", "federated + central DP, ε = 1, clip 1.0"),
    ("dp_eps8_clip0.1", "federated + central DP, ε = 8, clip 0.1"),
    ("dp_eps1_clip0.1", "federated + central DP, ε = 1, clip 0.1"),
    ("federated_std_per_meter", "federated, per-meter standardisation"),
)


def _values(
    results: list[dict[str, Any]], app: str, key: str, metric: str
) -> list[float]:
    out = []
    for r in results:
        if r["app"] != app:
            continue
        runs = r["runs"]
        if key.startswith("local_"):
            value = runs.get(f"{key}_{metric}")
        else:
            value = (runs.get(key) or {}).get(metric)
        if value is not None:
            out.append(float(value))
    return out


def tables(data: dict[str, Any]) -> str:
    results = data["results"]
    seeds = sorted({r["seed"] for r in results})
    lines = []
    for app, spec in APPS.items():
        mine = [r for r in results if r["app"] == app]
        if not mine:
            continue
        first = mine[0]
        lines += [
            f"### {spec['title']}",
            "",
            f"`{spec['config'].relative_to(ROOT)}`, {data['rounds'][app]} rounds; "
            f"server test set {first['test_rows']} rows "
            f"({first['test_positives']} {spec['positive']}); mean ± sd over "
            f"{len(seeds)} seeds.",
            "",
            "| method | ROC AUC | accuracy | ε reported (max over seeds) | σ |",
            "|---|---|---|---|---|",
        ]
        for key, label in ROWS:
            auc = _values(results, app, key, "roc_auc")
            acc = _values(results, app, key, "accuracy")
            if not auc and not acc:
                continue
            eps = [
                r["runs"][key]["epsilon"]
                for r in mine
                if key in r["runs"] and r["runs"][key].get("epsilon") is not None
            ]
            sig = [
                r["runs"][key]["noise_multiplier"]
                for r in mine
                if key in r["runs"]
                and r["runs"][key].get("noise_multiplier") is not None
            ]
            lines.append(
                f"| {label} | {_ms(auc)} | {_ms(acc)} "
                f"| {f'{max(eps):.3f}' if eps else '—'} "
                f"| {f'{sig[0]:.2f}' if sig else '—'} |"
            )
        # Per client: does the federated model beat the client's own?
        pairs = [
            (
                r["runs"]["federated"]["roc_auc"],
                v["roc_auc"],
                r["runs"]["federated"]["accuracy"],
                v["accuracy"],
            )
            for r in mine
            for v in r["local"].values()
        ]
        auc_wins = sum(f > loc for f, loc, _, _ in pairs)
        acc_wins = sum(f > loc for _, _, f, loc in pairs)
        lines += [
            "",
            f"Federated strictly beats the client's own model on {auc_wins} of "
            f"{len(pairs)} (client, seed) pairs in ROC AUC and on {acc_wins} of "
            f"{len(pairs)} in "
            "accuracy (same server test set).",
        ]
        if spec["natural"]:
            fed_auc = _values(results, app, "federated", "roc_auc")
            lines += [
                "",
                "Per client (local-only model on the same server test set, mean "
                f"± sd over seeds; federated ROC AUC {statistics.fmean(fed_auc):.3f}):",
                "",
                "| client | train rows | positives | local ROC AUC | local accuracy "
                "| federated − local (ROC AUC) |",
                "|---|---:|---:|---|---|---:|",
            ]
            for cid in first["local"]:
                auc = [r["local"][cid]["roc_auc"] for r in mine]
                acc = [r["local"][cid]["accuracy"] for r in mine]
                rows = statistics.fmean(r["local"][cid]["train_rows"] for r in mine)
                pos = statistics.fmean(r["local"][cid]["label_counts"][1] for r in mine)
                diffs = [
                    r["runs"]["federated"]["roc_auc"] - r["local"][cid]["roc_auc"]
                    for r in mine
                ]
                lines.append(
                    f"| `{cid}` | {rows:.0f} | {pos:.0f} | {_ms(auc)} | {_ms(acc)} "
                    f"| {statistics.fmean(diffs):+.3f} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = data["results"]
    bars = (
        ("local_mean", "local only\n(mean; min–max)", "0.6"),
        ("federated", "federated", "tab:blue"),
        ("pooled", "pooled", "tab:green"),
        ("dp_eps8_clip1", "DP ε=8", "tab:orange"),
        ("dp_eps1_clip1", "DP ε=1", "tab:red"),
    )
    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(2, len(APPS), sharey="row")
    for row, metric in enumerate(METRICS):
        for ax, (app, spec) in zip(grid[row], APPS.items(), strict=True):
            for i, (key, _label, colour) in enumerate(bars):
                values = _values(results, app, key, metric)
                if not values:
                    continue
                mean = statistics.fmean(values)
                if key == "local_mean":
                    lo = statistics.fmean(_values(results, app, "local_min", metric))
                    hi = statistics.fmean(_values(results, app, "local_max", metric))
                    yerr = [[mean - lo], [hi - mean]]
                else:
                    sd = statistics.stdev(values) if len(values) > 1 else 0.0
                    yerr = [[sd], [sd]]
                ax.bar(i, mean, color=colour, yerr=yerr, capsize=4)
                ax.text(i, 0.02, f"{mean:.3f}", ha="center", va="bottom", fontsize=8)
            mine = [r for r in results if r["app"] == app]
            if metric == "roc_auc":
                chance, what = 0.5, "chance"
            else:
                share = mine[0]["test_positives"] / mine[0]["test_rows"]
                chance, what = max(share, 1 - share), "majority class"
            ax.axhline(chance, color="0.3", linestyle=":", linewidth=1, label=what)
            ax.legend(fontsize=7, loc="upper right")
            ax.set_xticks(range(len(bars)), [b[1] for b in bars], fontsize=8)
            ax.set_ylim(0, 1.1)
            ax.set_title(spec["title"], fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
    grid[0][0].set_ylabel("ROC AUC on the server test set")
    grid[1][0].set_ylabel("accuracy on the server test set")
    seeds = len({r["seed"] for r in results})
    fig.suptitle(
        f"Local-only vs federated vs pooled, central DP clip 1.0, δ = 1e-5 "
        f"(mean over {seeds} seeds; whiskers: sd, local: worst–best client)",
        fontsize=9,
    )
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: one seed, 3 rounds, nothing written",
    )
    parser.add_argument("--apps", nargs="+", default=list(APPS), choices=list(APPS))
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="print the tables and redraw the plot from results.json",
    )
    args = parser.parse_args(argv)
    results_path = HERE / "results.json"
    if args.tables_only:
        data = json.loads(results_path.read_text())
        print(tables(data))
        plot(data, HERE / "applications.png")
        return 0

    import torch

    torch.set_num_threads(1)
    import fedshield
    from fedshield.api import load_config

    seeds = [0] if args.quick else list(range(args.seeds))
    rounds = 3 if args.quick else None
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedshield-applications-") as tmp:
        for app in args.apps:
            for seed in seeds:
                t0 = time.perf_counter()
                results.append(run_app(app, seed, rounds, Path(tmp)))
                print(
                    f"{app} seed {seed}: {time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    wall = time.perf_counter() - started
    data = {
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python "
        + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]),
        "fedshield": fedshield.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": 1,
        "wall_seconds": round(wall, 1),
        "seeds": seeds,
        "rounds": {
            app: load_config(APPS[app]["config"]).run.rounds
            if rounds is None
            else rounds
            for app in args.apps
        },
        "clip_grid": list(CLIP_GRID),
        "target_epsilons": list(EPSILONS),
        "delta": 1e-5,
        "results": results,
    }
    print(tables(data))
    print(f"wall time: {wall:.1f} s")
    if not args.quick:
        results_path.write_text(json.dumps(data, indent=1) + "\n")
        plot(data, HERE / "applications.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
