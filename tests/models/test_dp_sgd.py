from __future__ import annotations

import copy
import functools
import math
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from torch import Tensor, nn
from torch.nn import functional

from fedshield.core import FitConfig, Params
from fedshield.errors import ConfigError
from fedshield.models import TorchModel, build_module, dp_sgd
from fedshield.models.dp_sgd import (
    DpSgdConfig,
    _choose_clipped_sum,
    _clip_factors,
    _train,
    check_dp_sgd,
    train_dp_sgd,
)
from fedshield.privacy.noise import SecureGaussian, SecureRandom, SeededGaussian
from fedshield.privacy.records import record_level_event

Data = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------- models


class _Residual(nn.Module):
    """Not a plain chain: a skip connection, LayerNorm, Tanh, a scalar gain."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 16)
        self.norm = nn.LayerNorm(16)
        self.block = nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)
        self.gain = nn.Parameter(torch.tensor(0.7))  # a 0-d parameter

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x.flatten(1)))
        h = h + self.gain * torch.relu(self.block(self.norm(h)))
        out: Tensor = self.out(h)
        return out


def _nll_of_log_softmax(out: Tensor, y: Tensor) -> Tensor:
    # Another loss than the default (so the general path's per-example loss
    # goes through loss_fn of a batch of one).
    return functional.nll_loss(torch.log_softmax(out, dim=1), y)


def _builtin(kind: str, hidden: tuple[int, ...] = (16,)) -> TorchModel:
    shape = (1, 8, 8) if kind == "cnn" else (64,)
    channels = (2, 3) if kind == "cnn" else hidden
    return TorchModel(
        functools.partial(
            build_module, kind, input_shape=shape, num_classes=10, hidden=channels
        ),
        input_shape=shape,
    )


MODELS: dict[str, Callable[[], TorchModel]] = {
    "logistic": lambda: _builtin("logistic"),
    "mlp": lambda: _builtin("mlp"),
    "cnn": lambda: _builtin("cnn"),
    "residual": lambda: TorchModel(
        _Residual, loss_fn=_nll_of_log_softmax, input_shape=(64,)
    ),
}
# (model, path): the chain models on both paths, the others on the general one.
CASES = [
    ("logistic", "chain"),
    ("logistic", "general"),
    ("mlp", "chain"),
    ("mlp", "general"),
    ("cnn", "general"),
    ("residual", "general"),
]


def _config(**kwargs: float) -> FitConfig:
    values: dict[str, float] = {
        "epochs": 1,
        "batch_size": 16,
        "lr": 0.1,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "mu": 0.0,
    }
    values.update(kwargs)
    return FitConfig(
        round_idx=0,
        epochs=int(values["epochs"]),
        batch_size=int(values["batch_size"]),
        lr=values["lr"],
        momentum=values["momentum"],
        weight_decay=values["weight_decay"],
        options={"proximal_mu": values["mu"]},
    )


def _batch(model: TorchModel, data: Data, rows: slice) -> tuple[Tensor, Tensor]:
    x, y = data
    return model._tensors(x[rows], y[rows])


# ------------------------------------------------- the obviously correct reference


def _reference(
    model: TorchModel, params: Params, xb: Tensor, yb: Tensor, clip_norm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loop over examples, autograd each in float64, clip, sum.

    Returns the clipped sum (flat, in storage order), the per-example
    gradient norms and the per-example losses.
    """
    module = copy.deepcopy(model._get_bound().module).double()
    with torch.no_grad():
        offset = 0
        for p in module.parameters():
            size = p.numel()
            p.copy_(torch.tensor(params.flat[offset : offset + size]).view_as(p))
            offset += size
    total = np.zeros(params.flat.size)
    norms, losses = [], []
    for i in range(xb.shape[0]):
        loss = model._loss_fn(module(xb[i : i + 1].double()), yb[i : i + 1])
        grads = torch.autograd.grad(loss, list(module.parameters()))
        g = torch.cat([t.reshape(-1) for t in grads]).numpy()
        norm = float(np.linalg.norm(g))
        total += g * min(1.0, clip_norm / norm)
        norms.append(norm)
        losses.append(float(loss.detach()))
    return total, np.array(norms), np.array(losses)


