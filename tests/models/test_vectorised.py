from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch import Tensor, nn
from torch.nn import functional

from fedshield.core import FitConfig, Params
from fedshield.errors import ConfigError
from fedshield.models import TorchModel, build_module
from fedshield.models.vectorised import check_vectorisable, train_many

SIZES = (7, 30, 64, 100, 33)
SHAPES = {"logistic": (64,), "mlp": (64,), "cnn": (1, 8, 8)}
# Batched kernels may sum in another order than unbatched ones; over 2 epochs
# the measured gap in parameters is <= 6e-8 absolute, far inside this.
TOL = {"rtol": 1e-4, "atol": 1e-5}

Datasets = list[tuple[np.ndarray, np.ndarray]]


def _config(mu: float = 0.0, **kwargs: float) -> FitConfig:
    values: dict[str, float] = {
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-3,
    }
    values.update(kwargs)
    return FitConfig(
        round_idx=0,
        epochs=int(values["epochs"]),
        batch_size=int(values["batch_size"]),
        lr=values["lr"],
        momentum=values["momentum"],
        weight_decay=values["weight_decay"],
        options={"proximal_mu": mu},
    )


def _builtin(kind: str) -> TorchModel:
    shape = SHAPES[kind]
    return TorchModel(
        functools.partial(build_module, kind, input_shape=shape, num_classes=10),
        input_shape=shape,
    )


@pytest.fixture
def datasets(digits: tuple[np.ndarray, np.ndarray]) -> Datasets:
    x, y = digits
    ends = np.cumsum((0, *SIZES))
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(ends)]


def _rngs(n: int, base: int = 100) -> list[np.random.Generator]:
    return [np.random.default_rng(base + k) for k in range(n)]


def _sequential(
    model: TorchModel, params: Params, datasets: Datasets, config: FitConfig
) -> list[tuple[Params, dict[str, float]]]:
    return [
        model.train(params, x, y, config, rng=rng)
        for (x, y), rng in zip(datasets, _rngs(len(datasets)), strict=True)
    ]


def _assert_same(
    got: list[tuple[Params, dict[str, float]]],
    want: list[tuple[Params, dict[str, float]]],
    start: Params,
    **tol: float,
) -> None:
    tol = tol or TOL
    assert len(got) == len(want)
    for (new, metrics), (ref, ref_metrics) in zip(got, want, strict=True):
        assert new.spec == ref.spec
        assert_allclose(new.flat, ref.flat, **tol)
        # The update itself, not just the parameters, must agree; measured
        # gaps are <= 1e-7 (CNN's grouped convolutions), so 1e-6 has margin.
        assert_allclose((new - start).flat, (ref - start).flat, rtol=1e-5, atol=1e-6)
        assert metrics.keys() == ref_metrics.keys() == {"loss", "accuracy"}
        assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        assert metrics["accuracy"] == ref_metrics["accuracy"]


# --- equivalence with sequential training ----------------------------------


@pytest.mark.parametrize("kind", ["logistic", "mlp", "cnn"])
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_train_many_matches_a_loop_of_train(
    kind: str, mu: float, datasets: Datasets
) -> None:
    # Prepare: unequal sizes, so partial last batches and clients that run
    # out of steps early (7 examples: 1 step per epoch; 100: 7).
    model = _builtin(kind)
    params = model.init_params(3)
    config = _config(mu)
    want = _sequential(model, params, datasets, config)

    # Execute
    got = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    # Assert
    _assert_same(got, want, params)
    moved = [np.abs((new - params).flat).max() for new, _ in got]
    assert min(moved) > 1e-3  # training really happened, so agreement means something


def test_train_many_advances_each_rng_as_train_does(datasets: Datasets) -> None:
    model = _builtin("mlp")
    params = model.init_params(0)
    sequential_rngs, vectorised_rngs = _rngs(len(datasets)), _rngs(len(datasets))
    for (x, y), rng in zip(datasets, sequential_rngs, strict=True):
        model.train(params, x, y, _config(), rng=rng)

    train_many(model, params, datasets, _config(), rngs=vectorised_rngs)

    for a, b in zip(sequential_rngs, vectorised_rngs, strict=True):
        assert a.integers(2**62) == b.integers(2**62)


