"""fedshield against Flower on the same federated task, side by side.

Run: make bench-peers
     (or .venv/bin/python bench/peers/run_peers.py [--quick] [--repeats N])

The task, in both frameworks: FedAvg of an MLP 64 -> 64 -> 10 (ReLU) over
IID slices of scikit-learn's digits, 1 local epoch, batch 32, plain SGD
lr 0.05, centralised evaluation of the global model on the 20 % held-out test
split after every round, no federated evaluation, 20 rounds, in three cases:

    a   10 clients, all 10 every round
    b   100 clients, 10 sampled per round
    c   1,000 clients (1-2 training rows each), 10 sampled per round

Both start from the same initial weights (``torch.manual_seed(seed)`` before
the module is built), train on the same rows and the same clients: the test
split, every client's slice and the clients sampled in each round are drawn
by fedshield's code and handed to the Flower app
(``.bench-peers/split-<case>-seed<seed>.npz``), whose ``PairedFedAvg`` (Flower's
FedAvg, sampling replaced) has each round train those clients. Flower's own
sampling cannot be seeded (its node ids are random), which would leave the
accuracy of cases b and c at the mercy of which 200 of the ~1,400 rows
happen to be seen; ``--flower-own-sampling`` restores it. Only the order of
the local mini-batches comes from each framework's own RNG.

Flower runs in its own virtual environment, ``.bench-peers/flower-venv``,
which this script creates and fills on first use (torch 2.13.0 first, so the
machine's CPU wheel is used, then scikit-learn and ``flwr[simulation]``
pinned to FLWR_VERSION); later runs find it ready and skip the installs.
fedshield runs as ``fedshield simulate`` (``fedshield_driver.py`` adds only
timestamps) with ``bench/peers/peers.toml``; Flower as ``flower_app.py``
(``run_simulation``, Ray backend, one CPU and one torch thread per client
actor, telemetry and Ray usage stats off since the machine is offline).

Each run is one subprocess in its own session. Measured per run: end to end
(process start to exit, imports included), start-up (process start to the
beginning of round 1), round 1, the steady-state round (median of rounds
2..R; a round runs from the end of the previous one to the end of its own
centralised evaluation), peak memory of the whole process tree (the sum of
RSS over the process and all its descendants, Ray's included, sampled every
0.1 s from /proc; the sum of PSS too, which counts shared pages once) and
the final test accuracy. ``python -c "import torch"`` is timed as the floor.
``--repeats N`` (default 3) runs every case with seeds 0..N-1 (split,
partition, initial weights, sampling and shuffling all follow the seed), the
frameworks alternating: timings and memory are the median over the N runs,
accuracy the mean (± sd). Any process of a run's tree still alive after it exits is
stopped, so no Ray process outlives the benchmark.

Results: a table on stdout, ``bench/peers/results.json`` and
``bench/peers/RESULTS.md``, with fedshield's time broken down step by step
(the real command with each step's end marked, and ``python -X importtime``
to place the imports). ``--quick`` runs
case a only, for 5 rounds, once, and writes to ``.bench-peers/quick/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / ".bench-peers"
VENV = WORK / "flower-venv"
VENV_PYTHON = VENV / "bin" / "python"
TORCH_VERSION = "2.13.0"
FLWR_VERSION = "1.42.0"
REQUIREMENTS = (
    (f"torch=={TORCH_VERSION}",),
    ("scikit-learn", f"flwr[simulation]=={FLWR_VERSION}"),
)
STAMP = VENV / ".peers-requirements"
CONFIG = HERE / "peers.toml"
SEED = 0
RUN_TIMEOUT_S = 300
RETRIES = 1  # a failed run (e.g. Ray not coming up) is tried once more
SAMPLE_S = 0.1
PSS_EVERY = 5  # PSS (smaps_rollup) is costlier to read: every 5th sample
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The goals.
GOAL_ROUND_SPEEDUP = 20.0
GOAL_E2E_SPEEDUP = 10.0
GOAL_E2E_FLOOR_MARGIN_S = 1.0
GOAL_ACCURACY_POINTS = 1.0
GOAL_MEMORY_RATIO = 0.5


@dataclass(frozen=True)
class Case:
    key: str
    clients: int
    per_round: int
    rounds: int

    @property
    def label(self) -> str:
        every = "all" if self.per_round == self.clients else f"{self.per_round}"
        return f"{self.key}: {self.clients:,} clients, {every} per round"


CASES = (Case("a", 10, 10, 20), Case("b", 100, 10, 20), Case("c", 1000, 10, 20))
# fedshield as shipped, fedshield without the HTML report (run.report=false:
# the report is what a run does after its last round), and Flower.
FRAMEWORKS = ("fedshield", "fedshield-no-report", "flower")
QUICK_CASE = Case("a", 10, 10, 5)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the venv


def venv_versions() -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "names = ['flwr', 'ray', 'torch', 'scikit-learn', 'numpy', 'grpcio']\n"
        "print(json.dumps({n: m.version(n) for n in names}"
        " | {'python': sys.version.split()[0]}))"
    )
    out = subprocess.run(
        [str(VENV_PYTHON), "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    versions: dict[str, str] = json.loads(out.stdout)
    return versions


def ensure_flower_venv() -> dict[str, str]:
    """Create and fill the Flower venv unless it is already there; return versions."""
    wanted = json.dumps(REQUIREMENTS)
    ready = VENV_PYTHON.exists() and STAMP.exists() and STAMP.read_text() == wanted
    if not ready:
        WORK.mkdir(exist_ok=True)
        if not VENV_PYTHON.exists():
            log(f"creating {VENV.relative_to(ROOT)}")
            subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
        # As the Makefile does: TORCH_INDEX (PyTorch's CPU index) where the
        # machine keeps no CPU wheel of torch, so no CUDA build is pulled.
        torch_index = os.environ.get("TORCH_INDEX")
        for i, group in enumerate(REQUIREMENTS):
            log(f"installing {' '.join(group)} into {VENV.relative_to(ROOT)}")
            index = ["--index-url", torch_index] if torch_index and i == 0 else []
            subprocess.run(
                [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", *index, *group],
                check=True,
                timeout=1800,
            )
        STAMP.write_text(wanted)
    versions = venv_versions()
    if versions["flwr"] != FLWR_VERSION or not versions["torch"].startswith(
        TORCH_VERSION
    ):
        raise SystemExit(
            f"{VENV} holds flwr {versions['flwr']} and torch {versions['torch']}, "
            f"not {FLWR_VERSION} and {TORCH_VERSION}: remove it and run again"
        )
    return versions


# --------------------------------------------------------------- the split


def export_split(case: Case, seed: int, path: Path) -> dict[str, int]:
    """Write fedshield's test split and client slices as row indices of digits."""
    import numpy as np

    from fedshield.api import build_federation, build_strategy, load_config
    from fedshield.core import derive_rng
    from fedshield.data import Dataset, load_dataset, split_test

    config = load_config(CONFIG, case_overrides(case, seed))
    federation = build_federation(config)
    dataset = load_dataset(config.data.dataset)
    # The same stratified split, drawn over a data set whose only feature is
    # the row number, gives the rows fedshield holds out.
    rows = Dataset(
        "rows",
        np.arange(len(dataset), dtype=np.float32)[:, None],
        dataset.y,
        num_classes=dataset.num_classes,
        input_shape=(1,),
    )
    train, test = split_test(
        rows,
        test_fraction=config.data.test_fraction,
        rng=derive_rng(config.run.seed, "test-split"),
    )
    train_rows = train.x[:, 0].astype(np.int64)
    test_rows = test.x[:, 0].astype(np.int64)
    if not (
        np.array_equal(dataset.x[train_rows], federation.train.x)
        and np.array_equal(dataset.x[test_rows], federation.test.x)
    ):
        raise RuntimeError("could not reproduce fedshield's test split")
    parts = [
        train_rows[federation.client_fn.local_split(cid)[0]]
        for cid in federation.client_ids
    ]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    # The clients fedshield samples in each round (run_round draws them with
    # derive_rng(seed, "configure", round_idx)), as partition numbers.
    sampler = build_strategy(config).sampler
    index = {cid: i for i, cid in enumerate(federation.client_ids)}
    schedule = np.array(
        [
            [
                index[cid]
                for cid in sampler.sample(
                    federation.client_ids,
                    round_idx=r,
                    rng=derive_rng(config.run.seed, "configure", r),
                )
            ]
            for r in range(config.run.rounds)
        ],
        dtype=np.int64,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        test=test_rows,
        client_rows=np.concatenate(parts),
        client_offsets=offsets.astype(np.int64),
        schedule=schedule,
    )
    sizes = [len(p) for p in parts]
    return {
        "test_rows": len(test_rows),
        "train_rows": int(sum(sizes)),
        "min_client_rows": min(sizes),
        "max_client_rows": max(sizes),
    }


