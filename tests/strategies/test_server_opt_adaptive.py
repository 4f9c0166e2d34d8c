"""Tests of the momentum and adaptive server optimizers (FedAvgM, FedAdam, ...)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedshield.core import Params, ServerState
from fedshield.errors import CheckpointError, ConfigError, InvalidUpdateError
from fedshield.strategies.server_opt import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    ServerSgd,
)

# A tiny two-value model and two rounds of pseudo-gradients. The second round
# is chosen so that FedYogi's sign(v - Δ²) is +1 for w[0] and -1 for w[1].
X0 = [1.0, -2.0]
DELTAS = [[1.0, -2.0], [0.05, 0.5]]


def _params(values: list[float]) -> Params:
    return Params({"w": values})


def _run(
    opt: ServerOptimizer, deltas: list[list[float]]
) -> tuple[Params, Mapping[str, Params]]:
    params = _params(X0)
    state = opt.init(params)
    for delta in deltas:
        params, state = opt.step(params, _params(delta), state)
    return params, state


# ------------------------------------------------ plain-float references


def _reference_adaptive(
    rule: Callable[[float, float], float],
    *,
    server_lr: float,
    beta1: float,
    tau: float,
) -> tuple[list[float], list[float], list[float]]:
    """Reddi et al. Algorithm 2, one coordinate at a time in Python floats."""
    xs, ms, vs = [], [], []
    for i, x in enumerate(X0):
        m, v = 0.0, tau**2
        for delta in DELTAS:
            d = delta[i]
            m = beta1 * m + (1 - beta1) * d
            v = rule(v, d * d)
            x = x + server_lr * m / (math.sqrt(v) + tau)
        xs.append(x)
        ms.append(m)
        vs.append(v)
    return xs, ms, vs


def _adagrad_rule(v: float, d2: float) -> float:
    return v + d2


def _adam_rule(beta2: float) -> Callable[[float, float], float]:
    return lambda v, d2: beta2 * v + (1 - beta2) * d2


def _yogi_rule(beta2: float) -> Callable[[float, float], float]:
    def rule(v: float, d2: float) -> float:
        sign = (v > d2) - (v < d2)
        return v - (1 - beta2) * d2 * sign

    return rule


# ------------------------------------------------------- hand-computed


def test_fedavgm_two_steps_match_hand_computed() -> None:
    # m1 = Δ1 = [1, -2];              x1 = [1, -2] + 0.5·m1 = [1.5, -3]
    # m2 = 0.8·m1 + Δ2 = [0.85, -1.1]; x2 = x1 + 0.5·m2 = [1.925, -3.55]
    opt = FedAvgM(server_lr=0.5, momentum=0.8)

    params, state = _run(opt, DELTAS)

    assert_allclose(params.flat, [1.925, -3.55], rtol=1e-6)
    assert_allclose(state["m"].flat, [0.85, -1.1], rtol=1e-6)
    assert list(state) == ["m"]


def test_fedadam_first_step_matches_hand_computed() -> None:
    # m = 0.2·1 = 0.2; v = 0.95·1e-4 + 0.05·1 = 0.050095
    # x = 1 + 0.1 · 0.2 / (√0.050095 + 0.01)
    opt = FedAdam(0.1, beta1=0.8, beta2=0.95, tau=0.01)

    params, state = _run(opt, DELTAS[:1])

    expected = 1 + 0.1 * 0.2 / (math.sqrt(0.050095) + 0.01)
    assert_allclose(params.flat[0], expected, rtol=1e-6)
    assert_allclose(state["m"].flat[0], 0.2, rtol=1e-6)
    assert_allclose(state["v"].flat[0], 0.050095, rtol=1e-6)


def test_fedadam_two_steps_match_reference() -> None:
    opt = FedAdam(0.1, beta1=0.8, beta2=0.95, tau=0.01)
    xs, ms, vs = _reference_adaptive(
        _adam_rule(0.95), server_lr=0.1, beta1=0.8, tau=0.01
    )

    params, state = _run(opt, DELTAS)

    assert_allclose(params.flat, xs, rtol=1e-6)
    assert_allclose(state["m"].flat, ms, rtol=1e-6)
    assert_allclose(state["v"].flat, vs, rtol=1e-6)


def test_fedyogi_two_steps_match_reference() -> None:
    opt = FedYogi(0.1, beta1=0.8, beta2=0.95, tau=0.01)
    xs, ms, vs = _reference_adaptive(
        _yogi_rule(0.95), server_lr=0.1, beta1=0.8, tau=0.01
    )

    params, state = _run(opt, DELTAS)

    assert_allclose(params.flat, xs, rtol=1e-6)
    assert_allclose(state["m"].flat, ms, rtol=1e-6)
    assert_allclose(state["v"].flat, vs, rtol=1e-6)
    # v1 = 1e-4 + 0.05·Δ1²  = [0.0501, 0.2001]; Δ2² = [0.0025, 0.25], so
    # w[0] shrinks by 0.05·0.0025 and w[1] grows by 0.05·0.25.
    assert_allclose(state["v"].flat, [0.049975, 0.2126], rtol=1e-6)


def test_fedyogi_differs_from_fedadam_in_second_moment() -> None:
    kwargs = {"beta1": 0.8, "beta2": 0.95, "tau": 0.01}

    _, yogi = _run(FedYogi(0.1, **kwargs), DELTAS)
    _, adam = _run(FedAdam(0.1, **kwargs), DELTAS)

    assert_array_equal(yogi["m"].flat, adam["m"].flat)
    assert not np.allclose(yogi["v"].flat, adam["v"].flat)


def test_fedadagrad_two_steps_match_reference() -> None:
    opt = FedAdagrad(0.3, beta1=0.5, tau=0.01)
    xs, ms, vs = _reference_adaptive(_adagrad_rule, server_lr=0.3, beta1=0.5, tau=0.01)

    params, state = _run(opt, DELTAS)

    assert_allclose(params.flat, xs, rtol=1e-6)
    assert_allclose(state["m"].flat, ms, rtol=1e-6)
    assert_allclose(state["v"].flat, vs, rtol=1e-6)
    # v2 = τ² + Δ1² + Δ2²
    assert_allclose(state["v"].flat, [1e-4 + 1 + 0.0025, 1e-4 + 4 + 0.25], rtol=1e-6)


# ----------------------------------------------------------- init state

ADAPTIVE = [FedAdam(), FedYogi(), FedAdagrad()]
ALL = [FedAvgM(), FedAvgM(0.3, 0.0), *ADAPTIVE, FedAdam(0.1, beta1=0.0, beta2=0.5)]


@pytest.mark.parametrize("opt", ADAPTIVE, ids=repr)
def test_adaptive_init_is_zero_m_and_tau_squared_v(
    opt: FedAdam | FedYogi | FedAdagrad,
) -> None:
    params = Params({"w": np.ones((2, 3)), "b": [1.0]})

    state = opt.init(params)

    assert sorted(state) == ["m", "v"]
    assert state["m"].spec == params.spec
    assert state["v"].spec == params.spec
    assert_array_equal(state["m"].flat, np.zeros(7))
    assert_allclose(state["v"].flat, np.full(7, opt.tau**2), rtol=1e-7)


def test_fedavgm_init_is_zero_momentum() -> None:
    params = Params({"w": np.ones((2, 3))})

    state = FedAvgM().init(params)

    assert list(state) == ["m"]
    assert_array_equal(state["m"]["w"], np.zeros((2, 3)))


# ---------------------------------------------------- checkpoint-exactness


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_resume_from_checkpoint_is_bit_identical(opt: ServerOptimizer) -> None:
    rng = np.random.default_rng(7)
    params0 = Params({"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5)})
    deltas = [
        Params({"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5)})
        for _ in range(6)
    ]
    # Uninterrupted.
    params, state = params0, opt.init(params0)
    for delta in deltas:
        params, state = opt.step(params, delta, state)
    # Interrupted after three rounds, resumed from serialised bytes.
    resumed_params, resumed_state = params0, opt.init(params0)
    for delta in deltas[:3]:
        resumed_params, resumed_state = opt.step(resumed_params, delta, resumed_state)
    checkpoint = ServerState(
        round_idx=3, params=resumed_params, optimizer_state=dict(resumed_state)
    ).to_bytes()
    loaded = ServerState.from_bytes(checkpoint)
    resumed_params, resumed_state = loaded.params, loaded.optimizer_state
    for delta in deltas[3:]:
        resumed_params, resumed_state = opt.step(resumed_params, delta, resumed_state)

    assert_array_equal(resumed_params.flat, params.flat)
    assert sorted(resumed_state) == sorted(state)
    for key in state:
        assert_array_equal(resumed_state[key].flat, state[key].flat)


# ------------------------------------------------ FedAvgM versus ServerSgd


@pytest.mark.parametrize("lr", [1.0, 0.5, 0.1, 2.0, 3.7])
def test_fedavgm_zero_momentum_equals_server_sgd(lr: float) -> None:
    rng = np.random.default_rng(3)
    sgd_params = avgm_params = Params({"w": rng.normal(size=10)})
    avgm, sgd = FedAvgM(lr, momentum=0.0), ServerSgd(lr)
    state = avgm.init(avgm_params)

    for _ in range(4):
        delta = Params({"w": rng.normal(size=10)})
        avgm_params, state = avgm.step(avgm_params, delta, state)
        sgd_params, _ = sgd.step(sgd_params, delta, {})

    assert_array_equal(avgm_params.flat, sgd_params.flat)


# --------------------------------------------------------- no mutation


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_step_does_not_mutate_inputs(opt: ServerOptimizer) -> None:
    params, delta = _params(X0), _params(DELTAS[0])
    state = dict(opt.step(params, delta, opt.init(params))[1])
    keys_before = dict(state)
    flats_before = {k: v.flat.copy() for k, v in state.items()}
    params_before, delta_before = params.flat.copy(), delta.flat.copy()

    new_params, new_state = opt.step(params, delta, state)

    assert state == keys_before
    for key, flat in flats_before.items():
        assert state[key] is keys_before[key]
        assert_array_equal(state[key].flat, flat)
    assert_array_equal(params.flat, params_before)
    assert_array_equal(delta.flat, delta_before)
    assert new_state is not state
    assert not new_params.flat.flags.writeable
    assert all(not v.flat.flags.writeable for v in new_state.values())


# ------------------------------------------------------------ mismatches


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_step_with_mismatched_delta_raises_invalid_update(
    opt: ServerOptimizer,
) -> None:
    params = _params(X0)

    with pytest.raises(InvalidUpdateError, match="does not match"):
        opt.step(params, Params({"v": [1.0, 2.0]}), opt.init(params))


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_step_with_foreign_state_raises_checkpoint_error(
    opt: ServerOptimizer,
) -> None:
    params = _params(X0)

    with pytest.raises(CheckpointError, match="missing buffer 'm'"):
        opt.step(params, params, {})
    with pytest.raises(CheckpointError, match="does not match"):
        opt.step(params, params, opt.init(Params({"w": [1.0, 2.0, 3.0]})))


# --------------------------------------------------------- convergence


def test_fedadam_on_quadratic_converges_to_target() -> None:
    # f(x) = ½‖x − target‖², so Δ = −∇f(x) = target − x.
    target = np.array([1.0, 2.0, -1.0, 0.25])
    params = Params({"w": [5.0, -3.0, 0.5, 0.25]})
    opt = FedAdam(0.05)
    state = opt.init(params)
    start = float(np.linalg.norm(params.flat - target))

    for _ in range(1000):
        delta = Params({"w": target - params.flat})
        params, state = opt.step(params, delta, state)

    assert float(np.linalg.norm(params.flat - target)) < 1e-2 * start


# ---------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: FedAvgM(0.0), "server_lr"),
        (lambda: FedAvgM(-1.0), "server_lr"),
        (lambda: FedAvgM(float("nan")), "server_lr"),
        (lambda: FedAvgM(float("inf")), "server_lr"),
        (lambda: FedAvgM(1.0, -0.1), "momentum"),
        (lambda: FedAvgM(1.0, 1.0), "momentum"),
        (lambda: FedAvgM(1.0, float("nan")), "momentum"),
        (lambda: FedAdam(0.0), "server_lr"),
        (lambda: FedAdam(beta1=1.0), "beta1"),
        (lambda: FedAdam(beta1=-0.5), "beta1"),
        (lambda: FedAdam(beta2=1.0), "beta2"),
        (lambda: FedAdam(beta2=float("nan")), "beta2"),
        (lambda: FedAdam(tau=0.0), "tau"),
        (lambda: FedAdam(tau=-1e-3), "tau"),
        (lambda: FedYogi(-0.1), "server_lr"),
        (lambda: FedYogi(beta1=2.0), "beta1"),
        (lambda: FedYogi(beta2=-0.1), "beta2"),
        (lambda: FedYogi(tau=float("inf")), "tau"),
        (lambda: FedAdagrad(float("nan")), "server_lr"),
        (lambda: FedAdagrad(beta1=1.0), "beta1"),
        (lambda: FedAdagrad(tau=0.0), "tau"),
    ],
)
def test_invalid_argument_raises_config_error(
    factory: Callable[[], object], name: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^`{name}` must be .*; got "):
        factory()


def test_defaults_are_documented_values() -> None:
    assert FedAvgM() == FedAvgM(server_lr=1.0, momentum=0.9)
    assert FedAdam() == FedAdam(0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    assert FedYogi() == FedYogi(0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    assert FedAdagrad() == FedAdagrad(0.1, beta1=0.9, tau=1e-3)


def test_adaptive_parameters_after_server_lr_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        FedAdam(0.1, 0.9)  # type: ignore[call-arg]