def _clipped_sum(
    model: TorchModel,
    params: Params,
    xb: Tensor,
    yb: Tensor,
    clip_norm: float,
    path: str,
) -> tuple[np.ndarray, Tensor, Tensor, Tensor, Tensor]:
    bound = model._get_bound()
    bound.load(params)
    grad_flat = torch.full_like(bound.flat, float("nan"))  # every slot is written
    fn = _choose_clipped_sum(
        model,
        dict(bound.module.named_parameters()),
        grad_flat,
        clip_norm,
        path=path,  # type: ignore[arg-type]
        input_ndim=xb.ndim,
    )
    with torch.no_grad():
        out, losses, sq_norms, factors = fn(xb, yb)
    return grad_flat.numpy().astype(np.float64), out, losses, sq_norms, factors


@pytest.mark.parametrize(("kind", "path"), CASES)
def test_clipped_sum_matches_slow_reference(kind: str, path: str, digits: Data) -> None:
    model = MODELS[kind]()
    params = model.init_params(3)
    xb, yb = _batch(model, digits, slice(0, 24))
    _, ref_norms, _ = _reference(model, params, xb, yb, math.inf)
    clip_norm = float(np.median(ref_norms))  # half the examples get clipped
    want, _, want_losses = _reference(model, params, xb, yb, clip_norm)
    got, out, losses, sq_norms, factors = _clipped_sum(
        model, params, xb, yb, clip_norm, path
    )
    assert 0 < int((factors < 1).sum()) < xb.shape[0]
    assert_allclose(np.sqrt(sq_norms.numpy()), ref_norms, rtol=1e-5)
    assert_allclose(losses.numpy(), want_losses, rtol=1e-5, atol=1e-6)
    assert out.shape == (24, 10)
    assert_allclose(got, want, rtol=1e-4, atol=2e-6 * float(np.abs(want).max()))


def test_the_reference_can_fail(digits: Data) -> None:
    # The comparison above is not vacuous: unclipped sums differ from it.
    model = MODELS["mlp"]()
    params = model.init_params(3)
    xb, yb = _batch(model, digits, slice(0, 24))
    _, ref_norms, _ = _reference(model, params, xb, yb, math.inf)
    want, _, _ = _reference(model, params, xb, yb, float(np.median(ref_norms)))
    got, *_ = _clipped_sum(model, params, xb, yb, 1e9, "chain")
    assert not np.allclose(got, want, rtol=1e-2)


@pytest.mark.parametrize("path", ["chain", "general"])
def test_empty_and_one_example_batches(path: str, digits: Data) -> None:
    model = MODELS["mlp"]()
    params = model.init_params(0)
    xb, yb = _batch(model, digits, slice(5, 6))
    want, norms, _ = _reference(model, params, xb, yb, 0.5)
    got, *_ = _clipped_sum(model, params, xb, yb, 0.5, path)
    assert norms[0] > 0.5
    assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert np.linalg.norm(got) <= 0.5


# ------------------------------------------------------------- clipping bound


@settings(max_examples=200, deadline=None)
@given(
    sq_norms=st.lists(
        st.one_of(
            st.floats(0.0, 1e30),
            st.sampled_from([0.0, 1e-300, 1e-12, math.inf, math.nan]),
        ),
        min_size=1,
        max_size=8,
    ),
    clip_norm=st.floats(1e-6, 1e6),
)
def test_clip_factors_never_let_a_norm_exceed_clip_norm(
    sq_norms: list[float], clip_norm: float
) -> None:
    sq = torch.tensor(sq_norms, dtype=torch.float64)
    factors, all_kept = _clip_factors(sq, clip_norm)
    norms = sq.sqrt()
    finite = torch.isfinite(norms)
    assert bool(((factors >= 0) & (factors <= 1)).all())
    assert bool((factors[~finite] == 0).all())
    assert all_kept == bool((factors > 0).all())
    assert bool((factors[finite] * norms[finite] < clip_norm).all())
    # Gradients well inside the bound are not clipped (once C is well above
    # the absolute epsilon 1e-6).
    small = finite & (norms < clip_norm * 0.5) & (clip_norm > 1e-5)
    assert bool((factors[small] == 1).all())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    clip_norm=st.floats(1e-4, 1e2),
    path=st.sampled_from(["chain", "general"]),
)
def test_clipped_gradient_norm_never_exceeds_clip_norm(
    seed: int, scale: float, clip_norm: float, path: str
) -> None:
    # One example per batch: the float32 clipped sum *is* that example's
    # clipped gradient, as the path writes it; its exact (float64) norm must
    # not exceed C. A batch of several checks factor * (the path's norm).
    torch.set_num_threads(1)
    model = MODELS["mlp"]()
    params = model.init_params(seed % 1000)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 64)) * scale).astype(np.float32)
    y = rng.integers(0, 10, 3)
    xt, yt = model._tensors(x, y)
    for i in range(3):
        got, *_ = _clipped_sum(
            model, params, xt[i : i + 1], yt[i : i + 1], clip_norm, path
        )
        assert np.linalg.norm(got) <= clip_norm
    _, _, _, sq_norms, factors = _clipped_sum(model, params, xt, yt, clip_norm, path)
    assert bool((factors * sq_norms.sqrt() <= clip_norm).all())