def case_overrides(case: Case, seed: int) -> list[str]:
    return [
        f"data.num_clients={case.clients}",
        f"strategy.clients_per_round={case.per_round}",
        f"run.rounds={case.rounds}",
        f"run.seed={seed}",
    ]


# ------------------------------------------------------- process measurement


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _tree(root: int) -> dict[int, int]:
    """{pid: start time} of ``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is None:
            continue
        children.setdefault(stat[0], []).append(int(entry))
        starts[int(entry)] = stat[1]
    if root not in starts:
        return {}
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
            todo.extend(children.get(pid, ()))
    return tree


class TreeMonitor(threading.Thread):
    """Samples the memory of a process tree until stopped."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.seen: dict[int, int] = {}

    def run(self) -> None:
        sample = 0
        while not self.stop.is_set():
            tree = _tree(self.root)
            self.seen.update(tree)
            self.peak_processes = max(self.peak_processes, len(tree))
            self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in tree))
            if sample % PSS_EVERY == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in tree))
            sample += 1
            self.stop.wait(SAMPLE_S)


def _alive(seen: dict[int, int]) -> list[int]:
    alive = []
    for pid, start in seen.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == start:
            alive.append(pid)
    return alive


def _stop_leftovers(seen: dict[int, int], pgid: int) -> dict[str, int]:
    """Let a run's leftover processes end, then stop those that do not."""
    lingering = len(_alive(seen))
    deadline = time.time() + 10
    while _alive(seen) and time.time() < deadline:
        time.sleep(0.2)
    killed = 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = _alive(seen)
        if not alive:
            break
        killed = len(alive)
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
        time.sleep(2)
    return {"lingering_after_exit": lingering, "stopped_by_benchmark": killed}


