"""1,000 light sites on one ``fedshield serve``: rounds of 100, the server's memory.

    .venv/bin/python bench/network/many_clients.py [--sites 1000] [--procs 4]

One server process, ``python -m fedshield.cli serve`` (``--insecure`` on
127.0.0.1), whose ``[network]`` lists ``s0000`` .. ``s0999``: logistic
regression on 8 features and 2 classes (18 parameters), FedAvg with
``strategy.clients_per_round = 100``, 2 rounds, no federated evaluation,
``poll_s = 10``, ``heartbeat_s = 5``.

The sites: ``--procs`` processes (this file with ``--role sites``), each
running its share of :class:`~fedshield.transport.site.SiteClient` objects,
one thread each (plus each one's heartbeat thread), all with their own gRPC
channel. A site's ``build(plan)`` gives a numpy client (no torch, no data):
its ``fit`` returns a small random update of the shape of the parameters it
was sent, 10 examples. What the server checks of a reply (wire format,
client id, shape, finite numbers) is the same as for a real site; the
training is not measured here, the fleet is.

Measured: the server's peak resident memory (``VmHWM`` from
``/proc/PID/status``, and the peak of ``VmRSS`` sampled every 0.2 s), when
all sites had joined, each round's ``seconds`` and ``num_clients`` from
``metrics.jsonl``, the site processes' peak memory and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PeakRss,
    machine,
    processes,
    read_metrics,
    update_results,
    wait_port,
)


def site_names(n: int) -> list[str]:
    return [f"s{i:04d}" for i in range(n)]


def server_config(
    path: Path, n: int, per_round: int, rounds: int, wait_s: float
) -> None:
    config: dict[str, Any] = {
        "run": {"name": "many", "rounds": rounds, "seed": 3, "federated_eval": False},
        "model": {"kind": "logistic"},
        "client": {"epochs": 1, "batch_size": 8, "lr": 0.1},
        "strategy": {"name": "fedavg", "clients_per_round": per_round},
        "network": {
            "sites": site_names(n),
            "input_shape": [8],
            "num_classes": 2,
            "poll_s": 10.0,
            "heartbeat_s": 5.0,
            "fit_timeout_s": 120.0,
            "stage_timeout_s": 60.0,
            "wait_for_sites_s": wait_s,
        },
    }
    path.write_text(tomli_w.dumps(config))


# -- the site processes ---------------------------------------------------------


class _NumpyClient:
    def __init__(self, name: str) -> None:
        self.name = name
        self.rng = np.random.default_rng(abs(hash(name)) % (1 << 32))

    def fit(self, params: Any, config: Any, rng: Any) -> Any:
        from fedshield.core import ClientUpdate, Params

        flat = (0.01 * self.rng.standard_normal(params.spec.size)).astype(np.float32)
        return ClientUpdate(
            self.name, Params.from_flat(flat, params.spec), 10, {"loss": 0.5}
        )

    def evaluate(self, params: Any, config: Any) -> dict[str, float]:
        return {"loss": 0.5, "accuracy": 0.5, "num_examples": 10.0}


def run_sites(port: int, names: list[str], status_file: Path) -> int:
    """Run ``names`` as SiteClients in threads of this process until the run ends."""
    from fedshield.transport.site import SiteClient, SiteSetup

    done: dict[str, Any] = {}
    lock = threading.Lock()

    def one(name: str) -> None:
        site = SiteClient(
            f"127.0.0.1:{port}",
            None,
            lambda plan: SiteSetup(_NumpyClient),
            insecure=True,
            name=name,
            connect_timeout_s=120,
        )
        try:
            answered: Any = site.run()
        except BaseException as err:  # counted, reported in the status file
            answered = f"{type(err).__name__}: {err}"
        finally:
            site.close()
        with lock:
            done[name] = answered

    threads = []
    for name in names:
        thread = threading.Thread(target=one, args=(name,), name=name, daemon=True)
        thread.start()
        threads.append(thread)
    peak_threads = threading.active_count()
    for thread in threads:
        thread.join()
    failed = {k: v for k, v in done.items() if not isinstance(v, int)}
    status_file.write_text(
        json.dumps(
            {
                "sites": len(names),
                "tasks_answered": sum(v for v in done.values() if isinstance(v, int)),
                "failed": failed,
                "threads_after_start": peak_threads,
            }
        )
    )
    return 1 if failed else 0


# -- the driver -------------------------------------------------------------------


def _wait_line(path: Path, text: str, proc: Any, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return time.perf_counter()
        if proc.poll() is not None:
            return None
        time.sleep(0.1)
    return None


def drive(args: argparse.Namespace) -> dict[str, Any]:
    n, procs_n = args.sites, args.procs
    names = site_names(n)
    shares = [names[k::procs_n] for k in range(procs_n)]
    with tempfile.TemporaryDirectory(prefix="fedshield-bench-many-") as tmp:
        root = Path(tmp)
        config = root / "server.toml"
        server_config(config, n, args.per_round, args.rounds, args.wait_s)
        state, port_file = root / "state", root / "port"
        with processes(root / "logs") as procs:
            started = time.perf_counter()
            server = procs.start(
                "server",
                [
                    sys.executable, "-m", "fedshield.cli", "serve", str(config),
                    "--insecure", "--state", str(state),
                    "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                ],
            )  # fmt: skip
            rss = PeakRss(server.pid, every_s=0.1)
            port = wait_port(server, port_file, 120)
            listening = time.perf_counter() - started
            site_procs, site_rss = [], []
            for k, share in enumerate(shares):
                names_file = root / f"names-{k}.json"
                names_file.write_text(json.dumps(share))
                proc = procs.start(
                    f"sites-{k}",
                    [
                        sys.executable, __file__, "--role", "sites",
                        "--port", str(port), "--names", str(names_file),
                        "--status", str(root / f"status-{k}.json"),
                    ],
                )  # fmt: skip
                site_procs.append(proc)
                site_rss.append(PeakRss(proc.pid, every_s=0.5))
            sites_started = time.perf_counter()
            joined_at = _wait_line(
                root / "logs" / "server.log",
                f"{n} of {n} sites joined",
                server,
                args.wait_s + 30,
            )
            code = server.wait(timeout=args.timeout)
            ended = time.perf_counter()
            rss.stop()
            site_codes = [p.wait(timeout=60) for p in site_procs]
            for r in site_rss:
                r.stop()
            log = procs.log("server")
        statuses = [
            json.loads((root / f"status-{k}.json").read_text())
            if (root / f"status-{k}.json").exists()
            else None
            for k in range(procs_n)
        ]
        records = read_metrics(state / "metrics.jsonl") if code == 0 else []
        failures_file = state / "failures.jsonl"
        failures = read_metrics(failures_file) if failures_file.exists() else []
        summary = (
            json.loads((state / "summary.json").read_text())
            if (state / "summary.json").exists()
            else {}
        )
    return {
        "sites": n,
        "site_processes": procs_n,
        "clients_per_round": args.per_round,
        "server_exit": code,
        "site_exits": site_codes,
        "site_status": statuses,
        "status": summary.get("status"),
        "server_listening_after_s": listening,
        "all_joined_after_sites_started_s": (
            None if joined_at is None else joined_at - sites_started
        ),
        "rounds_after_all_joined_s": None if joined_at is None else ended - joined_at,
        "round_seconds": [r.get("seconds") for r in records],
        "round_num_clients": [r.get("num_clients") for r in records],
        "failures": len(failures),
        "failures_sample": failures[:3],
        "rounds_completed": [r.get("completed", True) for r in records],
        "server_peak_rss_mib": rss.peak_mib,
        "server_hwm_mib": rss.hwm_kib / 1024,
        "server_cpu_s": rss.cpu_s,
        "site_process_cpu_s": [round(r.cpu_s, 2) for r in site_rss],
        "site_process_peak_rss_mib": [round(r.peak_mib, 1) for r in site_rss],
        "server_log_tail": log.splitlines()[-8:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("driver", "sites"), default="driver")
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--wait-s", type=float, default=240.0)
    parser.add_argument("--timeout", type=float, default=280.0)
    parser.add_argument("--port", type=int)
    parser.add_argument("--names", type=Path)
    parser.add_argument("--status", type=Path)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.role == "sites":
        names = json.loads(args.names.read_text())
        return run_sites(args.port, names, args.status)
    result = {
        "command": "python bench/network/many_clients.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        **drive(args),
    }
    print(json.dumps(result, indent=1))
    if not args.no_save:
        key = f"many_clients_{args.sites}"
        if args.per_round != 100:
            key += f"_per_round_{args.per_round}"
        update_results(key, result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
