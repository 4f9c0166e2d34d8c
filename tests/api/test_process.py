from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.datasets import load_digits

import fedshield as fs
from fedshield.errors import ConfigError, RoundFailedError


def _clients(n: int = 4):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    parts = np.array_split(order[:1200], n)
    return [(x[p], y[p]) for p in parts], (x[order[1200:]], y[order[1200:]])


def model_fn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )


def test_iterative_process_loop_trains_a_model():
    client_data, (x_test, y_test) = _clients()
    process = fs.fedavg(model_fn, lr=0.1, momentum=0.9, seed=1)
    state = process.initialize()
    before = process.evaluate(state, x_test, y_test)["accuracy"]
    for _ in range(8):
        state, metrics = process.next(state, client_data)
    after = process.evaluate(state, x_test, y_test)["accuracy"]
    assert state.round_idx == 8
    assert metrics["num_clients"] == 4
    assert before < 0.3 and after > 0.85


def test_fedavg_of_one_round_is_the_weighted_mean_of_local_models():
    client_data, _ = _clients(3)
    client_data[0] = (client_data[0][0][:50], client_data[0][1][:50])  # unequal sizes
    process = fs.fedavg(model_fn, lr=0.1, seed=3)
    state = process.initialize()
    new_state, _ = process.next(state, client_data)
    # Reference: each client trained alone by the same model adapter and rng.
    from fedshield.core import FitConfig, derive_rng

    locals_, sizes = [], []
    for i, (x, y) in enumerate(client_data):
        rng = derive_rng(3, "stage", "fit", 0, str(i))
        params, _ = process.model.train(
            state.params, x, y, FitConfig(round_idx=0, lr=0.1), rng=rng
        )
        locals_.append(params.flat)
        sizes.append(len(y))
    expected = np.average(np.stack(locals_), axis=0, weights=sizes)
    assert_allclose(new_state.params.flat, expected, rtol=1e-5, atol=1e-6)


def test_process_reports_bad_client_data_clearly():
    process = fs.fedavg(model_fn)
    with pytest.raises(ConfigError, match="at least one client"):
        process.next(process.initialize(), [])
    with pytest.raises(ConfigError, match=r"client_data\['0'\] must be"):
        process.next(process.initialize(), ["nonsense"])


def test_process_round_fails_when_no_client_succeeds():
    process = fs.fedavg(model_fn)
    bad = (np.zeros((3, 5), np.float32), np.zeros(3, np.int64))  # wrong feature count
    with pytest.raises(RoundFailedError, match="only 0 of 1"):
        process.next(process.initialize(), [bad])


def test_client_objects_keep_their_own_ids():
    from fedshield.models import TorchClient

    client_data, _ = _clients(2)
    process = fs.fedavg(model_fn, lr=0.1)
    clients = [
        TorchClient(f"hospital-{i}", process.model, x_train=x, y_train=y)
        for i, (x, y) in enumerate(client_data)
    ]
    _state, metrics = process.next(process.initialize(), clients)
    assert metrics["num_clients"] == 2 and metrics["failures"] == []


def test_round_failure_says_why():
    process = fs.fedavg(model_fn)
    bad = (np.zeros((3, 5), np.float32), np.zeros(3, np.int64))
    with pytest.raises(RoundFailedError, match=r"0 \(error\)"):
        process.next(process.initialize(), [bad])