def measure(
    cmd: list[str], *, env: dict[str, str], log_path: Path, timeout: float
) -> dict[str, Any]:
    """Run ``cmd`` in its own session; wall time, peak tree memory, leftovers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    with log_path.open("wb") as out:
        spawn = time.time()
        env["PEERS_T_SPAWN"] = repr(spawn)
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        monitor = TreeMonitor(proc.pid)
        monitor.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        end = time.time()
        monitor.stop.set()
        monitor.join()
    cleanup = _stop_leftovers(monitor.seen, proc.pid)
    return {
        "spawn": spawn,
        "exit": end,
        "wall_s": end - spawn,
        "returncode": rc,
        "timed_out": timed_out,
        "peak_rss_mb": monitor.peak_rss / 2**20,
        "peak_pss_mb": monitor.peak_pss / 2**20,
        "peak_processes": monitor.peak_processes,
        "log": str(log_path.relative_to(ROOT)),
        **cleanup,
    }


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")


# ------------------------------------------------------------------ one run


def rounds_from(events: dict[str, Any], round1_start: float) -> list[float]:
    ends = [round1_start, *events["round_end"]]
    return [b - a for a, b in itertools.pairwise(ends)]


def summarize(
    framework: str, case: Case, run: dict[str, Any], events: dict[str, Any]
) -> dict[str, Any]:
    """The figures of one run, from its process measurement and timestamps."""
    start_key = "round1_start" if framework == "fedshield" else "initial_eval_end"
    if run["returncode"] != 0 or start_key not in events:
        raise RuntimeError(
            f"{framework} case {case.key} failed (exit {run['returncode']}); "
            f"see {run['log']}"
        )
    if len(events["round_end"]) != case.rounds:
        raise RuntimeError(
            f"{framework} case {case.key} ran {len(events['round_end'])} of "
            f"{case.rounds} rounds; see {run['log']}"
        )
    durations = rounds_from(events, events[start_key])
    return {
        "end_to_end_s": run["wall_s"],
        "startup_s": events[start_key] - run["spawn"],
        "round1_s": durations[0],
        "per_round_s": statistics.median(durations[1:]),
        "rounds_s": durations,
        "after_last_round_s": run["exit"] - events["round_end"][-1],
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_pss_mb": run["peak_pss_mb"],
        "peak_processes": run["peak_processes"],
        "accuracy": events["accuracy"][-1],
        "accuracy_per_round": events["accuracy"],
        "lingering_after_exit": run["lingering_after_exit"],
        "stopped_by_benchmark": run["stopped_by_benchmark"],
        "loadavg_before": run["loadavg_before"],
        "log": run["log"],
    }


def run_fedshield(
    case: Case, seed: int, out: Path, *, report: bool = True
) -> dict[str, Any]:
    name = "fedshield" if report else "fedshield-no-report"
    tag = f"seed{seed}"
    events_path = out / f"events-{case.key}-{name}-{tag}.json"
    sets = case_overrides(case, seed) + ([] if report else ["run.report=false"])
    cmd = [
        sys.executable,
        str(HERE / "fedshield_driver.py"),
        str(events_path),
        "simulate",
        str(CONFIG),
        *[arg for o in sets for arg in ("--set", o)],
        "--out",
        str(WORK / "runs" / f"peers-{case.key}"),
        "--overwrite",
        "--format",
        "json",
    ]
    before = loadavg()
    run = measure(
        cmd,
        env=dict(os.environ),
        log_path=out / "logs" / f"{case.key}-{name}-{tag}.log",
        timeout=RUN_TIMEOUT_S,
    )
    run["loadavg_before"] = before
    events = json.loads(events_path.read_text()) if events_path.exists() else {}
    result = summarize("fedshield", case, run, events)
    summary_path = WORK / "runs" / f"peers-{case.key}" / "summary.json"
    result["backend"] = json.loads(summary_path.read_text()).get("backend")
    return result


def flower_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # offline machine: no telemetry calls
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def run_flower(
    case: Case, seed: int, split: Path, out: Path, *, own_sampling: bool = False
) -> dict[str, Any]:
    tag = f"seed{seed}"
    events_path = out / f"events-{case.key}-flower-{tag}.json"
    cmd = [
        str(VENV_PYTHON),
        str(HERE / "flower_app.py"),
        str(split),
        str(events_path),
        "--clients",
        str(case.clients),
        "--per-round",
        str(case.per_round),
        "--rounds",
        str(case.rounds),
        "--seed",
        str(seed),
    ]
    # A short, private folder for Ray's session (its socket paths must stay
    # under 108 bytes), removed after the run.
    ray_dir = Path(tempfile.mkdtemp(prefix="peers-ray-"))
    cmd += ["--ray-temp-dir", str(ray_dir)]
    if own_sampling:
        cmd.append("--own-sampling")
    before = loadavg()
    try:
        run = measure(
            cmd,
            env=flower_env(),
            log_path=out / "logs" / f"{case.key}-flower-{tag}.log",
            timeout=RUN_TIMEOUT_S,
        )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    run["loadavg_before"] = before
    events = json.loads(events_path.read_text()) if events_path.exists() else {}
    return summarize("flower", case, run, events)


def run_floor(out: Path, repeats: int) -> dict[str, Any]:
    runs = [
        measure(
            [sys.executable, "-c", "import torch"],
            env=dict(os.environ),
            log_path=out / "logs" / f"floor-{i}.log",
            timeout=120,
        )
        for i in range(max(repeats, 3))
    ]
    return {
        "command": 'python -c "import torch"',
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "wall_s_runs": [r["wall_s"] for r in runs],
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
    }


MEDIAN_KEYS = (
    "end_to_end_s",
    "startup_s",
    "round1_s",
    "per_round_s",
    "after_last_round_s",
    "peak_rss_mb",
    "peak_pss_mb",
)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median timings and memory, mean accuracy over the runs (seeds 0..N-1)."""
    combined = {k: statistics.median(r[k] for r in runs) for k in MEDIAN_KEYS}
    accuracies = [r["accuracy"] for r in runs]
    combined["accuracy"] = statistics.fmean(accuracies)
    combined["accuracy_sd"] = statistics.stdev(accuracies) if len(runs) > 1 else 0.0
    combined["accuracy_runs"] = accuracies
    combined["peak_processes"] = max(r["peak_processes"] for r in runs)
    combined["stopped_by_benchmark"] = sum(r["stopped_by_benchmark"] for r in runs)
    combined["runs"] = runs
    if "backend" in runs[0]:
        combined["backend"] = runs[0]["backend"]
    return combined


