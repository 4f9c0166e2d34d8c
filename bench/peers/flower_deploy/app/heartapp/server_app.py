"""ServerApp: Flower's FedAvg over the three hospital SuperNodes, rounds timed.

``TimedFedAvg`` is Flower's ``FedAvg`` with ``time.perf_counter`` stamps:
a round starts when ``configure_train`` is called and ends when
``aggregate_evaluate`` returns (federated evaluation is off, so that is
right after the aggregation of the train replies; no centralised
evaluation). The stamps, and the aggregated train metrics, are written as
JSON to the run config's ``timings-path`` after every round, so a run that
fails part way still leaves the rounds it finished.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from heartapp.task import HOSPITALS, build_mlp

app = ServerApp()
STAMPS = ("t-process-start", "t-train-enter", "t-train-exit")


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts, is sent, and ends."""

    def __init__(self, timings_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timings_path = timings_path
        self.t0 = time.perf_counter()
        self.record: dict[str, Any] = {
            "clock": "time.perf_counter, seconds since the ServerApp's main began",
            "wall_start_unix": time.time(),
            "pid": os.getpid(),
            "rounds": [],
        }

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        start = self._now()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.record["rounds"].append(
            {
                "round": server_round,
                "start": start,
                # After FedAvg has sampled the nodes (it waits until
                # min_available_nodes are connected) and built the messages.
                "sent": self._now(),
                "sent_unix": time.time(),
                "nodes": len(messages),
            }
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        current = self.record["rounds"][-1]
        current["replies_received"] = self._now()
        current["replies_received_unix"] = time.time()
        # The ClientApps' wall-clock stamps, taken out of the metrics so that
        # FedAvg does not average them.
        current["clients"] = []
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content["metrics"]
            stamps = {k: float(metrics.pop(k)) for k in STAMPS if k in metrics}
            current["clients"].append(stamps)
        current["replies"] = len(replies)
        current["errors"] = sum(1 for m in replies if m.has_error())
        arrays, metrics = super().aggregate_train(server_round, replies)
        current["aggregated"] = self._now()
        if metrics is not None:
            current["train_metrics"] = {k: float(v) for k, v in metrics.items()}
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        result = super().aggregate_evaluate(server_round, replies)
        current = self.record["rounds"][-1]
        current["end"] = self._now()
        current["seconds"] = current["end"] - current["start"]
        self.dump()
        return result

    def dump(self) -> None:
        if not self.timings_path:
            return
        path = Path(self.timings_path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        tmp.replace(path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over all three hospitals every round, no federated evaluation."""
    cfg = context.run_config
    torch.set_num_threads(1)
    n_nodes = len(HOSPITALS)
    strategy = TimedFedAvg(
        str(cfg["timings-path"]),
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=n_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=n_nodes,
    )
    model = build_mlp(int(cfg["seed"]))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord(
            {
                "lr": float(cfg["lr"]),
                "batch-size": int(cfg["batch-size"]),
                "local-epochs": int(cfg["local-epochs"]),
                "seed": int(cfg["seed"]),
            }
        ),
    )
    strategy.record["strategy_finished"] = strategy._now()
    strategy.record["completed"] = True
    strategy.record["final_train_metrics"] = {
        str(r): {k: float(v) for k, v in m.items()}
        for r, m in result.train_metrics_clientapp.items()
    }
    strategy.dump()
