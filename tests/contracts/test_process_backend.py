from __future__ import annotations

import multiprocessing
import os

import pytest

from fedshield.errors import ConfigError
from fedshield.simulation.backends.process import ProcessPoolBackend

from .backend_contract import (
    SEED,
    PoolBackendContract,
    assert_same_update,
    collect,
    evaluate_request,
    fit_request,
    reference,
)
from .fakes import FakeClients, read_log, torch_threads_client


class TestProcessPoolBackend(PoolBackendContract):
    worker_noun = "worker process"
    death_details = {"exit": "exit code 1", "segfault": "signal SIGSEGV"}  # noqa: RUF012
    hung_words = ("worker process was stopped",)

    @classmethod
    def make_backend(cls) -> ProcessPoolBackend:
        # A short grace keeps the hung-worker case quick.
        return ProcessPoolBackend(2, grace_s=0.5)

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
