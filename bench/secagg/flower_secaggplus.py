"""Flower's SecAgg+ beside fedshield's, per round, on the digits MLP task.

Run: make bench-secagg
     (or .bench-peers/flower-venv/bin/python bench/secagg/flower_secaggplus.py
      [--rounds R] [--skip-micro] [--skip-full50])
     fedshield's side alone: .venv/bin/python bench/secagg/flower_secaggplus.py
      --fedshield-only b [--rounds R]  (prints its round times; writes nothing)

This script runs in the peer benchmark's Flower environment
(``.bench-peers/flower-venv``, made by ``make bench-peers``: flwr 1.42.0 with
Ray, torch, scikit-learn). It never imports fedshield: it starts each run as a
subprocess of its own, so that every Ray instance dies with its run.

The task: FedAvg of an MLP 64 -> 64 -> 10 (ReLU, 4,810 parameters) over IID
slices of scikit-learn's digits (20 % held out), 1 local epoch, batch 32,
plain SGD lr 0.05, centralised evaluation after every round, ``R`` rounds
(default 4), every client in every round. The cases:

    a   10 clients; Flower: full graph (num_shares = 10, threshold 7);
        fedshield: ``secagg+``, whose k is then n - 1 = 9 (the complete graph)
    b   50 clients; Flower: num_shares = 3, threshold 2 (Flower's example
        setting: each client and its two ring neighbours hold its shares);
        fedshield: ``secagg+`` with its own k (from sigma = 40 and 10 %
        expected dropout: 49 at n = 50); ``neighbours = 3`` is also tried,
        and fedshield refuses it (its Erdos-Renyi graph of degree 3 leaves
        clients isolated)

and, unless ``--skip-full50``, case c: Flower alone at 50 clients with the
full graph (num_shares = 50, threshold 34), which the issue reports crashing
(its Ray actors dying).

Each framework runs the same task with and without secure aggregation:

- Flower: a ``ServerApp`` with ``LegacyContext`` and ``DefaultWorkflow``,
  its fit workflow ``SecAggPlusWorkflow(num_shares, reconstruction_threshold,
  max_weight=1000)`` (defaults otherwise: clipping range 8, quantisation
  range 2**22, modulus 2**32), and a ``ClientApp`` of a ``NumPyClient`` with
  ``mods=[secaggplus_mod]``; the plain run is the same apps with the default
  fit workflow and no mod. ``run_simulation`` on Ray, one CPU per client
  actor (two actors on a two-core machine), one torch thread each.
- fedshield: ``fedshield simulate bench/peers/peers.toml`` (the same task)
  through ``bench/peers/fedshield_driver.py`` (which only adds timestamps),
  with ``--set secagg.protocol="secagg+"`` for the secure run.

Per run: the end-to-end wall time, round 1, and the median of rounds 2..R (a
round runs from the end of the previous round's centralised evaluation to the
end of its own), plus the final accuracy. A run that fails or does not finish
its rounds is recorded as such with the tail of its stderr.

``--skip-micro`` leaves out the micro-benchmark: Flower's server-side
unmasking (``flwr.common.secure_aggregation``: Shamir reconstruction of every
survivor's self-mask seed, ``pseudo_rand_gen`` of its mask, subtraction mod
2**32) for n = 100 and d = 100,000 with num_shares = 3, timed in this process,
beside fedshield's server ``receive`` of the unmask stage at the same n and d
(``bench/secagg/cost.py --unmask-micro``, run with fedshield's venv).

Results: ``.bench-peers/secagg/peers.json`` and the section between the ``peers``
markers of ``bench/secagg/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / ".bench-peers" / "secagg"
FEDSHIELD_PYTHON = ROOT / ".venv" / "bin" / "python"
DRIVER = ROOT / "bench" / "peers" / "fedshield_driver.py"
PEERS_TOML = ROOT / "bench" / "peers" / "peers.toml"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
RUN_TIMEOUT_S = 150
SEED = 0

# key: (clients, Flower's num_shares, Flower's threshold, fedshield neighbours)
CASES: dict[str, tuple[int, int, int, int | None]] = {
    "a": (10, 10, 7, None),
    "b": (50, 3, 2, None),
}
FULL50 = ("c", (50, 50, 34, None))
FULL50_ROUNDS = 2  # about 30 s a round: two keep the whole script near 5 minutes


# ======================================================================
# One Flower run (a subprocess: ``--one-run``)


def flower_run(args: argparse.Namespace) -> int:
    """Run one Flower simulation and write its timestamps to ``args.events``."""
    events: dict[str, Any] = {"start": time.time(), "round_end": [], "accuracy": []}
    import numpy as np
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation
    from sklearn.datasets import load_digits

    events["imported"] = time.time()
    n, rounds = args.clients, args.rounds

    bunch = load_digits()
    x_all = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y_all = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(SEED).permutation(len(y_all))
    n_test = round(0.2 * len(y_all))
    test_rows, train_rows = order[:n_test], order[n_test:]
    slices = np.array_split(train_rows, n)

    def build() -> torch.nn.Module:
        torch.manual_seed(SEED)
        return torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    def get_weights(model: torch.nn.Module) -> list[Any]:
        return [v.detach().cpu().numpy() for v in model.state_dict().values()]

    def set_weights(model: torch.nn.Module, weights: list[Any]) -> None:
        keys = list(model.state_dict())
        model.load_state_dict(
            {
                k: torch.from_numpy(np.array(w))
                for k, w in zip(keys, weights, strict=True)
            }
        )

    class DigitsClient(NumPyClient):  # type: ignore[misc]
        def __init__(self, partition: int) -> None:
            rows = slices[partition]
            self.x = torch.from_numpy(x_all[rows])
            self.y = torch.from_numpy(y_all[rows])

        def fit(
            self, parameters: list[Any], config: dict[str, Any]
        ) -> tuple[list[Any], int, dict[str, Any]]:
            torch.set_num_threads(1)
            model = build()
            set_weights(model, parameters)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            perm = torch.randperm(len(self.y))
            for start in range(0, len(self.y), 32):
                idx = perm[start : start + 32]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(
                    model(self.x[idx]), self.y[idx]
                )
                loss.backward()
                optimizer.step()
            return get_weights(model), len(self.y), {}

    def client_fn(context: Context) -> Any:
        return DigitsClient(int(context.node_config["partition-id"])).to_client()

    mods = [secaggplus_mod] if args.secagg else []
    client_app = ClientApp(client_fn=client_fn, mods=mods)

    x_test, y_test = (
        torch.from_numpy(x_all[test_rows]),
        torch.from_numpy(y_all[test_rows]),
    )

    def evaluate(
        server_round: int, weights: list[Any], config: dict[str, Any]
    ) -> tuple[float, dict[str, float]]:
        model = build()
        set_weights(model, weights)
        with torch.no_grad():
            logits = model(x_test)
            loss = float(torch.nn.functional.cross_entropy(logits, y_test))
            accuracy = float((logits.argmax(1) == y_test).float().mean())
        now = time.time()
        if server_round == 0:
            events["initial_eval_end"] = now
        else:
            events["round_end"].append(now)
            events["accuracy"].append(accuracy)
        return loss, {"accuracy": accuracy}

    server_app = ServerApp()

    @server_app.main()  # type: ignore[misc]
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            evaluate_fn=evaluate,
            initial_parameters=ndarrays_to_parameters(get_weights(build())),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        if args.secagg:
            fit = SecAggPlusWorkflow(
                num_shares=args.num_shares,
                reconstruction_threshold=args.threshold,
                max_weight=1000.0,
            )
            DefaultWorkflow(fit_workflow=fit)(grid, legacy)
        else:
            DefaultWorkflow()(grid, legacy)

    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=n,
            backend_config={
                "init_args": {"address": "local", "_temp_dir": args.ray_temp_dir},
                "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
            },
        )
    finally:
        events["simulation_end"] = time.time()
        import ray

        if ray.is_initialized():
            ray.shutdown()
        args.events.write_text(json.dumps(events, indent=1))
    return 0 if len(events["round_end"]) == rounds else 1


# ======================================================================
# The micro-benchmark: Flower's server-side unmasking


def flower_unmask_micro(n: int, d: int, num_shares: int, threshold: int) -> float:
    """CPU seconds Flower's unmask step takes for ``n`` survivors (no dropouts).

    Exactly what ``SecAggPlusWorkflow.unmask_stage`` does for each survivor
    once the shares are in: ``combine_shares`` of its self-mask seed,
    ``pseudo_rand_gen`` of the mask, ``parameters_subtraction``; then
    ``parameters_mod``. The shares are made by ``create_shares`` as the
    clients make them.
    """
    import numpy as np
    from flwr.common.secure_aggregation.crypto.shamir import (
        combine_shares,
        create_shares,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        get_parameters_shape,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    mod_range = 1 << 32
    rng = np.random.default_rng(0)
    masked = [rng.integers(0, mod_range, d, dtype=np.int64)]
    shares = {
        u: create_shares(os.urandom(32), threshold, num_shares)[:threshold]
        for u in range(n)
    }
    start = time.process_time()  # CPU time: robust to other work on the machine
    for share_list in shares.values():
        secret = combine_shares(share_list)
        mask = pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked))
        masked = parameters_subtraction(masked, mask)
    parameters_mod(masked, mod_range)
    return time.process_time() - start


# ======================================================================
# The orchestration (Flower's venv; fedshield through its own venv)


def rounds_of(events: dict[str, Any], first: str) -> list[float]:
    marks = [events[first], *events["round_end"]]
    return [b - a for a, b in itertools.pairwise(marks)]


def summarise(
    events: dict[str, Any], first: str, wall: float, rounds: int
) -> dict[str, Any]:
    durations = rounds_of(events, first) if first in events else []
    ok = len(durations) == rounds
    return {
        "ok": ok,
        "wall_s": wall,
        "round1_s": durations[0] if durations else None,
        "round_s": statistics.median(durations[1:]) if len(durations) > 1 else None,
        "rounds_done": len(durations),
        "accuracy": events["accuracy"][-1] if events.get("accuracy") else None,
    }


def run_subprocess(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            start_new_session=True,
        )
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = -1
        err = (
            (exc.stderr or b"").decode(errors="replace")
            if isinstance(exc.stderr, bytes)
            else str(exc.stderr or "")
        )
        err += f"\n(timed out after {RUN_TIMEOUT_S} s)"
    return code, time.perf_counter() - start, err


def tail(text: str, lines: int = 6) -> str:
    """The lines that say why a run failed (errors, aborts), else the last ones."""
    kept = [" ".join(line.split()) for line in text.strip().splitlines()]
    kept = [line for line in kept if line and not line.startswith(("round ", "━"))]
    why = [
        line
        for line in kept
        if any(
            w in line.lower()
            for w in ("error", "aborted", "not connected", "died", "traceback")
        )
    ]
    return "\n".join((why or kept)[-lines:])


def flower_case(
    clients: int, num_shares: int, threshold: int, secagg: bool, rounds: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fs-secagg-") as tmp:
        events_path = Path(tmp) / "events.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one-run",
            "--clients",
            str(clients),
            "--rounds",
            str(rounds),
            "--num-shares",
            str(num_shares),
            "--threshold",
            str(threshold),
            "--events",
            str(events_path),
            "--ray-temp-dir",
            str(Path(tmp) / "ray"),
            *(["--secagg"] if secagg else []),
        ]
        env = dict(os.environ)
        env.update(
            FLWR_TELEMETRY_ENABLED="0",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DEDUP_LOGS="0",
            OMP_NUM_THREADS="1",
        )
        code, wall, err = run_subprocess(cmd, env)
        events = json.loads(events_path.read_text()) if events_path.exists() else {}
    result = (
        summarise(events, "initial_eval_end", wall, rounds)
        if events
        else {
            "ok": False,
            "wall_s": wall,
            "rounds_done": 0,
        }
    )
    result["exit_code"] = code
    if not result["ok"] or code != 0:
        result["ok"] = False
        result["error"] = tail(err)
    return result


def fedshield_case(
    clients: int, secagg: bool, rounds: int, neighbours: int | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fs-secagg-") as tmp:
        events_path = Path(tmp) / "events.json"
        sets = [
            f"data.num_clients={clients}",
            f"strategy.clients_per_round={clients}",
            f"run.rounds={rounds}",
            f"run.seed={SEED}",
            "run.report=false",
        ]
        if secagg:
            sets.append('secagg.protocol="secagg+"')
        if neighbours is not None:
            # Below the secure minimum on purpose (Flower's graph size): the
            # config refuses it unless the risk is named.
            sets.append(f"secagg.neighbours={neighbours}")
            sets.append("secagg.allow_insecure_neighbours=true")
        cmd = [
            str(FEDSHIELD_PYTHON),
            str(DRIVER),
            str(events_path),
            "simulate",
            str(PEERS_TOML),
            *[arg for s in sets for arg in ("--set", s)],
            "--out",
            str(Path(tmp) / "run"),
            "--overwrite",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        code, wall, err = run_subprocess(cmd, env)
        out = ""
        if code != 0:
            # fedshield prints its refusal on stdout/stderr; keep the tail.
            out = err
        events = json.loads(events_path.read_text()) if events_path.exists() else {}
    if "round1_start" in events:
        result = summarise(events, "round1_start", wall, rounds)
    else:
        result = {"ok": False, "wall_s": wall, "rounds_done": 0}
    result["exit_code"] = code
    if not result["ok"] or code != 0:
        result["ok"] = False
        result["error"] = tail(out)
    return result


def fedshield_k(clients: int) -> str:
    """fedshield's SecAgg+ neighbour count for ``clients`` ([secagg] defaults)."""
    code = (
        "from fedshield.simulation.secure import SecureAggregation\n"
        f"n = {clients}\n"
        "c = SecureAggregation(protocol='secagg+').protocol_config(n, 40, 1)\n"
        "print(c.neighbour_count(n))"
    )
    out = subprocess.run(
        [str(FEDSHIELD_PYTHON), "-c", code], capture_output=True, text=True
    )
    return out.stdout.strip() if out.returncode == 0 else "?"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}) shared with other work"


