"""The Caravan example from Python: the same files, model and protections.

Two ways, both with central DP on top of SecAgg+ and the accountant's ε
reported:

1. ``fs.simulate(config, model_fn=...)``: the whole configured simulation
   (the TOML's sections as a dict, the model as a Python function), writing
   its run folder and report like ``fedshield simulate``.
2. ``fs.fedavg(model_fn, privacy=..., secagg=...)``: the iterative process,
   ``state, metrics = process.next(state, client_data)``, on the same
   per-client CSV files read with the same loader.

Run: ``.venv/bin/python examples/finance/python_api.py``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import fedshield as fs
from fedshield.data.user import UserDataSpec, load_user_data

HERE = Path(__file__).resolve().parent
PRIVACY = {
    "mode": "central",
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "sampling": "fixed",
    "accountant": "rdp",
}
SECAGG = {"protocol": "secagg+"}


def model_fn():
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(84, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
    )


def whole_simulation(rounds: int = 10) -> dict:
    config = {
        "run": {"name": "caravan_python", "rounds": rounds, "report": False},
        "data": {
            "dataset": "csv",
            "path": str(HERE / "data" / "clients"),
            "label": "Purchase",
            "classes": ["no", "yes"],
            "test_path": str(HERE / "data" / "test.csv"),
        },
        "strategy": {"clients_per_round": 8},
        "privacy": PRIVACY,
        "secagg": SECAGG,
    }
    summary, folder = fs.simulate(
        config, model_fn=model_fn, out=Path("runs") / "caravan_python", overwrite=True
    )
    print(
        f"fs.simulate: accuracy {summary['accuracy']:.3f}, epsilon "
        f"{summary['epsilon']:.2f} (delta {summary['delta']}), folder {folder}"
    )
    return summary


def iterative_process(rounds: int = 10) -> dict:
    data = load_user_data(
        UserDataSpec(kind="csv", path=HERE / "data" / "clients", label="Purchase")
    )
    train = data.train
    assert train.groups is not None
    clients = {}
    for cid in data.client_ids or ():
        x, y = train.x[train.groups == cid], train.y[train.groups == cid]
        # Each site standardises its own features with its own statistics
        # (what fs.simulate does for you; pooled statistics would leak).
        x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        clients[cid] = (x.astype(np.float32), y)
    process = fs.fedavg(
        model_fn, strategy={"clients_per_round": 8}, privacy=PRIVACY, secagg=SECAGG
    )
    state = process.initialize()
    metrics: dict = {}
    for i in range(rounds):
        state, metrics = process.next(state, clients)
        print(f"round {i}, epsilon={metrics['epsilon']:.2f}")
    return metrics


if __name__ == "__main__":
    whole_simulation()
    iterative_process()
