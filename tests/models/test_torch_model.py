from __future__ import annotations

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.metrics import roc_auc_score

from fedshield.core import FitConfig, Params
from fedshield.errors import ConfigError
from fedshield.models import TorchModel, build_module


def _logistic(num_features: int, num_classes: int = 2) -> TorchModel:
    return TorchModel(
        functools.partial(
            build_module,
            "logistic",
            input_shape=(num_features,),
            num_classes=num_classes,
        )
    )


def _binary_params(model: TorchModel) -> Params:
    # logits (0, x): the score logit_1 - logit_0 equals the single feature x
    return Params.from_flat(np.array([0.0, 1.0, 0.0, 0.0]), model.spec)


# --- spec and parameters ---------------------------------------------------


def test_spec_follows_named_parameters(mlp_model: TorchModel) -> None:
    assert mlp_model.spec.entries == (
        ("hidden0.weight", (32, 64)),
        ("hidden0.bias", (32,)),
        ("out.weight", (10, 32)),
        ("out.bias", (10,)),
    )


def test_params_load_then_read_round_trip(mlp_model: TorchModel) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    params = Params.from_flat(
        rng.normal(size=mlp_model.spec.size).astype(np.float32), mlp_model.spec
    )

    # Execute
    mlp_model._load_params(params)
    back = mlp_model._read_params()

    # Assert
    assert back == params
    assert not np.shares_memory(back.flat, params.flat)


def test_loaded_params_drive_the_forward_pass() -> None:
    # Prepare: second-source check of loading against a hand-built module
    model = _logistic(3, num_classes=2)
    params = Params({"linear.weight": [[1, 2, 3], [0, -1, 0.5]], "linear.bias": [1, 0]})
    x = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=np.float32)
    y = np.array([0, 1])
    logits = x @ params["linear.weight"].T + params["linear.bias"]
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    # Execute
    metrics = model.evaluate(params, x, y)

    # Assert
    expected = -np.mean(log_softmax[np.arange(2), y])
    assert_allclose(metrics["loss"], expected, rtol=1e-6)


def test_params_of_another_spec_raise(mlp_model: TorchModel) -> None:
    wrong = Params({"w": np.zeros(3)})

    with pytest.raises(ConfigError, match="params do not match the model"):
        mlp_model.evaluate(wrong, np.zeros((1, 64)), np.zeros(1, dtype=np.int64))


def test_init_params_same_seed_is_identical(mlp_model: TorchModel) -> None:
    assert mlp_model.init_params(3) == mlp_model.init_params(3)


def test_init_params_other_seed_differs(mlp_model: TorchModel) -> None:
    a, b = mlp_model.init_params(3), mlp_model.init_params(4)

    assert a.spec == b.spec == mlp_model.spec
    assert not np.array_equal(a.flat, b.flat)


def test_init_params_leaves_global_torch_rng_alone(mlp_model: TorchModel) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    mlp_model.init_params(7)

    assert torch.equal(torch.rand(3), expected)


def test_init_params_negative_seed_raises(mlp_model: TorchModel) -> None:
    with pytest.raises(ConfigError, match="seed"):
        mlp_model.init_params(-1)


def test_module_with_buffers_is_rejected() -> None:
    model = TorchModel(lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(4)))

    with pytest.raises(ConfigError, match=r"buffers.*GroupNorm"):
        _ = model.spec


def test_module_fn_returning_non_module_is_rejected() -> None:
    model = TorchModel(lambda: "not a module")  # type: ignore[arg-type,return-value]

    with pytest.raises(ConfigError, match=r"must return a torch\.nn\.Module"):
        model.init_params(0)


# --- training --------------------------------------------------------------


