"""Where a small stage's time goes: one Fleet stage with three tiny sites.

    .venv/bin/python bench/network/stage_latency.py [--stages 40]

A :class:`~fedshield.transport.loopback.LoopbackBackend` (real server,
store and ``SiteClient`` threads in this process), three sites with the
contract suite's fake clients (a 7-parameter model), ``fit`` stages one
after the other; insecure and with mutual TLS. Reports the median stage
(``run_stage`` until the round loop holds the three replies) and, from
timing wrappers put around the transport's functions in this process only
(nothing in ``src/`` changes), how long each step takes and how often it
runs per stage. The heart demo's rounds are 7 such stages (SecAgg+ and
federated evaluation), the plain FedAvg run's one.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import machine, make_ca, update_results
from tests.contracts.backend_contract import fit_request
from tests.contracts.fakes import FakeClients

from fedshield.transport import auth, backend, server, site, store
from fedshield.transport.loopback import LoopbackBackend

SITES = ["0", "1", "2"]
STEPS: list[tuple[Any, str]] = [
    (site.SiteClient, "_push"),
    (site.SiteClient, "_call"),
    (site.SiteClient, "_answer"),
    (server.FleetServer, "take_result"),
    (backend.Mailbox, "accept"),
    (store.ServerStore, "add_reply"),
    (store.BlobStore, "put"),
    (store.ServerStore, "add_tasks"),
    (store.ServerStore, "close_stage"),
    (auth.Signer, "sign"),
    (auth.RequestGuard, "check"),
]


def instrument() -> dict[str, list[float]]:
    spent: dict[str, list[float]] = collections.defaultdict(list)

    def wrap(owner: Any, name: str) -> None:
        fn: Callable[..., Any] = getattr(owner, name)
        label = f"{owner.__name__}.{name}"

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label].append(time.perf_counter() - started)

        setattr(owner, name, timed)

    for owner, name in STEPS:
        wrap(owner, name)
    return spent


def measure(stages: int, tls: bool, spent: dict[str, list[float]]) -> dict[str, Any]:
    from fedshield.transport.auth import load_identity

    with tempfile.TemporaryDirectory(prefix="fedshield-bench-stage-") as tmp:
        kwargs: dict[str, Any] = {}
        if tls:
            ca_dir, folders = make_ca(Path(tmp), SITES)
            kwargs = {
                "identities": {s: load_identity(f) for s, f in folders.items()},
                "ca_dir": ca_dir,
            }
        lb = LoopbackBackend(
            SITES, fresh_store=False, serial=False, poll_s=5.0, heartbeat_s=2.0,
            state_dir=Path(tmp) / "state", **kwargs,
        )  # fmt: skip
        clients = FakeClients(3)
        try:
            list(
                lb.run_stage(fit_request(SITES, round_idx=0), client_fn=clients, seed=1)
            )
            spent.clear()
            times = []
            for r in range(1, stages + 1):
                started = time.perf_counter()
                replies = list(
                    lb.run_stage(
                        fit_request(SITES, round_idx=r), client_fn=clients, seed=1
                    )
                )
                times.append(time.perf_counter() - started)
                assert all(reply.ok for reply in replies)
        finally:
            lb.close()
    steps = {
        label: {
            "per_stage": len(v) / stages,
            "median_ms": statistics.median(v) * 1e3,
            "total_ms_per_stage": sum(v) / stages * 1e3,
        }
        for label, v in sorted(spent.items(), key=lambda kv: -sum(kv[1]))
    }
    return {
        "stage_median_ms": statistics.median(times) * 1e3,
        "stage_min_ms": min(times) * 1e3,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=40)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    spent = instrument()
    result: dict[str, Any] = {
        "command": "python bench/network/stage_latency.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
    }
    for tls in (False, True):
        key = "mtls" if tls else "insecure"
        result[key] = measure(args.stages, tls, spent)
        print(f"{key}: stage median {result[key]['stage_median_ms']:.1f} ms")
        for label, row in result[key]["steps"].items():
            print(
                f"  {label:28s} {row['per_stage']:4.1f}/stage  median "
                f"{row['median_ms']:6.2f} ms  "
                f"total {row['total_ms_per_stage']:6.2f} ms/stage"
            )
    if not args.no_save:
        update_results("stage_latency", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