def compare(fs: dict[str, Any], fl: dict[str, Any], floor_s: float) -> dict[str, Any]:
    e2e_speedup = fl["end_to_end_s"] / fs["end_to_end_s"]
    round_speedup = fl["per_round_s"] / fs["per_round_s"]
    memory_ratio = fs["peak_rss_mb"] / fl["peak_rss_mb"]
    pss_ratio = (
        fs["peak_pss_mb"] / fl["peak_pss_mb"] if fl["peak_pss_mb"] else float("nan")
    )
    accuracy_points = 100 * (fs["accuracy"] - fl["accuracy"])
    per_seed_points = [
        100 * (a - b)
        for a, b in zip(fs["accuracy_runs"], fl["accuracy_runs"], strict=True)
    ]
    above_floor = fs["end_to_end_s"] - floor_s
    return {
        "end_to_end_speedup": e2e_speedup,
        "per_round_speedup": round_speedup,
        "memory_ratio_rss": memory_ratio,
        "memory_ratio_pss": pss_ratio,
        "accuracy_difference_points": accuracy_points,
        "accuracy_difference_points_per_seed": per_seed_points,
        "fedshield_above_floor_s": above_floor,
        "goals": {
            "per_round_20x": round_speedup >= GOAL_ROUND_SPEEDUP,
            "end_to_end_10x_or_floor_plus_1s": (
                e2e_speedup >= GOAL_E2E_SPEEDUP
                or above_floor <= GOAL_E2E_FLOOR_MARGIN_S
            ),
            "accuracy_within_1_point": abs(accuracy_points) <= GOAL_ACCURACY_POINTS,
            "memory_under_half": memory_ratio < GOAL_MEMORY_RATIO,
        },
    }


