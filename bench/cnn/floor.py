"""The Fashion-MNIST CNN round against the compute floor (issue 13).

Run: ``.venv/bin/python bench/cnn/floor.py [--quick] [--no-write] [--no-flower]``
(``make bench-cnn``). It writes ``bench/cnn/RESULTS.md`` and
``bench/cnn/results.json`` unless ``--no-write``.

The task is ``examples/fashion_mnist.toml`` as shipped (50 clients with two
label shards each, the built-in CNN with 16 and 32 channels, 10 clients per
round, one local epoch of batch 32, SGD lr 0.05 with momentum 0.9, FedAvg),
with three changes so that a round is only what the floor does too:
``run.federated_eval = false`` (the clients do not evaluate),
``run.eval_every = R`` (the server evaluates after the last round only, and
that round is not timed) and ``run.report = false``.

**fedshield**: ``fedshield.simulate`` of that configuration, once per backend
(``auto``, which picks what a user gets, then ``sequential`` and
``vectorised`` explicitly); a round is timed from the end of the previous
round's callback to the start of its own, so it holds everything the run
does per round (building the clients, training, aggregation, the metrics
line and checkpoint).

**The floor**: in the same process, with the same torch thread count, run
from ``on_round`` right after each fedshield round: one plain PyTorch loop
that, for every client fedshield sampled in that round, loads the global
model into a ``torch.nn.Module`` of the same architecture, trains it with
``torch.optim.SGD`` over the same mini-batches (the client's own rows,
shuffled each epoch by a ``torch.Generator`` seeded as fedshield seeds it,
so the same examples in the same order), and then averages the clients'
parameters weighted by their example counts with plain torch. It starts from
the same global model as fedshield's round, so its result must equal
fedshield's new global model up to rounding: the largest difference is
reported (``floor_gap``), as proof that both did the same work. A second
floor, ``floor-cl``, is the same loop with the module in PyTorch's
channels-last memory format, the fastest plain loop we found (oneDNN's fast
path for convolutions and pooling), so that a framework faster than the
plain floor is also compared with a tuned one.

Rounds alternate fedshield / floor / floor-cl (the two floors swap places
every round) and the backends rotate between repeats; each ratio is the
median over the paired rounds of fedshield's round divided by the floor's
round measured right after it. Round 1 (first-call costs) and the last round
(server evaluation) are not timed.

**Flower** (optional, ``.bench-peers/flower-venv`` as ``make bench-peers``
builds it): ``bench/cnn/flower_cnn.py`` runs the same task with Flower 1.42
(``run_simulation`` on Ray), same clients per round, same initial weights,
same mini-batches, by default with one client actor at a time (one torch
thread, as the floor) and in the full run also with two actors (both
cores). After each Flower run the floor runs the same rounds again in this
process, and Flower's median round is divided by that.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = ROOT / "examples" / "fashion_mnist.toml"
PEERS = ROOT / "bench" / "peers"
FLOWER_PYTHON = ROOT / ".bench-peers" / "flower-venv" / "bin" / "python"
BACKENDS = ("auto", "sequential", "vectorised")
# The vectorised backend as it was before issue 13: the CNN through the general
# torch.func.vmap step (grouped convolutions) instead of the hand-written one.
VMAP = "vectorised-vmap"
LABELS = {
    "auto": "auto (→ {resolved})",
    VMAP: "vectorised, vmap step (before issue 13)",
}
FLOORS = ("floor", "floor-cl")
GOAL = 1.2  # the goal: a round within 1.2x of the floor
SEED_BOUND = 2**63  # TorchModel.train draws its seeds below this
FULL = {"rounds": 8, "repeats": 2, "flower_repeats": 2}
QUICK = {"rounds": 4, "repeats": 1, "flower_repeats": 1}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def overrides(rounds: int, backend: str) -> list[str]:
    return [
        f"run.rounds={rounds}",
        f"run.backend={backend}",
        "run.federated_eval=false",
        f"run.eval_every={rounds}",
        "run.report=false",
    ]


# ------------------------------------------------------------------ the task


@dataclass
class Task:
    """What every round trains: clients, their rows, batches and settings."""

    rounds: int
    seed: int
    client_ids: list[str]
    data: dict[str, tuple[Any, Any]]  # client id -> (x (n, C, H, W), y (n,))
    schedule: list[list[str]]  # clients sampled in each round
    shuffle_seeds: list[dict[str, int]]  # per round, client id -> seed
    kind: str
    hidden: list[int]
    input_shape: tuple[int, ...]
    num_classes: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    threads: int
    init: np.ndarray  # the initial global model, flat
    names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)


def build_task(rounds: int) -> Task:
    """The example's federation, as fedshield builds it for ``rounds`` rounds."""
    import torch

    from fedshield.api import build_federation, build_strategy, load_config
    from fedshield.core import derive_rng

    config = load_config(CONFIG, overrides(rounds, "auto"))
    federation = build_federation(config)
    shape = tuple(int(s) for s in federation.train.input_shape)
    data = {}
    for cid in federation.client_ids:
        x, y = federation.client_fn(cid).train_data
        data[str(cid)] = (
            torch.from_numpy(np.array(x, dtype=np.float32)).reshape(-1, *shape),
            torch.from_numpy(np.array(y, dtype=np.int64)),
        )
    seed = config.run.seed
    strategy: Any = build_strategy(config)
    sampler = strategy.sampler
    schedule = [
        [
            str(c)
            for c in sampler.sample(
                federation.client_ids,
                round_idx=r,
                rng=derive_rng(seed, "configure", r),
            )
        ]
        for r in range(rounds)
    ]
    # TorchModel.train draws two seeds from the client's generator, the first
    # seeding the torch.Generator of its per-epoch shuffles.
    shuffle_seeds = [
        {
            cid: int(
                derive_rng(seed, "stage", "fit", r, cid).integers(SEED_BOUND, size=2)[0]
            )
            for cid in clients
        }
        for r, clients in enumerate(schedule)
    ]
    init = federation.model.init_params(seed)
    spec = init.spec
    return Task(
        rounds=rounds,
        seed=seed,
        client_ids=[str(c) for c in federation.client_ids],
        data=data,
        schedule=schedule,
        shuffle_seeds=shuffle_seeds,
        kind=config.model.kind,
        hidden=list(config.model.hidden),
        input_shape=shape,
        num_classes=int(federation.train.num_classes),
        epochs=config.client.epochs,
        batch_size=config.client.batch_size,
        lr=config.client.lr,
        momentum=config.client.momentum,
        weight_decay=config.client.weight_decay,
        threads=config.run.torch_threads,
        init=np.array(init.flat, dtype=np.float32),
        names=list(spec.names),
        shapes=[tuple(shape) for _, shape in spec.entries],
    )


