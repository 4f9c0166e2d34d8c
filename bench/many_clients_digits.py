"""10,000 clients over digits through the Python API (bootstrap clients).

Digits has 1,797 images, so 10,000 *disjoint* clients are impossible and
``fedshield simulate`` refuses such a partition. This script measures the
same scale through the lower-level API instead: ``run_rounds`` over 10,000
clients built lazily by a ``client_fn``, each holding a bootstrap sample
(8 rows drawn with replacement, seeded by the client id) of digits' training
split. Clients overlap; this is a measure of what 10,000 clients cost the
framework (sampling, lazy construction, aggregation, run folder), not a
federated-learning result (each client takes one local step of 8 rows per
round, so 20 rounds leave the model far from trained).

Usage: ``python bench/many_clients_digits.py RUN_DIR`` (writes
``metrics.jsonl``, checkpoints and a ``summary.json`` like the CLI's).
Run by ``bench/test_many_clients.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from fedshield.api import build_federation, parse_config
from fedshield.api.backends import make_backend, resolve_backend
from fedshield.core import ClientId, FitConfig, WeightedMean, derive_rng
from fedshield.models import TorchClient, TorchModel
from fedshield.simulation import RunDirectory, run_rounds
from fedshield.strategies import CountSampler, FedAvg, ServerSgd

NUM_CLIENTS = 10_000
ROWS_PER_CLIENT = 8
SEED = 0

CONFIG = {
    "run": {"seed": SEED, "rounds": 20, "eval_every": 5, "federated_eval": False},
    # the federation built from this is used for its model, train and test
    # splits only; the clients come from BootstrapClients below
    "data": {"dataset": "digits", "partition": "iid", "num_clients": 10},
    "model": {"kind": "mlp", "hidden": [64]},
}


class BootstrapClients:
    """Client ``i`` holds ``rows`` rows of ``x, y`` drawn with replacement."""

    def __init__(
        self, model: TorchModel, x: np.ndarray, y: np.ndarray, rows: int, seed: int
    ) -> None:
        self.model, self.x, self.y, self.rows, self.seed = model, x, y, rows, seed

    def __call__(self, client_id: ClientId) -> TorchClient:
        rng = derive_rng(self.seed, "bootstrap", client_id)
        idx = rng.integers(0, len(self.y), size=self.rows)
        return TorchClient(
            client_id, self.model, x_train=self.x[idx], y_train=self.y[idx]
        )


def main(out: Path) -> int:
    started = time.perf_counter()
    config = parse_config(CONFIG)
    federation = build_federation(config)
    # 100 of the 10,000 clients per round: built directly (the configuration
    # only knows disjoint partitions, which cannot hold 10,000 clients here)
    strategy = FedAvg(
        sampler=CountSampler(100),
        aggregator=WeightedMean(),
        server_opt=ServerSgd(server_lr=1.0),
        local=FitConfig(round_idx=0, epochs=1, batch_size=8, lr=0.05),
        min_clients=50,
    )
    clients = BootstrapClients(
        federation.model,
        federation.train.x,
        federation.train.y,
        ROWS_PER_CLIENT,
        SEED,
    )
    client_ids = [str(i) for i in range(NUM_CLIENTS)]
    backend_name = resolve_backend("auto", federation.model)
    backend = make_backend(backend_name)
    run_dir = RunDirectory(out)
    run_dir.prepare(resume=False, overwrite=True)
    state = strategy.init(federation.model.init_params(SEED))
    import torch

    torch.set_num_threads(1)
    try:
        state = run_rounds(
            strategy,
            state,
            rounds=config.run.rounds,
            client_fn=clients,
            client_ids=client_ids,
            seed=SEED,
            backend=backend,
            evaluate_fn=federation.evaluate,
            eval_every=config.run.eval_every,
            max_examples=ROWS_PER_CLIENT,
            run_dir=run_dir,
        )
    finally:
        backend.close()
    last = next(r for r in reversed(run_dir.read_metrics()) if r.get("accuracy"))
    run_dir.write_json(
        "summary.json",
        {
            "status": "completed",
            "rounds": state.round_idx,
            "accuracy": last["accuracy"],
            "wall_seconds": round(time.perf_counter() - started, 3),
            "backend": backend_name,
            "num_clients": NUM_CLIENTS,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
