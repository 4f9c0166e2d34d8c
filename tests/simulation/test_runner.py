from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fedshield.errors import RoundFailedError
from fedshield.simulation import (
    FailureKind,
    RunDirectory,
    SequentialBackend,
    run_round,
    run_rounds,
)
from fedshield.strategies import CountSampler, FedAvg

from .fakes import (
    SPEC_PARAMS,
    ImpostorClient,
    MeanClient,
    NanClient,
    RaisingClient,
    RandomClient,
    WrongShapeClient,
)


def make(clients: dict[str, MeanClient]):
    return clients.__getitem__, list(clients)


def test_run_round_fedavg_weights_by_examples():
    # Prepare: targets 1 (n=1) and 4 (n=2) -> weighted mean 3.
    client_fn, ids = make({"a": MeanClient("a", 1.0, 1), "b": MeanClient("b", 4.0, 2)})
    strategy = FedAvg()
    # Execute
    result = run_round(
        strategy,
        strategy.init(SPEC_PARAMS),
        client_fn=client_fn,
        client_ids=ids,
        seed=0,
    )
    # Assert
    assert result.completed
    assert result.state.round_idx == 1
    assert_allclose(result.state.params.flat, 3.0, rtol=0, atol=1e-6)
    assert result.metrics["num_clients"] == 2
    assert_allclose(result.metrics["train_loss"], 3.0)


@pytest.mark.parametrize(
    ("bad", "kind", "needle"),
    [
        (RaisingClient("x", 0.0, 1), FailureKind.ERROR, "disk on fire"),
        (NanClient("x", 0.0, 1), FailureKind.REJECTED, "NaN"),
        (WrongShapeClient("x", 0.0, 1), FailureKind.REJECTED, "missing parameter"),
        (ImpostorClient("x", 9.0, 1), FailureKind.REJECTED, "claims to come from"),
    ],
)
def test_run_round_bad_client_is_left_out_and_round_goes_on(bad, kind, needle):
    client_fn, ids = make({"a": MeanClient("a", 2.0, 1), "x": bad})
    strategy = FedAvg()
    result = run_round(
        strategy,
        strategy.init(SPEC_PARAMS),
        client_fn=client_fn,
        client_ids=ids,
        seed=0,
    )
    assert result.completed
    assert_allclose(result.state.params.flat, 2.0, atol=1e-6)
    (failure,) = result.failures
    assert failure.client_id == "x" and failure.kind == kind and failure.stage == "fit"
    assert needle in failure.message


def test_run_round_below_min_clients_fails_and_keeps_state():
    client_fn, ids = make({"a": MeanClient("a", 2.0, 1), "x": RaisingClient("x", 0, 1)})
    strategy = FedAvg(min_clients=2)
    state = strategy.init(SPEC_PARAMS)
    result = run_round(strategy, state, client_fn=client_fn, client_ids=ids, seed=0)
    assert not result.completed
    assert result.state is state
    assert "min_clients is 2" in result.message


def test_run_rounds_raises_round_failed_with_client_details(tmp_path):
    client_fn, ids = make({"x": RaisingClient("x", 0, 1)})
    strategy = FedAvg()
    run_dir = RunDirectory(tmp_path)
    with pytest.raises(RoundFailedError, match="disk on fire"):
        run_rounds(
            strategy,
            strategy.init(SPEC_PARAMS),
            rounds=3,
            client_fn=client_fn,
            client_ids=ids,
            seed=0,
            run_dir=run_dir,
        )
    failures = [
        json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()
    ]
    assert failures[0]["client_id"] == "x" and failures[0]["kind"] == "error"


def test_stage_deadline_turns_slow_replies_into_timeouts():
    client_fn, ids = make({"a": MeanClient("a", 2.0, 1)})
    strategy = FedAvg()
    result = run_round(
        strategy,
        strategy.init(SPEC_PARAMS),
        client_fn=client_fn,
        client_ids=ids,
        seed=0,
        timeout_s=1e-12,
    )
    assert not result.completed
    assert result.failures[0].kind == FailureKind.TIMEOUT


def test_federated_eval_is_a_second_stage():
    client_fn, ids = make({"a": MeanClient("a", 2.0, 1), "b": MeanClient("b", 2.0, 3)})
    strategy = FedAvg()
    result = run_round(
        strategy,
        strategy.init(SPEC_PARAMS),
        client_fn=client_fn,
        client_ids=ids,
        seed=0,
        federated_eval=True,
    )
    assert result.metrics["federated_accuracy"] == 1.0
    assert_allclose(result.metrics["federated_loss"], 0.0, atol=1e-6)


def test_client_randomness_depends_on_seed_round_and_client_not_order():
    clients = {c: RandomClient(c, 0, 1) for c in ("a", "b", "c")}
    strategy = FedAvg(weighted=False)
    state = strategy.init(SPEC_PARAMS)
    forward = run_round(
        strategy,
        state,
        client_fn=clients.__getitem__,
        client_ids=["a", "b", "c"],
        seed=5,
    )
    backward = run_round(
        strategy,
        state,
        client_fn=clients.__getitem__,
        client_ids=["c", "b", "a"],
        seed=5,
    )
    other = run_round(
        strategy,
        state,
        client_fn=clients.__getitem__,
        client_ids=["a", "b", "c"],
        seed=6,
    )
    assert_allclose(forward.state.params.flat, backward.state.params.flat, atol=1e-6)
    assert not np.allclose(forward.state.params.flat, other.state.params.flat)


def test_clients_are_built_lazily_only_when_sampled():
    built: list[str] = []

    def client_fn(cid: str) -> MeanClient:
        built.append(cid)
        return MeanClient(cid, 1.0, 1)

    ids = [str(i) for i in range(10_000)]
    strategy = FedAvg(sampler=CountSampler(5))
    state = run_rounds(
        strategy,
        strategy.init(SPEC_PARAMS),
        rounds=2,
        client_fn=client_fn,
        client_ids=ids,
        seed=0,
        backend=SequentialBackend(),
    )
    assert state.round_idx == 2
    assert len(built) == 10  # 5 per round, nothing else


def test_run_rounds_writes_metrics_and_checkpoint_each_round(tmp_path):
    client_fn, ids = make({"a": MeanClient("a", 2.0, 1)})
    strategy = FedAvg()
    run_dir = RunDirectory(tmp_path)
    seen = []
    state = run_rounds(
        strategy,
        strategy.init(SPEC_PARAMS),
        rounds=3,
        client_fn=client_fn,
        client_ids=ids,
        seed=0,
        run_dir=run_dir,
        evaluate_fn=lambda p: {"accuracy": 0.5, "loss": 1.0},
        eval_every=2,
        on_round=lambda s, r: seen.append(dict(r)),
    )
    records = run_dir.read_metrics()
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[0]["accuracy"] is None and records[1]["accuracy"] == 0.5
    assert records[2]["accuracy"] == 0.5  # the last round is always evaluated
    assert all(r["seconds"] >= 0 and r["num_clients"] == 1 for r in records)
    assert run_dir.load_checkpoint() == state
    assert seen == records