def fedshield_unmask_micro(n: int, d: int) -> dict[str, Any]:
    cmd = [
        str(FEDSHIELD_PYTHON),
        str(HERE / "cost.py"),
        "--unmask-micro",
        str(n),
        str(d),
    ]
    code, _, err = run_subprocess(cmd, dict(os.environ))
    if code != 0:
        return {"ok": False, "error": tail(err)}
    return {"ok": True, **json.loads((WORK / "unmask-micro.json").read_text())}


def fmt(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    return f"{value:.3f}"


def render(results: dict[str, Any]) -> str:
    rounds = results["rounds"]
    lines = [
        BEGIN,
        "## Flower's SecAgg+ beside fedshield's (`flower_secaggplus.py`)",
        "",
        f"Command: `make bench-secagg` (this part: `{results['command']}`), "
        f"{results['date']}, {results['machine']}; flwr {results['flwr']}, "
        f"Ray {results['ray']}. Digits MLP (4,810 parameters), every client "
        f"every round, {rounds} rounds; *round* is the median of rounds "
        f"2..{rounds} (end of one centralised evaluation to the end of the "
        "next), *round 1* the first, *wall* the whole process (imports, Ray "
        "start-up and shutdown included). One run each, on a 2-core shared "
        "machine: noisy, differences under ~30 % mean little.",
        "",
        "| case | framework | aggregation | round | round 1 | wall | accuracy "
        "| status |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        r = row["result"]
        status = (
            "ok"
            if r["ok"]
            else "FAILED: "
            + (
                r.get("error", "").replace("\n", " / ").replace("|", "\\|")[:300]
                or f"exit {r.get('exit_code')}"
            )
        )
        acc = r.get("accuracy")
        lines.append(
            f"| {row['case']} | {row['framework']} | {row['aggregation']} "
            f"| {fmt(r.get('round_s'))} | {fmt(r.get('round1_s'))} "
            f"| {fmt(r.get('wall_s'))} | {'-' if acc is None else f'{acc:.3f}'} "
            f"| {status} |"
        )
    lines.append("")
    ratios = []
    for case in sorted({row["case"] for row in results["rows"]}):
        by = {
            (row["framework"], row["secure"]): row["result"]
            for row in results["rows"]
            if row["case"] == case and row.get("primary", True)
        }
        for fw in ("Flower", "fedshield"):
            plain, secure = by.get((fw, False)), by.get((fw, True))
            if plain and secure and plain.get("round_s") and secure.get("round_s"):
                ratios.append(
                    f"{case} {fw}: secure round / plain round = "
                    f"{secure['round_s'] / plain['round_s']:.1f}x "
                    f"(+{secure['round_s'] - plain['round_s']:.3f} s)"
                )
        flower, ours = by.get(("Flower", True)), by.get(("fedshield", True))
        if flower and ours and flower.get("round_s") and ours.get("round_s"):
            ratios.append(
                f"{case}: Flower's secure round / fedshield's secure round = "
                f"{flower['round_s'] / ours['round_s']:.1f}x"
            )
    if ratios:
        lines += ["Overhead of secure aggregation per round:", ""]
        lines += [f"- {r}" for r in ratios]
        lines.append("")
    micro = results.get("micro")
    if micro:
        lines += [
            "### Server-side unmasking, n = 100, d = 100,000 (one round, no dropouts)",
            "",
            "| framework | what is timed | CPU seconds |",
            "|---|---|---:|",
            f"| Flower | `combine_shares` + `pseudo_rand_gen` + subtraction for 100 "
            f"survivors, num_shares = 3 (threshold 2) | {micro['flower_s']:.3f} |",
        ]
        fs = micro.get("fedshield", {})
        if fs.get("ok"):
            lines.append(
                f"| fedshield | `SecAggServer.receive` of the unmask stage (Shamir "
                f"rebuild of 100 self-mask seeds with t_u = {fs['local_threshold']}, "
                f"AES-CTR expansion, subtraction), k = {fs['neighbours']} "
                f"| {fs['unmask_receive_s']:.3f} |"
            )
        else:
            lines.append(f"| fedshield | failed: {fs.get('error', '')[:200]} | - |")
        lines.append("")
    lines += [
        "### The mask generators",
        "",
        "- **Flower 1.42.0**: `pseudo_rand_gen` in "
        "`flwr/common/secure_aggregation/secaggplus_utils.py` folds the seed "
        "(the client's 32-byte self-mask seed from `os.urandom`, or the "
        "44-byte url-safe base64 of the HKDF-SHA256 output of an ECDH "
        "(SECP384R1) agreement, `generate_shared_key` in "
        "`flwr/common/secure_aggregation/crypto/symmetric_encryption.py`) "
        "into 32 bits by XOR-ing its 4-byte little-endian words, seeds "
        "`np.random.RandomState(seed32)` (Mersenne Twister MT19937) and draws "
        "`randint(0, num_range - 1)` (values in [0, 2**32 - 2], the top value "
        "never drawn). A mask therefore has at most 2**32 possible values: a "
        "server can try every 32-bit seed against a masked vector, and MT19937 "
        "is not a cryptographic generator (its state is recoverable from 624 "
        "outputs).",
        "- **fedshield**: `expand_mask` in `src/fedshield/secagg/crypto.py`: "
        "AES-256-CTR keystream (`cryptography`) keyed by a 32-byte seed (the "
        "self-mask seed from `os.urandom`, or the HKDF-SHA256 output of an "
        "X25519 agreement bound to session, round and the pair of ids), 8 bytes "
        "per word masked to b bits, exactly uniform mod 2**b.",
        "",
        "Graphs differ too: Flower's SecAgg+ puts the clients on a ring in a "
        "random order and gives each the `num_shares - 1` nearest (2 for "
        "num_shares = 3); fedshield draws an Erdos-Renyi graph from a public "
        "seed with k chosen for sigma = 40 bits of security at 10 % dropout "
        "(k = n - 1 up to about n = 100), and refuses a k that leaves a client "
        "isolated.",
        END,
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    current = RESULTS.read_text() if RESULTS.exists() else "# Secure aggregation\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        _, after = rest.split(END, 1)
        updated = head + text + after
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(updated)


def orchestrate(args: argparse.Namespace) -> int:
    import flwr
    import ray

    WORK.mkdir(exist_ok=True)
    rounds = args.rounds
    cases = dict(CASES)
    if not args.skip_full50:
        cases[FULL50[0]] = FULL50[1]
    rows: list[dict[str, Any]] = []
    for key, (clients, shares, threshold, _) in cases.items():
        label = f"{key}: {clients} clients"
        flower_graph = "full graph" if shares >= clients else f"num_shares={shares}"
        runs: list[tuple[str, str, bool, Any]] = []
        if key != "c":
            runs += [
                ("Flower", "plain", False, None),
                ("Flower", f"SecAgg+ ({flower_graph}, t={threshold})", True, None),
                ("fedshield", "plain", False, None),
                (
                    "fedshield",
                    f"secagg+ (k = {fedshield_k(clients)}, chosen)",
                    True,
                    None,
                ),
            ]
            if key == "b":
                runs.append(("fedshield", "secagg+ neighbours=3", True, 3))
        else:
            label += f", {FULL50_ROUNDS} rounds"
            runs.append(
                ("Flower", f"SecAgg+ ({flower_graph}, t={threshold})", True, None)
            )
        for framework, aggregation, secure, neighbours in runs:
            print(
                f"[{label}] {framework} {aggregation} ...", file=sys.stderr, flush=True
            )
            count = FULL50_ROUNDS if key == FULL50[0] else rounds
            if framework == "Flower":
                result = flower_case(clients, shares, threshold, secure, count)
            else:
                result = fedshield_case(clients, secure, count, neighbours)
            print(
                f"    round {fmt(result.get('round_s'))}, "
                f"wall {fmt(result.get('wall_s'))}, ok={result['ok']}",
                file=sys.stderr,
                flush=True,
            )
            if not result["ok"]:
                print("    " + result.get("error", "")[-400:], file=sys.stderr)
            rows.append(
                {
                    "case": label,
                    "framework": framework,
                    "aggregation": aggregation,
                    "secure": secure,
                    "primary": neighbours is None,
                    "result": result,
                }
            )
    micro = None
    if not args.skip_micro:
        print("[micro] server-side unmasking, n=100, d=100000", file=sys.stderr)
        micro = {
            "flower_s": flower_unmask_micro(100, 100_000, 3, 2),
            "fedshield": fedshield_unmask_micro(100, 100_000),
        }
    results = {
        "command": " ".join(
            [
                ".bench-peers/flower-venv/bin/python",
                "bench/secagg/flower_secaggplus.py",
                *sys.argv[1:],
            ]
        ),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "rounds": rounds,
        "rows": rows,
        "micro": micro,
    }
    (WORK / "peers.json").write_text(json.dumps(results, indent=1))
    write_section(render(results))
    print(render(results))
    return 0


def fedshield_only(cases: list[str], rounds: int) -> int:
    """fedshield's secure runs of ``cases`` only: printed, nothing written."""
    ok = True
    for key in cases:
        clients = CASES[key][0]
        result = fedshield_case(clients, True, rounds)
        ok = ok and bool(result["ok"])
        print(
            json.dumps(
                {
                    "case": f"{key}: {clients} clients",
                    "aggregation": f"secagg+ (k = {fedshield_k(clients)}, chosen)",
                    "rounds": rounds,
                    **{
                        name: result.get(name)
                        for name in ("ok", "round_s", "round1_s", "wall_s", "accuracy")
                    },
                }
            )
        )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-full50", action="store_true")
    parser.add_argument(
        "--fedshield-only",
        nargs="+",
        choices=sorted(CASES),
        metavar="CASE",
        help="only fedshield's secure run of these cases (a, b), printed as JSON; "
        "RESULTS.md is left alone (needs only fedshield's .venv)",
    )
    # Internal: one Flower run.
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-shares", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threshold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--secagg", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ray-temp-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_run:
        return flower_run(args)
    if args.fedshield_only:
        return fedshield_only(args.fedshield_only, args.rounds)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
