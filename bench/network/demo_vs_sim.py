"""The heart demo's rounds over the network against the same rounds simulated.

    .venv/bin/python bench/network/demo_vs_sim.py [--repeats N] [--variants demo,plain]

Two configurations, each run over the network and in simulation in this
one command:

``demo``
    ``examples/network/server.toml`` as it is (MLP 35 → 16 → 2, FedAvg,
    SecAgg+, central DP, federated evaluation, 10 rounds), the three
    hospital sites written by ``examples/network/make_sites.py``, each
    joining with ``examples/network/demo_policy.toml``, as ``demo.sh`` does.
``plain``
    Configured like Flower's deployment app in ``bench/peers/flower_deploy``:
    plain FedAvg, no SecAgg, no DP, no evaluation, MLP 35 → 32 → 2, one
    local epoch, batch 32, lr 0.05, 5 rounds; same three hospitals, no
    site policy (the demo's requires SecAgg and DP).

Network: one ``fedshield serve`` process and three ``fedshield join``
processes on 127.0.0.1, mutual TLS with a fresh CA (made with
``fedshield.transport.ca`` as ``fedshield ca init/request/approve`` do).

Simulation: ``fedshield.api.run.simulate`` of the same sections (without
``[network]``) with ``clients = {site: (x, y)}``, each site's rows encoded
exactly as ``fedshield join`` encodes them (the site's own ``[data]``
through ``build_federation``, one client, as ``site_builder`` does), and
``test`` = the rows each site held out of its own training
(``data.test_fraction``), so the simulation also evaluates centrally every
round, which the network server cannot (no data): that costs the
simulation a few milliseconds a round and makes the ratio, if anything,
smaller.

Seconds per round are the ``seconds`` field of each round's record in
``metrics.jsonl`` (``run_rounds``: from the round's start to its record).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    LineWatcher,
    PeakRss,
    fedshield_cmd,
    machine,
    make_ca,
    processes,
    read_metrics,
    update_results,
    wait_port,
)

NETWORK = ROOT / "examples" / "network"
SITES = ("cleveland", "hungary", "va")


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _make_sites(out: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_sites", NETWORK / "make_sites.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_sites(out)


def sections(variant: str) -> dict[str, Any]:
    base = tomllib.loads((NETWORK / "server.toml").read_text())
    if variant == "demo":
        return base
    assert variant == "plain"
    base.pop("privacy")
    base.pop("secagg")
    base["run"].update(name="heart-plain", rounds=5, federated_eval=False)
    base["model"]["hidden"] = [32]
    base["client"].update(epochs=1, batch_size=32, lr=0.05)
    base["strategy"] = {"name": "fedavg", "fraction": 1.0}
    return base


def run_network(
    work: Path,
    variant: str,
    sites_dir: Path,
    ca_dir: Path,
    idents: dict[str, Path],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    # Each repeat stands for a fresh federation: the sites' ledgers (what
    # they answered, and the epsilon they spent over their runs) would
    # otherwise refuse later repeats once their max_epsilon is reached.
    for folder in idents.values():
        (folder / "ledger.json").unlink(missing_ok=True)
    config = work / "server.toml"
    config.write_text(tomli_w.dumps(sections(variant)))
    state = work / "state"
    port_file = work / "port"
    policy = (
        ["--policy", str(NETWORK / "demo_policy.toml")] if variant == "demo" else []
    )
    started = time.perf_counter()
    with processes(work / "logs", env) as procs:
        server = procs.start(
            "server",
            fedshield_cmd(
                "serve",
                config,
                "--ca",
                ca_dir,
                "--state",
                state,
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                port_file,
            ),
        )
        rss = PeakRss(server.pid)
        watcher = LineWatcher(state / "metrics.jsonl")
        port = wait_port(server, port_file, 120)
        listening = time.perf_counter() - started
        for site in SITES:
            procs.start(
                site,
                fedshield_cmd(
                    "join",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--identity",
                    idents[site],
                    "--data",
                    sites_dir / site / "site.toml",
                    *policy,
                ),
            )
        code = server.wait(timeout=280)
        rss.stop()
        stamps = watcher.stop()
        server_done = time.perf_counter() - started
        site_codes = {s: procs.procs[s].wait(timeout=60) for s in SITES}
    if code != 0 or any(site_codes.values()):
        raise RuntimeError(
            f"network run failed: server {code}, sites {site_codes}; logs in {work}"
        )
    summary = json.loads((state / "summary.json").read_text())
    records = read_metrics(state / "metrics.jsonl")
    import sqlite3

    with contextlib.closing(sqlite3.connect(state / "state.db")) as db:
        stages = db.execute("SELECT round, stage FROM stages ORDER BY rowid").fetchall()
    return {
        "final_params": _final_params(state),
        "stages_per_round": len(stages) / max(1, len(records)),
        "stages_of_round_1": [
            stage for r, stage in stages if r == min(x for x, _ in stages)
        ],
        "seconds": [r.get("seconds") for r in records],
        "between_records_s": list(np.diff(stamps)),
        "accuracy": summary.get("accuracy"),
        "accuracy_source": summary.get("accuracy_source"),
        "epsilon": summary.get("epsilon"),
        "status": summary.get("status"),
        "server_wall_seconds": summary.get("wall_seconds"),
        "server_listening_after_s": listening,
        "command_wall_s": server_done,
        "server_peak_rss_mib": rss.peak_mib,
    }


def site_arrays(variant: str, sites_dir: Path) -> tuple[dict[str, Any], Any]:
    """Each site's training rows and held-out rows, encoded as a site does."""
    from fedshield.api.config import parse_config
    from fedshield.api.experiment import build_federation

    base = sections(variant)
    clients, tests_x, tests_y = {}, [], []
    for site in SITES:
        data = tomllib.loads((sites_dir / site / "site.toml").read_text())["data"]
        data["path"] = str(sites_dir / site / data["path"])
        data.update(partition="iid", num_clients=1)
        own = parse_config({"run": base["run"], "model": base["model"], "data": data})
        federation = build_federation(own)
        rows = federation.client_fn.parts[federation.client_ids[0]]
        clients[site] = (federation.train.x[rows], federation.train.y[rows])
        tests_x.append(federation.test.x)
        tests_y.append(federation.test.y)
    return clients, (np.concatenate(tests_x), np.concatenate(tests_y))


