"""The Flower side of the peer benchmark: FedAvg of a 64-64-10 MLP on digits.

Runs in the benchmark's own virtual environment (``.bench-peers/flower-venv``,
made by ``run_peers.py``), never in fedshield's, so it imports only Flower,
torch, numpy and scikit-learn. ``run_peers.py`` starts it as

    flower-venv/bin/python bench/peers/flower_app.py SPLIT.npz EVENTS.json \
        --clients N --per-round K --rounds R --seed S

``SPLIT.npz`` holds the row indices of the held-out test split and of every
client's training slice, as fedshield's own code draws them for the same
seed, so that both frameworks train on the same rows from the same initial
weights (``torch.manual_seed(seed)`` before building the module, as fedshield
does). It also holds the clients fedshield samples in each round:
``PairedFedAvg`` has every round train those same clients (``--own-sampling``
lets Flower's FedAvg sample instead). What is left to each framework's own RNG
is the order of the local mini-batches.

The ``ClientApp`` and ``ServerApp`` are written for the Message API of Flower
1.2x-1.4x (``flwr.clientapp.ClientApp``, ``flwr.serverapp.ServerApp``,
``flwr.serverapp.strategy.FedAvg``) and run by
``flwr.simulation.run_simulation`` on its Ray backend, one CPU per client
actor (two actors on a two-core machine) and one torch thread per actor.
Federated evaluation is off (``fraction_evaluate=0``); the server evaluates
the global model centrally on the test split after every round, as fedshield
does with ``eval_every = 1``.

``EVENTS.json`` receives wall-clock timestamps (``time.time()``): when
``main`` began, the end of the initial evaluation (round 1 starts right
after it) and the end of each round, with the round's test accuracy.

This file is kept out of pytest's doctest collection (``conftest.py``):
fedshield's environment has no Flower.
"""

from __future__ import annotations

import time

if __name__ == "__main__":
    # Run as the importable module ``flower_app``, so that Ray pickles the
    # apps' functions by reference and each actor keeps its data cache.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_app

    sys.exit(flower_app.main())

T_IMPORT = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

T_FLWR = time.time()

HIDDEN = 64
NUM_FEATURES = 64
NUM_CLASSES = 10

# Settings of this run. The ServerApp runs in a thread of this process and
# reads them here; the ClientApp runs in Ray actors and gets what it needs
# (split file, seed, local hyper-parameters) in each message's ConfigRecord.
SETTINGS: dict[str, Any] = {}
EVENTS: dict[str, Any] = {"round_end": [], "accuracy": [], "loss": []}

# Per-actor cache: digits and the split are loaded once per Ray worker.
_DATA: dict[str, Any] = {}


def build_mlp(seed: int | None = None) -> torch.nn.Module:
    """64 -> 64 -> 10 with ReLU; seeded exactly like fedshield's ``mlp``."""

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(NUM_FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, NUM_CLASSES),
        )

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def load_data(split_path: str) -> dict[str, Any]:
    """Digits scaled to [0, 1] and the split's indices (cached per process)."""
    cached = _DATA.get(split_path)
    if cached is not None:
        return cached
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    with np.load(split_path) as split:
        data = {
            "x": torch.from_numpy(x),
            "y": torch.from_numpy(y),
            "test": split["test"],
            "client_rows": split["client_rows"],
            "client_offsets": split["client_offsets"],
            "schedule": split["schedule"],
        }
    _DATA[split_path] = data
    return data


def client_rows(data: dict[str, Any], partition_id: int) -> np.ndarray:
    """Row indices (into the whole data set) of one client's training slice."""
    offsets = data["client_offsets"]
    rows: np.ndarray = data["client_rows"][
        offsets[partition_id] : offsets[partition_id + 1]
    ]
    return rows


# --------------------------------------------------------------------- client

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's local training: plain mini-batch SGD, shuffled each epoch."""
    torch.set_num_threads(1)
    config = msg.content["config"]
    # The partition this round assigns (PairedFedAvg), else the node's own.
    partition_id = int(
        config["partition-id"]
        if "partition-id" in config
        else context.node_config["partition-id"]
    )
    data = load_data(str(config["split"]))
    rows = torch.from_numpy(client_rows(data, partition_id))
    x, y = data["x"][rows], data["y"][rows]
    n = len(rows)

    model = build_mlp()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    batch_size = int(config["batch-size"])
    generator = torch.Generator().manual_seed(
        int(config["seed"]) * 10**12
        + int(config["server-round"]) * 10**6
        + partition_id
    )
    total_loss, correct = 0.0, 0
    for _ in range(int(config["epochs"])):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(dim=1) == yb).sum())
    seen = max(n * int(config["epochs"]), 1)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {
                    "train_loss": total_loss / seen,
                    "train_accuracy": correct / seen,
                    "num-examples": n,
                }
            ),
        }
    )
    return Message(content=reply, reply_to=msg)