def test_train_same_rng_seed_is_bitwise_reproducible(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    x, y = digits[0][:300], digits[1][:300]
    start = mlp_model.init_params(0)
    config = FitConfig(round_idx=0, epochs=2, batch_size=16, momentum=0.9)

    # Execute
    a, metrics_a = mlp_model.train(start, x, y, config, rng=np.random.default_rng(5))
    b, metrics_b = mlp_model.train(start, x, y, config, rng=np.random.default_rng(5))

    # Assert
    assert a == b
    assert metrics_a == metrics_b


def test_train_other_rng_seed_differs(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:300], digits[1][:300]
    start = mlp_model.init_params(0)
    config = FitConfig(round_idx=0, batch_size=16)

    a, _ = mlp_model.train(start, x, y, config, rng=np.random.default_rng(5))
    b, _ = mlp_model.train(start, x, y, config, rng=np.random.default_rng(6))

    assert not np.array_equal(a.flat, b.flat)


def test_train_with_dropout_is_reproducible_and_leaves_global_rng_alone(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    # Prepare: dropout draws from torch's global generator
    model = TorchModel(
        lambda: torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(64, 10))
    )
    x, y = digits[0][:100], digits[1][:100]
    start = model.init_params(0)
    config = FitConfig(round_idx=0, batch_size=10)
    torch.manual_seed(9)
    expected = torch.rand(3)
    torch.manual_seed(9)

    # Execute
    a, _ = model.train(start, x, y, config, rng=np.random.default_rng(1))
    torch.manual_seed(1234)
    b, _ = model.train(start, x, y, config, rng=np.random.default_rng(1))

    # Assert
    assert a == b
    torch.manual_seed(9)
    model.train(start, x, y, config, rng=np.random.default_rng(2))
    assert torch.equal(torch.rand(3), expected)


def test_train_does_not_change_its_inputs(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:64].copy(), digits[1][:64].copy()
    start = mlp_model.init_params(0)
    before = np.array(start.flat)

    mlp_model.train(start, x, y, FitConfig(round_idx=0), rng=np.random.default_rng(0))

    assert_allclose(start.flat, before, rtol=0, atol=0)
    assert_allclose(x, digits[0][:64], rtol=0, atol=0)


def test_train_mlp_on_digits_learns(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    x, y = digits
    start = mlp_model.init_params(0)
    initial = mlp_model.evaluate(start, x, y)
    config = FitConfig(round_idx=0, epochs=5, batch_size=32, lr=0.1, momentum=0.5)

    # Execute
    trained, metrics = mlp_model.train(
        start, x, y, config, rng=np.random.default_rng(0)
    )
    final = mlp_model.evaluate(trained, x, y)

    # Assert
    assert metrics["accuracy"] > 0.9
    assert final["accuracy"] > 0.9
    assert final["loss"] < 0.5 * initial["loss"]
    assert metrics["loss"] < initial["loss"]


def test_train_cnn_accepts_flat_rows_via_input_shape(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    # Prepare
    model = TorchModel(
        functools.partial(
            build_module, "cnn", input_shape=(1, 8, 8), num_classes=10, hidden=(4, 8)
        ),
        input_shape=(1, 8, 8),
    )
    x, y = digits[0][:200], digits[1][:200]
    start = model.init_params(0)

    # Execute
    trained, _ = model.train(
        start, x, y, FitConfig(round_idx=0, lr=0.1), rng=np.random.default_rng(0)
    )
    flat = model.evaluate(trained, x, y)
    shaped = model.evaluate(trained, x.reshape(-1, 1, 8, 8), y)

    # Assert
    assert flat == shaped
    assert not np.array_equal(trained.flat, start.flat)


def test_train_wrong_input_shape_raises() -> None:
    model = TorchModel(
        functools.partial(build_module, "cnn", input_shape=(1, 8, 8), num_classes=2),
        input_shape=(1, 8, 8),
    )

    with pytest.raises(ValueError, match=r"x must have shape"):
        model.train(
            model.init_params(0),
            np.zeros((4, 63), dtype=np.float32),
            np.zeros(4, dtype=np.int64),
            FitConfig(round_idx=0),
            rng=np.random.default_rng(0),
        )


def test_train_rows_mismatch_raises(mlp_model: TorchModel) -> None:
    with pytest.raises(ValueError, match="same number of rows"):
        mlp_model.train(
            mlp_model.init_params(0),
            np.zeros((4, 64)),
            np.zeros(3, dtype=np.int64),
            FitConfig(round_idx=0),
            rng=np.random.default_rng(0),
        )


def test_train_non_integer_labels_raise(mlp_model: TorchModel) -> None:
    with pytest.raises(ValueError, match="integer class labels"):
        mlp_model.train(
            mlp_model.init_params(0),
            np.zeros((2, 64)),
            np.array([0.5, 1.0]),
            FitConfig(round_idx=0),
            rng=np.random.default_rng(0),
        )


def test_train_huge_proximal_mu_stays_near_start(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    x, y = digits[0][:400], digits[1][:400]
    start = mlp_model.init_params(0)

    def moved(mu: float) -> float:
        config = FitConfig(round_idx=0, epochs=2, lr=0.05, options={"proximal_mu": mu})
        new, _ = mlp_model.train(start, x, y, config, rng=np.random.default_rng(0))
        return (new - start).norm()

    # Execute
    free, anchored = moved(0.0), moved(15.0)

    # Assert
    assert anchored < 0.2 * free


def test_train_proximal_term_matches_autograd_reference(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    # Prepare: full-batch steps, so shuffling only reorders terms of the mean
    model = _logistic(64, num_classes=10)
    x, y = digits[0][:50], digits[1][:50]
    start = model.init_params(0)
    mu, lr, steps = 0.7, 0.5, 3
    config = FitConfig(
        round_idx=0, epochs=steps, batch_size=50, lr=lr, options={"proximal_mu": mu}
    )
    w = torch.from_numpy(np.array(start["linear.weight"])).requires_grad_()
    b = torch.from_numpy(np.array(start["linear.bias"])).requires_grad_()
    anchor_w, anchor_b = w.detach().clone(), b.detach().clone()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        proximal = ((w - anchor_w) ** 2).sum() + ((b - anchor_b) ** 2).sum()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + mu / 2 * proximal
        grad_w, grad_b = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= lr * grad_w
            b -= lr * grad_b

    # Execute
    ours, _ = model.train(start, x, y, config, rng=np.random.default_rng(0))
    plain, _ = model.train(
        start,
        x,
        y,
        FitConfig(round_idx=0, epochs=steps, batch_size=50, lr=lr),
        rng=np.random.default_rng(0),
    )

    # Assert
    assert_allclose(ours["linear.weight"], w.detach().numpy(), rtol=0, atol=1e-6)
    assert_allclose(ours["linear.bias"], b.detach().numpy(), rtol=0, atol=1e-6)
    assert np.abs(ours.flat - plain.flat).max() > 1e-3


@pytest.mark.parametrize("mu", [-1.0, float("nan"), "strong", True])
def test_train_invalid_proximal_mu_raises(mlp_model: TorchModel, mu: object) -> None:
    config = FitConfig(round_idx=0, options={"proximal_mu": mu})  # type: ignore[dict-item]

    with pytest.raises(ConfigError, match="proximal_mu"):
        mlp_model.train(
            mlp_model.init_params(0),
            np.zeros((2, 64)),
            np.zeros(2, dtype=np.int64),
            config,
            rng=np.random.default_rng(0),
        )


def test_train_no_examples_raises(mlp_model: TorchModel) -> None:
    with pytest.raises(ValueError, match="0 examples"):
        mlp_model.train(
            mlp_model.init_params(0),
            np.zeros((0, 64)),
            np.zeros(0, dtype=np.int64),
            FitConfig(round_idx=0),
            rng=np.random.default_rng(0),
        )


# --- evaluation ------------------------------------------------------------


def test_evaluate_binary_hand_case_matches_sklearn() -> None:
    # Prepare: scores 0.1, 0.4, 0.35, 0.8 for labels 0, 0, 1, 1 -> AUC 3/4
    model = _logistic(1)
    params = _binary_params(model)
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    x = scores.reshape(-1, 1).astype(np.float32)
    y = np.array([0, 0, 1, 1])

    # Execute
    metrics = model.evaluate(params, x, y)

    # Assert
    assert_allclose(metrics["roc_auc"], 0.75, rtol=0, atol=1e-12)
    assert_allclose(metrics["roc_auc"], roc_auc_score(y, scores), rtol=0, atol=1e-12)
    # logits (0, s): every score > 0 predicts class 1
    assert metrics["accuracy"] == 0.5
    assert metrics["num_examples"] == 4.0
    expected_loss = np.mean(np.log1p(np.exp(scores)) - y * scores)
    assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)


def test_evaluate_one_class_present_has_no_roc_auc() -> None:
    model = _logistic(1)

    metrics = model.evaluate(_binary_params(model), np.ones((3, 1)), np.ones(3, int))

    assert "roc_auc" not in metrics
    assert metrics["accuracy"] == 1.0


def test_evaluate_multiclass_has_no_roc_auc(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:50], np.arange(50) % 2

    metrics = mlp_model.evaluate(mlp_model.init_params(0), x, y)

    assert set(metrics) == {"loss", "accuracy", "num_examples"}


def test_evaluate_batch_size_does_not_change_result(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:203], digits[1][:203]
    params = mlp_model.init_params(0)

    whole = mlp_model.evaluate(params, x, y)
    batched = mlp_model.evaluate(params, x, y, batch_size=7)

    assert batched["accuracy"] == whole["accuracy"]
    assert_allclose(batched["loss"], whole["loss"], rtol=1e-6)


def test_evaluate_no_examples_reports_zero(mlp_model: TorchModel) -> None:
    metrics = mlp_model.evaluate(
        mlp_model.init_params(0), np.zeros((0, 64)), np.zeros(0, dtype=np.int64)
    )

    assert metrics == {"num_examples": 0.0}


def test_evaluate_read_only_inputs_work_without_warning(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits[0][:20].copy(), digits[1][:20].copy()
    x.flags.writeable = False
    y.flags.writeable = False

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = mlp_model.evaluate(mlp_model.init_params(0), x, y)

    assert metrics["num_examples"] == 20.0


# --- pickling --------------------------------------------------------------


def test_pickle_round_trip_trains_identically(
    mlp_model: TorchModel, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    x, y = digits[0][:100], digits[1][:100]
    start = mlp_model.init_params(0)  # builds the cached module before pickling
    config = FitConfig(round_idx=0, batch_size=10)

    # Execute
    clone = pickle.loads(pickle.dumps(mlp_model))

    # Assert
    assert clone.spec == mlp_model.spec
    a, _ = mlp_model.train(start, x, y, config, rng=np.random.default_rng(3))
    b, _ = clone.train(start, x, y, config, rng=np.random.default_rng(3))
    assert a == b