# --------------------------------------------------------------- training


def _dp(
    clip_norm: float = 1.0, noise_multiplier: float = 1.0, **kw: float
) -> DpSgdConfig:
    return DpSgdConfig(clip_norm=clip_norm, noise_multiplier=noise_multiplier, **kw)


@pytest.mark.parametrize("path", ["auto", "general"])
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_no_noise_no_clipping_full_batch_is_gradient_descent(
    path: str, mu: float, digits: Data
) -> None:
    # sigma = 0, C huge, q = 1: every step takes every record, so the update
    # is sum_i g_i / (q n) = the mean gradient: full-batch GD, which is
    # TorchModel.train with batch_size = n (momentum, weight decay, proximal
    # term included).
    x, y = digits[0][:200], digits[1][:200]
    model = MODELS["mlp"]()
    params = model.init_params(1)
    config = _config(epochs=3, lr=0.5, momentum=0.9, weight_decay=1e-3, mu=mu)
    want, want_metrics = model.train(
        params, x, y, _config(epochs=3, batch_size=200, lr=0.5, momentum=0.9,
                              weight_decay=1e-3, mu=mu),
        rng=np.random.default_rng(0),
    )  # fmt: skip
    got, metrics, event = _train(
        model,
        params,
        x,
        y,
        config,
        rng=np.random.default_rng(0),
        dp=_dp(1e9, 0.0, sample_rate=1.0),
        noise=SeededGaussian(np.random.default_rng(1)),
        path=path,  # type: ignore[arg-type]
    )
    assert event is None  # sigma = 0: no guarantee to account
    assert_allclose(got.flat, want.flat, rtol=1e-4, atol=1e-6)
    assert not np.allclose(got.flat, params.flat, atol=1e-3)
    assert metrics["accuracy"] == pytest.approx(want_metrics["accuracy"])
    assert metrics["loss"] == pytest.approx(want_metrics["loss"], rel=1e-5)


def test_the_gradient_descent_comparison_can_fail(digits: Data) -> None:
    # Dividing by the sampled batch instead of q n, or clipping, would show.
    x, y = digits[0][:200], digits[1][:200]
    model = MODELS["mlp"]()
    params = model.init_params(1)
    want, _ = model.train(
        params, x, y, _config(epochs=3, batch_size=200, lr=0.5),
        rng=np.random.default_rng(0),
    )  # fmt: skip
    got, _, _ = _train(
        model, params, x, y, _config(epochs=3, lr=0.5),
        rng=np.random.default_rng(0), dp=_dp(0.1, 0.0, sample_rate=1.0),
        noise=SeededGaussian(np.random.default_rng(1)), path="auto",
    )  # fmt: skip
    assert not np.allclose(got.flat, want.flat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["auto", "general"])
