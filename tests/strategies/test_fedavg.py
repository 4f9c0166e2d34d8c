"""Tests of the FedAvg strategy, driven piece by piece as the round loop does."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedshield.core import (
    ClientUpdate,
    FitConfig,
    Params,
    ServerState,
    WeightedMean,
    aggregate,
)
from fedshield.errors import ConfigError
from fedshield.strategies import (
    CountSampler,
    FedAvg,
    FractionSampler,
    RoundPlan,
    ServerSgd,
    Strategy,
)


def _global() -> Params:
    return Params({"w": [[1.0, -1.0], [0.5, 2.0]], "b": [0.0, 3.0]})


def _local_models() -> list[tuple[str, Params, int]]:
    # θ_k after local training, with n_k.
    return [
        ("a", Params({"w": [[2.0, 0.0], [1.0, 2.0]], "b": [1.0, 3.0]}), 10),
        ("b", Params({"w": [[0.0, -3.0], [0.5, 6.0]], "b": [-2.0, 1.0]}), 30),
        ("c", Params({"w": [[4.0, 1.0], [-1.5, 0.0]], "b": [0.0, 5.0]}), 60),
    ]


def _run_round(
    strategy: FedAvg, state: ServerState, models: Sequence[tuple[str, Params, int]]
) -> ServerState:
    rng = np.random.default_rng(0)
    updates = [ClientUpdate(cid, theta - state.params, n) for cid, theta, n in models]
    agg = aggregate(
        strategy.aggregator,
        ((u, strategy.weight(u)) for u in updates),
        state.params.spec,
        rng=rng,
    )
    plan = strategy.configure(state, [cid for cid, _, _ in models], rng=rng)
    return strategy.apply(state, agg, plan=plan, rng=rng)


# ---------------------------------------------------------------- a round


def test_fedavg_round_equals_weighted_average_of_local_models() -> None:
    # Prepare
    strategy = FedAvg()
    state = strategy.init(_global())
    models = _local_models()

    # Execute
    new = _run_round(strategy, state, models)

    # Assert: θ ← Σ n_k θ_k / Σ n_k, written out by hand for "b":
    # (10*[1, 3] + 30*[-2, 1] + 60*[0, 5]) / 100 = [-50, 360] / 100
    total = sum(n for _, _, n in models)
    expected = sum(n * theta.flat.astype(np.float64) for _, theta, n in models) / total
    assert_allclose(new.params.flat, expected, rtol=1e-6, atol=1e-6)
    assert_allclose(new.params["b"], [-0.5, 3.6], rtol=1e-6, atol=1e-6)
    assert new.params.spec == state.params.spec
    assert new.round_idx == 1


def test_fedavg_round_leaves_old_state_unchanged() -> None:
    strategy = FedAvg()
    state = strategy.init(_global())

    new = _run_round(strategy, state, _local_models())

    assert new is not state
    assert state.round_idx == 0
    assert state.params == _global()


@pytest.mark.parametrize("server_lr", [0.5, 2.0])
def test_fedavg_server_lr_scales_the_step(server_lr: float) -> None:
    # θ ← θ + server_lr · (Σ n_k θ_k / Σ n_k − θ)
    state = FedAvg().init(_global())
    plain = _run_round(FedAvg(), state, _local_models())
    strategy = FedAvg(server_opt=ServerSgd(server_lr))

    new = _run_round(strategy, strategy.init(_global()), _local_models())

    theta = _global().flat.astype(np.float64)
    expected = theta + server_lr * (plain.params.flat - theta)
    assert_allclose(new.params.flat, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(new.params.flat, plain.params.flat)


def test_fedavg_unweighted_averages_equally() -> None:
    strategy = FedAvg(weighted=False)
    models = _local_models()

    new = _run_round(strategy, strategy.init(_global()), models)

    expected = np.mean([theta.flat for _, theta, _ in models], axis=0)
    assert_allclose(new.params.flat, expected, rtol=1e-6, atol=1e-6)


def test_fedavg_weight_is_num_examples_or_one() -> None:
    update = ClientUpdate("a", _global(), 37)

    assert FedAvg().weight(update) == 37.0
    assert isinstance(FedAvg().weight(update), float)
    assert FedAvg(weighted=False).weight(update) == 1.0


def test_fedavg_single_client_round_takes_its_model() -> None:
    strategy = FedAvg()
    theta = _local_models()[1][1]

    new = _run_round(strategy, strategy.init(_global()), [("only", theta, 5)])

    assert_allclose(new.params.flat, theta.flat, rtol=1e-6, atol=1e-6)


def test_fedavg_two_rounds_advance_round_idx() -> None:
    strategy = FedAvg()
    state = strategy.init(_global())

    for _ in range(2):
        state = _run_round(strategy, state, _local_models())

    assert state.round_idx == 2


# ---------------------------------------------------------------- init / defaults


def test_fedavg_defaults() -> None:
    strategy = FedAvg()

    assert isinstance(strategy.aggregator, WeightedMean)
    assert strategy.server_opt == ServerSgd(1.0)
    assert strategy.sampler == FractionSampler(1.0)
    assert strategy.min_clients == 1
    assert strategy.weighted is True


def test_fedavg_init_starts_at_round_zero_with_params() -> None:
    state = FedAvg().init(_global())

    assert isinstance(state, ServerState)
    assert state.round_idx == 0
    assert state.params == _global()
    assert dict(state.optimizer_state) == {}


def test_fedavg_state_round_trips_through_bytes_after_a_round() -> None:
    strategy = FedAvg()
    state = _run_round(strategy, strategy.init(_global()), _local_models())

    assert ServerState.from_bytes(state.to_bytes()) == state


def test_fedavg_satisfies_strategy_protocol() -> None:
    strategy: Strategy = FedAvg()

    assert strategy.aggregator.is_streaming


@pytest.mark.parametrize("min_clients", [0, -2])
def test_fedavg_invalid_min_clients_raises_config_error(min_clients: int) -> None:
    with pytest.raises(ConfigError, match="min_clients"):
        FedAvg(min_clients=min_clients)


# ---------------------------------------------------------------- configure


def test_fedavg_configure_plans_the_round() -> None:
    local = FitConfig(round_idx=0, epochs=2, batch_size=16, lr=0.1)
    strategy = FedAvg(sampler=CountSampler(2), local=local, min_clients=2)
    state = strategy.init(_global()).evolve(round_idx=5)
    available = ["a", "b", "c", "d"]

    plan = strategy.configure(state, available, rng=np.random.default_rng(0))

    assert isinstance(plan, RoundPlan)
    assert plan.round_idx == 5
    assert isinstance(plan.clients, tuple)
    assert len(plan.clients) == 2
    assert set(plan.clients) <= set(available)
    assert plan.min_clients == 2
    assert plan.fit_config.round_idx == 5
    assert plan.fit_config.epochs == 2
    assert plan.fit_config.batch_size == 16
    assert plan.fit_config.lr == 0.1
    assert local.round_idx == 0


def test_fedavg_configure_default_asks_every_client() -> None:
    strategy = FedAvg()
    state = strategy.init(_global())

    plan = strategy.configure(state, ["x", "y", "z"], rng=np.random.default_rng(0))

    assert plan.clients == ("x", "y", "z")


def test_fedavg_configure_is_deterministic_given_rng() -> None:
    strategy = FedAvg(sampler=FractionSampler(0.3))
    state = strategy.init(_global())
    available = [f"c{i}" for i in range(20)]

    a = strategy.configure(state, available, rng=np.random.default_rng(4))
    b = strategy.configure(state, available, rng=np.random.default_rng(4))

    assert a == b


def test_fedavg_configure_too_few_available_raises_config_error() -> None:
    strategy = FedAvg(min_clients=3)
    state = strategy.init(_global())

    with pytest.raises(ConfigError, match="min_clients") as info:
        strategy.configure(state, ["a", "b"], rng=np.random.default_rng(0))

    assert "only 2" in str(info.value)


def test_fedavg_configure_exactly_min_clients_available_is_fine() -> None:
    strategy = FedAvg(min_clients=2)
    state = strategy.init(_global())

    plan = strategy.configure(state, ["a", "b"], rng=np.random.default_rng(0))

    assert plan.clients == ("a", "b")


def test_fedavg_is_immutable() -> None:
    strategy = FedAvg()

    with pytest.raises(AttributeError):
        strategy.min_clients = 5  # type: ignore[misc]


def test_fedavg_unweighted_round_matches_hand_computed_value() -> None:
    strategy = FedAvg(weighted=False)
    base = Params({"w": [0.0, 0.0]})
    models = [("a", Params({"w": [3.0, 0.0]}), 1), ("b", Params({"w": [0.0, 6.0]}), 99)]

    new = _run_round(strategy, strategy.init(base), models)

    assert_array_equal(new.params["w"], [1.5, 3.0])