def run_simulation(
    work: Path, variant: str, sites_dir: Path, backend: str
) -> dict[str, Any]:
    from fedshield.api.run import simulate

    clients, test = site_arrays(variant, sites_dir)
    config = sections(variant)
    config.pop("network")
    config["run"]["backend"] = backend
    if "privacy" in config:  # DP: the class set is declared, as the sites do
        config["data"] = {"classes": ["0", "1"]}
    stamps: list[float] = []
    started = time.perf_counter()
    summary, folder = simulate(
        config,
        clients=clients,
        test=test,
        out=work / "sim",
        write_report=False,
        on_round=lambda *_: stamps.append(time.perf_counter()),
    )
    wall = time.perf_counter() - started
    records = read_metrics(folder / "metrics.jsonl")
    return {
        "final_params": _final_params(folder),
        "seconds": [r.get("seconds") for r in records],
        "between_records_s": list(np.diff(stamps)),
        "accuracy": summary.get("accuracy"),
        "federated_accuracy": records[-1].get("federated_accuracy"),
        "epsilon": summary.get("epsilon"),
        "status": summary.get("status"),
        "backend": summary.get("backend"),
        "command_wall_s": wall,
    }


def _final_params(folder: Path) -> Any:
    from fedshield.simulation import RunDirectory

    return RunDirectory(folder).load_checkpoint().params.flat.copy()


def per_round(run: dict[str, Any]) -> dict[str, Any]:
    """Seconds per round: the records' ``seconds`` where the run writes them
    (not under DP); otherwise the time between consecutive records, which
    has no round 1 (its start is not seen from outside)."""
    seconds = run["seconds"]
    if all(s is not None for s in seconds):
        source, rest, first = "metrics.jsonl seconds", seconds[1:], seconds[0]
    else:
        source, rest, first = "between records", run["between_records_s"], None
    return {
        "source": source,
        "round1": first,
        "median_excl_round1": statistics.median(rest),
        "mean_excl_round1": statistics.fmean(rest),
        "between_records_median": statistics.median(run["between_records_s"]),
    }


