"""One round of 100 clients: the sequential backend against the vectorised one.

Both run in this process, alternating, on the same federation (digits, IID,
MLP with 64 hidden units, 1 local epoch, batch 32, lr 0.05), first with one
torch thread each and then with two; the figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import pytest

from fedshield.api import build_federation, build_strategy, parse_config
from fedshield.simulation import SequentialBackend, run_round
from fedshield.simulation.backends.vectorised import VectorisedBackend

torch = pytest.importorskip("torch")

CONFIG: dict[str, Any] = {
    "run": {"seed": 0, "federated_eval": False},
    "data": {"dataset": "digits", "num_clients": 100, "partition": "iid"},
    "model": {"kind": "mlp", "hidden": [64]},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "strategy": {"fraction": 1.0},
}
REPEATS = 7


@pytest.mark.bench
@pytest.mark.parametrize("threads", [1, 2])
def test_vectorised_round_is_faster(threads: int) -> None:
    config = parse_config(CONFIG)
    federation = build_federation(config)
    strategy = build_strategy(config)
    state = strategy.init(federation.model.init_params(0))
    backends = {"sequential": SequentialBackend(), "vectorised": VectorisedBackend()}

    def one_round(name: str) -> tuple[float, Any]:
        started = time.perf_counter()
        result = run_round(
            strategy,
            state,
            client_fn=federation.client_fn,
            client_ids=federation.client_ids,
            seed=0,
            backend=backends[name],
        )
        return time.perf_counter() - started, result

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in backends:  # warm-up: first-call costs of torch and vmap
            one_round(name)
        times: dict[str, list[float]] = {name: [] for name in backends}
        results: dict[str, Any] = {}
        for _ in range(REPEATS):
            for name in backends:
                seconds, results[name] = one_round(name)
                times[name].append(seconds)
    finally:
        torch.set_num_threads(before)

    sequential = statistics.median(times["sequential"])
    vectorised = statistics.median(times["vectorised"])
    print(
        f"\n100 clients, 1 round, {threads} torch thread(s), median of {REPEATS}: "
        f"sequential {sequential * 1000:.1f} ms, vectorised "
        f"{vectorised * 1000:.1f} ms, speed-up {sequential / vectorised:.1f}x"
    )
    seq_params = results["sequential"].state.params.flat
    vec_params = results["vectorised"].state.params.flat
    np.testing.assert_allclose(vec_params, seq_params, rtol=1e-4, atol=1e-5)
    assert results["vectorised"].metrics["num_clients"] == 100
    assert vectorised < sequential
