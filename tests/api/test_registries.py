"""One place names each family of parts: the registries (issue 13).

A robust rule, an attack or a backend registered in its registry, and
nowhere else, is accepted by the configuration and its JSON schema, listed
by ``fedshield analyze`` and the CLI's help, and described in the security
matrix; an unknown name is refused with the closest registered one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedshield.api import parse_config, simulate
from fedshield.api.config import ExperimentConfig
from fedshield.api.experiment import build_strategy
from fedshield.cli.analyze import attack_names, defence_names, parse_names, plan_pairs
from fedshield.cli.main import app
from fedshield.core import ClientUpdate, FitConfig, Params
from fedshield.core.registry import Registry
from fedshield.data import DATASETS
from fedshield.errors import ConfigError
from fedshield.models.attacks import (
    ATTACKS,
    Attack,
    AttackSpec,
    MaliciousClient,
    honest_fit,
)
from fedshield.report.matrix import known_failure, render_matrix, tabulate
from fedshield.simulation import RunDirectory
from fedshield.simulation.backends import BACKENDS
from fedshield.strategies.dp import MECHANISMS
from fedshield.strategies.robust import RULES, RobustRule, TrimmedMean, make_robust

TOY_RULE = "toy_trim"
TOY_RULE_TEXT = "toy rule: a trimmed mean without the f largest and smallest"
TOY_ATTACK = "toy_zero"
TOY_ATTACK_TEXT = "toy attack: sends a zero update"
TOY_BACKEND = "toy_backend"

BASE: dict[str, dict[str, Any]] = {
    "run": {"name": "toy", "rounds": 2, "seed": 3, "federated_eval": False},
    "data": {"dataset": "digits", "num_clients": 8},
    "model": {"kind": "logistic"},
    "client": {"lr": 0.1},
}


def _config(**sections: dict[str, Any]) -> ExperimentConfig:
    data = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


def _zero_update(
    client: MaliciousClient,
    params: Params,
    config: FitConfig,
    rng: np.random.Generator,
) -> ClientUpdate:
    honest = honest_fit(client, params, config, rng)
    return replace(honest, delta=Params.zeros(honest.delta.spec))


@pytest.fixture
def toy_rule() -> Iterator[str]:
    """A robust rule registered in RULES only, for the test's duration."""
    RULES.add(
        TOY_RULE,
        RobustRule(lambda o: TrimmedMean(o["f"]), required=frozenset({"f"})),
        TOY_RULE_TEXT,
        tags={"needs_f"},
    )
    try:
        yield TOY_RULE
    finally:
        RULES.remove(TOY_RULE)


@pytest.fixture
def toy_attack() -> Iterator[str]:
    """An attack registered in ATTACKS only, for the test's duration."""
    ATTACKS.add(TOY_ATTACK, Attack(_zero_update), TOY_ATTACK_TEXT)
    try:
        yield TOY_ATTACK
    finally:
        ATTACKS.remove(TOY_ATTACK)


@pytest.fixture
def toy_backend() -> Iterator[str]:
    BACKENDS.add(TOY_BACKEND, None, "toy backend: for the help only")
    try:
        yield TOY_BACKEND
    finally:
        BACKENDS.remove(TOY_BACKEND)


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    # one line of words, without the option panel's frame
    return " ".join(result.output.replace("│", " ").split())


def _enum(section: str, key: str) -> list[str]:
    schema = ExperimentConfig.model_json_schema()
    enum: list[str] = schema["$defs"][section]["properties"][key]["enum"]
    return enum


# --- the single place ---------------------------------------------------------


