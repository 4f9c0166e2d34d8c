"""The contract every backend passes: same replies as the sequential reference.

A backend's test module subclasses :class:`BackendContract` (whose name keeps
pytest from collecting it on its own) and defines ``make_backend``; one
backend serves the whole class, so process start-up is paid once. Every
result is compared with :class:`SequentialBackend` for the same seed, and
must be bitwise identical: a backend may run clients anywhere and in any
order, but a client's randomness comes only from ``(seed, stage, round_idx,
client_id)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params
from fedshield.simulation import (
    Backend,
    ClientFn,
    EvaluateIns,
    FailureKind,
    FitIns,
    SequentialBackend,
    StageReply,
    StageRequest,
    run_rounds,
)
from fedshield.strategies import CountSampler, FedAvg

from .fakes import SPEC_PARAMS, FakeClients, read_log

SEED = 11

TINY_DIGITS: dict[str, Any] = {
    "run": {"name": "contract", "rounds": 2, "seed": 5},
    "data": {"dataset": "digits", "partition": "iid", "num_clients": 4},
    "model": {"kind": "mlp", "hidden": [16]},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    "strategy": {"clients_per_round": 3},
}


def fit_request(
    client_ids: Sequence[str],
    *,
    round_idx: int = 0,
    timeout_s: float | None = None,
    params: Params = SPEC_PARAMS,
) -> StageRequest:
    message = FitIns(params, FitConfig(round_idx=round_idx))
    return StageRequest("fit", round_idx, dict.fromkeys(client_ids, message), timeout_s)


def evaluate_request(
    client_ids: Sequence[str], *, round_idx: int = 0, params: Params = SPEC_PARAMS
) -> StageRequest:
    message = EvaluateIns(params, EvalConfig(round_idx=round_idx))
    return StageRequest("evaluate", round_idx, dict.fromkeys(client_ids, message))


def collect(
    backend: Backend, request: StageRequest, client_fn: ClientFn, seed: int = SEED
) -> dict[str, StageReply]:
    """Run one stage; check there is exactly one reply per client asked."""
    replies = list(backend.run_stage(request, client_fn=client_fn, seed=seed))
    ids = [reply.client_id for reply in replies]
    assert sorted(ids) == sorted(request.messages), ids
    return {reply.client_id: reply for reply in replies}


def reference(
    request: StageRequest, client_fn: ClientFn, seed: int = SEED
) -> dict[str, StageReply]:
    """The sequential backend's replies to ``request`` (a fresh round)."""
    backend = SequentialBackend()
    try:
        return collect(backend, request, client_fn, seed)
    finally:
        backend.close()


def assert_same_update(got: StageReply, want: StageReply) -> None:
    assert got.ok and want.ok, (got.failure, want.failure)
    assert isinstance(got.value, ClientUpdate)
    assert isinstance(want.value, ClientUpdate)
    assert got.value.client_id == want.value.client_id
    assert got.value.num_examples == want.value.num_examples
    assert dict(got.value.metrics) == dict(want.value.metrics)
    assert got.value.delta.spec == want.value.delta.spec
    assert_array_equal(got.value.delta.flat, want.value.delta.flat, strict=True)


