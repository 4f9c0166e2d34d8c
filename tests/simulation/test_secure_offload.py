"""Secure rounds with every other client's half on a worker process.

:class:`SecureOffload` hands halves over after training; the server sees the
same stages, and the run is bitwise that of the in-process backend alone.
"""

from __future__ import annotations

from typing import Any

import pytest
from numpy.testing import assert_array_equal

from fedshield.api import build_federation, build_strategy, parse_config
from fedshield.api.experiment import secure_settings
from fedshield.simulation import (
    ProcessPoolBackend,
    RoundOptions,
    SequentialBackend,
    run_rounds,
)
from fedshield.simulation.backends.offload import SecureOffload
from fedshield.simulation.secure_client import ClientTrust, KeyDirectory


@pytest.fixture(scope="module")
def pool():  # type: ignore[no-untyped-def]
    backend = ProcessPoolBackend(1, torch_threads=1)
    yield backend
    backend.close()


@pytest.mark.parametrize("secagg", [{"protocol": "secagg+"}, {"malicious": True}])
def test_handed_halves_give_the_same_run(pool, secagg) -> None:  # type: ignore[no-untyped-def]
    raw: dict[str, Any] = {
        "run": {"name": "o", "rounds": 2, "seed": 3},
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 6},
        "model": {"kind": "logistic"},
        "strategy": {"clients_per_round": 6, "min_clients": 4},
        "secagg": {"protocol": "secagg", **secagg},
    }
    config = parse_config(raw)
    federation = build_federation(config)
    malicious = bool(secagg.get("malicious"))
    keys = KeyDirectory(federation.client_ids)

    strategy = build_strategy(config)
    initial = strategy.init(federation.model.init_params(3))
    options = RoundOptions(
        secure=secure_settings(config),
        max_examples=federation.max_examples,
        verify_keys=keys.public_table(federation.client_ids) if malicious else None,
    )

    def run(backend: Any) -> tuple[Any, list[dict[str, Any]]]:
        # A fresh trust a run: each client joins a round's secure sum once.
        federation.client_fn.trust = ClientTrust(keys=keys if malicious else None)
        records: list[dict[str, Any]] = []
        state = run_rounds(
            strategy,
            initial,
            rounds=2,
            client_fn=federation.client_fn,
            client_ids=federation.client_ids,
            seed=3,
            backend=backend,
            options=options,
            on_round=lambda _s, r: records.append(dict(r)),
        )
        return state.params, records

    class Spy:
        handed: list[str] = []  # noqa: RUF012 - per test

        def run_stage(self, request, **kwargs):  # type: ignore[no-untyped-def]
            Spy.handed.extend(request.messages)
            return pool.run_stage(request, **kwargs)

        def end_round(self) -> None:
            pool.end_round()

        def close(self) -> None:
            pass

    offload = SecureOffload(SequentialBackend(), Spy(), min_clients=2)
    got, got_records = run(offload)
    assert sorted(set(Spy.handed)) == sorted(federation.client_ids)[1::2]
    want, want_records = run(SequentialBackend())
    assert_array_equal(got.flat, want.flat, strict=True)
    assert [r["secagg/survivors"] for r in got_records] == [6.0, 6.0]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in got_records] == [
        {k: v for k, v in r.items() if k not in drop} for r in want_records
    ]