# ---------------------------------------------------- start-up breakdown


def _driver_cmd(case: Case, events: Path, *python_flags: str) -> list[str]:
    return [
        sys.executable,
        *python_flags,
        str(HERE / "fedshield_driver.py"),
        str(events),
        "simulate",
        str(CONFIG),
        *[arg for o in case_overrides(case, SEED) for arg in ("--set", o)],
        "--out",
        str(WORK / "runs" / f"peers-phases-{case.key}"),
        "--overwrite",
        "--format",
        "json",
    ]


def _phase_times(run: dict[str, Any], events: dict[str, Any]) -> list[list[Any]]:
    """[name, seconds] from one marked run: each mark ends its step."""
    times, previous = [], run["spawn"]
    for name, stamp in events["marks"]:
        times.append([name, stamp - previous])
        previous = stamp
    times.append(["output and interpreter exit", run["exit"] - previous])
    return times


def startup_breakdown(case: Case, out: Path, repeats: int) -> dict[str, Any]:
    """Where ``fedshield simulate`` spends its time, step by step.

    The real command, with the end of each step marked (``PEERS_PHASES=1``
    in ``fedshield_driver.py``), run ``repeats`` times (each step's median
    is kept), then once more under ``python -X importtime`` to see which
    imports happen in which step.
    """
    env = dict(os.environ, PEERS_PHASES="1")
    runs = []
    for i in range(max(repeats, 3)):
        events_path = out / f"events-phases-{case.key}-{i}.json"
        run = measure(
            _driver_cmd(case, events_path),
            env=env,
            log_path=out / "logs" / f"phases-{case.key}-{i}.log",
            timeout=RUN_TIMEOUT_S,
        )
        if run["returncode"] != 0:
            raise RuntimeError(f"the marked fedshield run failed; see {run['log']}")
        events = json.loads(events_path.read_text())
        runs.append(
            {
                "phases": _phase_times(run, events),
                "before_round1_s": events["round1_start"] - run["spawn"],
                "wall_s": run["wall_s"],
            }
        )
    names = [name for name, _ in runs[0]["phases"]]
    phases = [
        {
            "phase": name,
            "seconds": statistics.median(r["phases"][i][1] for r in runs),
            "imports": [],
        }
        for i, name in enumerate(names)
    ]

    importtime_log = out / "logs" / f"importtime-{case.key}.log"
    measure(
        _driver_cmd(case, out / "events-importtime.json", "-X", "importtime"),
        env=env,
        log_path=importtime_log,
        timeout=RUN_TIMEOUT_S,
    )
    attributed = parse_importtime(importtime_log.read_text())
    for phase in phases:
        phase["imports"] = attributed["by_step"].get(phase["phase"], [])
    return {
        "case": case.key,
        "runs": len(runs),
        "before_round1_s": statistics.median(r["before_round1_s"] for r in runs),
        "process_wall_s": statistics.median(r["wall_s"] for r in runs),
        "phases": phases,
        "importtime_total_s": attributed["total_s"],
        "importtime_top_level": attributed["top_level"],
    }


IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")
MARK_LINE = re.compile(r"PEERS-MARK (.+)$")
BIG_IMPORT_S = 0.02


