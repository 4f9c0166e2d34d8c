from __future__ import annotations

import pickle

import numpy as np

from fedshield.api.config import ExperimentConfig
from fedshield.api.experiment import DatasetClients, build_federation


def _federation(**data: object) -> DatasetClients:
    config = ExperimentConfig.model_validate(
        {"data": {"dataset": "digits", "num_clients": 6, **data}}
    )
    return build_federation(config).client_fn


def test_a_client_built_again_is_the_cached_one_with_the_same_rows() -> None:
    clients = _federation(client_test_fraction=0.2)
    first = clients("0")
    again = clients("0")
    assert again is first
    fresh = DatasetClients(
        clients.model,
        clients.train,
        clients.parts,
        client_test_fraction=0.2,
        seed=clients.seed,
        cache_bytes=0,
    )("0")
    assert fresh is not first
    for a, b in zip(first.train_data, fresh.train_data, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_cache_keeps_the_most_recent_clients_within_its_bytes() -> None:
    clients = _federation()
    one = clients("0").nbytes
    clients.cache_bytes = 2 * one + one // 2  # room for two clients
    a = clients("0")
    b = clients("1")
    assert clients("0") is a  # client-0 is now the most recent
    clients("2")  # evicts client-1, the least recent
    assert clients("0") is a
    assert clients("1") is not b
    assert clients._cached_bytes <= clients.cache_bytes


def test_the_cache_is_not_pickled() -> None:
    clients = _federation()
    for k in range(6):
        clients(str(k))
    size = len(pickle.dumps(clients))
    copy = pickle.loads(pickle.dumps(clients))
    assert len(copy._cache) == 0
    assert copy("3").num_train_examples == clients("3").num_train_examples
    empty = _federation()
    assert size <= len(pickle.dumps(empty)) + 64


def test_no_test_split_draws_nothing_and_keeps_every_row() -> None:
    clients = _federation(client_test_fraction=0.0)
    train, test = clients.local_split("2")
    np.testing.assert_array_equal(train, np.sort(clients.parts["2"]))
    assert test.size == 0
