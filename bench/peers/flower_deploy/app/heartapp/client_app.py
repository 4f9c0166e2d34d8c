"""ClientApp: local SGD on the rows of the SuperNode's own hospital.

The hospital comes from the SuperNode's ``--node-config 'hospital="..."'``;
the hyper-parameters from the ServerApp's train ConfigRecord.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from heartapp.task import HOSPITALS, build_mlp, load_hospital

app = ClientApp()

_DATA: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _process_start_unix() -> float:
    """When this process (the ``flwr-clientapp`` the SuperNode spawned) started."""
    with open(f"/proc/{os.getpid()}/stat") as f:
        stat = f.read()
    start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf(
        "SC_CLK_TCK"
    )
    return time.time() - age


def _data(hospital: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hospital not in _DATA:
        _DATA[hospital] = load_hospital(hospital)
    return _DATA[hospital]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Plain mini-batch SGD, shuffled each epoch; reply with weights and metrics.

    Three wall-clock stamps (``time.time()``) ride in the reply's metrics for
    the benchmark's breakdown of a round; the ServerApp's strategy takes them
    out before FedAvg averages the metrics.
    """
    t_enter = time.time()
    torch.set_num_threads(1)
    hospital = str(context.node_config["hospital"])
    config = msg.content["config"]
    x, y = _data(hospital)
    n = len(y)

    model = build_mlp()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    batch_size = int(config["batch-size"])
    epochs = int(config["local-epochs"])
    generator = torch.Generator().manual_seed(
        int(config["seed"]) * 10**6
        + int(config["server-round"]) * 10**3
        + HOSPITALS.index(hospital)
    )
    total_loss, correct = 0.0, 0
    for _ in range(epochs):
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
    seen = max(n * epochs, 1)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {
                    "train_loss": total_loss / seen,
                    "train_accuracy": correct / seen,
                    "num-examples": n,
                    "t-process-start": _process_start_unix(),
                    "t-train-enter": t_enter,
                    "t-train-exit": time.time(),
                }
            ),
        }
    )
    return Message(content=reply, reply_to=msg)