def parse_importtime(text: str) -> dict[str, Any]:
    """Top-level imports of a ``-X importtime`` log, and the step of each.

    An import belongs to the step whose ``PEERS-MARK`` line follows it.
    """
    top: dict[str, float] = {}
    by_step: dict[str, list[dict[str, Any]]] = {}
    pending: list[tuple[str, float]] = []
    total = 0.0
    for line in text.splitlines():
        marked = MARK_LINE.search(line)
        if marked:
            step = by_step.setdefault(marked[1], [])
            step += [{"module": m, "s": t} for m, t in pending if t >= BIG_IMPORT_S]
            pending = []
            continue
        match = IMPORT_LINE.match(line)
        if not match or match[3]:
            continue
        seconds = int(match[2]) / 1e6
        total += seconds
        top[match[4]] = top.get(match[4], 0.0) + seconds
        pending.append((match[4], seconds))
    if pending:
        by_step.setdefault("output and interpreter exit", []).extend(
            {"module": m, "s": t} for m, t in pending if t >= BIG_IMPORT_S
        )
    for imports in by_step.values():
        imports.sort(key=lambda row: -row["s"])
    biggest = sorted(top.items(), key=lambda kv: -kv[1])[:12]
    return {
        "total_s": total,
        "top_level": [{"module": m, "s": s} for m, s in biggest],
        "by_step": by_step,
    }


# ----------------------------------------------------------------- reports

COLUMNS = (
    ("case", "case"),
    ("framework", "framework"),
    ("end-to-end s", "end_to_end_s"),
    ("start-up s", "startup_s"),
    ("round 1 s", "round1_s"),
    ("per-round s", "per_round_s"),
    ("after last round s", "after_last_round_s"),
    ("peak MB (RSS sum)", "peak_rss_mb"),
    ("peak MB (PSS sum)", "peak_pss_mb"),
    ("processes", "peak_processes"),
    ("accuracy (mean ± sd)", "accuracy"),
)


def fmt(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if key == "accuracy":
        return f"{value:.3f}"
    if key == "per_round_s":
        return f"{value:.4f}"
    if key.endswith("_mb"):
        return f"{value:,.0f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}"


def results_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for case in results["cases"]:
        for framework in FRAMEWORKS:
            figures = {
                "case": case["label"],
                "framework": framework,
                **case[framework],
            }
            row = [fmt(figures[key], key) for _, key in COLUMNS]
            row[-1] += f" ± {figures['accuracy_sd']:.3f}"
            rows.append(row)
    return rows


def ratio_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    pairs = [(c, v) for c in results["cases"] for v in c["comparison"]]
    for case, variant in pairs:
        c = case["comparison"][variant]
        goals = c["goals"]

        def mark(ok: bool) -> str:
            return "met" if ok else "NOT met"

        rows.append(
            [
                case["label"],
                variant,
                f"{c['end_to_end_speedup']:.1f}× "
                f"({c['fedshield_above_floor_s']:+.2f} s vs floor) "
                f"{mark(goals['end_to_end_10x_or_floor_plus_1s'])}",
                f"{c['per_round_speedup']:.1f}× {mark(goals['per_round_20x'])}",
                f"{c['memory_ratio_rss']:.2f} (PSS {c['memory_ratio_pss']:.2f}) "
                f"{mark(goals['memory_under_half'])}",
                f"{c['accuracy_difference_points']:+.1f} pts "
                f"{mark(goals['accuracy_within_1_point'])} (per seed: "
                + ", ".join(
                    f"{d:+.1f}" for d in c["accuracy_difference_points_per_seed"]
                )
                + ")",
            ]
        )
    return rows


RATIO_HEADER = [
    "case",
    "fedshield",
    "end to end: Flower ÷ fedshield (goal ≥ 10× or ≤ floor + 1 s)",
    "per round: Flower ÷ fedshield (goal ≥ 20×)",
    "memory: fedshield ÷ Flower (goal < 0.5)",
    "accuracy: fedshield − Flower, means over seeds (goal ±1 pt)",
]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
    ]
    return "\n".join(lines)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def breakdown_rows(breakdown: dict[str, Any]) -> list[list[str]]:
    rows = []
    elapsed = 0.0
    for phase in breakdown["phases"]:
        elapsed += phase["seconds"]
        imports = ", ".join(
            f"`{row['module']}` {row['s']:.2f}" for row in phase["imports"][:5]
        )
        rows.append(
            [
                phase["phase"],
                f"{phase['seconds']:.3f}",
                f"{elapsed:.2f}",
                imports or "-",
            ]
        )
    return rows


