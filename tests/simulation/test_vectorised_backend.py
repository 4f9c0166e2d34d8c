from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fedshield.api import Federation, build_federation, build_strategy, parse_config
from fedshield.core import Client, ClientUpdate, FitConfig
from fedshield.errors import ConfigError
from fedshield.simulation import (
    FailureKind,
    FitIns,
    SequentialBackend,
    StageReply,
    StageRequest,
    run_rounds,
)
from fedshield.simulation.backends.vectorised import VectorisedBackend

from .fakes import MeanClient

torch = pytest.importorskip("torch")

SEED = 7
CONFIG: dict[str, Any] = {
    "run": {"rounds": 3, "seed": SEED, "federated_eval": True},
    # Dirichlet: clients of unequal sizes, so lockstep padding and masking run.
    "data": {"dataset": "digits", "num_clients": 12, "partition": "dirichlet"},
    "model": {"kind": "mlp", "hidden": [16]},
    "client": {
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-3,
    },
    "strategy": {"clients_per_round": 8},
}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def federation() -> Federation:
    return build_federation(parse_config(CONFIG))


def _run(federation: Federation, backend: Any) -> tuple[Any, list[dict[str, Any]]]:
    config = parse_config(CONFIG)
    strategy = build_strategy(config)
    records: list[dict[str, Any]] = []
    state = run_rounds(
        strategy,
        strategy.init(federation.model.init_params(SEED)),
        rounds=3,
        client_fn=federation.client_fn,
        client_ids=federation.client_ids,
        seed=SEED,
        backend=backend,
        evaluate_fn=federation.evaluate,
        federated_eval=True,
        on_round=lambda _state, record: records.append(dict(record)),
    )
    return state, records


def test_three_rounds_match_the_sequential_backend(federation: Federation) -> None:
    # Prepare / Execute: chunks of 3, so 8 sampled clients take 3 chunks
    want_state, want = _run(federation, SequentialBackend())
    got_state, got = _run(federation, VectorisedBackend(max_batch_clients=3))

    # Assert
    assert got_state.round_idx == want_state.round_idx == 3
    assert_allclose(got_state.params.flat, want_state.params.flat, rtol=1e-4, atol=1e-5)
    moved = federation.model.init_params(SEED).flat - got_state.params.flat
    assert np.abs(moved).max() > 1e-2
    assert len(got) == len(want) == 3
    for record, reference in zip(got, want, strict=True):
        assert record["num_clients"] == reference["num_clients"] == 8
        for key in (
            "train_loss",
            "train_accuracy",
            "federated_loss",
            "federated_accuracy",
            "loss",
            "accuracy",
            "update_norm",
        ):
            assert_allclose(record[key], reference[key], rtol=1e-4, err_msg=key)


def _fit_request(federation: Federation, ids: list[str], **kwargs: Any) -> StageRequest:
    message = FitIns(
        federation.model.init_params(0),
        FitConfig(round_idx=0, epochs=1, batch_size=8, lr=0.1, momentum=0.5),
    )
    return StageRequest("fit", 0, dict.fromkeys(ids, message), **kwargs)


def _replies(backend: Any, request: StageRequest, client_fn: Any) -> list[StageReply]:
    try:
        return list(backend.run_stage(request, client_fn=client_fn, seed=SEED))
    finally:
        backend.end_round()


def _assert_same_replies(got: list[StageReply], want: list[StageReply]) -> None:
    assert [r.client_id for r in got] == [r.client_id for r in want]
    for reply, reference in zip(got, want, strict=True):
        assert reply.ok == reference.ok
        if not reply.ok:
            assert reply.failure is not None and reference.failure is not None
            assert reply.failure.kind == reference.failure.kind
            assert reply.failure.message == reference.failure.message
            continue
        update, expected = reply.value, reference.value
        assert isinstance(update, ClientUpdate) and isinstance(expected, ClientUpdate)
        assert update.client_id == expected.client_id
        assert update.num_examples == expected.num_examples
        assert_allclose(update.delta.flat, expected.delta.flat, rtol=1e-4, atol=1e-6)
        assert_allclose(update.metrics["loss"], expected.metrics["loss"], rtol=1e-5)


def test_client_fn_that_raises_fails_only_that_client(federation: Federation) -> None:
    # Prepare
    calls: list[str] = []

    def client_fn(client_id: str) -> Client:
        calls.append(client_id)
        if client_id == "3":
            raise RuntimeError("disk on fire")
        return federation.client_fn(client_id)

    ids = [str(i) for i in range(6)]
    request = _fit_request(federation, ids)

    # Execute
    got = _replies(VectorisedBackend(), request, client_fn)

    # Assert
    failed = [r for r in got if not r.ok]
    assert [r.client_id for r in failed] == ["3"]
    assert failed[0].failure is not None
    assert failed[0].failure.kind == FailureKind.ERROR
    assert "disk on fire" in failed[0].failure.message
    assert calls.count("3") == 1  # not built a second time to report it
    _assert_same_replies(got, _replies(SequentialBackend(), request, client_fn))