def report(
    variant: str, k: int, one: dict[str, Any], backends: list[str], one_thread: bool
) -> None:
    net = one["network"]["per_round"]
    ratios = []
    for b in backends:
        sim_b = one[f"simulation_{b}"]["per_round"]["median_excl_round1"]
        ratio = one[f"ratio_vs_{b}_median_excl_round1"]
        ratios.append(f"vs {b}: {ratio:.2f} ({sim_b:.3f} s)")
    print(
        f"{variant} run {k}: network {net['median_excl_round1']:.3f} s/round "
        f"(round 1 {net['round1']}); " + ", ".join(ratios),
        flush=True,
    )
    if one_thread:
        net1 = one["network_1thread"]["per_round"]["median_excl_round1"]
        ratios = [
            f"vs {b}: {one[f'ratio_1thread_vs_{b}_median_excl_round1']:.2f}"
            for b in backends
        ]
        print(
            f"  network with OMP_NUM_THREADS=1: {net1:.3f} s/round, ratio "
            + ", ".join(ratios),
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="demo,plain")
    parser.add_argument(
        "--sim-backends",
        default="auto,sequential",
        help="simulation backends; the first is the bar's baseline (auto: "
        "what fedshield simulate picks, vectorised here)",
    )
    parser.add_argument(
        "--one-thread",
        action="store_true",
        help="also run the network with OMP_NUM_THREADS=1 in every process "
        "(what a simulation's run.torch_threads = 1 does in-process)",
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "command": "python bench/network/demo_vs_sim.py "
        + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="fedshield-bench-net-") as tmp:
        root = Path(tmp)
        sites_dir = root / "sites"
        _make_sites(sites_dir)
        ca_dir, idents = make_ca(root / "operator", SITES)
        for variant in args.variants.split(","):
            runs = []
            for k in range(args.repeats):
                # Alternate the order so drift on the shared machine hits both.
                backends = args.sim_backends.split(",")
                sims = [f"sim-{b}" for b in backends]
                nets = ["network"] + (["network-1thread"] if args.one_thread else [])
                order = [*nets, *sims] if k % 2 == 0 else [*sims, *nets]
                one: dict[str, Any] = {}
                for what in order:
                    work = root / f"{variant}-{k}-{what}"
                    work.mkdir()
                    if what == "network":
                        one["network"] = run_network(
                            work, variant, sites_dir, ca_dir, idents
                        )
                    elif what == "network-1thread":
                        one["network_1thread"] = run_network(
                            work, variant, sites_dir, ca_dir, idents, ONE_THREAD
                        )
                    else:
                        backend = what.removeprefix("sim-")
                        one[f"simulation_{backend}"] = run_simulation(
                            work, variant, sites_dir, backend
                        )
                # Did both train the same model? (Compared to the network's.)
                net_params = one["network"].pop("final_params")
                others = [x for x in one if x.startswith(("simulation_", "network_"))]
                for key in others:
                    other = one[key].pop("final_params")
                    one[key]["final_params_max_abs_diff_vs_network"] = float(
                        np.max(np.abs(other - net_params))
                    )
                net = per_round(one["network"])
                one["network"]["per_round"] = net
                if args.one_thread:
                    net1 = per_round(one["network_1thread"])
                    one["network_1thread"]["per_round"] = net1
                    for b in backends:
                        one[f"ratio_1thread_vs_{b}_median_excl_round1"] = (
                            net1["median_excl_round1"]
                            / per_round(one[f"simulation_{b}"])["median_excl_round1"]
                        )
                for b in backends:
                    sim_b = per_round(one[f"simulation_{b}"])
                    one[f"simulation_{b}"]["per_round"] = sim_b
                    one[f"ratio_vs_{b}_median_excl_round1"] = (
                        net["median_excl_round1"] / sim_b["median_excl_round1"]
                    )
                base = one[f"simulation_{backends[0]}"]
                sim = base["per_round"]
                one["ratio_median_excl_round1"] = (
                    net["median_excl_round1"] / sim["median_excl_round1"]
                )
                one["extra_seconds_per_round"] = (
                    net["median_excl_round1"] - sim["median_excl_round1"]
                )
                report(variant, k, one, backends, args.one_thread)
                runs.append(one)
            result[variant] = {"runs": runs}
    if not args.no_save:
        update_results("demo_vs_sim", result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
