"""The TensorFlow Federated example that started fedshield, in fedshield.

TFF's tutorial builds a small Keras model, wraps it with
``tff.learning.algorithms.build_weighted_fed_avg`` and calls
``state, metrics = fed_avg.next(state, client_data)`` in a loop. Here the
same program runs on 784-feature images (Fashion-MNIST, from the Debian
package ``dataset-fashion-mnist``): a ``model_fn`` building Linear(784 → 10)
+ ReLU + Linear(10 → 10), ``fed_avg = fs.fedavg(model_fn)``, 100 rounds.

Then, with ``--private``, the very same program with differential privacy
and secure aggregation added to ``fs.fedavg`` and nothing else changed:
every round's metrics then carry the accountant's ε.

Run::

    .venv/bin/python examples/seed_program.py            # plain FedAvg
    .venv/bin/python examples/seed_program.py --private  # + DP + SecAgg+
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import fedshield as fs
from fedshield.data import load_dataset, partition

NUM_CLIENTS = 10
EXAMPLES_PER_CLIENT = 600


def model_fn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(784, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10)
    )


def make_client_data(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ten clients of 600 Fashion-MNIST images each, two classes apiece mostly.

    As TFF's tutorial takes a few writers of EMNIST, this takes a slice of
    Fashion-MNIST's training images and deals it out in label shards, so
    every client's data is non-IID.
    """
    data = load_dataset("fashion_mnist")
    assert data.is_test is not None
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(~data.is_test)
    rows = rng.choice(train, size=NUM_CLIENTS * EXAMPLES_PER_CLIENT, replace=False)
    parts = partition(data.y[rows], NUM_CLIENTS, method="shards", rng=rng)
    return {
        f"client_{k}": (data.x[rows[part]], data.y[rows[part]])
        for k, part in enumerate(parts)
    }


def main(rounds: int, private: bool) -> None:
    client_data = make_client_data()
    if not private:
        fed_avg = fs.fedavg(model_fn)
    else:
        fed_avg = fs.fedavg(
            model_fn,
            privacy={
                "mode": "central",
                "clip_norm": 1.0,
                "noise_multiplier": 1.0,
                # With secure aggregation the sample size must not depend on
                # the data: fixed-size sampling, accounted with RDP.
                "sampling": "fixed",
                "accountant": "rdp",
            },
            secagg={"protocol": "secagg+"},
        )
    state = fed_avg.initialize()
    for i in range(rounds):
        state, metrics = fed_avg.next(state, client_data)
        print(f"round {i:2d}, metrics={metrics}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument(
        "--private", action="store_true", help="add DP and SecAgg+ (nothing else)"
    )
    args = parser.parse_args()
    main(args.rounds, args.private)
