from __future__ import annotations

import pytest

from fedshield.api import load_config, parse_config
from fedshield.api.config import apply_overrides
from fedshield.errors import ConfigError, ConfigFileError


def test_defaults_are_valid():
    config = parse_config({})
    assert config.run.rounds == 30 and config.data.dataset == "digits"


def test_misspelt_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        parse_config({"data": {"datset": "digits"}})
    message = str(info.value)
    assert "data.datset: unknown key" in message
    assert "did you mean 'dataset'?" in message


def test_unknown_section_is_named():
    with pytest.raises(
        ConfigError, match=r"\[strategi\]: unknown section; did you mean"
    ):
        parse_config({"strategi": {}})


def test_bad_value_names_key_constraint_and_value():
    with pytest.raises(ConfigError) as info:
        parse_config({"client": {"lr": -1.0}})
    message = str(info.value)
    assert "client.lr" in message and "greater than 0" in message and "-1.0" in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config({"client": {"lr": 0}, "run": {"rounds": 0}})
    assert "client.lr" in str(info.value) and "run.rounds" in str(info.value)


def test_fraction_and_clients_per_round_are_exclusive():
    with pytest.raises(ConfigError, match="either fraction or clients_per_round"):
        parse_config({"strategy": {"fraction": 0.5, "clients_per_round": 3}})


def test_clients_per_round_cannot_exceed_num_clients():
    with pytest.raises(ConfigError, match="clients_per_round"):
        parse_config({"data": {"num_clients": 3}, "strategy": {"clients_per_round": 5}})


def test_set_values_are_parsed_as_toml():
    data = apply_overrides(
        {},
        ["model.hidden=[64,32]", "run.rounds=5", "data.dataset=heart", 'run.name="x"'],
    )
    config = parse_config(data)
    assert config.model.hidden == [64, 32]
    assert config.run.rounds == 5
    assert config.data.dataset == "heart"
    assert config.run.name == "x"


@pytest.mark.parametrize("item", ["rounds", "=5", "rounds=5"])
def test_malformed_set_is_refused(item):
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides({}, [item])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigFileError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 3")
    with pytest.raises(ConfigFileError, match="not valid TOML"):
        load_config(bad)


def test_shipped_examples_are_valid():
    for name in ("quickstart", "heart_hospitals", "fashion_mnist"):
        load_config(
            __import__("pathlib").Path(__file__).parents[2]
            / "examples"
            / f"{name}.toml"
        )


def test_min_clients_above_sampled_per_round_is_refused_before_round_1(tmp_path):
    from fedshield.api import simulate

    config = parse_config(
        {"data": {"num_clients": 10}, "strategy": {"fraction": 0.1, "min_clients": 3}}
    )
    with pytest.raises(ConfigError, match="samples only 1 of 10"):
        simulate(config, out=tmp_path / "run", write_report=False)
    assert not (tmp_path / "run").exists()