def without_times(records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def run_config(
    config: Any, runner: Backend, **options: Any
) -> tuple[Params, list[dict[str, Any]]]:
    """Run ``config``'s federation on ``runner``; the model and the records."""
    from fedshield.api import build_federation, build_strategy

    federation = build_federation(config)
    strategy = build_strategy(config)
    initial = strategy.init(federation.model.init_params(config.run.seed))
    records: list[dict[str, Any]] = []
    state = run_rounds(
        strategy,
        initial,
        rounds=config.run.rounds,
        client_fn=federation.client_fn,
        client_ids=federation.client_ids,
        seed=config.run.seed,
        backend=runner,
        max_examples=federation.max_examples,
        on_round=lambda _state, record: records.append(dict(record)),
        **options,
    )
    return state.params, records


class BackendContract:
    """Cases every backend must pass.

    Subclasses define the class method ``make_backend``; the backend it
    returns serves every test of the class and is closed after the last.
    A backend that computes the training differently (vectorised) sets
    ``real_model_rtol`` > 0: the real-model run must then match within it.
    """

    real_model_rtol: float = 0.0

    @classmethod
    def make_backend(cls) -> Backend:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> Iterator[Backend]:
        backend = cls.make_backend()
        try:
            yield backend
        finally:
            backend.close()

    @pytest.fixture(autouse=True)
    def _fresh_round(self, backend: Backend) -> Iterator[None]:
        backend.end_round()
        yield
        backend.end_round()

    # -- one stage -------------------------------------------------------------

    def test_fit_stage_gives_each_client_the_sequential_reply(self, backend):
        client_fn = FakeClients(8)
        request = fit_request(client_fn.client_ids, round_idx=2)
        got = collect(backend, request, client_fn)
        want = reference(request, client_fn)
        for client_id in client_fn.client_ids:
            assert_same_update(got[client_id], want[client_id])

    def test_seed_and_round_change_every_client_draw(self, backend):
        client_fn = FakeClients(4)
        ids = client_fn.client_ids
        base = collect(backend, fit_request(ids, round_idx=0), client_fn, seed=1)
        backend.end_round()
        other_seed = collect(backend, fit_request(ids, round_idx=0), client_fn, seed=2)
        backend.end_round()
        other_round = collect(backend, fit_request(ids, round_idx=1), client_fn, seed=1)
        for client_id in ids:
            a = base[client_id].value.delta.flat
            assert not np.array_equal(a, other_seed[client_id].value.delta.flat)
            assert not np.array_equal(a, other_round[client_id].value.delta.flat)

    def test_empty_stage_yields_nothing(self, backend):
        assert (
            list(backend.run_stage(fit_request([]), client_fn=FakeClients(), seed=0))
            == []
        )

    def test_raising_client_is_an_error_and_the_others_still_reply(self, backend):
        client_fn = FakeClients(6, {"2": "raise"})
        request = fit_request(client_fn.client_ids)
        got = collect(backend, request, client_fn)
        failure = got["2"].failure
        assert failure is not None and failure.kind == FailureKind.ERROR
        assert failure.stage == "fit" and failure.client_id == "2"
        assert failure.message == "RuntimeError: disk on fire at 2"
        want = reference(request, client_fn)
        for client_id in ("0", "1", "3", "4", "5"):
            assert_same_update(got[client_id], want[client_id])

    def test_client_fn_failure_is_an_error(self, backend):
        request = fit_request(["0", "99"])
        got = collect(backend, request, FakeClients(4))
        assert got["0"].ok
        failure = got["99"].failure
        assert failure is not None and failure.kind == FailureKind.ERROR
        assert "no client '99'" in failure.message

    def test_slow_client_times_out(self, backend):
        client_fn = FakeClients(4, {"1": "sleep"}, sleep_s=0.6)
        got = collect(
            backend, fit_request(client_fn.client_ids, timeout_s=0.3), client_fn
        )
        failure = got["1"].failure
        assert failure is not None and failure.kind == FailureKind.TIMEOUT
        assert failure.stage == "fit"
        assert all(got[c].ok for c in ("0", "2", "3"))

    # -- clients across stages -------------------------------------------------

    def test_clients_are_built_lazily_and_once_per_round(self, backend, tmp_path):
        log = tmp_path / "builds.log"
        client_fn = FakeClients(10, build_log=log)
        collect(backend, fit_request(["1", "3", "6"]), client_fn)
        collect(backend, evaluate_request(["6", "1"]), client_fn)
        built = sorted(line.split()[1] for line in read_log(log))
        assert built == ["1", "3", "6"]

    def test_stages_of_a_round_meet_the_same_client_object(self, backend):
        client_fn = FakeClients(6)
        ids = client_fn.client_ids
        fit = collect(backend, fit_request(ids, round_idx=3), client_fn)
        evaluated = collect(backend, evaluate_request(ids, round_idx=3), client_fn)
        for client_id in ids:
            assert evaluated[client_id].value["fits"] == 1.0
            token = fit[client_id].value.metrics["token"]
            assert evaluated[client_id].value["fit_token"] == token

    def test_end_round_forgets_the_clients(self, backend):
        client_fn = FakeClients(4)
        ids = client_fn.client_ids
        collect(backend, fit_request(ids, round_idx=0), client_fn)
        backend.end_round()
        evaluated = collect(backend, evaluate_request(ids, round_idx=0), client_fn)
        assert all(evaluated[c].value["fits"] == 0.0 for c in ids)

    def test_a_new_round_index_starts_with_new_clients(self, backend):
        client_fn = FakeClients(4)
        ids = client_fn.client_ids
        collect(backend, fit_request(ids, round_idx=0), client_fn)
        evaluated = collect(backend, evaluate_request(ids, round_idx=1), client_fn)
        assert all(evaluated[c].value["fits"] == 0.0 for c in ids)

    def test_a_new_client_fn_is_used(self, backend):
        first, second = FakeClients(4), FakeClients(4, offset=10.0)
        ids = first.client_ids
        collect(backend, fit_request(ids), first)
        backend.end_round()
        request = fit_request(ids, round_idx=1)
        got = collect(backend, request, second)
        want = reference(request, second)
        for client_id in ids:
            assert_same_update(got[client_id], want[client_id])

    # -- whole runs ------------------------------------------------------------

    def test_fedavg_rounds_match_the_sequential_backend(self, backend):
        client_fn = FakeClients(8)
        strategy = FedAvg(sampler=CountSampler(5))

        def run(runner: Backend) -> tuple[Params, list[dict[str, Any]]]:
            records: list[dict[str, Any]] = []
            state = run_rounds(
                strategy,
                strategy.init(SPEC_PARAMS),
                rounds=3,
                client_fn=client_fn,
                client_ids=client_fn.client_ids,
                seed=SEED,
                backend=runner,
                federated_eval=True,
                on_round=lambda _state, record: records.append(dict(record)),
            )
            return state.params, records

        got_params, got_records = run(backend)
        want_params, want_records = run(SequentialBackend())
        assert_array_equal(got_params.flat, want_params.flat, strict=True)
        assert without_times(got_records) == without_times(want_records)
        assert "federated_loss" in got_records[-1]

    @pytest.mark.usefixtures("one_torch_thread")
    def test_digits_run_matches_the_sequential_backend(self, backend, tmp_path):
        from fedshield.api import build_federation, parse_config

        config = parse_config(TINY_DIGITS)
        evaluate = build_federation(config).evaluate

        def run(runner: Backend) -> tuple[Params, list[dict[str, Any]]]:
            return run_config(config, runner, evaluate_fn=evaluate, federated_eval=True)

        got_params, got_records = run(backend)
        want_params, want_records = run(SequentialBackend())
        if self.real_model_rtol == 0.0:
            assert_array_equal(got_params.flat, want_params.flat, strict=True)
            assert without_times(got_records) == without_times(want_records)
            return
        rtol = self.real_model_rtol
        assert_allclose(got_params.flat, want_params.flat, rtol=rtol, atol=rtol)
        for got, want in zip(
            without_times(got_records), without_times(want_records), strict=True
        ):
            assert got.keys() == want.keys()
            for key in got:
                assert got[key] == pytest.approx(want[key], rel=rtol, abs=rtol), key

    # -- secure rounds ---------------------------------------------------------

    @pytest.mark.usefixtures("one_torch_thread")
    @pytest.mark.parametrize(
        ("protocol", "privacy"),
        [
            ("secagg", None),
            ("secagg+", None),
            ("secagg", "central"),
            ("secagg+", "central"),
            ("secagg", "malicious"),
        ],
    )
    def test_secure_rounds_match_the_sequential_backend(
        self, backend, protocol, privacy
    ):
        # The clients' halves (encoding, clipping, masking) run wherever the
        # backend holds the clients; the result must not depend on where.
        from fedshield.api import parse_config
        from fedshield.api.experiment import secure_settings

        raw: dict[str, Any] = {
            **TINY_DIGITS,
            "data": {"dataset": "digits", "partition": "iid", "num_clients": 6},
            "strategy": {"clients_per_round": 6, "min_clients": 4},
            "secagg": {"protocol": protocol},
        }
        if protocol == "secagg+":
            # k = n - 1: SecAgg+'s graph machinery with a graph that is the
            # same every run (a sparser one is drawn from fresh keys, and
            # at n = 6 it can leave a client short of neighbours in one run
            # and not the other).
            raw["secagg"] = {"protocol": protocol, "neighbours": 5}
        if privacy == "central":
            raw["privacy"] = {
                "mode": "central",
                "clip_norm": 1.0,
                "noise_multiplier": 0.5,
                "sampling": "fixed",
                "accountant": "rdp",
            }
        if privacy == "malicious":
            raw["secagg"] = {"protocol": protocol, "malicious": True}
        config = parse_config(raw)

        def run(runner: Backend) -> tuple[Params, list[dict[str, Any]]]:
            return run_config(config, runner, secure=secure_settings(config))

        got_params, got_records = run(backend)
        want_params, want_records = run(SequentialBackend())
        if privacy != "central":  # a DP run writes only what its guarantee covers
            assert all(r["secagg/aborted"] == 0.0 for r in want_records)
            assert want_records[-1]["secagg/survivors"] == 6.0
        assert len(want_records) == config.run.rounds
        if self.real_model_rtol == 0.0:
            assert_array_equal(got_params.flat, want_params.flat, strict=True)
            assert without_times(got_records) == without_times(want_records)
            return
        rtol = self.real_model_rtol
        assert_allclose(got_params.flat, want_params.flat, rtol=rtol, atol=rtol)


class PoolBackendContract(BackendContract):
    """Cases of backends that run clients in a pool of workers.

    Subclasses set the words their failure messages use: ``worker_noun``
    (e.g. ``"worker process"``), ``death_details`` (kind of death -> text
    the message must also hold) and ``hung_words`` (for a hung worker).
    """

    worker_noun: str = ""
    death_details: dict[str, str] = {}  # noqa: RUF012 - read-only per class
    hung_words: tuple[str, ...] = ()

    def test_replies_come_in_request_order(self, backend):
        # The first client is slow, so the others finish first and must wait.
        client_fn = FakeClients(6, {"5": "sleep"}, sleep_s=0.3)
        ids = ["5", "0", "3", "1", "4", "2"]
        replies = backend.run_stage(fit_request(ids), client_fn=client_fn, seed=SEED)
        assert [reply.client_id for reply in replies] == ids

    def test_client_fn_is_loaded_once_by_each_worker(self, backend, tmp_path):
        log = tmp_path / "loads.log"
        client_fn = FakeClients(6, load_log=log)
        ids = client_fn.client_ids
        collect(backend, fit_request(ids, round_idx=0), client_fn)
        collect(backend, evaluate_request(ids, round_idx=0), client_fn)
        backend.end_round()
        collect(backend, fit_request(ids, round_idx=1), client_fn)
        pids = read_log(log)
        assert len(pids) == 2 and len(set(pids)) == 2
        assert str(os.getpid()) not in pids

    @pytest.mark.parametrize("kind", ["exit", "segfault"])
    def test_dead_worker_fails_only_its_client_and_is_replaced(self, backend, kind):
        client_fn = FakeClients(8, {"4": kind})
        ids = client_fn.client_ids
        got = collect(backend, fit_request(ids), client_fn)
        failure = got["4"].failure
        assert failure is not None and failure.kind == FailureKind.ERROR
        assert self.worker_noun in failure.message and "died" in failure.message
        assert self.death_details.get(kind, "") in failure.message
        want = reference(fit_request([c for c in ids if c != "4"]), client_fn)
        for client_id, reply in want.items():
            assert_same_update(got[client_id], reply)

        # Worker 0 ran 0, 2, 4 (died) and, replaced, 6. The objects of 0 and
        # 2 died with it: later stages of the round say so rather than
        # silently talking to a rebuilt client.
        evaluated = collect(backend, evaluate_request(ids), client_fn)
        lost = {c for c, reply in evaluated.items() if not reply.ok}
        assert lost == {"0", "2", "4"}
        assert all("client state lost" in evaluated[c].failure.message for c in lost)
        assert evaluated["6"].value["fits"] == 1.0

        backend.end_round()
        healthy = FakeClients(8)
        request = fit_request(ids, round_idx=1)
        got = collect(backend, request, healthy)
        want = reference(request, healthy)
        for client_id in ids:
            assert_same_update(got[client_id], want[client_id])

    def test_hung_client_times_out_and_its_worker_is_replaced(self, backend):
        client_fn = FakeClients(6, {"2": "hang"})
        ids = client_fn.client_ids
        started = time.monotonic()
        got = collect(backend, fit_request(ids, timeout_s=0.3), client_fn)
        assert time.monotonic() - started < 10
        failure = got["2"].failure
        assert failure is not None and failure.kind == FailureKind.TIMEOUT
        assert all(word in failure.message for word in self.hung_words)
        want = reference(fit_request([c for c in ids if c != "2"]), client_fn)
        for client_id, reply in want.items():
            assert_same_update(got[client_id], reply)

        backend.end_round()
        got = collect(backend, fit_request(ids, round_idx=1), FakeClients(6))
        assert all(reply.ok for reply in got.values())

    def test_abandoned_stage_does_not_disturb_the_next(self, backend):
        client_fn = FakeClients(6)
        ids = client_fn.client_ids
        replies = backend.run_stage(fit_request(ids), client_fn=client_fn, seed=SEED)
        assert next(iter(replies)).client_id == "0"
        del replies  # nobody reads the rest
        request = fit_request(ids, round_idx=1)
        got = collect(backend, request, client_fn)
        want = reference(request, client_fn)
        for client_id in ids:
            assert_same_update(got[client_id], want[client_id])
