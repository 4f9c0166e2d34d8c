"""Under secure aggregation the server's side never holds a client's update.

Each client trains a *canary* update: values no aggregate can equal. A
profiler watches every call into the server's side of a round (the round
protocol, the secure sum's server half, the runner, the SecAgg server) and
looks through the arguments and locals of each call for the canary's array
or anything that shares its memory or holds its values; the round's
observers (``on_stage``) get what the server sees and are searched too. The
same check run without secure aggregation finds the canary at once, so the
check can fail.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import numpy as np
import pytest

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params
from fedshield.simulation import (
    FitReceipt,
    SequentialBackend,
    StageView,
    run_rounds,
)
from fedshield.simulation.secure import SecureAggregation
from fedshield.strategies import CountSampler, FedAvg

SPEC = Params({"w": np.zeros((4, 8), np.float32), "b": np.zeros(8, np.float32)})
CANARY = np.float32(0.0123456789)
"""Every value of every canary update: the mean of several equal canaries
is the canary again, so an aggregate would show it; the masked and encoded
inputs never do."""

SERVER_FILES = (
    "fedshield/simulation/rounds.py",
    "fedshield/simulation/secure.py",
    "fedshield/simulation/runner.py",
    "fedshield/secagg/protocol.py",
    "fedshield/strategies/",
    "fedshield/core/aggregate.py",
)
CLIENT_FUNCTIONS = frozenset(
    {"hold_update", "run_secure_stage", "encode_input", "_lenient", "fit_reply"}
)


class CanaryClient:
    def __init__(self, client_id: str, found: list[np.ndarray]) -> None:
        self.client_id = client_id
        self.found = found

    def fit(self, params: Params, config: FitConfig, rng: Any) -> ClientUpdate:
        delta = Params.from_flat(
            np.full(params.spec.size, CANARY, np.float32), params.spec
        )
        self.found.append(delta.flat)
        return ClientUpdate(self.client_id, delta, 10, {"loss": 0.5})

    def evaluate(self, params: Params, config: EvalConfig) -> dict[str, float]:
        return {"num_examples": 1.0, "loss": 0.0}


def _holds_canary(value: Any, canaries: list[np.ndarray], depth: int = 0) -> bool:
    if depth > 3:
        return False
    if isinstance(value, ClientUpdate):
        return _holds_canary(value.delta, canaries, depth + 1)
    if isinstance(value, Params):
        return _holds_canary(value.flat, canaries, depth + 1)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
        if any(np.shares_memory(value, c) for c in canaries):
            return True
        flat = value.ravel()
        return bool(flat.size >= 8 and np.all(flat[:8] == CANARY))
    if isinstance(value, dict):
        return any(_holds_canary(v, canaries, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_canary(v, canaries, depth + 1) for v in value[:64])
    return False


def _server_frames(frame: FrameType) -> bool:
    name = frame.f_code.co_filename.replace("\\", "/")
    if frame.f_code.co_name in CLIENT_FUNCTIONS:
        return False
    return any(part in name for part in SERVER_FILES)


def _run(secure: SecureAggregation | None) -> tuple[list[str], list[StageView]]:
    found: list[np.ndarray] = []
    clients = {str(i): CanaryClient(str(i), found) for i in range(5)}
    strategy = FedAvg(sampler=CountSampler(5))
    views: list[StageView] = []
    leaks: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not found or not _server_frames(frame):
            return
        for name, value in list(frame.f_locals.items()):
            if _holds_canary(value, found):
                leaks.append(f"{frame.f_code.co_name}({name})")

    sys.setprofile(profile)
    try:
        run_rounds(
            strategy,
            strategy.init(SPEC),
            rounds=2,
            client_fn=clients.__getitem__,
            client_ids=sorted(clients),
            seed=3,
            backend=SequentialBackend(),
            secure=secure,
            on_stage=(views.append,),
        )
    finally:
        sys.setprofile(None)
    return leaks, views


def _views_hold_canary(views: list[StageView]) -> Iterator[str]:
    pattern = np.full(8, CANARY, np.float32).tobytes()
    for view in views:
        for reply in view.replies:
            if _holds_canary(reply.value, []):
                yield f"{view.stage}: {reply.client_id}'s reply"
            if isinstance(reply.value, bytes) and pattern in reply.value:
                yield f"{view.stage}: {reply.client_id}'s bytes"


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_the_server_side_never_holds_a_clients_update(protocol: str) -> None:
    secure = SecureAggregation(
        protocol=protocol,  # type: ignore[arg-type]
        neighbours=4 if protocol == "secagg+" else None,
        allow_insecure_neighbours=True,
    )
    leaks, views = _run(secure)
    assert leaks == []
    assert list(_views_hold_canary(views)) == []
    fits = [v for v in views if v.stage == "fit"]
    assert fits
    assert all(isinstance(r.value, FitReceipt) for v in fits for r in v.replies)
    stages = [v.stage for v in views[: len(views) // 2]]
    assert stages[0] == "fit" and "masked_input" in stages and stages[-1] == "unmask"


def test_the_check_finds_the_canary_without_secure_aggregation() -> None:
    leaks, views = _run(None)
    assert leaks  # the server's own code receives every update in the clear
    assert list(_views_hold_canary(views))