def test_train_many_without_momentum_or_decay_matches(datasets: Datasets) -> None:
    model = _builtin("mlp")
    params = model.init_params(1)
    config = _config(momentum=0.0, weight_decay=0.0, epochs=3, batch_size=10)

    got = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    _assert_same(got, _sequential(model, params, datasets, config), params)


def test_chunks_smaller_than_the_clients_give_the_same_result(
    datasets: Datasets,
) -> None:
    # Prepare
    model = _builtin("mlp")
    params = model.init_params(2)
    config = _config(0.1)
    whole = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    # Execute: chunks of 2, 2 and 1 clients
    chunked = train_many(
        model,
        params,
        datasets,
        config,
        rngs=_rngs(len(datasets)),
        max_batch_clients=2,
    )

    # Assert: a client's numbers do not depend on who trains beside it
    _assert_same(chunked, whole, params, rtol=1e-6, atol=1e-7)


def test_one_client_and_no_client(datasets: Datasets) -> None:
    model = _builtin("logistic")
    params = model.init_params(0)
    got = train_many(model, params, datasets[:1], _config(), rngs=_rngs(1))
    _assert_same(got, _sequential(model, params, datasets[:1], _config()), params)
    assert train_many(model, params, [], _config(), rngs=[]) == []


def test_custom_mean_loss_is_evaluated_per_example(datasets: Datasets) -> None:
    # Prepare: not cross_entropy itself, so the inner-vmap path runs
    def smoothed(out: Tensor, y: Tensor) -> Tensor:
        return functional.cross_entropy(out, y, label_smoothing=0.1)

    model = TorchModel(
        functools.partial(build_module, "mlp", input_shape=(64,), num_classes=10),
        loss_fn=smoothed,
    )
    params = model.init_params(4)
    config = _config(0.2)

    got = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    _assert_same(got, _sequential(model, params, datasets, config), params)


# --- the hand-differentiated path for plain chains -------------------------


def _chain(*layers: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*layers)