# --------------------------------------------------------------------- server

server_app = ServerApp()


class PairedFedAvg(FedAvg):
    """Flower's FedAvg, with each round training the partitions of a schedule.

    Flower picks the virtual nodes that carry the round's messages; each
    message tells its node which partition to train, the one fedshield's
    sampler drew for that round, so that both frameworks train the same
    clients in the same rounds and their accuracies can be compared run by run
    (Flower's own sampling cannot be seeded: node ids are random).
    """

    def __init__(self, schedule: np.ndarray, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule = schedule

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        partitions = self.schedule[server_round - 1]
        paired = []
        for message, partition_id in zip(messages, partitions, strict=True):
            own = ConfigRecord(dict(message.content["config"]))
            own["partition-id"] = int(partition_id)
            paired.append(
                Message(
                    content=RecordDict({"arrays": arrays, "config": own}),
                    dst_node_id=message.metadata.dst_node_id,
                    message_type=message.metadata.message_type,
                )
            )
        return paired


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy and loss of the global model on the held-out test split."""
    data = load_data(SETTINGS["split"])
    test = torch.from_numpy(data["test"])
    model = build_mlp()
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        logits = model(data["x"][test])
        labels = data["y"][test]
        loss = float(torch.nn.functional.cross_entropy(logits, labels))
        accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    now = time.time()
    if server_round == 0:
        EVENTS["initial_eval_end"] = now
    else:
        EVENTS["round_end"].append(now)
        EVENTS["accuracy"].append(accuracy)
        EVENTS["loss"].append(loss)
    return MetricRecord({"accuracy": accuracy, "loss": loss})


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """FedAvg for ``rounds`` rounds over ``per_round`` sampled clients."""
    EVENTS["server_main"] = time.time()
    s = SETTINGS
    random.seed(s["seed"])  # Flower samples nodes with the `random` module
    torch.set_num_threads(1)
    model = build_mlp(s["seed"])
    options: dict[str, Any] = {
        "fraction_train": s["per_round"] / s["clients"],
        "fraction_evaluate": 0.0,
        "min_train_nodes": s["per_round"],
        "min_evaluate_nodes": 0,
        "min_available_nodes": s["clients"],
    }
    if s["own_sampling"]:
        strategy: FedAvg = FedAvg(**options)
    else:
        strategy = PairedFedAvg(load_data(s["split"])["schedule"], **options)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=s["rounds"],
        train_config=ConfigRecord(
            {
                "lr": s["lr"],
                "batch-size": s["batch_size"],
                "epochs": s["epochs"],
                "seed": s["seed"],
                "split": s["split"],
            }
        ),
        evaluate_fn=central_evaluate,
    )


# ----------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run one simulation and write the timestamps to the events file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split", type=Path)
    parser.add_argument("events", type=Path)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--per-round", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument(
        "--own-sampling",
        action="store_true",
        help="let Flower sample the clients (default: the split's schedule)",
    )
    parser.add_argument(
        "--ray-temp-dir", help="Ray's session folder (default: Ray's, /tmp/ray)"
    )
    args = parser.parse_args(argv)
    EVENTS["import_start"] = T_IMPORT
    EVENTS["flwr_imported"] = T_FLWR
    EVENTS["main"] = time.time()
    SETTINGS.update(
        split=str(args.split.resolve()),
        clients=args.clients,
        per_round=args.per_round,
        rounds=args.rounds,
        seed=args.seed,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        own_sampling=args.own_sampling,
    )
    # address="local": always a fresh Ray instance of this process's own,
    # never a cluster that something else started on the machine.
    init_args: dict[str, Any] = {"address": "local"}
    if args.ray_temp_dir:
        init_args["_temp_dir"] = args.ray_temp_dir
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=args.clients,
            backend_config={
                "init_args": init_args,
                "client_resources": {
                    "num_cpus": args.cpus_per_client,
                    "num_gpus": 0.0,
                },
            },
        )
    finally:
        EVENTS["simulation_end"] = time.time()
        import ray

        if ray.is_initialized():
            ray.shutdown()
        EVENTS["exit"] = time.time()
        args.events.write_text(json.dumps(EVENTS, indent=1))
    if len(EVENTS["round_end"]) != args.rounds:
        print(
            f"flower run finished {len(EVENTS['round_end'])} of {args.rounds} rounds",
            file=sys.stderr,
        )
        return 1
    return 0
