"""Per-round seconds of one configuration under two source trees, alternating.

Usage (from the repository root)::

    git worktree add /tmp/base <commit>
    REPS=6 .venv/bin/python bench/ab_trees.py /tmp/base/src bench/peers/peers.toml \\
        data.num_clients=50 strategy.clients_per_round=50 run.rounds=6 \\
        'secagg.protocol="secagg+"' run.report=false

Each repeat runs ``python -m fedshield.cli simulate CONFIG --set ...`` once
with each tree first on ``PYTHONPATH`` (the order alternates), takes the
median ``seconds`` of rounds 2 onward from ``metrics.jsonl``, and prints
the median over repeats for each tree and their ratio (this tree ÷ base)
as JSON. Both trees use this interpreter's installed dependencies.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _one(src: str, config: str, sets: list[str]) -> tuple[float, object]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "fedshield.cli", "simulate", config]
        cmd += ["--out", f"{tmp}/run", "--overwrite"]
        for item in sets:
            cmd += ["--set", item]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
        if done.returncode != 0:
            sys.exit(f"{src}: failed\n{done.stdout[-800:]}\n{done.stderr[-1500:]}")
        text = Path(f"{tmp}/run/metrics.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        seconds = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
        return statistics.median(seconds), rows[-1].get("accuracy")


def main() -> None:
    base, config, *sets = sys.argv[1:]
    trees = {"base": base, "new": str(HERE / "src")}
    reps = int(os.environ.get("REPS", "3"))
    times: dict[str, list[float]] = {name: [] for name in trees}
    for rep in range(reps):
        order = list(trees.items())
        for name, src in order if rep % 2 == 0 else reversed(order):
            seconds, accuracy = _one(src, config, sets)
            times[name].append(seconds)
            print(name, rep, round(seconds, 4), accuracy, flush=True)
    b, n = statistics.median(times["base"]), statistics.median(times["new"])
    print(json.dumps({"base_s": b, "new_s": n, "ratio_new_over_base": n / b}))


if __name__ == "__main__":
    main()