CHAINS = {
    "tanh-sigmoid": _chain(
        nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 12), nn.Sigmoid(), nn.Linear(12, 10)
    ),
    "leaky-identity": _chain(
        nn.Linear(64, 16), nn.LeakyReLU(0.2), nn.Identity(), nn.Linear(16, 10)
    ),
    "no-bias": _chain(
        nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False)
    ),
    # a Linear over the last axis of (batch, 8, 8) inputs, then flattened
    "rank-3-linear": _chain(
        nn.Linear(8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(40, 10)
    ),
    "flatten-logistic": _chain(nn.Flatten(), nn.Linear(64, 10)),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_plain_chains_match_sequential_training(name: str, datasets: Datasets) -> None:
    model = TorchModel(CHAINS[name])
    if name == "rank-3-linear":
        datasets = [(x.reshape(-1, 8, 8), y) for x, y in datasets]
    params = model.init_params(6)
    config = _config(0.1)

    got = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    _assert_same(got, _sequential(model, params, datasets, config), params)


def test_chain_detection() -> None:
    from fedshield.models.vectorised import _linear_chain

    assert _linear_chain(build_module("mlp", input_shape=(64,), num_classes=10))
    assert _linear_chain(build_module("logistic", input_shape=(64,), num_classes=3))
    assert (
        _linear_chain(build_module("cnn", input_shape=(1, 8, 8), num_classes=3)) is None
    )
    assert _linear_chain(CHAINS["rank-3-linear"]())
    unflatten = nn.Sequential(nn.Unflatten(1, (8, 8)), nn.Linear(8, 3))
    assert _linear_chain(unflatten) is None  # not a chain layer: the vmap path
    hooked = build_module("mlp", input_shape=(64,), num_classes=10)
    hooked[0].register_forward_hook(lambda *_: None)
    assert _linear_chain(hooked) is None  # a hook may change the output

    class Doubled(nn.ReLU):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    assert _linear_chain(nn.Sequential(nn.Linear(3, 3), Doubled())) is None


def test_chain_and_vmap_steps_give_the_same_gradient() -> None:
    from fedshield.models.vectorised import _chain_step, _linear_chain, _vmap_step

    module = CHAINS["tanh-sigmoid"]()
    layers = _linear_chain(module)
    assert layers is not None
    gen = torch.Generator().manual_seed(0)
    params = {
        n: torch.randn((3, *p.shape), generator=gen)
        for n, p in module.named_parameters()
    }
    x = torch.randn((3, 5, 64), generator=gen)
    y = torch.randint(0, 10, (3, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()

    g1, out1, loss1 = _chain_step(layers)(params, x, y, mask)
    g2, out2, loss2 = _vmap_step(module, functional.cross_entropy)(params, x, y, mask)

    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(loss1, loss2)
    for name in params:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-6)
        assert float(g1[name].abs().max()) > 0


def test_gathering_each_step_gives_what_gathering_once_gives(
    datasets: Datasets, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedshield.models.vectorised as vectorised

    model = _builtin("mlp")
    params = model.init_params(7)
    config = _config(0.0)
    once = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    monkeypatch.setattr(vectorised, "_PREGATHER_BYTES", 0)
    each = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    _assert_same(each, once, params, rtol=0.0, atol=0.0)


# --- the hand-differentiated path for convolutional chains ------------------


def _image(shape: tuple[int, ...], datasets: Datasets) -> Datasets:
    return [(x.reshape(-1, *shape), y) for x, y in datasets]


CONV_CHAINS: dict[str, tuple[tuple[int, ...], Callable[[], nn.Module]]] = {
    # stride, dilation, no bias, uneven padding, a pool with its own stride,
    # padding and ceil mode, other activations, more than one Linear
    "strided-dilated": (
        (1, 8, 8),
        _chain(
            nn.Conv2d(1, 6, 3, stride=2, padding=(1, 2), bias=False),
            nn.Tanh(),
            nn.Conv2d(6, 4, 2, dilation=2, padding=1),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(4 * 4 * 5, 12),
            nn.Sigmoid(),
            nn.Linear(12, 10),
        ),
    ),
    # four input channels, grouped convolution, a pool before the first conv
    # and an activation in front of everything (no gradient below it)
    "grouped-pool-first": (
        (4, 4, 4),
        _chain(
            nn.Identity(),
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(4, 8, 2, groups=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        ),
    ),
    # the built-in CNN's shape with 2 and 3 channels, ending at the Flatten's
    # own Linear
    "two-blocks": (
        (1, 8, 8),
        _chain(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 10),
        ),
    ),
}


@pytest.mark.parametrize("mu", [0.0, 0.2])
@pytest.mark.parametrize("name", sorted(CONV_CHAINS))
def test_conv_chains_match_sequential_training(
    name: str, mu: float, datasets: Datasets
) -> None:
    from fedshield.models.vectorised import _conv_chain

    shape, build = CONV_CHAINS[name]
    model = TorchModel(build, input_shape=shape)
    assert _conv_chain(model._get_bound().module) is not None  # the hand path
    data = _image(shape, datasets)
    params = model.init_params(8)
    config = _config(mu)

    got = train_many(model, params, data, config, rngs=_rngs(len(data)))

    _assert_same(got, _sequential(model, params, data, config), params)
    moved = [np.abs((new - params).flat).max() for new, _ in got]
    assert min(moved) > 1e-3


def test_plain_sgd_on_the_builtin_cnn_matches(datasets: Datasets) -> None:
    # No momentum, decay or proximal term: the in-place update path.
    model = _builtin("cnn")
    params = model.init_params(4)
    config = _config(0.0, momentum=0.0, weight_decay=0.0)

    got = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    _assert_same(got, _sequential(model, params, datasets, config), params)


def test_conv_chain_detection() -> None:
    from fedshield.models.vectorised import _conv_chain

    cnn = build_module("cnn", input_shape=(1, 8, 8), num_classes=3)
    found = _conv_chain(cnn)
    assert found is not None
    spatial, head = found
    assert [kind for kind, _, _ in spatial] == ["conv", "act", "pool"] * 2
    assert [kind for kind, _, _ in head] == ["flatten", "linear"]
    assert _conv_chain(build_module("mlp", input_shape=(64,), num_classes=3)) is None

    def conv_then(*layers: nn.Module) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 2, 3), *layers)

    head_ok = (nn.Flatten(), nn.Linear(72, 3))
    assert _conv_chain(conv_then(*head_ok)) is not None
    refused = {
        "no Flatten": conv_then(nn.ReLU()),
        "pool only": nn.Sequential(nn.MaxPool2d(2), *head_ok),
        "'same' padding": nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), *head_ok),
        "reflect padding": nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), *head_ok
        ),
        "average pool": conv_then(nn.AvgPool2d(1), *head_ok),
        "pool indices": conv_then(nn.MaxPool2d(1, return_indices=True), *head_ok),
        "batch norm": conv_then(nn.BatchNorm2d(2, track_running_stats=False), *head_ok),
        "partial Flatten": conv_then(nn.Flatten(2), nn.Linear(36, 3)),
        "a layer after Flatten": conv_then(*head_ok, nn.Unflatten(1, (3, 1))),
    }
    for why, module in refused.items():
        assert _conv_chain(module) is None, why
    hooked = build_module("cnn", input_shape=(1, 8, 8), num_classes=3)
    hooked[0].register_forward_hook(lambda *_: None)
    assert _conv_chain(hooked) is None  # a hook may change the output

    class Conv(nn.Conv2d):
        pass

    assert _conv_chain(nn.Sequential(Conv(1, 2, 3), *head_ok)) is None


