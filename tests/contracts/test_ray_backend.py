"""The Ray backend: the backend contract, plus what only Ray can get wrong.

Ray starts once for the module (``ray.init`` in a fixture, 4 logical CPUs)
and every backend here joins it, so the module pays Ray's start-up (~2.5 s)
once; one test starts and stops its own Ray in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from fedshield.errors import ConfigError  # noqa: E402
from fedshield.simulation import FailureKind  # noqa: E402
from fedshield.simulation.backends.ray import RayBackend  # noqa: E402

from .backend_contract import (  # noqa: E402
    SEED,
    PoolBackendContract,
    assert_same_update,
    collect,
    evaluate_request,
    fit_request,
    reference,
)
from .fakes import (  # noqa: E402
    ExitOnLoad,
    FakeClients,
    read_log,
    torch_threads_client,
)

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    """One local Ray for the module; backends join it and leave it running."""
    if ray.is_initialized():  # someone else's Ray: not ours to configure
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        # Actors unpickle the fakes as ``tests.contracts.fakes``.
        job_config=ray.job_config.JobConfig(code_search_path=[str(ROOT)]),
    )
    try:
        yield
    finally:
        ray.shutdown()


class TestRayBackend(PoolBackendContract):
    worker_noun = "Ray worker"
    hung_words = ("Ray worker", "killed")

    @classmethod
    def make_backend(cls) -> RayBackend:
        # A short grace keeps the hung-actor case quick.
        return RayBackend(num_workers=2, grace_s=0.5)

    def test_backend_joined_the_running_ray(self, backend):
        backend.start()
        assert backend.is_started and not backend.owns_ray
        assert backend.num_workers == 2

    def test_actor_dying_as_it_loads_client_fn_fails_its_clients(self, backend):
        ids = ["0", "1", "2"]
        got = collect(backend, fit_request(ids), ExitOnLoad())
        for client_id in ids:
            failure = got[client_id].failure
            assert failure is not None and failure.kind == FailureKind.ERROR
            assert "died while starting" in failure.message
        backend.end_round()
        healthy = FakeClients(3)
        request = fit_request(ids, round_idx=1)
        got = collect(backend, request, healthy)
        want = reference(request, healthy)
        for client_id in ids:
            assert_same_update(got[client_id], want[client_id])

    def test_a_closure_client_fn_is_shipped_with_cloudpickle(self, backend):
        fakes = FakeClients(4, offset=3.0)

        def local_client_fn(client_id):
            return fakes(client_id)

        request = fit_request(fakes.client_ids)
        got = collect(backend, request, local_client_fn)
        want = reference(request, fakes)
        for client_id in fakes.client_ids:
            assert_same_update(got[client_id], want[client_id])

    def test_unpicklable_client_fn_is_refused(self, backend):
        lock = threading.Lock()

        def locked_client_fn(client_id):
            with lock:
                return FakeClients()(client_id)

        with pytest.raises(ConfigError, match="must be picklable"):
            backend.run_stage(fit_request(["0"]), client_fn=locked_client_fn, seed=0)
        assert collect(backend, fit_request(["0"]), FakeClients())["0"].ok


def test_unordered_replies_equal_the_sequential_ones():
    # Arrival order depends on timing; each client's reply must not.
    client_fn = FakeClients(6, {"0": "sleep"}, sleep_s=0.2)
    request = fit_request(client_fn.client_ids)
    with RayBackend(num_workers=2, ordered=False) as backend:
        replies = list(backend.run_stage(request, client_fn=client_fn, seed=SEED))
    assert sorted(reply.client_id for reply in replies) == client_fn.client_ids
    want = reference(request, client_fn)
    for reply in replies:
        assert_same_update(reply, want[reply.client_id])


def test_actors_pin_torch_threads_once_torch_is_loaded():
    pytest.importorskip("torch")
    with RayBackend(num_workers=1, torch_threads=3) as backend:
        got = collect(backend, evaluate_request(["a"]), torch_threads_client)
    assert got["a"].value["torch_threads"] == 3.0


def test_close_kills_the_actors_and_leaves_a_joined_ray_running(tmp_path):
    log = tmp_path / "builds.log"
    backend = RayBackend(num_workers=2)
    with backend:
        collect(backend, fit_request(["0", "1"]), FakeClients(2, build_log=log))
    assert ray.is_initialized()
    pids = {int(line.split()[0]) for line in read_log(log)}
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    backend.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        backend.run_stage(fit_request(["0"]), client_fn=FakeClients(), seed=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed actor may linger as a zombie until Ray reaps it.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_backend_that_starts_ray_shuts_it_down():
    # In a subprocess: this process's Ray is the module's.
    script = textwrap.dedent(
        """
        import ray
        from fedshield.simulation.backends.ray import RayBackend
        from tests.contracts.backend_contract import fit_request
        from tests.contracts.fakes import FakeClients

        backend = RayBackend(num_cpus=1, num_workers=1)
        assert not ray.is_initialized()  # nothing starts before first use
        replies = list(
            backend.run_stage(fit_request(["0", "1"]), client_fn=FakeClients(2), seed=1)
        )
        assert [r.ok for r in replies] == [True, True], replies
        assert backend.owns_ray and ray.is_initialized()
        backend.close()
        assert not ray.is_initialized()
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_workers": 0}, "`num_workers` must be >= 1"),
        ({"torch_threads": 0}, "`torch_threads` must be >= 1"),
        ({"address": "auto", "num_cpus": 2}, "needs address=None"),
        ({"address": ""}, "`address` of RayBackend"),
        ({"cpus_per_worker": -1.0}, "`cpus_per_worker` must be >= 0"),
        ({"grace_s": -1.0}, "`grace_s` must be >= 0"),
        ({"start_timeout_s": 0.0}, "`start_timeout_s` must be > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        RayBackend(**kwargs)


def test_default_num_workers_is_the_cpus_ray_reports():
    with RayBackend() as backend:
        assert backend.num_workers is None  # not known before Ray is asked
        backend.start()
        assert backend.num_workers == int(ray.cluster_resources()["CPU"])