def test_a_client_that_breaks_its_chunk_is_reported_alone(
    federation: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: label 99 of 10 classes makes the whole vectorised chunk raise
    from fedshield.models import TorchClient

    def client_fn(client_id: str) -> Client:
        client = federation.client_fn(client_id)
        if client_id != "2":
            return client
        x, y = client.train_data
        return TorchClient("2", client.model, x_train=x, y_train=np.full_like(y, 99))

    request = _fit_request(federation, [str(i) for i in range(5)])

    # Execute
    with caplog.at_level(logging.WARNING):
        got = _replies(VectorisedBackend(), request, client_fn)

    # Assert: the others still reply, with the sequential results
    assert [r.client_id for r in got if not r.ok] == ["2"]
    assert "one by one" in caplog.text
    _assert_same_replies(got, _replies(SequentialBackend(), request, client_fn))


def test_other_clients_and_models_run_one_by_one(
    federation: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a torch-free client among TorchClients, and a federation whose
    # model has dropout (not vectorisable): both must run as in sequential.
    from fedshield.models import TorchClient, TorchModel

    def dropout_module() -> Any:
        return torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, 8),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(8, 10),
        )

    dropout_model = TorchModel(dropout_module)

    def client_fn(client_id: str) -> Client:
        if client_id == "mean":
            return MeanClient("mean", 1.0, 3)
        if client_id.startswith("d"):
            x, y = federation.client_fn(client_id[1:]).train_data
            return TorchClient(client_id, dropout_model, x_train=x, y_train=y)
        return federation.client_fn(client_id)

    ids = ["0", "mean", "1", "d2", "d3", "4"]
    plain = _fit_request(federation, ["0"])
    message = plain.messages["0"]
    dropout_message = FitIns(dropout_model.init_params(0), message.config)
    request = StageRequest(
        "fit",
        0,
        {i: dropout_message if i.startswith("d") else message for i in ids},
    )

    # Execute
    with caplog.at_level(logging.WARNING):
        got = _replies(VectorisedBackend(), request, client_fn)

    # Assert
    assert all(r.ok for r in got)
    assert "'2' (Dropout)" in caplog.text
    _assert_same_replies(got, _replies(SequentialBackend(), request, client_fn))


def test_deadline_counts_each_chunk_wall_time(federation: Federation) -> None:
    request = _fit_request(federation, ["0", "1", "2"], timeout_s=1e-9)

    got = _replies(VectorisedBackend(), request, federation.client_fn)

    assert all(r.failure is not None for r in got)
    for reply in got:
        assert reply.failure is not None
        assert reply.failure.kind == FailureKind.TIMEOUT
        assert "its chunk of 3 clients took" in reply.failure.message


def test_evaluate_stage_matches_sequential(federation: Federation) -> None:
    from fedshield.core import EvalConfig
    from fedshield.simulation import EvaluateIns

    message = EvaluateIns(federation.model.init_params(1), EvalConfig(round_idx=0))
    request = StageRequest("evaluate", 0, dict.fromkeys(["0", "5"], message))

    got = _replies(VectorisedBackend(), request, federation.client_fn)
    want = _replies(SequentialBackend(), request, federation.client_fn)

    assert [r.value for r in got] == [r.value for r in want]


def test_clients_are_built_once_per_round(federation: Federation) -> None:
    calls: list[str] = []

    def client_fn(client_id: str) -> Client:
        calls.append(client_id)
        return federation.client_fn(client_id)

    backend = VectorisedBackend()
    fit = _fit_request(federation, ["0", "1"])
    list(backend.run_stage(fit, client_fn=client_fn, seed=SEED))
    list(backend.run_stage(fit, client_fn=client_fn, seed=SEED))
    assert calls == ["0", "1"]
    backend.end_round()
    list(backend.run_stage(fit, client_fn=client_fn, seed=SEED))
    assert calls == ["0", "1", "0", "1"]
    backend.close()


@pytest.mark.parametrize("bad", [0, -1, True])
def test_max_batch_clients_must_be_positive(bad: int) -> None:
    with pytest.raises(ConfigError, match="max_batch_clients"):
        VectorisedBackend(max_batch_clients=bad)


def test_repr_names_the_chunk_size() -> None:
    assert repr(VectorisedBackend(5)) == "VectorisedBackend(max_batch_clients=5)"