def test_conv_chain_and_vmap_steps_give_the_same_gradient() -> None:
    from fedshield.models.vectorised import _chain_step, _conv_chain, _vmap_step

    _, build = CONV_CHAINS["strided-dilated"]
    module = build()
    found = _conv_chain(module)
    assert found is not None
    spatial, head = found
    gen = torch.Generator().manual_seed(0)
    params = {
        n: torch.randn((3, *p.shape), generator=gen) * 0.3
        for n, p in module.named_parameters()
    }
    x = torch.randn((3, 5, 1, 8, 8), generator=gen)
    y = torch.randint(0, 10, (3, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()

    g1, out1, loss1 = _chain_step(head, spatial=spatial)(params, x, y, mask)
    g2, out2, loss2 = _vmap_step(module, functional.cross_entropy)(params, x, y, mask)

    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    assert list(g1) == list(params)
    for name in params:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6)
        assert float(g1[name].abs().max()) > 0


def test_regression_through_a_conv_chain_matches(datasets: Datasets) -> None:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(48, 1),
        )

    model = TorchModel(build, input_shape=(1, 8, 8), task="regression")
    data = [(x, y.astype(np.float32) / 9.0) for x, y in datasets]
    params = model.init_params(2)
    config = _config(0.0, lr=0.05)

    got = train_many(model, params, data, config, rngs=_rngs(len(data)))

    for (new, metrics), (ref, ref_metrics) in zip(
        got, _sequential(model, params, data, config), strict=True
    ):
        assert_allclose(new.flat, ref.flat, **TOL)
        assert metrics.keys() == ref_metrics.keys() == {"loss", "rmse", "mae"}
        for key in metrics:
            assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5)


class _PartlyFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(64, 16)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(16, 10)
        self.unused = nn.Linear(3, 3)  # never reached by forward

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.frozen(x)))


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_frozen_and_unused_parameters_move_as_in_sequential(
    mu: float, datasets: Datasets
) -> None:
    # Sequential SGD skips parameters without .grad (frozen; unused when
    # mu == 0), and weight decay would otherwise move them.
    model = TorchModel(_PartlyFrozen)
    params = model.init_params(5)
    config = _config(mu)

    got = train_many(model, params, datasets, config, rngs=_rngs(len(datasets)))

    want = _sequential(model, params, datasets, config)
    _assert_same(got, want, params)
    for new, _ in got:
        assert np.array_equal(new["frozen.weight"], params["frozen.weight"])
        if mu == 0:
            assert np.array_equal(new["unused.weight"], params["unused.weight"])


# --- refusals ----------------------------------------------------------------


