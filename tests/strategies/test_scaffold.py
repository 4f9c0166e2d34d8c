from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fedshield.api import build_federation, parse_config, simulate
from fedshield.core import FitConfig, Params
from fedshield.core.client import (
    CLIENT_CONTROL,
    CONTROL_DELTA,
    SCAFFOLD,
    SERVER_CONTROL,
)
from fedshield.models import build_update, local_correction
from fedshield.simulation import (
    ClientStateStore,
    RunDirectory,
    SequentialBackend,
    run_rounds,
)
from fedshield.simulation.backends.vectorised import VectorisedBackend
from fedshield.strategies import FedAvg, Scaffold

TINY = {
    "run": {"rounds": 3, "seed": 4},
    "data": {
        "dataset": "digits",
        "partition": "dirichlet",
        "alpha": 0.3,
        "num_clients": 6,
        "min_samples": 8,
    },
    "model": {"kind": "mlp", "hidden": [16]},
    "client": {"lr": 0.05, "batch_size": 16},
    "strategy": {"name": "scaffold", "clients_per_round": 4},
}


def test_client_control_variate_follows_option_ii_by_hand():
    spec_params = Params({"w": [1.0, 2.0]})
    new = Params({"w": [0.0, 2.5]})
    c = Params({"w": [0.2, -0.2]})
    c_i = Params({"w": [0.1, 0.1]})
    config = FitConfig(
        round_idx=0,
        epochs=2,
        batch_size=4,
        lr=0.5,
        options={SCAFFOLD: True},
        tensors={SERVER_CONTROL: c},
        state={CLIENT_CONTROL: c_i},
    )
    # 10 examples, batch 4 -> 3 steps per epoch, K = 6 steps, K * lr = 3.
    update = build_update("a", spec_params, new, {}, num_examples=10, config=config)
    # c_i+ = c_i - c + (x - y) / (K lr) = [0.1 - 0.2 + 1/3, 0.1 + 0.2 - 0.5/3]
    expected = [0.1 - 0.2 + 1.0 / 3.0, 0.1 + 0.2 - 0.5 / 3.0]
    assert_allclose(update.state[CLIENT_CONTROL].flat, expected, rtol=1e-6)
    assert_allclose(
        update.extras[CONTROL_DELTA].flat, np.array(expected) - [0.1, 0.1], rtol=1e-5
    )
    assert_allclose(update.delta.flat, [-1.0, 0.5])
    assert_allclose(local_correction(spec_params, config).flat, [0.1, -0.3], rtol=1e-6)


def test_first_client_round_uses_zero_client_control():
    params = Params({"w": [1.0, 2.0]})
    config = FitConfig(
        round_idx=0,
        options={SCAFFOLD: True},
        tensors={SERVER_CONTROL: Params({"w": [0.5, 0.5]})},
    )
    assert_allclose(local_correction(params, config).flat, [0.5, 0.5])
    assert local_correction(params, FitConfig(round_idx=0)) is None


def _run(config_data, backend, rounds=None):
    config = parse_config(config_data)
    federation = build_federation(config)
    from fedshield.api import build_strategy

    strategy = build_strategy(config)
    store = ClientStateStore() if strategy.is_stateful else None
    state = run_rounds(
        strategy,
        strategy.init(federation.model.init_params(4)),
        rounds=rounds or config.run.rounds,
        client_fn=federation.client_fn,
        client_ids=federation.client_ids,
        seed=4,
        backend=backend,
        client_states=store,
    )
    return state, store


def test_scaffold_round_one_equals_fedavg_and_then_differs():
    fedavg = {**TINY, "strategy": {"name": "fedavg", "clients_per_round": 4}}
    s1, _ = _run(TINY, SequentialBackend(), rounds=1)
    f1, _ = _run(fedavg, SequentialBackend(), rounds=1)
    # c = c_i = 0 in round 1, so the local training is FedAvg's.
    assert_allclose(s1.params.flat, f1.params.flat, rtol=0, atol=1e-7)
    s3, store = _run(TINY, SequentialBackend())
    f3, _ = _run(fedavg, SequentialBackend())
    assert not np.allclose(s3.params.flat, f3.params.flat)
    assert len(store) >= 4  # every client that took part has its c_i
    assert s3.optimizer_state[SERVER_CONTROL].norm() > 0


