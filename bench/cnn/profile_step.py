"""Where a CNN round's time goes: the local training of one round, profiled.

Run: ``.venv/bin/python bench/cnn/profile_step.py [--repeats N]``

The clients of round 1 of ``examples/fashion_mnist.toml`` (10 clients of 960
images, one epoch of batch 32) train from the same start in five ways, in
this process with one torch thread: the plain floor and the channels-last
floor of ``floor.py``, ``TorchModel.train`` once per client (the sequential
backend), ``train_many`` (the vectorised backend) and ``train_many`` with the
general ``vmap`` step (the vectorised backend before issue 13). It prints
each one's median wall time over interleaved repeats, its ratio to the plain
floor, and then ``torch.profiler``'s operators by self time for one run of
each. Nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8, help="operators per table")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    import floor as bench
    import torch
    from torch.profiler import profile

    import fedshield.models.vectorised as vectorised
    from fedshield.api import build_federation, load_config
    from fedshield.core import FitConfig

    torch.set_num_threads(1)
    task = bench.build_task(3)
    config = load_config(bench.CONFIG, bench.overrides(3, "auto"))
    federation = build_federation(config)
    model = federation.model
    start = model.init_params(task.seed)
    clients = task.schedule[0]
    data = [federation.client_fn(c).train_data for c in clients]
    fit = FitConfig(
        round_idx=0,
        epochs=task.epochs,
        batch_size=task.batch_size,
        lr=task.lr,
        momentum=task.momentum,
        weight_decay=task.weight_decay,
    )
    floors = {
        name: bench.Floor(task, channels_last=name == "floor-cl")
        for name in bench.FLOORS
    }
    flat = torch.from_numpy(task.init.copy())

    def rngs() -> list[np.random.Generator]:
        return [np.random.default_rng(k) for k in range(len(data))]

    def sequential() -> None:
        for (x, y), rng in zip(data, rngs(), strict=True):
            model.train(start, x, y, fit, rng=rng)

    def hand_written() -> None:
        vectorised.train_many(model, start, data, fit, rngs=rngs())

    def vmap_step() -> None:
        conv_chain = vectorised._conv_chain
        vectorised._conv_chain = lambda module: None
        try:
            vectorised.train_many(model, start, data, fit, rngs=rngs())
        finally:
            vectorised._conv_chain = conv_chain

    def floor_of(name: str) -> Callable[[], None]:
        return lambda: floors[name].round(0, flat)

    variants: dict[str, Callable[[], None]] = {
        "plain floor": floor_of("floor"),
        "channels-last floor": floor_of("floor-cl"),
        "sequential (TorchModel.train)": sequential,
        "vectorised (hand-written conv step)": hand_written,
        "vectorised, vmap step (before issue 13)": vmap_step,
    }
    for run in variants.values():  # first-call costs
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        names = list(variants)
        names = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in names:
            began = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - began)
    base = statistics.median(times["plain floor"])
    print(f"local training of round 1's {len(data)} clients, median of {args.repeats}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:42s} {median:6.3f} s  {median / base:5.2f}x the plain floor")
    for name, run in variants.items():
        with profile() as prof:
            run()
        print(f"\n{name}:")
        print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=args.rows
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