def write_markdown(results: dict[str, Any], path: Path) -> None:
    env = results["environment"]
    floor = results["floor"]
    header = [h for h, _ in COLUMNS]
    lines = [
        "# fedshield against Flower",
        "",
        "Generated by `bench/peers/run_peers.py` (`make bench-peers`) on "
        f"{results['date']}; do not edit by hand.",
        "",
        f"Machine: {env['cpus']} CPUs ({env['cpu_model']}), {env['memory_gb']:.0f} "
        f"GiB, {env['platform']}; load average {env['loadavg_start']:.2f} at the "
        "start (the machine is shared: timings vary by ±30 % between runs). "
        f"fedshield {env['fedshield']} at commit {results['fedshield_commit']} "
        f"(backend `{results['fedshield_backend']}`) "
        f"with torch {env['torch']}; Flower {env['flower']['flwr']} "
        f"(Ray {env['flower']['ray']}, torch {env['flower']['torch']}, "
        f"scikit-learn {env['flower']['scikit-learn']}). "
        f"Each case ran {results['repeats']} time(s) per framework, with seeds "
        f"0..{results['repeats'] - 1}, the frameworks alternating: timings and "
        "memory are medians over those runs, accuracy their mean ± sd.",
        "",
        "Task, identical in both: FedAvg, MLP 64 → 64 → 10 (ReLU, 4,810 "
        "parameters), scikit-learn digits, IID partition, 1 local epoch, batch 32, "
        "SGD lr 0.05 without momentum, 20 rounds, centralised evaluation on the "
        "same 20 % held-out test split (359 rows) after every round, no federated "
        "evaluation. Both start from the same initial weights and train on the "
        "same rows"
        + (
            " (fedshield draws the split and partition; the Flower app gets the "
            "row indices); client sampling and mini-batch order are each "
            "framework's own. "
            if results["flower_sampling"] == "own"
            else ", the same clients in the same rounds (fedshield draws the "
            "split, the partition and each round's clients; the Flower app gets "
            "them as indices, and its `PairedFedAvg` — Flower's FedAvg with "
            "`configure_train` extended — tells each sampled node which "
            "partition to train, since Flower's own sampling cannot be seeded: "
            "its node ids are random); only the order of local mini-batches is "
            "each framework's own. "
        )
        + "Flower: `flwr.simulation.run_simulation` with a "
        "`ServerApp` running `flwr.serverapp.strategy.FedAvg` "
        "(`fraction_evaluate=0`, `evaluate_fn` for the centralised evaluation) "
        "and a `ClientApp`, Ray backend with one CPU per client actor (two "
        "actors on two cores) and one torch thread per actor; digits is loaded "
        "once per actor. fedshield: `fedshield simulate bench/peers/peers.toml` "
        "as shipped (backend `auto`, progress off with `--format json`; run "
        "folder, checkpoint every round and HTML report included), and again "
        "with `--set run.report=false` (*fedshield-no-report*: everything but "
        "the HTML report, which `fedshield report RUN_DIR` can write later).",
        "",
        "Columns: *end-to-end* — process start to exit, imports and teardown "
        "included; *start-up* — process start to the start of round 1; *round 1* "
        "— the first round (includes each framework's warm-up: Ray starting its "
        "actors for Flower); *per-round* — median of rounds 2–20, each round "
        "measured from the end of the previous one to the end of its centralised "
        "evaluation, server-side; *after last round* — end of round 20 to process "
        "exit (fedshield: summary and HTML report; Flower: Ray shutdown); *peak "
        "MB* — peak over the run of the summed resident memory of the process and "
        "all its descendants (Ray's raylet, GCS, workers...), sampled every 0.1 s "
        "(RSS counts pages shared between processes once per process, PSS divides "
        "them); *accuracy* — test accuracy after round 20.",
        "",
        f"Floor: `{floor['command']}` takes {floor['wall_s']:.2f} s "
        f"(median of {len(floor['wall_s_runs'])}) and peaks at "
        f"{floor['peak_rss_mb']:.0f} MB.",
        "",
        "## Results",
        "",
        md_table(header, results_rows(results)),
        "",
        "## fedshield against Flower, and the issue's goals",
        "",
        md_table(RATIO_HEADER, ratio_rows(results)),
        "",
    ]
    breakdown = results.get("startup_breakdown")
    if breakdown:
        lines += [
            "## Where fedshield's seconds go",
            "",
            f"Case {breakdown['case']}, seed {SEED}: the real `fedshield simulate` "
            "command, with the end of each step marked by wrapping the functions "
            "`fedshield.api.run.simulate` calls (`fedshield_driver.py` with "
            "`PEERS_PHASES=1`: `load_config`, `load_dataset`, `split_test`, "
            "`partition`, `build_federation`, `build_strategy`, "
            "`resolve_backend`, then the `on_start` and `on_round` callbacks). "
            "Each row runs from the previous mark to its own; seconds are the "
            f"median of {breakdown['runs']} runs. The imports column comes from "
            "one more run under `python -X importtime` (top-level imports of "
            "20 ms or more that happened in that step, cumulative, as importtime "
            "reports them, which slows imports down a little). Time to round 1: "
            f"{breakdown['before_round1_s']:.2f} s; whole process "
            f"{breakdown['process_wall_s']:.2f} s; floor "
            f"{results['floor']['wall_s']:.2f} s.",
            "",
            md_table(
                ["step (ends at)", "s", "elapsed s", "imports in this step (s)"],
                breakdown_rows(breakdown),
            ),
            "",
        ]
    path.write_text("\n".join(lines))