def test_server_control_moves_by_sampled_share_of_mean_delta():
    strategy = Scaffold(FedAvg())
    state = strategy.init(Params({"w": [0.0, 0.0]}))
    from fedshield.core import Aggregate

    plan = strategy.configure(state, ["a", "b", "c", "d"], rng=np.random.default_rng(0))
    agg = Aggregate(
        delta=Params({"w": [1.0, 1.0]}),
        num_updates=2,
        total_weight=2.0,
        extras={CONTROL_DELTA: Params({"w": [0.4, -0.8]})},
    )
    new = strategy.apply(state, agg, plan=plan, rng=np.random.default_rng(0))
    # |S| / N = 2 / 4
    assert_allclose(new.optimizer_state[SERVER_CONTROL].flat, [0.2, -0.4])
    assert_allclose(new.params.flat, [1.0, 1.0])


def test_vectorised_scaffold_matches_sequential():
    seq, seq_store = _run(TINY, SequentialBackend())
    vec, vec_store = _run(TINY, VectorisedBackend())
    assert_allclose(vec.params.flat, seq.params.flat, rtol=1e-4, atol=1e-5)
    for cid in ("0", "1", "2", "3", "4", "5"):
        a, b = seq_store.get(cid), vec_store.get(cid)
        assert a.keys() == b.keys()
        for key in a:
            assert_allclose(b[key].flat, a[key].flat, rtol=1e-3, atol=1e-4)


def test_scaffold_resume_equals_uninterrupted_run(tmp_path):
    full, _ = simulate(parse_config(TINY), out=tmp_path / "full", write_report=False)

    def stop(state, record):
        if state.round_idx == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(
            parse_config(TINY), out=tmp_path / "part", on_round=stop, write_report=False
        )
    resumed, _ = simulate(
        parse_config(TINY), out=tmp_path / "part", resume=True, write_report=False
    )
    a, b = RunDirectory(tmp_path / "full"), RunDirectory(tmp_path / "part")
    assert b.load_checkpoint() == a.load_checkpoint()
    assert sorted(p.name for p in (tmp_path / "part").glob("client_states*")) == [
        "client_states.r3.npz"
    ]
    assert resumed["loss"] == full["loss"]
    assert math.isfinite(full["loss"])


def test_disk_state_store_resume_equals_memory_store_run(tmp_path):
    disk = {**TINY, "run": {**TINY["run"], "client_state": "disk"}}
    memory, _ = simulate(parse_config(TINY), out=tmp_path / "mem", write_report=False)

    def stop(state, record):
        if state.round_idx == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(
            parse_config(disk), out=tmp_path / "disk", on_round=stop, write_report=False
        )
    # A crash after round 3's client states were written but before its
    # checkpoint: a stray newer version must be ignored on resume.
    stray = next((tmp_path / "disk" / "client_states").glob("*.r2.npz"))
    stray.with_name(stray.name.replace(".r2.", ".r3.")).write_bytes(b"garbage")
    resumed, _ = simulate(
        parse_config(disk), out=tmp_path / "disk", resume=True, write_report=False
    )
    a, b = RunDirectory(tmp_path / "mem"), RunDirectory(tmp_path / "disk")
    assert b.load_checkpoint().params == a.load_checkpoint().params
    assert resumed["loss"] == memory["loss"]
    names = [p.name for p in (tmp_path / "disk" / "client_states").iterdir()]
    assert all(".r" in n for n in names) and len(names) == len(
        {n.split(".r")[0] for n in names}
    )  # one version per client after pruning


def test_disk_store_keeps_memory_flat_and_versions_round_trip(tmp_path):
    from fedshield.simulation import DiskStateStore

    store = DiskStateStore(tmp_path)
    c = {"scaffold/c_i": Params({"w": [1.0, 2.0]})}
    store.update({"a": c}, round_idx=1)
    store.update({"a": {"scaffold/c_i": Params({"w": [3.0, 4.0]})}}, round_idx=2)
    assert store.get("a")["scaffold/c_i"].flat.tolist() == [3.0, 4.0]
    reopened = DiskStateStore(tmp_path, committed_round=1)
    assert reopened.get("a")["scaffold/c_i"].flat.tolist() == [1.0, 2.0]
    assert reopened.get("nobody") == {}
