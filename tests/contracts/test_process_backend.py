from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from fedshield.errors import ConfigError
from fedshield.simulation import FailureKind
from fedshield.simulation.backends.process import ProcessPoolBackend

from .backend_contract import (
    SEED,
    BackendContract,
    assert_same_update,
    collect,
    evaluate_request,
    fit_request,
    reference,
)
from .fakes import FakeClients, read_log, torch_threads_client


class TestProcessPoolBackend(BackendContract):
    @classmethod
    def make_backend(cls) -> ProcessPoolBackend:
        # A short grace keeps the hung-worker case quick.
        return ProcessPoolBackend(2, grace_s=0.5)

    def test_replies_come_in_request_order(self, backend):
        # The first client is slow, so the others finish first and must wait.
        client_fn = FakeClients(6, {"5": "sleep"}, sleep_s=0.3)
        ids = ["5", "0", "3", "1", "4", "2"]
        replies = backend.run_stage(fit_request(ids), client_fn=client_fn, seed=SEED)
        assert [reply.client_id for reply in replies] == ids

    def test_client_fn_is_sent_once_to_each_worker(self, backend, tmp_path):
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

    @pytest.mark.parametrize(
        ("kind", "how"), [("exit", "exit code 1"), ("segfault", "signal SIGSEGV")]
    )
    def test_dead_worker_fails_only_its_client_and_is_replaced(
        self, backend, kind, how
    ):
        client_fn = FakeClients(8, {"4": kind})
        ids = client_fn.client_ids
        got = collect(backend, fit_request(ids), client_fn)
        failure = got["4"].failure
        assert failure is not None and failure.kind == FailureKind.ERROR
        assert "worker process" in failure.message and "died" in failure.message
        assert how in failure.message
        want = reference(fit_request([c for c in ids if c != "4"]), client_fn)
        for client_id, reply in want.items():
            assert_same_update(got[client_id], reply)

        # Worker 0 ran 0, 2, 4 (died) and, restarted, 6. The objects of 0 and
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
        assert "worker process was stopped" in failure.message
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

    def test_unpicklable_client_fn_is_refused(self, backend):
        def local_client_fn(client_id):
            return FakeClients()(client_id)

        with pytest.raises(ConfigError, match="must be picklable"):
            backend.run_stage(fit_request(["0"]), client_fn=local_client_fn, seed=0)
        assert collect(backend, fit_request(["0"]), FakeClients())["0"].ok


def test_unordered_replies_equal_the_sequential_ones():
    # Arrival order depends on timing; each client's reply must not.
    client_fn = FakeClients(6, {"0": "sleep"}, sleep_s=0.2)
    request = fit_request(client_fn.client_ids)
    with ProcessPoolBackend(2, ordered=False) as backend:
        replies = list(backend.run_stage(request, client_fn=client_fn, seed=SEED))
    assert sorted(reply.client_id for reply in replies) == client_fn.client_ids
    want = reference(request, client_fn)
    for reply in replies:
        assert_same_update(reply, want[reply.client_id])


def test_workers_pin_torch_threads_once_torch_is_loaded():
    pytest.importorskip("torch")
    with ProcessPoolBackend(1, torch_threads=3) as backend:
        got = collect(backend, evaluate_request(["a"]), torch_threads_client)
    assert got["a"].value["torch_threads"] == 3.0


def test_close_stops_every_worker(tmp_path):
    log = tmp_path / "builds.log"
    backend = ProcessPoolBackend(2)
    with backend:
        collect(backend, fit_request(["0", "1"]), FakeClients(2, build_log=log))
    pids = {int(line.split()[0]) for line in read_log(log)}
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    backend.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        backend.run_stage(fit_request(["0"]), client_fn=FakeClients(), seed=0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_workers": 0}, "`num_workers` must be >= 1"),
        ({"torch_threads": 0}, "`torch_threads` must be >= 1"),
        ({"mp_context": "fork"}, "deadlock"),
        ({"grace_s": -1.0}, "`grace_s` must be >= 0"),
        ({"start_timeout_s": 0.0}, "`start_timeout_s` must be > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ProcessPoolBackend(**kwargs)


def test_default_num_workers_is_the_usable_cpus():
    backend = ProcessPoolBackend()
    try:
        assert 1 <= backend.num_workers <= (os.cpu_count() or 1)
    finally:
        backend.close()
