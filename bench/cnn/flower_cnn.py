"""The Flower side of the CNN benchmark: FedAvg of the Fashion-MNIST CNN.

Runs in the peer benchmark's environment (``.bench-peers/flower-venv``),
never in fedshield's, so it imports only Flower, torch and numpy.
``floor.py`` starts it as

    flower-venv/bin/python bench/cnn/flower_cnn.py TASK.npz EVENTS.json \
        --cpus-per-client C --ray-temp-dir DIR

``TASK.npz`` (written by ``floor.py``) holds every client's training rows as
fedshield holds them, the clients fedshield samples in each round, the seed
of each client's per-epoch shuffle in each round, the initial weights and
the local settings, so that Flower trains the same clients on the same
mini-batches from the same start. The ``ClientApp`` trains as the plain
PyTorch floor does (``torch.optim.SGD``, one torch thread); the ``ServerApp``
is Flower's ``FedAvg`` with each round's partitions taken from the task
(``PairedFedAvg``, as in ``bench/peers/flower_app.py``). The server's
``evaluate_fn`` evaluates nothing: it notes when each round ended and keeps
the global model after round 1, which ``floor.py`` compares with the floor's
round 1 from the same start (later rounds would not tell: in this training a
difference of one rounding error in the weights grows to the size of the
weights within about eight rounds, in either framework).

This file is kept out of pytest's doctest collection (``conftest.py``).
"""

from __future__ import annotations

import time

if __name__ == "__main__":
    # Run as the importable module ``flower_cnn``, so that Ray pickles the
    # apps' functions by reference and each actor keeps its data cache.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_cnn

    sys.exit(flower_cnn.main())

T_IMPORT = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from collections import OrderedDict  # noqa: E402
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

SETTINGS: dict[str, Any] = {}
EVENTS: dict[str, Any] = {"round_end": []}
_DATA: dict[str, Any] = {}  # per process: the task, loaded once


def load_task(path: str) -> dict[str, Any]:
    cached = _DATA.get(path)
    if cached is not None:
        return cached
    with np.load(path) as f:
        task = {key: f[key] for key in f.files}
    shape = tuple(int(s) for s in task["input_shape"])
    task["x_t"] = torch.from_numpy(task["x"]).reshape(-1, *shape)
    task["y_t"] = torch.from_numpy(task["y"])
    _DATA[path] = task
    return task


def build_cnn(task: dict[str, Any]) -> torch.nn.Module:
    """fedshield's built-in CNN (``models/builtin.py``), layer for layer."""
    channels, height, width = (int(s) for s in task["input_shape"])
    layers: list[tuple[str, torch.nn.Module]] = []
    for i, out_channels in enumerate(int(h) for h in task["hidden"]):
        layers.append(
            (f"conv{i}", torch.nn.Conv2d(channels, out_channels, 3, padding=1))
        )
        layers.append((f"relu{i}", torch.nn.ReLU()))
        layers.append((f"pool{i}", torch.nn.MaxPool2d(2)))
        channels, height, width = out_channels, height // 2, width // 2
    layers.append(("flatten", torch.nn.Flatten()))
    layers.append(
        ("out", torch.nn.Linear(channels * height * width, int(task["num_classes"])))
    )
    return torch.nn.Sequential(OrderedDict(layers))


def initial_state(task: dict[str, Any]) -> dict[str, torch.Tensor]:
    module = build_cnn(task)
    flat = torch.from_numpy(task["init"])
    state, offset = {}, 0
    for name, p in module.named_parameters():
        state[name] = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return state


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's local training, as the floor trains it."""
    torch.set_num_threads(1)
    config = msg.content["config"]
    task = load_task(str(config["task"]))
    partition = int(config["partition-id"])
    seed = int(config["shuffle-seed"])
    epochs, batch_size, lr, momentum, weight_decay = (
        float(v) for v in task["settings"]
    )
    begin, end = int(task["offsets"][partition]), int(task["offsets"][partition + 1])
    x, y = task["x_t"][begin:end], task["y_t"][begin:end]
    n = end - begin
    model = build_cnn(task)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(int(epochs)):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, int(batch_size)):
            idx = order[start : start + int(batch_size)]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content=reply, reply_to=msg)


server_app = ServerApp()


class PairedFedAvg(FedAvg):
    """Flower's FedAvg, each round training the partitions fedshield sampled."""

    def __init__(self, schedule: np.ndarray, seeds: np.ndarray, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule = schedule
        self.seeds = seeds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        partitions = self.schedule[server_round - 1]
        seeds = self.seeds[server_round - 1]
        paired = []
        for message, partition_id, seed in zip(
            messages, partitions, seeds, strict=True
        ):
            own = ConfigRecord(dict(message.content["config"]))
            own["partition-id"] = int(partition_id)
            own["shuffle-seed"] = int(seed)
            paired.append(
                Message(
                    content=RecordDict({"arrays": arrays, "config": own}),
                    dst_node_id=message.metadata.dst_node_id,
                    message_type=message.metadata.message_type,
                )
            )
        return paired


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """No evaluation: the end of each round, and the model after round 1."""
    now = time.time()
    if server_round == 0:
        EVENTS["initial_eval_end"] = now
    else:
        EVENTS["round_end"].append(now)
        if server_round == 1:
            state = arrays.to_torch_state_dict()
            EVENTS["round1"] = torch.cat(
                [t.reshape(-1) for t in state.values()]
            ).tolist()
    return MetricRecord({"round": float(server_round)})


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    EVENTS["server_main"] = time.time()
    task = load_task(SETTINGS["task"])
    random.seed(0)
    torch.set_num_threads(1)
    clients = len(task["offsets"]) - 1
    per_round = int(task["schedule"].shape[1])
    strategy = PairedFedAvg(
        task["schedule"],
        task["seeds"],
        fraction_train=per_round / clients,
        fraction_evaluate=0.0,
        min_train_nodes=per_round,
        min_evaluate_nodes=0,
        min_available_nodes=clients,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_state(task)),
        num_rounds=SETTINGS["rounds"],
        train_config=ConfigRecord({"task": SETTINGS["task"]}),
        evaluate_fn=central_evaluate,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", type=Path)
    parser.add_argument("events", type=Path)
    parser.add_argument("--cpus-per-client", type=float, default=2.0)
    parser.add_argument("--ray-temp-dir")
    args = parser.parse_args(argv)
    EVENTS["import_start"] = T_IMPORT
    EVENTS["main"] = time.time()
    task_path = str(args.task.resolve())
    task = load_task(task_path)
    rounds = int(task["schedule"].shape[0])
    SETTINGS.update(task=task_path, rounds=rounds)
    init_args: dict[str, Any] = {"address": "local"}
    if args.ray_temp_dir:
        init_args["_temp_dir"] = args.ray_temp_dir
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(task["offsets"]) - 1,
            backend_config={
                "init_args": init_args,
                "client_resources": {
                    "num_cpus": args.cpus_per_client,
                    "num_gpus": 0.0,
                },
            },
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        EVENTS["exit"] = time.time()
        args.events.write_text(json.dumps(EVENTS))
    if len(EVENTS["round_end"]) != rounds:
        print(
            f"flower run finished {len(EVENTS['round_end'])} of {rounds} rounds",
            file=sys.stderr,
        )
        return 1
    return 0