def test_a_rule_registered_once_is_accepted_listed_and_built(toy_rule, tmp_path):
    config = _config(robust={"rule": toy_rule, "f": 1})
    assert config.robust.rule == toy_rule
    assert toy_rule in _enum("RobustSection", "rule")
    assert make_robust(toy_rule, f=1) == TrimmedMean(1)
    assert build_strategy(config).aggregator == TrimmedMean(1)  # type: ignore[attr-defined]
    # fedshield analyze: a defence, given f from --fraction (tag needs_f)
    assert toy_rule in defence_names()
    assert parse_names(f"median,{toy_rule}", defence_names(), "--defences") == (
        "median",
        toy_rule,
    )
    path = tmp_path / "toy.toml"
    path.write_text('[data]\ndataset = "digits"\nnum_clients = 10\n')
    pairs, settings = plan_pairs(
        path,
        attacks=("none",),
        defences=(toy_rule,),
        fraction=0.2,
        max_norm=None,
        out_dir=tmp_path / "analysis",
    )
    assert "robust.f=2" in pairs[0].overrides
    assert f"f (for bulyan, krum, multi_krum, {toy_rule}, trimmed_mean)" in settings
    # the CLI's help lists it, with its description
    words = _help("analyze")
    assert f"norm_bound, fltrust, {toy_rule}." in words  # --defences' help
    assert f"trimmed_mean, bulyan, {toy_rule}." in words  # --fraction's help
    assert f"{toy_rule}: {TOY_RULE_TEXT}" in words
    assert toy_rule in words.split("Defences:")[1]


def test_an_unregistered_rule_is_refused_again():
    assert TOY_RULE not in RULES
    with pytest.raises(ConfigError, match=f"unknown robust rule '{TOY_RULE}'"):
        _config(robust={"rule": TOY_RULE})
    assert TOY_RULE not in defence_names()
    assert TOY_RULE not in _help("analyze")


def test_an_attack_registered_once_runs_and_is_listed(toy_attack, toy_rule, tmp_path):
    config = _config(
        attack={"kind": toy_attack, "fraction": 0.25},
        robust={"rule": toy_rule, "f": 1},
    )
    assert toy_attack in _enum("AttackSection", "kind")
    assert AttackSpec(kind=toy_attack).kind == toy_attack
    assert toy_attack in attack_names()
    assert f"{toy_attack}: {TOY_ATTACK_TEXT}" in _help("analyze")
    summary, run_dir = simulate(config, out=tmp_path / "run", write_report=False)
    assert summary["status"] == "completed"
    recorded = json.loads((Path(run_dir) / "attack.json").read_text())
    assert recorded["kind"] == toy_attack and len(recorded["malicious"]) == 2
    assert RunDirectory(run_dir).read_metrics()[-1]["round"] == 2
    # the matrix describes both and knows the mean is no defence against it
    rows = [
        {"attack": "none", "defence": toy_rule, "accuracy": 0.9, "rounds": 2},
        {"attack": toy_attack, "defence": toy_rule, "accuracy": 0.9, "rounds": 2},
        {"attack": toy_attack, "defence": "fedavg", "accuracy": 0.9, "rounds": 2},
    ]
    page = render_matrix(tabulate(rows), png=None, title="toy")
    assert f"<td>{TOY_RULE_TEXT}</td>" in page
    assert f"<td>{TOY_ATTACK_TEXT}</td>" in page
    assert known_failure(toy_attack, "fedavg") is not None
    assert known_failure(toy_attack, toy_rule) is None


def test_a_backend_registered_once_is_accepted_and_listed(toy_backend):
    assert _config(run={"backend": toy_backend}).run.backend == toy_backend
    assert toy_backend in _enum("RunSection", "backend")
    words = _help("simulate")
    assert f"process, ray, {toy_backend}." in words  # --backend's help
    assert f"{toy_backend}: toy backend: for the help only" in words