def _with(layer: nn.Module) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 16), layer, nn.Linear(16, 10))

    return build


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        (nn.Dropout(0.5), "'1' (Dropout)"),
        (nn.AlphaDropout(0.1), "'1' (AlphaDropout)"),
        (nn.BatchNorm1d(16, track_running_stats=False), "'1' (BatchNorm1d)"),
    ],
)
def test_random_and_batch_mixing_layers_are_refused(
    layer: nn.Module, needle: str, datasets: Datasets
) -> None:
    model = TorchModel(_with(layer))
    params = model.init_params(0)

    with pytest.raises(ConfigError) as early:
        check_vectorisable(model)
    with pytest.raises(ConfigError) as late:
        train_many(model, params, datasets, _config(), rngs=_rngs(len(datasets)))

    for err in (early, late):
        assert needle in str(err.value)
        assert "backend = 'sequential' or 'process'" in str(err.value)


def test_batchnorm_with_running_stats_is_refused_by_the_model_itself() -> None:
    # Its buffers cannot travel in Params, so no backend trains it; the
    # message names the layer through its buffers.
    model = TorchModel(_with(nn.BatchNorm1d(16)))

    with pytest.raises(ConfigError, match=r"1\.running_mean"):
        check_vectorisable(model)


class _Branchy(nn.Module):
    """Data-dependent control flow: fine eagerly, impossible under vmap."""

    def forward(self, x: Tensor) -> Tensor:
        return x if bool(x.sum() > 0) else -x


def test_layer_vmap_cannot_batch_is_named(datasets: Datasets) -> None:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 16), nn.Sequential(nn.ReLU(), _Branchy()), nn.Linear(16, 10)
        )

    # With input_shape the check finds it by a dummy step; without, the first
    # training step does. Sequential training works, so it is vmap's fault.
    early_model = TorchModel(build, input_shape=(64,))
    late_model = TorchModel(build)
    params = late_model.init_params(0)
    x, y = datasets[0]
    late_model.train(params, x, y, _config(), rng=np.random.default_rng(0))

    with pytest.raises(ConfigError) as early:
        check_vectorisable(early_model)
    with pytest.raises(ConfigError) as late:
        train_many(late_model, params, datasets, _config(), rngs=_rngs(5))

    for err in (early, late):
        assert "layer '1.1' (_Branchy)" in str(err.value)
        assert "backend = 'sequential' or 'process'" in str(err.value)


def test_builtin_models_pass_the_check() -> None:
    for kind in SHAPES:
        check_vectorisable(_builtin(kind))


def test_data_errors_are_not_blamed_on_vmap(datasets: Datasets) -> None:
    model = _builtin("mlp")
    params = model.init_params(0)
    bad = [*datasets[:2], (np.zeros((3, 64), np.float32), np.array([0, 1, 99]))]

    # Label 99 of 10 classes fails without vmap too: the real error surfaces.
    with pytest.raises((IndexError, RuntimeError)) as err:
        train_many(model, params, bad, _config(), rngs=_rngs(3))
    assert not isinstance(err.value, ConfigError)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"max_batch_clients": 0}, ConfigError, "max_batch_clients"),
        ({"rngs": _rngs(2)}, ConfigError, "one generator per data set"),
    ],
)
def test_bad_arguments_raise(
    kwargs: dict[str, object], error: type[Exception], needle: str, datasets: Datasets
) -> None:
    model = _builtin("logistic")
    arguments: dict[str, object] = {"rngs": _rngs(len(datasets)), **kwargs}
    with pytest.raises(error, match=needle):
        train_many(
            model,
            model.init_params(0),
            datasets,
            _config(),
            **arguments,
        )


def test_empty_or_mismatched_data_set_names_its_index(datasets: Datasets) -> None:
    model = _builtin("logistic")
    params = model.init_params(0)
    empty = [*datasets[:2], (np.zeros((0, 64), np.float32), np.zeros(0, np.int64))]
    mismatched = [datasets[0], (np.zeros((4, 64), np.float32), np.zeros(3))]

    with pytest.raises(ValueError, match="data set 2: cannot train on 0 examples"):
        train_many(model, params, empty, _config(), rngs=_rngs(3))
    with pytest.raises(ValueError, match="data set 1: x and y"):
        train_many(model, params, mismatched, _config(), rngs=_rngs(2))


def test_params_of_another_model_raise(datasets: Datasets) -> None:
    model = _builtin("logistic")
    with pytest.raises(ConfigError, match="params do not match"):
        train_many(
            model,
            Params({"w": np.zeros(3)}),
            datasets,
            _config(),
            rngs=_rngs(len(datasets)),
        )
