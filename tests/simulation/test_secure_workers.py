"""Secure aggregation's client halves on worker processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedshield.api import parse_config, simulate
from fedshield.secagg.encoding import choose_encoding
from fedshield.simulation import RunDirectory
from fedshield.simulation import secure_workers as sw
from fedshield.simulation.secure import SecureAggregation, _run_protocol

BASE = {
    "run": {"name": "w", "rounds": 3, "seed": 9, "federated_eval": False},
    "data": {"dataset": "digits", "num_clients": 12},
    "model": {"kind": "logistic"},
    "client": {"lr": 0.1},
    "strategy": {"clients_per_round": 12},
}


def _config(**sections: dict[str, object]) -> object:
    data = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


@pytest.mark.parametrize("extra", [{}, {"malicious": True}])
def test_workers_give_the_same_model_as_one_process(tmp_path, extra) -> None:  # type: ignore[no-untyped-def]
    runs = {}
    for workers in (0, 2):
        config = _config(secagg={"protocol": "secagg+", "workers": workers, **extra})
        summary, run_dir = simulate(
            config, out=tmp_path / f"w{workers}", write_report=False
        )
        assert summary["status"] == "completed"
        runs[workers] = RunDirectory(run_dir).load_checkpoint().params
    # The inputs are encoded before the hand-over, so the sums are identical.
    np.testing.assert_array_equal(runs[2].flat, runs[0].flat)


def test_dropouts_with_workers_are_recorded_and_survived(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(
        secagg={"protocol": "secagg", "threshold": 0.6, "workers": 1},
        faults={"dropout": 0.2},
        run={"rounds": 4},
    )
    summary, run_dir = simulate(config, out=tmp_path / "d", write_report=False)
    assert summary["status"] == "completed"
    records = RunDirectory(run_dir).read_metrics()
    assert any(k.startswith("dropped/") for r in records for k in r)
    assert any(r["secagg/aborted"] == 0.0 for r in records)


def _inputs(n: int, bits: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        f"c{i:02d}": rng.integers(0, 1 << (bits - 4), 40, dtype=np.uint64)
        for i in range(n)
    }


def test_a_worker_that_dies_mid_round_drops_its_clients(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings = SecureAggregation(protocol="secagg", threshold=0.6, workers=2)
    enc = choose_encoding(12, 1.0)
    config = settings.protocol_config(12, enc.modulus_bits, 40)
    inputs = _inputs(12, enc.modulus_bits)
    pool = sw.HalfWorkers(2)
    monkeypatch.setattr(sw, "shared_workers", lambda processes: pool)
    original = sw.HalfWorkers.send
    calls = {"n": 0}

    def send(self, requests):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:  # the masked-input stage: one worker dies
            self._workers[0].process.kill()
            self._workers[0].process.join()
        original(self, requests)

    monkeypatch.setattr(sw.HalfWorkers, "send", send)
    dropped: dict[str, str] = {}
    try:
        server = _run_protocol(config, settings, 0, inputs, {}, dropped)
        dead = set(pool._workers[0].clients)
    finally:
        pool.close()
    assert set(dropped) == dead and len(dead) == 4
    assert set(dropped.values()) == {"masked_input"}
    survivors = sorted(set(inputs) - dead)
    assert sorted(server.survivors) == survivors
    mask = np.uint64((1 << enc.modulus_bits) - 1)
    expected = np.zeros(40, dtype=np.uint64)
    for cid in survivors:
        expected = (expected + inputs[cid]) & mask
    np.testing.assert_array_equal(server.result(), expected)


def test_auto_uses_another_core_only_for_large_rounds(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sw.os, "cpu_count", lambda: 2)
    assert sw.auto_workers(sw.AUTO_MIN_CLIENTS) == 1
    assert sw.auto_workers(sw.AUTO_MIN_CLIENTS - 1) == 0
    monkeypatch.setattr(sw.os, "cpu_count", lambda: 1)
    assert sw.auto_workers(1000) == 0