def test_denominator_is_the_expected_batch_size(
    path: str, digits: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    # q = 0.7: round(1 / q) = 1 step, on a Poisson batch B of about 0.7 n
    # records; sigma = 0, C huge. The update is -lr sum_{i in B} g_i / (q n),
    # which is plain SGD on B alone with lr * |B| / (q n).
    x, y = digits[0][:100], digits[1][:100]
    batches: list[np.ndarray] = []
    real = dp_sgd._poisson_sample

    def recording(rng: np.random.Generator, n: int, q: float) -> np.ndarray:
        batches.append(real(rng, n, q))
        return batches[-1]

    monkeypatch.setattr(dp_sgd, "_poisson_sample", recording)
    model = MODELS["mlp"]()
    params = model.init_params(0)
    got, _, _ = _train(
        model, params, x, y, _config(lr=0.5), rng=np.random.default_rng(0),
        dp=_dp(1e9, 0.0, sample_rate=0.7), path=path,  # type: ignore[arg-type]
        noise=SeededGaussian(np.random.default_rng(1)),
    )  # fmt: skip
    (batch,) = batches
    assert 0 < batch.size < 100
    lr = 0.5 * batch.size / (0.7 * 100)
    want, _ = model.train(
        params, x[batch], y[batch], _config(lr=lr, batch_size=batch.size),
        rng=np.random.default_rng(0),
    )  # fmt: skip
    assert_allclose(got.flat, want.flat, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("kind", "path"), [("mlp", "auto"), ("residual", "general")])
def test_noise_has_std_sigma_clip_over_expected_batch(
    kind: str, path: str, digits: Data
) -> None:
    # Two one-step runs (q = 1) differing only in sigma, same sampling draws:
    # their difference is lr * N(0, (sigma C)^2 I) / (q n), C = 1, sigma = 2.
    x, y = digits[0][:300], digits[1][:300]
    model = MODELS[kind]()
    params = model.init_params(2)
    lr = 0.1

    def run(sigma: float) -> np.ndarray:
        new, _, event = _train(
            model, params, x, y, _config(lr=lr), rng=np.random.default_rng(7),
            dp=_dp(1.0, sigma, sample_rate=1.0),
            noise=SeededGaussian(np.random.default_rng(8)), path=path,  # type: ignore[arg-type]
        )  # fmt: skip
        assert event is None or event.count == 1
        return new.flat.astype(np.float64)

    noise = (run(0.0) - run(2.0)) * x.shape[0] / lr
    size = noise.size
    assert np.count_nonzero(noise) == size  # every parameter gets noise
    # The sample mean and sd of `size` N(0, 4) values, within 5 of their sds.
    assert abs(noise.mean()) < 5 * 2.0 / math.sqrt(size)
    assert abs(noise.std() - 2.0) < 5 * 2.0 / math.sqrt(2 * size)
    # And it is the noise source's draw, scaled: sigma C N(0, 1) (float32).
    draw = np.random.default_rng(8).standard_normal(size) * 2.0
    assert_allclose(noise, draw, rtol=1e-3, atol=1e-3)


class _RecordingNoise:
    """A stand-in GaussianNoise that records what it is asked for."""

    secure = False

    def __init__(self) -> None:
        self.calls: list[tuple[object, float]] = []

    def sample(self, shape: int | tuple[int, ...], std: float) -> np.ndarray:
        self.calls.append((shape, std))
        return np.zeros(shape, dtype=np.float64)


def test_noise_is_asked_once_per_step_for_every_parameter(digits: Data) -> None:
    x, y = digits[0][:100], digits[1][:100]
    model = MODELS["mlp"]()
    noise = _RecordingNoise()
    _, _, event = train_dp_sgd(
        model, model.init_params(0), x, y, _config(epochs=2),
        rng=np.random.default_rng(0), dp=_dp(0.7, 1.3, sample_rate=0.2), noise=noise,
    )  # fmt: skip
    assert event is not None
    assert len(noise.calls) == event.count == 2 * 5
    assert all(c == ((model.spec.size,), pytest.approx(1.3 * 0.7)) for c in noise.calls)


def test_poisson_sampling_batch_sizes_and_event(
    digits: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = digits
    n = x.shape[0]
    rate = 0.03  # 1 / q = 33.3: 33 steps per epoch
    sizes: list[int] = []
    real = dp_sgd._poisson_sample

    def recording(rng: np.random.Generator, n: int, q: float) -> np.ndarray:
        idx = real(rng, n, q)
        assert q == rate
        sizes.append(idx.size)
        return idx

    monkeypatch.setattr(dp_sgd, "_poisson_sample", recording)
    model = MODELS["logistic"]()
    _, _, event = train_dp_sgd(
        model, model.init_params(0), x, y, _config(epochs=6),
        rng=np.random.default_rng(0), dp=_dp(1.0, 1.1, sample_rate=rate),
        noise=SeededGaussian(np.random.default_rng(1)),
    )  # fmt: skip
    assert event is not None
    assert len(sizes) == event.count == 6 * 33
    assert event.sampling == "poisson"
    assert event.sampling_rate == rate
    assert event.noise_multiplier == 1.1
    # Each size is Binomial(n, q); their mean over T steps has sd
    # sqrt(n q (1 - q) / T).
    sd = math.sqrt(n * rate * (1 - rate) / len(sizes))
    assert abs(np.mean(sizes) - n * rate) < 5 * sd
    assert np.var(sizes) == pytest.approx(n * rate * (1 - rate), rel=0.5)


def test_poisson_sample_includes_each_record_with_probability_q() -> None:
    rng = np.random.default_rng(0)
    counts = np.zeros(50)
    for _ in range(4000):
        counts[dp_sgd._poisson_sample(rng, 50, 0.2)] += 1
    # Per record: Binomial(4000, 0.2), sd ~ 25.3.
    assert np.all(np.abs(counts - 800) < 5 * math.sqrt(4000 * 0.2 * 0.8))


@pytest.mark.parametrize(
    ("rate", "steps"), [(None, 4), (0.4, 2), (1.0, 1), (0.01, 100)]
)
def test_steps_per_epoch_is_round_one_over_q(
    rate: float | None, steps: int, digits: Data
) -> None:
    x, y = digits[0][:64], digits[1][:64]
    model = MODELS["logistic"]()
    _, _, event = train_dp_sgd(
        model, model.init_params(0), x, y, _config(epochs=3, batch_size=16),
        rng=np.random.default_rng(0), dp=_dp(sample_rate=rate),  # type: ignore[arg-type]
        noise=SeededGaussian(np.random.default_rng(1)),
    )  # fmt: skip
    assert event is not None
    assert event.count == 3 * steps
    assert event.sampling_rate == (rate if rate is not None else 16 / 64)


@pytest.mark.parametrize(("n", "batch_size", "epochs"), [(100, 16, 2), (10, 32, 1)])
def test_default_event_is_what_the_server_accounts(
    n: int, batch_size: int, epochs: int, digits: Data
) -> None:
    model = MODELS["logistic"]()
    _, _, event = train_dp_sgd(
        model, model.init_params(0), digits[0][:n], digits[1][:n],
        _config(epochs=epochs, batch_size=batch_size), rng=np.random.default_rng(0),
        dp=_dp(1.0, 0.9), noise=SeededGaussian(np.random.default_rng(1)),
    )  # fmt: skip
    assert event == record_level_event(
        n, batch_size=batch_size, epochs=epochs, noise_multiplier=0.9
    )


@pytest.mark.parametrize("kind", ["mlp", "residual"])
def test_empty_batches_are_noise_only_steps(kind: str, digits: Data) -> None:
    x, y = digits[0][:2], digits[1][:2]
    model = MODELS[kind]()
    params = model.init_params(0)
    # q = 0.01 on 2 records: 100 steps, nearly all of them empty.
    new, metrics, event = train_dp_sgd(
        model, params, x, y, _config(lr=0.01),
        rng=np.random.default_rng(0), dp=_dp(sample_rate=0.01),
        noise=SeededGaussian(np.random.default_rng(1)),
    )  # fmt: skip
    assert event is not None and event.count == 100
    assert np.all(np.isfinite(new.flat))
    assert not np.array_equal(new.flat, params.flat)
    assert set(metrics) == {"loss", "accuracy"}


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize("path", ["auto", "general"])
def test_reproducible_with_seeded_noise_and_not_with_secure(
    path: str, digits: Data
) -> None:
    x, y = digits[0][:150], digits[1][:150]
    model = MODELS["mlp"]()
    params = model.init_params(0)
    config = _config(epochs=2, momentum=0.9, weight_decay=1e-3)

    def run(noise: object) -> tuple[Params, dict[str, float]]:
        new, metrics, _ = _train(
            model, params, x, y, config, rng=np.random.default_rng(3),
            dp=_dp(), noise=noise, path=path,  # type: ignore[arg-type]
        )  # fmt: skip
        return new, metrics

    a, metrics_a = run(SeededGaussian(np.random.default_rng(4)))
    b, metrics_b = run(SeededGaussian(np.random.default_rng(4)))
    c, _ = run(SeededGaussian(np.random.default_rng(5)))
    assert_array_equal(a.flat, b.flat)
    assert metrics_a == metrics_b
    assert not np.array_equal(a.flat, c.flat)
    s1, _ = run(SecureGaussian())
    s2, _ = run(SecureGaussian())
    assert not np.array_equal(s1.flat, s2.flat)
    assert not np.array_equal(s1.flat, a.flat)


def test_secure_noise_draws_the_batches_from_the_keystream(
    digits: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Amplification by sampling assumes the batches are as secret as the
    # noise: with a secure noise source they are not a function of ``rng``
    # (the seed); with seeded noise they are.
    x, y = digits[0][:150], digits[1][:150]
    batches: list[tuple[type, list[int]]] = []
    real = dp_sgd._poisson_sample

    def recording(
        rng: np.random.Generator | SecureRandom, n: int, q: float
    ) -> np.ndarray:
        idx = real(rng, n, q)
        batches.append((type(rng), idx.tolist()))
        return idx

    monkeypatch.setattr(dp_sgd, "_poisson_sample", recording)
    model = MODELS["logistic"]()
    params = model.init_params(0)

    def run(noise: object) -> list[tuple[type, list[int]]]:
        batches.clear()
        _train(
            model, params, x, y, _config(epochs=2), rng=np.random.default_rng(3),
            dp=_dp(sample_rate=0.2), noise=noise, path="auto",  # type: ignore[arg-type]
        )  # fmt: skip
        return list(batches)

    seeded = run(SeededGaussian(np.random.default_rng(4)))
    assert seeded == run(SeededGaussian(np.random.default_rng(5)))  # rng alone
    assert {kind for kind, _ in seeded} == {np.random.Generator}
    first, second = run(SecureGaussian()), run(SecureGaussian())
    assert {kind for kind, _ in first + second} == {SecureRandom}
    assert len(first) == len(second) == 10
    assert [b for _, b in first] != [b for _, b in second]
    assert [b for _, b in first] != [b for _, b in seeded]


def test_keystream_poisson_sample_includes_each_record_with_probability_q() -> None:
    source = SecureRandom()
    counts = np.zeros(50)
    for _ in range(4000):
        counts[dp_sgd._poisson_sample(source, 50, 0.2)] += 1
    # Per record: Binomial(4000, 0.2), sd ~ 25.3.
    assert np.all(np.abs(counts - 800) < 5 * math.sqrt(4000 * 0.2 * 0.8))


def test_params_and_rng_are_used_not_changed(digits: Data) -> None:
    x, y = digits[0][:50], digits[1][:50]
    model = MODELS["mlp"]()
    params = model.init_params(0)
    before = params.flat.copy()
    train_dp_sgd(
        model, params, x, y, _config(), rng=np.random.default_rng(0), dp=_dp(),
        noise=SeededGaussian(np.random.default_rng(1)),
    )  # fmt: skip
    assert_array_equal(params.flat, before)


def _mlp8(frozen: bool) -> nn.Module:
    module = build_module("mlp", input_shape=(64,), num_classes=10, hidden=(8,))
    module.get_submodule("hidden0").weight.requires_grad_(not frozen)
    return module


def test_frozen_parameters_stay_fixed(digits: Data) -> None:
    x, y = digits[0][:50], digits[1][:50]
    for path in ("auto", "general"):
        model = TorchModel(functools.partial(_mlp8, True), input_shape=(64,))
        params = model.init_params(0)
        new, _, _ = _train(
            model, params, x, y, _config(momentum=0.5, weight_decay=0.1),
            rng=np.random.default_rng(0), dp=_dp(), path=path,  # type: ignore[arg-type]
            noise=SeededGaussian(np.random.default_rng(1)),
        )  # fmt: skip
        assert_array_equal(new["hidden0.weight"], params["hidden0.weight"])
        assert not np.array_equal(new["hidden0.bias"], params["hidden0.bias"])


def test_frozen_parameters_do_not_count_in_the_norm(digits: Data) -> None:
    model = TorchModel(functools.partial(_mlp8, True), input_shape=(64,))
    free = TorchModel(functools.partial(_mlp8, False), input_shape=(64,))
    params = model.init_params(0)
    xb, yb = _batch(model, digits, slice(0, 8))
    _, _, _, chain, _ = _clipped_sum(model, params, xb, yb, 1.0, "chain")
    _, _, _, general, _ = _clipped_sum(model, params, xb, yb, 1.0, "general")
    _, _, _, full, _ = _clipped_sum(free, params, xb, yb, 1.0, "chain")
    assert_allclose(chain.numpy(), general.numpy(), rtol=1e-5)
    assert bool((full > chain * 1.01).all())


# ------------------------------------------------------------ refusals


def _with(layer: nn.Module) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                [("inp", nn.Linear(64, 8)), ("bn", layer), ("out", nn.Linear(8, 10))]
            )
        )

    return build


@pytest.mark.parametrize(
    ("layer", "words"),
    [
        (nn.BatchNorm1d(8), ["'bn'", "BatchNorm1d", "GroupNorm or LayerNorm"]),
        (
            nn.BatchNorm1d(8, track_running_stats=False),
            ["'bn'", "BatchNorm1d", "statistics of the whole batch"],
        ),
        (nn.Dropout(0.1), ["'bn'", "Dropout", "random"]),
    ],
)
def test_check_dp_sgd_names_the_layer(layer: nn.Module, words: list[str]) -> None:
    model = TorchModel(_with(layer), input_shape=(64,))
    with pytest.raises(ConfigError) as info:
        check_dp_sgd(model)
    for word in words:
        assert word in str(info.value)


def test_train_refuses_batch_norm(digits: Data) -> None:
    model = TorchModel(_with(nn.BatchNorm1d(8, track_running_stats=False)))
    with pytest.raises(ConfigError, match="'bn'"):
        train_dp_sgd(
            model, model.init_params(0), *digits, _config(),
            rng=np.random.default_rng(0), dp=_dp(),
            noise=SeededGaussian(np.random.default_rng(1)),
        )  # fmt: skip


class _Item(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * float(x.sum().item() > 0)


def test_check_dp_sgd_names_a_layer_vmap_cannot_batch() -> None:
    model = TorchModel(_with(_Item()), input_shape=(64,))
    with pytest.raises(ConfigError, match=r"'bn' \(_Item\)"):
        check_dp_sgd(model)


def test_check_dp_sgd_does_not_blame_vmap_for_a_loss_the_dummy_batch_breaks() -> None:
    def wants_float_targets(out: Tensor, y: Tensor) -> Tensor:
        if y.dtype != torch.float32:
            raise TypeError("this loss wants float targets")
        return functional.mse_loss(out[:, 0], y)

    model = TorchModel(_with(nn.Tanh()), loss_fn=wants_float_targets, input_shape=(64,))
    check_dp_sgd(model)  # nothing to say about the layers


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_check_dp_sgd_accepts_supported_models(kind: str) -> None:
    check_dp_sgd(MODELS[kind]())


def test_no_noise_is_refused_by_the_public_function(digits: Data) -> None:
    model = MODELS["logistic"]()
    with pytest.raises(ConfigError, match="noise_multiplier"):
        train_dp_sgd(
            model, model.init_params(0), *digits, _config(),
            rng=np.random.default_rng(0), dp=_dp(1.0, 0.0),
            noise=SeededGaussian(np.random.default_rng(1)),
        )  # fmt: skip


def test_scaffold_is_refused(digits: Data) -> None:
    model = MODELS["logistic"]()
    config = FitConfig(round_idx=0, options={"scaffold": True})
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        train_dp_sgd(
            model, model.init_params(0), *digits, config, rng=np.random.default_rng(0),
            dp=_dp(), noise=SeededGaussian(np.random.default_rng(1)),
        )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0, "noise_multiplier": 1.0},
        {"clip_norm": math.inf, "noise_multiplier": 1.0},
        {"clip_norm": 1.0, "noise_multiplier": -1.0},
        {"clip_norm": 1.0, "noise_multiplier": math.nan},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.0},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 1.5},
        {"clip_norm": True, "noise_multiplier": 1.0},
    ],
)
def test_config_is_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        DpSgdConfig(**kwargs)
