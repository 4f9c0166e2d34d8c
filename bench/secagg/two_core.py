"""One simulated SecAgg+ round with the client halves on one core or on two.

Run: .venv/bin/python bench/secagg/two_core.py [--clients 50] [--rounds 7]

A prototype of how :func:`fedshield.simulation.secure.secure_sum` could use a
second core; ``secure_sum`` itself is not changed. The digits MLP's update
(4,810 parameters plus the two extra words ``secure_sum`` appends) is summed
by the protocol of :mod:`fedshield.secagg.protocol`, configured as
``secure_sum`` configures it from ``[secagg]``'s defaults with
``protocol = "secagg+"`` (threshold ``ceil(2 n / 3)``, 24 precision bits,
sigma = 40, 10 % expected dropout, so k = n - 1 at n = 50).

serial
    What ``secure_sum`` does: every client half runs in this process, one
    after another, stage by stage.
two processes
    The clients are split in two halves. A worker process, started once
    (``spawn``; as a simulation would start it once, not every round), builds
    the :class:`~fedshield.secagg.protocol.SecAggClient` objects of its half
    and keeps them: their secrets never leave it, as on real clients. Each
    stage, this process sends the worker its half's requests (bytes) in one
    message, answers its own half meanwhile, collects the worker's replies
    and hands all of them to the server's ``receive``. Only protocol bytes
    cross the pipe.

Each round: a fresh server and fresh client halves (round index r), inputs
already encoded (the same for both drivers), no dropouts; the result is
checked against the plain sum. Timed per round (wall clock, like the
``round`` of ``flower_secaggplus.py``, which also includes training and
evaluation): from the server's constructor to ``result()``, including the
client halves' construction and ``set_input``. The median over the rounds
is printed; the worker's start-up is printed separately.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection

import numpy as np
import numpy.typing as npt

from fedshield.secagg.encoding import choose_encoding
from fedshield.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer, Stage
from fedshield.simulation.secure import SecureAggregation

WORDS = 4_810 + 2  # the digits MLP (64 -> 64 -> 10) and secure_sum's two extras


def configure(n: int) -> SecAggConfig:
    settings = SecureAggregation(protocol="secagg+")
    enc = choose_encoding(n, settings.clip, precision_bits=settings.precision_bits)
    return settings.protocol_config(n, enc.modulus_bits, WORDS)


def inputs_for(n: int, config: SecAggConfig) -> dict[str, npt.NDArray[np.uint64]]:
    rng = np.random.default_rng(n)
    high = 1 << (config.modulus_bits - 4)
    return {f"{i}": rng.integers(0, high, WORDS, dtype=np.uint64) for i in range(n)}


def _worker(conn: Connection, n: int) -> None:
    """Hold the client halves of one process; answer each stage's requests."""
    config = configure(n)
    inputs = inputs_for(n, config)
    clients: dict[str, SecAggClient] = {}
    while True:
        item = conn.recv()
        if item[0] == "stop":
            return
        if item[0] == "round":
            _, round_idx, ids = item
            clients = {}
            for cid in ids:
                client = SecAggClient(config, round_idx, cid)
                client.set_input(inputs[cid])
                clients[cid] = client
            continue
        _, requests = item
        conn.send({cid: clients[cid].handle(m) for cid, m in requests.items()})


def one_round(
    round_idx: int,
    ids: list[str],
    config: SecAggConfig,
    inputs: dict[str, npt.NDArray[np.uint64]],
    worker: Connection | None,
) -> npt.NDArray[np.uint64]:
    """Run the protocol once; the worker (if any) answers the second half."""
    remote = set(ids[len(ids) // 2 :]) if worker is not None else set()
    if worker is not None:
        worker.send(("round", round_idx, sorted(remote)))
    server = SecAggServer(config, round_idx, ids)
    local: dict[str, SecAggClient] = {}
    for cid in ids:
        if cid not in remote:
            local[cid] = SecAggClient(config, round_idx, cid)
            local[cid].set_input(inputs[cid])
    while server.stage not in (Stage.DONE, Stage.ABORTED):
        requests = server.requests()
        if worker is not None:
            worker.send(("stage", {c: m for c, m in requests.items() if c in remote}))
        replies = {c: local[c].handle(m) for c, m in requests.items() if c in local}
        if worker is not None:
            replies.update(worker.recv())
        server.receive(replies)
    return server.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    n = args.clients
    config = configure(n)
    ids = [f"{i}" for i in range(n)]
    inputs = inputs_for(n, config)
    expected = sum(inputs.values()) & np.uint64((1 << config.modulus_bits) - 1)
    print(
        f"n = {n}, d = {WORDS}, t = {config.threshold}, "
        f"k = {config.neighbour_count(n)}, b = {config.modulus_bits}"
    )

    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_worker, args=(theirs, n))
    process.start()
    theirs.close()
    ours.send(("round", 0, []))  # wait until the worker has imported everything
    ours.send(("stage", {}))
    ours.recv()
    print(f"worker start-up: {time.perf_counter() - started:.2f} s (once)")

    times: dict[str, list[float]] = {"serial": [], "two processes": []}
    ok = True
    for r in range(args.rounds):
        for name, worker in (("serial", None), ("two processes", ours)):
            start = time.perf_counter()
            total = one_round(r + 1, ids, config, inputs, worker)
            times[name].append(time.perf_counter() - start)
            ok = ok and bool(np.array_equal(total, expected))
    ours.send(("stop",))
    process.join()
    for name, values in times.items():
        print(
            f"{name:14s} per round: median {statistics.median(values):.3f} s "
            f"(min {min(values):.3f}, max {max(values):.3f}, {len(values)} rounds)"
        )
    serial = statistics.median(times["serial"])
    both = statistics.median(times["two processes"])
    print(f"saved: {serial - both:.3f} s a round ({serial / both:.2f}x)")
    print("sum check:", "ok" if ok else "WRONG")
    return 0 if ok and math.isfinite(both) else 1


if __name__ == "__main__":
    sys.exit(main())
