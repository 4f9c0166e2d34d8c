"""Regression through the model layer: TorchModel, vectorised, DP-SGD, clients."""

from __future__ import annotations

import copy
import functools
import logging
import math
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch import Tensor, nn

from fedshield.api import backends
from fedshield.core import EvalConfig, FitConfig, Params
from fedshield.errors import ConfigError
from fedshield.models import (
    TorchClient,
    TorchModel,
    build_module,
    check_dp_sgd,
    check_vectorisable,
    regression_loss,
    train_many,
)
from fedshield.models.attacks import AttackSpec, MaliciousClient
from fedshield.models.dp_sgd import DpSgdConfig, _choose_clipped_sum, _train
from fedshield.models.vectorised import _chain_step, _linear_chain, _vmap_step
from fedshield.privacy.noise import SeededGaussian
from fedshield.privacy.records import DP_SGD_CLIP, DP_SGD_SIGMA

D = 8
Data = tuple[np.ndarray, np.ndarray]


def _data(n: int, seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    w = np.linspace(-1.0, 1.0, D, dtype=np.float32)
    y = (x @ w + 0.5 + 0.1 * rng.normal(size=n)).astype(np.float32)
    return x, y


class _Residual(nn.Module):
    """Not a plain chain: LayerNorm, a skip connection, a (n,) output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        out: Tensor = self.out(h + torch.relu(self.norm(h)))
        return out.squeeze(1)


def _mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            [("hidden", nn.Linear(D, 6)), ("act", nn.ReLU()), ("out", nn.Linear(6, 1))]
        )
    )


def _linear() -> nn.Module:
    return nn.Linear(D, 1)


MODELS = {
    "linear": _linear,
    "chain": _mlp,
    "residual": _Residual,
}


def _model(kind: str, **kwargs: object) -> TorchModel:
    return TorchModel(MODELS[kind], input_shape=(D,), task="regression", **kwargs)  # type: ignore[arg-type]


def _config(mu: float = 0.0, **kwargs: float) -> FitConfig:
    values = {"epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9}
    values.update(kwargs)
    return FitConfig(
        round_idx=0,
        epochs=int(values["epochs"]),
        batch_size=int(values["batch_size"]),
        lr=values["lr"],
        momentum=values["momentum"],
        weight_decay=1e-3,
        options={"proximal_mu": mu},
    )


# --- TorchModel -------------------------------------------------------------


def test_task_property_and_default() -> None:
    assert TorchModel(MODELS["linear"]).task == "classification"
    model = _model("linear")
    assert model.task == "regression" and model.is_regression
    assert model._loss_fn is regression_loss
    again = pickle.loads(pickle.dumps(model))
    assert again.task == "regression" and again._loss_fn is regression_loss
    assert "task='regression'" in repr(model)
    with pytest.raises(ConfigError, match="`task` of TorchModel"):
        TorchModel(MODELS["linear"], task="ranking")


def test_train_and_evaluate_report_regression_metrics() -> None:
    model = _model("linear")
    x, y = _data(64)
    params = model.init_params(0)
    before = model.evaluate(params, x, y)
    new, metrics = model.train(
        params, x, y, _config(epochs=20), rng=np.random.default_rng(0)
    )
    assert set(metrics) == {"loss", "rmse", "mae"}
    assert math.isclose(metrics["rmse"], math.sqrt(metrics["loss"]), rel_tol=1e-5)
    after = model.evaluate(new, x, y, batch_size=10)
    assert set(after) == {"loss", "rmse", "mae", "num_examples"}
    assert after["num_examples"] == 64.0
    assert after["loss"] < 0.1 * before["loss"]
    # Against numpy on the model's own predictions.
    bound = model._get_bound()
    bound.load(new)
    with torch.no_grad():
        pred = bound.module(torch.from_numpy(x)).numpy().reshape(-1)
    err = pred.astype(np.float64) - y
    assert_allclose(after["rmse"], np.sqrt(np.mean(err**2)), rtol=1e-5)
    assert_allclose(after["mae"], np.mean(np.abs(err)), rtol=1e-5)
    assert_allclose(after["loss"], np.mean(err**2), rtol=1e-5)
    assert model.evaluate(new, x[:0], y[:0]) == {"num_examples": 0.0}


def test_a_custom_loss_is_kept_and_errors_still_measured() -> None:
    # The (n, 1) outputs reach the loss as (n,): no silent broadcasting.
    model = _model("linear", loss_fn=nn.functional.l1_loss)
    x, y = _data(32)
    params = model.init_params(0)
    metrics = model.evaluate(params, x, y.reshape(-1, 1))
    assert_allclose(metrics["loss"], metrics["mae"], rtol=1e-5)
    assert metrics["rmse"] >= metrics["mae"]
    new, _ = model.train(params, x, y, _config(), rng=np.random.default_rng(0))
    many = train_many(
        model, params, [(x, y)], _config(), rngs=[np.random.default_rng(0)]
    )
    assert_allclose(many[0][0].flat, new.flat, rtol=1e-4, atol=1e-5)
    assert pickle.loads(pickle.dumps(model)).evaluate(params, x, y) == metrics


def test_targets_dtypes_and_shapes() -> None:
    model = _model("linear")
    x, y = _data(6)
    _, yt = model._tensors(x, y.astype(np.float64))
    assert yt.dtype == torch.float32 and yt.shape == (6,)
    _, yt = model._tensors(x, np.arange(6))  # integer targets are numbers too
    assert yt.dtype == torch.float32
    _, yt = model._tensors(x, y.reshape(6, 1))
    assert yt.shape == (6,)
    bad = y.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="finite; row 3"):
        model._tensors(x, bad)
    with pytest.raises(ValueError, match="numbers"):
        model._tensors(x, np.array(list("abcdef")))
    with pytest.raises(ValueError, match=r"\(n,\) or \(n, 1\)"):
        model._tensors(x, np.zeros((6, 2)))
    # A classification model refuses real targets and points at regression.
    with pytest.raises(ValueError, match="task = 'regression'"):
        TorchModel(MODELS["linear"])._tensors(x, y)


# --- vectorised == sequential -------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "chain", "residual"])
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_vectorised_matches_sequential(kind: str, mu: float) -> None:
    model = _model(kind)
    check_vectorisable(model)  # float dummy targets, the regression loss
    params = model.init_params(1)
    datasets = [_data(n, seed=n) for n in (5, 17, 30)]
    config = _config(mu)
    many = train_many(
        model,
        params,
        datasets,
        config,
        rngs=[np.random.default_rng(10 + k) for k in range(3)],
        max_batch_clients=2,
    )
    for k, (x, y) in enumerate(datasets):
        ref, ref_metrics = model.train(
            params, x, y, config, rng=np.random.default_rng(10 + k)
        )
        new, metrics = many[k]
        assert_allclose(new.flat, ref.flat, rtol=1e-4, atol=1e-5)
        assert metrics.keys() == ref_metrics.keys() == {"loss", "rmse", "mae"}
        for key in metrics:
            assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5)


def test_chain_step_gradient_matches_vmap_step() -> None:
    module = _mlp()
    layers = _linear_chain(module)
    assert layers is not None
    params = {
        n: p.detach().unsqueeze(0).expand(3, *p.shape).clone()
        for n, p in module.named_parameters()
    }
    x = torch.randn(3, 4, D)
    y = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    g1, out1, loss1 = _chain_step(layers, regression=True)(params, x, y, mask)
    g2, out2, loss2 = _vmap_step(module, regression_loss)(params, x, y, mask)
    assert_allclose(loss1.numpy(), loss2.numpy(), rtol=1e-5, atol=1e-6)
    assert_allclose(out1.numpy(), out2.numpy(), rtol=1e-5, atol=1e-6)
    for name in g1:
        assert_allclose(g1[name].numpy(), g2[name].numpy(), rtol=1e-4, atol=1e-6)


# --- record-level DP-SGD ---------------------------------------------------------


def _dp_run(
    model: TorchModel, params: Params, data: Data, path: str, sigma: float = 0.5
) -> tuple[Params, dict[str, float]]:
    new, metrics, _ = _train(
        model, params, *data, _config(epochs=2, momentum=0.0),
        rng=np.random.default_rng(3),
        dp=DpSgdConfig(clip_norm=1.0, noise_multiplier=sigma),
        noise=SeededGaussian(np.random.default_rng(4)),
        path=path,  # type: ignore[arg-type]
    )  # fmt: skip
    return new, metrics


@pytest.mark.parametrize("kind", ["linear", "chain", "residual"])
def test_dp_sgd_trains_a_regression_model(kind: str) -> None:
    model = _model(kind)
    check_dp_sgd(model)
    data = _data(200)
    params = model.init_params(0)
    new, metrics = _dp_run(model, params, data, "auto", sigma=0.3)
    assert set(metrics) == {"loss", "rmse", "mae"}
    assert model.evaluate(new, *data)["loss"] < model.evaluate(params, *data)["loss"]


def test_dp_sgd_chain_path_matches_general_path() -> None:
    model = _model("chain")
    data = _data(60)
    params = model.init_params(0)
    a, metrics_a = _dp_run(model, params, data, "chain")
    b, metrics_b = _dp_run(model, params, data, "general")
    assert_allclose(a.flat, b.flat, rtol=1e-4, atol=1e-6)
    for key in metrics_a:
        assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-5)


def test_dp_sgd_clipped_sum_matches_a_slow_reference() -> None:
    model = _model("chain")
    params = model.init_params(2)
    x, y = _data(9)
    xb, yb = model._tensors(x, y * 10)  # large errors: clipping bites
    clip = 0.5
    for path in ("chain", "general"):
        bound = model._get_bound()
        bound.load(params)
        grad_flat = torch.full_like(bound.flat, float("nan"))
        fn = _choose_clipped_sum(
            model, dict(bound.module.named_parameters()), grad_flat, clip,
            path=path, input_ndim=2,
        )  # fmt: skip
        with torch.no_grad():
            _, losses, _, _ = fn(xb, yb)
        module = copy.deepcopy(bound.module).double()
        total = np.zeros(params.flat.size)
        for i in range(9):
            loss = regression_loss(
                module(xb[i : i + 1].double()), yb[i : i + 1].double()
            )
            grads = torch.autograd.grad(loss, list(module.parameters()))
            g = torch.cat([t.reshape(-1) for t in grads]).numpy()
            total += g * min(1.0, clip / np.linalg.norm(g))
        assert_allclose(grad_flat.numpy(), total, rtol=1e-4, atol=1e-6)
        assert losses.shape == (9,)


# --- clients and attacks -------------------------------------------------------


def test_client_keeps_float_targets_and_passes_metrics_through() -> None:
    model = _model("linear")
    x, y = _data(20)
    y_int = np.round(y).astype(np.float64)  # integral values stay real targets
    client = TorchClient("a", model, x_train=x, y_train=y_int, x_test=x, y_test=y)
    assert client.train_data[1].dtype == np.float32
    params = model.init_params(0)
    update = client.fit(params, _config(), np.random.default_rng(0))
    assert set(update.metrics) == {"loss", "rmse", "mae"}
    assert set(client.evaluate(params, EvalConfig(round_idx=0))) == {
        "loss",
        "rmse",
        "mae",
        "num_examples",
    }
    options = {"proximal_mu": 0.0, DP_SGD_CLIP: 1.0, DP_SGD_SIGMA: 0.5}
    dp = client.fit(
        params,
        FitConfig(round_idx=0, batch_size=8, options=options),
        np.random.default_rng(0),
    )
    # Under DP-SGD no training metric leaves the client, regression or not.
    assert not {"loss", "rmse", "mae"} & set(dp.metrics)


@pytest.mark.parametrize("kind", ["label_flip", "backdoor"])
def test_label_attacks_refuse_a_regression_model(kind: str) -> None:
    x, y = _data(10)
    client = TorchClient("a", _model("linear"), x_train=x, y_train=y)
    with pytest.raises(ConfigError, match="needs class labels"):
        MaliciousClient(
            client, AttackSpec(kind=kind), num_classes=0, boost=1.0, max_examples=10
        )


def test_model_poisoning_attacks_still_work_on_regression() -> None:
    x, y = _data(10)
    model = _model("linear")
    client = TorchClient("a", model, x_train=x, y_train=y)
    params = model.init_params(0)
    honest = client.fit(params, _config(), np.random.default_rng(0))
    bad = MaliciousClient(
        client,
        AttackSpec(kind="sign_flip", scale=2.0),
        num_classes=0,
        boost=1.0,
        max_examples=10,
    ).fit(params, _config(), np.random.default_rng(0))
    assert_allclose(bad.delta.flat, -2.0 * honest.delta.flat, rtol=1e-6)


# --- auto backend --------------------------------------------------------------


def test_auto_backend_warns_once_per_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backends, "_WARNED", set())
    dropout = TorchModel(
        lambda: nn.Sequential(nn.Linear(D, 1), nn.Dropout(0.1)),
        input_shape=(D,),
        task="regression",
    )
    with caplog.at_level(logging.INFO, logger=backends.logger.name):
        for _ in range(3):
            assert backends.resolve_backend("auto", dropout) == "sequential"
    records = [r for r in caplog.records if r.name == backends.logger.name]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "(Dropout)" in records[0].getMessage()
    assert "'sequential', not 'vectorised'" in records[0].getMessage()
    caplog.clear()
    fine = TorchModel(
        functools.partial(build_module, "mlp", input_shape=(D,), num_classes=3),
        input_shape=(D,),
    )
    with caplog.at_level(logging.INFO, logger=backends.logger.name):
        assert backends.resolve_backend("auto", fine) == "vectorised"
        assert backends.resolve_backend("auto", fine, privacy_mode="central",
                                        timeout_s=5.0) == "sequential"  # fmt: skip
        assert backends.resolve_backend("auto", fine, privacy_mode="central",
                                        timeout_s=5.0) == "sequential"  # fmt: skip
    records = [r for r in caplog.records if r.name == backends.logger.name]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "timeout_s" in records[0].getMessage()
    with pytest.raises(ConfigError, match="Dropout"):
        backends.resolve_backend("vectorised", dropout)
