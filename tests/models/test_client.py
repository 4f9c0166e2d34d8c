from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fedshield.core import Client, EvalConfig, FitConfig, validate_update
from fedshield.errors import ConfigError
from fedshield.models import TorchClient, TorchModel, build_module
from fedshield.privacy.records import DP_SGD_CLIP, DP_SGD_SIGMA


@pytest.fixture
def model() -> TorchModel:
    return TorchModel(
        functools.partial(build_module, "logistic", input_shape=(64,), num_classes=10)
    )


@pytest.fixture
def client(model: TorchModel, digits: tuple[np.ndarray, np.ndarray]) -> TorchClient:
    x, y = digits
    return TorchClient(
        "c7",
        model,
        x_train=x[:120],
        y_train=y[:120],
        x_test=x[120:170],
        y_test=y[120:170],
    )


def test_client_satisfies_client_protocol(client: TorchClient) -> None:
    assert isinstance(client, Client)


def test_fit_delta_is_new_minus_old(
    client: TorchClient, model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    x, y = digits
    params = model.init_params(0)
    config = FitConfig(round_idx=2, batch_size=16)

    # Execute
    update = client.fit(params, config, np.random.default_rng(11))
    new, metrics = model.train(
        params, x[:120], y[:120], config, rng=np.random.default_rng(11)
    )

    # Assert
    assert update.client_id == "c7"
    assert update.num_examples == 120
    assert update.delta.spec == params.spec
    assert_allclose(update.delta.flat, new.flat - params.flat, rtol=0, atol=0)
    assert dict(update.metrics) == metrics
    assert set(metrics) == {"loss", "accuracy"}


def test_fit_no_training_examples_raises(model: TorchModel) -> None:
    client = TorchClient(
        "empty", model, x_train=np.zeros((0, 64)), y_train=np.zeros(0, dtype=int)
    )

    with pytest.raises(ValueError, match="'empty' has no training examples"):
        client.fit(
            model.init_params(0), FitConfig(round_idx=0), np.random.default_rng(0)
        )


def test_evaluate_without_test_split_reports_zero(
    model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    client = TorchClient("a", model, x_train=digits[0][:5], y_train=digits[1][:5])

    metrics = client.evaluate(model.init_params(0), EvalConfig(round_idx=0))

    assert metrics == {"num_examples": 0}


def test_evaluate_uses_local_test_split(
    client: TorchClient, model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    params = model.init_params(0)

    metrics = client.evaluate(params, EvalConfig(round_idx=0, batch_size=8))

    assert metrics == model.evaluate(params, x[120:170], y[120:170], batch_size=8)
    assert metrics["num_examples"] == 50


def test_only_one_of_test_arrays_raises(model: TorchModel) -> None:
    with pytest.raises(ConfigError, match="together"):
        TorchClient(
            "a",
            model,
            x_train=np.zeros((2, 64)),
            y_train=np.zeros(2, dtype=int),
            x_test=np.zeros((2, 64)),
        )


def test_rows_mismatch_raises(model: TorchModel) -> None:
    with pytest.raises(ConfigError, match="`x_train` has 3 rows but `y_train` has 2"):
        TorchClient(
            "a", model, x_train=np.zeros((3, 64)), y_train=np.zeros(2, dtype=int)
        )


def test_float_labels_are_converted_once(model: TorchModel) -> None:
    client = TorchClient(
        "a", model, x_train=np.zeros((2, 64)), y_train=np.array([0.0, 3.0])
    )

    update = client.fit(
        model.init_params(0), FitConfig(round_idx=0), np.random.default_rng(0)
    )

    assert update.num_examples == 2


def test_pickle_round_trip_fits_identically(
    client: TorchClient, model: TorchModel
) -> None:
    # Prepare
    params = model.init_params(0)
    config = FitConfig(round_idx=0, batch_size=16)

    # Execute
    clone = pickle.loads(pickle.dumps(client))

    # Assert
    assert clone.client_id == client.client_id
    assert repr(clone) == repr(client) == "TorchClient('c7', train=120, test=50)"
    a = client.fit(params, config, np.random.default_rng(4))
    b = clone.fit(params, config, np.random.default_rng(4))
    assert a.delta == b.delta
    assert a.metrics == b.metrics


def test_a_diverged_dp_sgd_update_is_sent_as_zeros(
    client: TorchClient, model: TorchModel
) -> None:
    # Record-level DP-SGD whose noised steps overflow: the update is zeros
    # (post-processing of the noised steps), never a NaN or infinite update
    # that the server would reject, telling that training diverged.
    params = model.init_params(0)
    options = {DP_SGD_CLIP: 1.0, DP_SGD_SIGMA: 100.0}
    config = FitConfig(round_idx=0, lr=1e38, epochs=2, options=options)
    trained, _ = client._fit_dp_sgd(params, config, np.random.default_rng(1))
    assert not trained.is_finite()  # what DP-SGD alone gives
    update = client.fit(params, config, np.random.default_rng(1))
    validate_update(update, params.spec)
    assert not np.any(update.delta.flat)
    assert set(update.metrics) == {"dp_sgd/sampling_rate", "dp_sgd/steps"}