# --- unknown names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "bad", "closest", "kind", "registry"),
    [
        ("robust", "rule", "krumm", "krum", "robust rule", RULES),
        ("attack", "kind", "sign_flp", "sign_flip", "attack", ATTACKS),
        ("run", "backend", "vectorized", "vectorised", "backend", BACKENDS),
        ("data", "dataset", "fashion-mnist", "fashion_mnist", "data set", DATASETS),
    ],
)
def test_an_unknown_name_gives_the_closest_and_the_choices(
    section: str,
    key: str,
    bad: str,
    closest: str,
    kind: str,
    registry: Registry[Any],
):
    with pytest.raises(ConfigError) as info:
        _config(**{section: {key: bad}})
    assert str(info.value) == (
        f"invalid configuration:\n  {section}.{key}: unknown {kind} {bad!r} "
        f"(did you mean {closest!r}?); choose one of: {', '.join(registry.names())}"
    )


def test_an_unknown_privacy_mode_lists_none_too():
    with pytest.raises(ConfigError) as info:
        _config(privacy={"mode": "centrall"})
    assert str(info.value).endswith(
        "privacy.mode: unknown privacy mode 'centrall' (did you mean 'central'?); "
        "choose one of: none, central, record, local, distributed"
    )


def test_a_name_must_be_a_string():
    with pytest.raises(
        ConfigError, match=r"robust\.rule: Input should be a valid string"
    ):
        _config(robust={"rule": 3})


def test_make_robust_and_the_attack_spec_refuse_unknown_names_alike():
    with pytest.raises(
        ConfigError,
        match=r"\[robust\] rule: unknown robust rule 'mediam' \(did you mean 'median'",
    ):
        make_robust("mediam")
    with pytest.raises(
        ConfigError,
        match=r"\[attack\] kind: unknown attack 'ipn' \(did you mean 'ipm'\?\)",
    ):
        AttackSpec(kind="ipn")


# --- the registries themselves -----------------------------------------------

REGISTRIES = {
    "RULES": RULES,
    "ATTACKS": ATTACKS,
    "BACKENDS": BACKENDS,
    "DATASETS": DATASETS,
    "MECHANISMS": MECHANISMS,
}


@pytest.mark.parametrize("name", sorted(REGISTRIES))
def test_every_registered_part_has_a_description(name: str):
    registry = REGISTRIES[name]
    assert len(registry) > 0
    missing = [n for n, text in registry.descriptions().items() if not text.strip()]
    assert missing == [], f"{name}: no description for {missing}"


def test_the_names_users_write_are_unchanged():
    """The names are a public contract: TOML files and scripts spell them."""
    assert RULES.names() == (
        "fedavg",
        "krum",
        "multi_krum",
        "median",
        "trimmed_mean",
        "bulyan",
        "geomed",
        "norm_bound",
        "fltrust",
    )
    assert ATTACKS.names() == (
        "none",
        "label_flip",
        "sign_flip",
        "gaussian",
        "backdoor",
        "alie",
        "ipm",
        "free_rider",
    )
    assert BACKENDS.names() == ("auto", "sequential", "vectorised", "process", "ray")
    assert DATASETS.names(tag="bundled") == (
        "digits",
        "breast_cancer",
        "heart",
        "fashion_mnist",
    )
    assert DATASETS.names(tag="user") == ("csv", "parquet", "npz", "images", "python")
    assert MECHANISMS.names() == ("central", "record", "local", "distributed")


def test_the_json_schema_lists_every_registered_name():
    assert _enum("RobustSection", "rule") == list(RULES.names())
    assert _enum("AttackSection", "kind") == list(ATTACKS.names())
    assert _enum("RunSection", "backend") == list(BACKENDS.names())
    assert _enum("DataSection", "dataset") == list(DATASETS.names())
    assert _enum("PrivacySection", "mode") == ["none", *MECHANISMS.names()]


def test_tags_say_what_the_checks_used_to_spell_out():
    assert RULES.names(tag="needs_f") == (
        "krum",
        "multi_krum",
        "trimmed_mean",
        "bulyan",
    )
    assert RULES.names(tag="secagg") == ("fedavg", "norm_bound")
    assert ATTACKS.names(tag="colluding") == ("alie", "ipm")
    assert ATTACKS.names(tag="label") == ("label_flip", "backdoor")
    assert DATASETS.names(tag="tabular") == ("csv", "parquet")
