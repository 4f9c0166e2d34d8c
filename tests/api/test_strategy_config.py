from __future__ import annotations

import pytest

from fedshield.api import build_strategy, parse_config, simulate
from fedshield.errors import ConfigError
from fedshield.strategies import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerSgd

TINY = {
    "run": {"rounds": 2, "seed": 0},
    "data": {"dataset": "digits", "num_clients": 4},
    "model": {"kind": "mlp", "hidden": [16]},
}


@pytest.mark.parametrize(
    ("name", "extra", "opt_type"),
    [
        ("fedavg", {}, ServerSgd),
        ("fedprox", {"mu": 0.1}, ServerSgd),
        ("fedavgm", {"server_momentum": 0.5}, FedAvgM),
        ("fedadam", {"beta1": 0.8, "tau": 0.01}, FedAdam),
        ("fedyogi", {}, FedYogi),
        ("fedadagrad", {"server_lr": 0.05}, FedAdagrad),
    ],
)
def test_each_strategy_name_builds_its_parts_and_runs(tmp_path, name, extra, opt_type):
    config = parse_config({**TINY, "strategy": {"name": name, **extra}})
    strategy = build_strategy(config)
    assert isinstance(strategy.server_opt, opt_type)
    for key, value in extra.items():
        attr = {"server_momentum": "momentum"}.get(key, key)
        if hasattr(strategy.server_opt, attr):
            assert getattr(strategy.server_opt, attr) == value
    summary, _ = simulate(config, out=tmp_path, write_report=False)
    assert summary["status"] == "completed" and summary["strategy"] == name


def test_fedprox_sends_mu_to_clients():
    strategy = build_strategy(
        parse_config({"strategy": {"name": "fedprox", "mu": 0.3}})
    )
    assert strategy.local.options["proximal_mu"] == 0.3


def test_fedprox_changes_training_and_mu_zero_does_not(tmp_path):
    runs = {}
    for label, strategy in [
        ("avg", {"name": "fedavg"}),
        ("prox0", {"name": "fedprox", "mu": 0.0}),
        ("prox", {"name": "fedprox", "mu": 1.0}),
    ]:
        config = parse_config({**TINY, "strategy": strategy})
        summary, _ = simulate(config, out=tmp_path / label, write_report=False)
        runs[label] = summary["loss"]
    assert runs["prox0"] == runs["avg"]
    assert runs["prox"] != runs["avg"]


def test_strategy_parameter_of_another_strategy_is_refused():
    with pytest.raises(ConfigError, match="mu does not apply to strategy 'fedavg'"):
        parse_config({"strategy": {"name": "fedavg", "mu": 0.1}})
    with pytest.raises(ConfigError, match="fedadagrad, fedadam, fedyogi"):
        parse_config({"strategy": {"name": "fedprox", "tau": 0.1}})


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(ConfigError, match="fedyogi"):
        parse_config({"strategy": {"name": "fedsgd"}})
