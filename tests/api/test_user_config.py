"""[data] and [model] keys for the user's own data and model; --set usability."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedshield.api.config import load_config, parse_config
from fedshield.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_set_clients_per_round_replaces_the_files_fraction():
    config = load_config(
        ROOT / "examples" / "quickstart.toml", ["strategy.clients_per_round=10"]
    )
    assert config.strategy.clients_per_round == 10
    assert config.strategy.fraction is None


def test_set_fraction_replaces_the_files_clients_per_round(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[strategy]\nclients_per_round = 3\n")
    config = load_config(path, ["strategy.fraction=0.5"])
    assert (config.strategy.fraction, config.strategy.clients_per_round) == (0.5, None)


def test_both_alternatives_on_the_command_line_are_still_refused(tmp_path):
    with pytest.raises(ConfigError, match="either fraction or clients_per_round"):
        load_config(None, ["strategy.fraction=0.5", "strategy.clients_per_round=3"])


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    path = folder / "c.toml"
    path.write_text(
        '[data]\ndataset = "csv"\npath = "data/clients"\nlabel = "y"\n'
        'test_path = "../test.csv"\n'
        '[model]\nkind = "python"\nfactory = "models/net.py:build"\n'
    )
    monkeypatch.chdir(tmp_path)  # elsewhere: the file's folder still counts
    config = load_config(path)
    assert Path(config.data.path) == folder / "data" / "clients"
    assert Path(config.data.test_path).resolve() == (tmp_path / "test.csv")
    assert config.model.factory == f"{folder / 'models' / 'net.py'}:build"


def test_set_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(
        None, ["data.dataset=csv", "data.path=mine.csv", "data.label=y"]
    )
    assert Path(config.data.path) == tmp_path / "mine.csv"


def test_a_module_reference_is_left_as_written(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nkind = "python"\nfactory = "mypkg.nets:build"\n')
    assert load_config(path).model.factory == "mypkg.nets:build"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dataset": "digits", "path": "x.csv"}, r"data\.path applies to your own"),
        ({"dataset": "csv", "path": "x.csv"}, "needs label"),
        ({"dataset": "csv", "label": "y"}, "needs path"),
        ({"dataset": "python"}, "needs factory"),
        ({"dataset": "npz", "path": "d", "label": "y"}, r"data\.label does not apply"),
        (
            {"dataset": "csv", "path": "x", "label": "y", "factory": "f.py:g"},
            r"factory applies to dataset = \"python\"",
        ),
        (
            {"dataset": "csv", "path": "x", "label": "y", "image_size": [8, 8]},
            r"data\.image_size does not apply",
        ),
    ],
)
def test_data_keys_must_fit_the_dataset(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"data": data})


def test_model_python_needs_a_factory_and_only_it_takes_one():
    with pytest.raises(ConfigError, match="needs factory"):
        parse_config({"model": {"kind": "python"}})
    with pytest.raises(ConfigError, match="applies to kind"):
        parse_config({"model": {"kind": "mlp", "factory": "m.py:f"}})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"data": {"partition": "dirichlet"}}, "splits by class label"),
        ({"attack": {"kind": "label_flip"}}, "changes class labels"),
    ],
)
def test_regression_refuses_what_needs_classes(extra, message):
    base = {"dataset": "csv", "path": "x.csv", "label": "y"}
    data = {**base, **extra.get("data", {})}
    sections = {"data": data, "model": {"task": "regression"}}
    if "attack" in extra:
        sections["attack"] = extra["attack"]
    with pytest.raises(ConfigError, match=message):
        parse_config(sections)


def test_regression_on_a_bundled_classification_set_is_refused():
    with pytest.raises(ConfigError, match="classification data set"):
        parse_config({"model": {"task": "regression"}})


def test_client_counts_wait_for_the_data_when_it_names_the_clients():
    # 50 per round is not checked against a count the data has not given yet.
    config = parse_config(
        {
            "data": {"dataset": "csv", "path": "d", "label": "y"},
            "strategy": {"clients_per_round": 50},
        }
    )
    assert config.expected_num_clients is None
    with pytest.raises(ValueError, match="must be <= the number of clients"):
        config.check_client_counts(4)
    with pytest.raises(ConfigError, match="must be <= the number of clients"):
        parse_config({"strategy": {"clients_per_round": 50}})


PRIVATE = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dataset": "csv", "path": "d", "label": "y"}, r"declare the class set"),
        (
            {
                "dataset": "csv",
                "path": "d",
                "label": "y",
                "classes": ["a", "b"],
                "categorical": ["site_type"],
            },
            r"levels of categorical column 'site_type'",
        ),
        (
            {"dataset": "images", "path": "d", "classes": ["a", "b"]},
            r"declare data\.image_size",
        ),
    ],
)
def test_dp_on_own_data_needs_a_declared_schema(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"data": data, "privacy": PRIVATE})
    parse_config({"data": data})  # without DP the schema may be derived


def test_a_declared_schema_under_dp_is_accepted():
    config = parse_config(
        {
            "data": {
                "dataset": "csv",
                "path": "d",
                "label": "y",
                "classes": ["a", "b"],
                "categorical": ["kind"],
                "levels": {"kind": ["x", "y"]},
                "missing": ["age"],
            },
            "privacy": PRIVATE,
        }
    )
    assert config.data.levels == {"kind": ["x", "y"]}


def test_levels_and_missing_are_for_tables_only():
    with pytest.raises(ConfigError, match=r"data\.levels does not apply"):
        parse_config({"data": {"dataset": "npz", "path": "d", "levels": {"a": ["b"]}}})
    with pytest.raises(ConfigError, match=r"data\.missing does not apply"):
        parse_config({"data": {"dataset": "npz", "path": "d", "missing": ["a"]}})