# ----------------------------------------------------------------- the floor


class Floor:
    """One plain PyTorch round: every sampled client trained, then averaged."""

    def __init__(self, task: Task, *, channels_last: bool) -> None:
        import torch

        from fedshield.models.builtin import build_module

        self.task = task
        self.torch = torch
        module = build_module(
            task.kind,
            input_shape=task.input_shape,
            num_classes=task.num_classes,
            hidden=task.hidden,
        )
        if channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.module = module.train()
        self.params = list(module.parameters())
        names = [n for n, _ in module.named_parameters()]
        if names != task.names:
            raise RuntimeError(
                f"the floor's module has {names}, fedshield's {task.names}"
            )

    def train_client(self, start: Any, cid: str, seed: int) -> Any:
        torch = self.torch
        task = self.task
        with torch.no_grad():  # load the global model (copy_ keeps the layout)
            offset = 0
            for p in self.params:
                p.copy_(start[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        optimizer = torch.optim.SGD(
            self.params,
            lr=task.lr,
            momentum=task.momentum,
            weight_decay=task.weight_decay,
        )
        x, y = task.data[cid]
        n = int(y.shape[0])
        generator = torch.Generator().manual_seed(seed)
        for _ in range(task.epochs):
            order = torch.randperm(n, generator=generator)
            for begin in range(0, n, task.batch_size):
                idx = order[begin : begin + task.batch_size]
                loss = torch.nn.functional.cross_entropy(self.module(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def round(self, r: int, start: Any) -> Any:
        """Round ``r`` (0-based) from the flat global model ``start``."""
        torch = self.torch
        clients = self.task.schedule[r]
        trained = torch.stack(
            [
                self.train_client(start, c, self.task.shuffle_seeds[r][c])
                for c in clients
            ]
        )
        weights = torch.tensor(
            [float(self.task.data[c][1].shape[0]) for c in clients],
            dtype=torch.float32,
        )
        return (weights @ trained) / weights.sum()

    def warm_up(self) -> None:
        """First-call costs (torch.optim's first step imports torch._dynamo)."""
        start = self.torch.from_numpy(self.task.init.copy())
        cid = self.task.schedule[0][0]
        self.train_client(start, cid, 0)


# ----------------------------------------------------------------- fedshield


def run_fedshield(
    task: Task, variant: str, floors: dict[str, Floor], out: Path, repeat: int
) -> dict[str, Any]:
    """One ``fedshield.simulate`` run, each round paired with the floors."""
    import torch

    import fedshield
    import fedshield.models.vectorised as vectorised

    backend = "vectorised" if variant == VMAP else variant
    config = fedshield.load_config(CONFIG, overrides(task.rounds, backend))
    rounds: list[dict[str, Any]] = []
    now: dict[str, Any] = {}

    def on_start(federation: Any, state: Any) -> None:
        now["params"] = state.params
        now["t"] = time.perf_counter()

    def on_round(state: Any, record: Mapping[str, Any]) -> None:
        ended = time.perf_counter()
        fed_s = ended - now["t"]
        r = int(record["round"]) - 1
        start = torch.from_numpy(np.array(now["params"].flat, dtype=np.float32))
        new = np.array(state.params.flat, dtype=np.float32)
        row: dict[str, Any] = {"round": r + 1, "fedshield_s": fed_s}
        order = FLOORS if r % 2 == 0 else FLOORS[::-1]
        for name in order:
            began = time.perf_counter()
            result = floors[name].round(r, start)
            row[f"{name}_s"] = time.perf_counter() - began
            row[f"{name}_gap"] = float(np.abs(result.numpy() - new).max())
        row["threads"] = torch.get_num_threads()
        rounds.append(row)
        now["params"] = state.params
        now["t"] = time.perf_counter()

    conv_chain = vectorised._conv_chain
    if variant == VMAP:  # no convolutional chain: the general vmap step
        vectorised._conv_chain = lambda module: None
    try:
        summary, _ = fedshield.simulate(
            config,
            out=out / f"{variant}-{repeat}",
            overwrite=True,
            on_start=on_start,
            on_round=on_round,
            write_report=False,
        )
    finally:
        vectorised._conv_chain = conv_chain
    return {
        "backend": variant,
        "resolved": summary.get("backend"),
        "accuracy": summary.get("accuracy"),
        "rounds": rounds,
    }


def timed(rounds: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """Rounds 2..R-1: not the first (first calls) nor the last (evaluation)."""
    return [row for row in rounds if 1 < row["round"] < total]


def summarize_fedshield(runs: list[dict[str, Any]], total: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for backend in (*BACKENDS, VMAP):
        rows = [
            row
            for run in runs
            if run["backend"] == backend
            for row in timed(run["rounds"], total)
        ]
        if not rows:
            continue
        entry: dict[str, Any] = {
            "resolved": next(r["resolved"] for r in runs if r["backend"] == backend),
            "paired_rounds": len(rows),
            "fedshield_s": statistics.median(r["fedshield_s"] for r in rows),
        }
        for name in FLOORS:
            entry[f"{name}_s"] = statistics.median(r[f"{name}_s"] for r in rows)
            entry[f"ratio_{name}"] = statistics.median(
                r["fedshield_s"] / r[f"{name}_s"] for r in rows
            )
            entry[f"ratio_{name}_range"] = [
                min(r["fedshield_s"] / r[f"{name}_s"] for r in rows),
                max(r["fedshield_s"] / r[f"{name}_s"] for r in rows),
            ]
            entry[f"{name}_gap_max"] = max(
                r[f"{name}_gap"]
                for run in runs
                if run["backend"] == backend
                for r in run["rounds"]
            )
        result[backend] = entry
    return result


# -------------------------------------------------------------------- Flower


def export_task(task: Task, path: Path) -> None:
    """Everything Flower's side needs, as arrays (it does not import fedshield)."""
    index = {cid: i for i, cid in enumerate(task.client_ids)}
    xs = [
        task.data[c][0].reshape(task.data[c][0].shape[0], -1).numpy()
        for c in task.client_ids
    ]
    ys = [task.data[c][1].numpy() for c in task.client_ids]
    offsets = np.concatenate([[0], np.cumsum([len(y) for y in ys])]).astype(np.int64)
    np.savez(
        path,
        x=np.concatenate(xs),
        y=np.concatenate(ys),
        offsets=offsets,
        schedule=np.array(
            [[index[c] for c in clients] for clients in task.schedule], dtype=np.int64
        ),
        seeds=np.array(
            [
                [task.shuffle_seeds[r][c] for c in clients]
                for r, clients in enumerate(task.schedule)
            ],
            dtype=np.int64,
        ),
        init=task.init,
        input_shape=np.array(task.input_shape, dtype=np.int64),
        hidden=np.array(task.hidden, dtype=np.int64),
        num_classes=np.array(task.num_classes),
        settings=np.array(
            [task.epochs, task.batch_size, task.lr, task.momentum, task.weight_decay],
            dtype=np.float64,
        ),
    )


def flower_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{FLOWER_PYTHON.parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # offline machine: no telemetry calls
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def run_flower(
    task_path: Path, out: Path, tag: str, cpus_per_client: float
) -> dict[str, Any]:
    events = out / f"flower-{tag}.json"
    ray_dir = Path(tempfile.mkdtemp(prefix="cnn-ray-"))
    cmd = [
        str(FLOWER_PYTHON),
        str(HERE / "flower_cnn.py"),
        str(task_path),
        str(events),
        "--cpus-per-client",
        str(cpus_per_client),
        "--ray-temp-dir",
        str(ray_dir),
    ]
    began = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=flower_env(), capture_output=True, text=True, timeout=900
        )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    (out / f"flower-{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not events.exists():
        raise RuntimeError(
            f"flower run {tag} failed (exit {proc.returncode}); see its log in {out}"
        )
    data = json.loads(events.read_text())
    ends = [data["initial_eval_end"], *data["round_end"]]
    rounds = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "wall_s": time.perf_counter() - began,
        "rounds_s": rounds,
        "round1": (
            np.array(data["round1"], dtype=np.float32) if data.get("round1") else None
        ),
    }


def floor_run(task: Task, floor: Floor) -> tuple[list[float], Any]:
    """The floor alone over all rounds, chained from the initial model.

    Returns each round's seconds and the global model after round 1.
    """
    torch = floor.torch
    params = torch.from_numpy(task.init.copy())
    times = []
    first = None
    for r in range(task.rounds):
        began = time.perf_counter()
        params = floor.round(r, params)
        times.append(time.perf_counter() - began)
        if first is None:
            first = params
    return times, first


def compare_flower(
    task: Task, floor: Floor, out: Path, repeats: int, full: bool
) -> dict[str, Any]:
    task_path = out / "task.npz"
    export_task(task, task_path)
    # Two actors (both cores, unlike the floor) once, for information.
    settings = [("one-actor", 2.0, repeats)] + (
        [("two-actors", 1.0, 1)] if full else []
    )
    result: dict[str, Any] = {}
    for label, cpus, runs in settings:
        pairs = []
        for i in range(runs):
            log(f"flower ({label}) run {i + 1}/{runs}")
            flower = run_flower(task_path, out, f"{label}-{i}", cpus)
            log(f"floor for flower ({label}) run {i + 1}/{runs}")
            floor_times, floor_round1 = floor_run(task, floor)
            gap = (
                float(np.abs(flower["round1"] - floor_round1.numpy()).max())
                if flower["round1"] is not None
                else None
            )
            # Round 1 is Ray's actors starting and loading the data.
            pairs.append(
                {
                    "flower_s": statistics.median(flower["rounds_s"][1:]),
                    "floor_s": statistics.median(floor_times[1:]),
                    "flower_rounds_s": flower["rounds_s"],
                    "floor_rounds_s": floor_times,
                    "flower_wall_s": flower["wall_s"],
                    "round1_gap": gap,
                }
            )
        result[label] = {
            "cpus_per_client": cpus,
            "flower_s": statistics.median(p["flower_s"] for p in pairs),
            "floor_s": statistics.median(p["floor_s"] for p in pairs),
            "ratio_floor": statistics.median(
                p["flower_s"] / p["floor_s"] for p in pairs
            ),
            "round1_gap_max": max(
                (p["round1_gap"] for p in pairs if p["round1_gap"] is not None),
                default=None,
            ),
            "runs": pairs,
        }
    return result


# ------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    import torch

    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, CPU only, shared with "
            "other jobs"
        ),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": 1,
        "loadavg": os.getloadavg(),
        "commit": commit,
    }


def span(bounds: list[float]) -> str:
    return f"({bounds[0]:.2f}–{bounds[1]:.2f})"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    env = results["environment"]
    fs = results["fedshield"]
    sizes = "/".join(str(n) for n in results["examples_per_client"])
    rows = []
    for backend, e in fs.items():
        rows.append(
            [
                LABELS.get(backend, backend).format(resolved=e["resolved"]),
                f"{e['fedshield_s']:.3f} s",
                f"{e['floor_s']:.3f} s",
                f"**{e['ratio_floor']:.2f}×** {span(e['ratio_floor_range'])}",
                f"{e['floor-cl_s']:.3f} s",
                f"{e['ratio_floor-cl']:.2f}× {span(e['ratio_floor-cl_range'])}",
                f"{e['floor_gap_max']:.1e}",
                str(e["paired_rounds"]),
            ]
        )
    text = [
        "# The Fashion-MNIST CNN against the compute floor (issue 13)",
        "",
        f"Command: `{results['command']}` ({env['date']}, commit "
        f"`{(env['commit'] or '?')[:12]}`). Machine: {env['machine']}; "
        f"torch {env['torch']}, {env['torch_threads']} torch thread; load average "
        f"before the run {env['loadavg'][0]:.2f}. Method: the docstring of "
        "`bench/cnn/floor.py`; raw numbers: `bench/cnn/results.json`.",
        "",
        f"Task: `examples/fashion_mnist.toml` ({results['clients_per_round']} of "
        f"{results['clients']} clients per round, {sizes} "
        "training images each, CNN 16/32 channels, "
        f"{results['parameters']:,} parameters, 1 epoch of batch 32, SGD "
        "momentum 0.9), without client or server evaluation in the timed rounds; "
        f"{results['rounds']} rounds per run, rounds 2–{results['rounds'] - 1} "
        f"timed, {results['repeats']} run(s) per backend.",
        "",
        md_table(
            [
                "backend",
                "fedshield round",
                "plain floor",
                "ratio (range)",
                "channels-last floor",
                "ratio (range)",
                "max gap to floor",
                "paired rounds",
            ],
            rows,
        ),
        "",
        "Ratio: median over the paired rounds of fedshield's round divided by the "
        "floor's round measured right after it. Gap: the largest difference "
        "between fedshield's new global model and the floor's from the same "
        "start (same clients, same batches: only rounding differs).",
        "",
    ]
    goal = fs.get("auto", {}).get("ratio_floor")
    if goal is not None:
        met = "met" if goal <= GOAL else "not met"
        text += [
            f"Goal (a round within {GOAL}× of the floor, as `auto` runs it): "
            f"**{met}** ({goal:.2f}×).",
            "",
        ]
    flower = results.get("flower")
    if isinstance(flower, dict) and flower:
        frows = [
            [
                label,
                f"{e['flower_s']:.3f} s",
                f"{e['floor_s']:.3f} s",
                f"{e['ratio_floor']:.2f}×",
                "—" if e["round1_gap_max"] is None else f"{e['round1_gap_max']:.1e}",
            ]
            for label, e in flower.items()
        ]
        text += [
            "Flower 1.42 (Ray), same task, same batches; after each Flower run the "
            "floor ran the same rounds in this process (round 1 not timed):",
            "",
            md_table(
                [
                    "Flower",
                    "round",
                    "floor (same time)",
                    "ratio",
                    "max gap to floor after round 1",
                ],
                frows,
            ),
            "",
            "one-actor: `num_cpus = 2` per client, so one client trains at a time "
            "with one torch thread, as the floor; two-actors: `num_cpus = 1`, two "
            "clients train at once on the two cores (twice the floor's cores).",
            "",
        ]
    elif isinstance(flower, str):
        text += [f"Flower: {flower}", ""]
    text += [
        "Why the ratios are what they are (operator profiles of each way of "
        "training a round, from `.venv/bin/python bench/cnn/profile_step.py`), "
        "and the example's end-to-end time: BENCHMARKS.md, section \"A real "
        'model: the Fashion-MNIST CNN against the compute floor".',
        "",
    ]
    path.write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="4 rounds, 1 run per backend, no Flower"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower")
    parser.add_argument(
        "--flower", action="store_true", help="run Flower with --quick too"
    )
    parser.add_argument("--rounds", type=int, help="rounds per run (>= 3)")
    parser.add_argument("--repeats", type=int, help="runs per backend")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        plan["rounds"] = max(3, args.rounds)
    if args.repeats is not None:
        plan["repeats"] = plan["flower_repeats"] = max(1, args.repeats)
    with_flower = not args.no_flower and (args.flower or not args.quick)

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    env = environment()
    torch.set_num_threads(1)
    task = build_task(plan["rounds"])
    floors = {name: Floor(task, channels_last=name == "floor-cl") for name in FLOORS}
    for floor in floors.values():
        floor.warm_up()
    out = Path(tempfile.mkdtemp(prefix="bench-cnn-"))
    runs = []
    try:
        for repeat in range(plan["repeats"]):
            variants = BACKENDS if args.quick else (*BACKENDS, VMAP)
            shift = repeat % len(variants)
            for backend in variants[shift:] + variants[:shift]:
                log(f"fedshield {backend}, run {repeat + 1}/{plan['repeats']}")
                runs.append(run_fedshield(task, backend, floors, out, repeat))
        results: dict[str, Any] = {
            "command": "make bench-cnn"
            if not args.quick
            else ".venv/bin/python bench/cnn/floor.py --quick",
            "environment": env,
            "rounds": plan["rounds"],
            "repeats": plan["repeats"],
            "clients": len(task.client_ids),
            "clients_per_round": len(task.schedule[0]),
            "examples_per_client": sorted(
                {int(task.data[c][1].shape[0]) for c in task.client_ids}
            ),
            "parameters": int(task.init.size),
            "fedshield": summarize_fedshield(runs, plan["rounds"]),
            "fedshield_runs": runs,
        }
        if with_flower:
            if not FLOWER_PYTHON.exists():
                results["flower"] = (
                    "not run: .bench-peers/flower-venv is missing "
                    "(make bench-peers builds it)"
                )
            else:
                try:
                    results["flower"] = compare_flower(
                        task,
                        floors["floor"],
                        out,
                        plan["flower_repeats"],
                        not args.quick,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    results["flower"] = f"failed: {err}"
        torch.set_num_threads(1)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    summary = {k: v for k, v in results.items() if k != "fedshield_runs"}
    if isinstance(summary.get("flower"), dict):
        summary["flower"] = {
            k: {kk: vv for kk, vv in v.items() if kk != "runs"}
            for k, v in summary["flower"].items()
        }
    print(json.dumps(summary, indent=1, default=str))
    if not args.no_write:
        (HERE / "results.json").write_text(
            json.dumps(results, indent=1, default=str) + "\n"
        )
        write_markdown(results, HERE / "RESULTS.md")
        log(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