# -------------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    import torch

    import fedshield

    cpu_model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": memory_gb,
        "platform": f"{platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "fedshield": fedshield.__version__,
        "torch": torch.__version__,
        "loadavg_start": loadavg(),
    }


def git_head() -> str | None:
    """The checked-out commit (read-only), to say which fedshield was measured."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + (" (src/ modified)" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="case a only, 5 rounds, once"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per framework and case"
    )
    parser.add_argument(
        "--cases", default="abc", help="which cases to run (default: abc)"
    )
    parser.add_argument(
        "--flower-own-sampling",
        action="store_true",
        help="let Flower sample the clients instead of fedshield's schedule",
    )
    args = parser.parse_args(argv)
    if args.quick:
        cases, repeats, out = [QUICK_CASE], 1, WORK / "quick"
        json_path, md_path = out / "results.json", out / "RESULTS.md"
    else:
        cases = [c for c in CASES if c.key in args.cases]
        repeats, out = max(args.repeats, 1), WORK / "full"
        json_path, md_path = HERE / "results.json", HERE / "RESULTS.md"
    try:
        import fedshield  # noqa: F401
    except ImportError:
        raise SystemExit(
            "run this with fedshield's environment: .venv/bin/python "
            "bench/peers/run_peers.py (or make bench-peers)"
        ) from None
    out.mkdir(parents=True, exist_ok=True)

    flower_versions = ensure_flower_venv()
    env = environment()
    env["flower"] = flower_versions
    log(f"Flower {flower_versions['flwr']} (Ray {flower_versions['ray']})")

    results: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "flower_sampling": "own" if args.flower_own_sampling else "paired",
        "repeats": repeats,
        "environment": env,
        "cases": [],
    }
    log("floor: python -c 'import torch'")
    results["floor"] = run_floor(out, repeats)
    for case in cases:
        runs: dict[str, list[dict[str, Any]]] = {f: [] for f in FRAMEWORKS}
        splits = []
        for seed in range(repeats):
            split = WORK / f"split-{case.key}-seed{seed}.npz"
            splits.append(export_split(case, seed, split))
            for framework in FRAMEWORKS:
                log(f"case {case.key}, {framework}, seed {seed} of 0..{repeats - 1}")
                for attempt in range(RETRIES + 1):
                    try:
                        if framework != "flower":
                            figures = run_fedshield(
                                case, seed, out, report=framework == "fedshield"
                            )
                        else:
                            figures = run_flower(
                                case,
                                seed,
                                split,
                                out,
                                own_sampling=args.flower_own_sampling,
                            )
                        figures["attempts"] = attempt + 1
                        break
                    except RuntimeError as err:
                        if attempt == RETRIES:
                            raise
                        log(f"  failed ({err}); trying once more")
                log(
                    f"  {figures['end_to_end_s']:.2f} s end to end, "
                    f"{figures['per_round_s'] * 1000:.1f} ms/round, "
                    f"{figures['peak_rss_mb']:.0f} MB, "
                    f"accuracy {figures['accuracy']:.3f}"
                )
                runs[framework].append(figures)
        combined = {f: combine(runs[f]) for f in FRAMEWORKS}
        floor_s = results["floor"]["wall_s"]
        results["cases"].append(
            {
                "key": case.key,
                "label": case.label,
                "clients": case.clients,
                "per_round": case.per_round,
                "rounds": case.rounds,
                "split": splits[0],
                **combined,
                "comparison": {
                    f: compare(combined[f], combined["flower"], floor_s)
                    for f in FRAMEWORKS
                    if f != "flower"
                },
            }
        )
    results["fedshield_backend"] = results["cases"][0]["fedshield"].get("backend")
    results["fedshield_commit"] = git_head()
    log("start-up breakdown")
    results["startup_breakdown"] = startup_breakdown(cases[0], out, repeats)

    json_path.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, md_path)
    print(text_table([h for h, _ in COLUMNS], results_rows(results)))
    print()
    print(text_table(RATIO_HEADER, ratio_rows(results)))
    print()
    print(f"floor: {results['floor']['command']} {results['floor']['wall_s']:.2f} s")
    print(f"wrote {json_path.relative_to(ROOT)} and {md_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
