"""``[robust]``: a robust rule in place of the mean, refused where it cannot work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedshield.api import parse_config, simulate
from fedshield.api.experiment import build_strategy
from fedshield.errors import ConfigError
from fedshield.simulation import RunDirectory
from fedshield.strategies import Krum, NormBound

BASE = {
    "run": {"name": "robust", "rounds": 3, "seed": 2, "federated_eval": False},
    "data": {"dataset": "digits", "num_clients": 10},
    "model": {"kind": "logistic"},
    "client": {"lr": 0.1},
    "strategy": {"clients_per_round": 8},
}


def _config(**sections: dict[str, object]) -> object:
    data = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


def test_the_rule_replaces_the_mean_and_the_run_completes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(robust={"rule": "krum", "f": 2})
    strategy = build_strategy(config)  # type: ignore[arg-type]
    assert isinstance(strategy.aggregator, Krum)
    summary, run_dir = simulate(config, out=tmp_path / "k", write_report=False)
    assert summary["status"] == "completed"
    record = RunDirectory(run_dir).read_metrics()[-1]
    assert record["krum/selected"] == 1.0


def test_a_rule_the_round_cannot_satisfy_is_refused_before_round_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(robust={"rule": "bulyan", "f": 2})  # needs n >= 11, gets 8
    with pytest.raises(ConfigError, match="Bulyan"):
        simulate(config, out=tmp_path / "b", write_report=False)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("rule", ["krum", "median", "trimmed_mean", "geomed"])
def test_rules_that_need_individual_updates_are_refused_with_secagg(rule: str) -> None:
    with pytest.raises(ConfigError, match="norm_bound"):
        _config(robust={"rule": rule, "f": 1}, secagg={"protocol": "secagg"})


def test_norm_bounding_works_under_secure_aggregation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The clients clip their own updates; the securely summed round equals
    # the in-the-clear NormBound round up to fixed-point rounding.
    robust = {"rule": "norm_bound", "max_norm": 0.05}
    _clear, clear_dir = simulate(
        _config(robust=robust), out=tmp_path / "clear", write_report=False
    )
    _secure, secure_dir = simulate(
        _config(robust=robust, secagg={"protocol": "secagg"}),
        out=tmp_path / "secure",
        write_report=False,
    )
    assert isinstance(build_strategy(_config(robust=robust)).aggregator, NormBound)  # type: ignore[arg-type]
    a = RunDirectory(clear_dir).load_checkpoint().params
    b = RunDirectory(secure_dir).load_checkpoint().params
    np.testing.assert_allclose(b.flat, a.flat, atol=1e-5)
    _unclipped, _ = simulate(_config(), out=tmp_path / "mean", write_report=False)
    c = RunDirectory(tmp_path / "mean").load_checkpoint().params
    assert np.abs(c.flat - a.flat).max() > 1e-3  # the bound really bit


def test_robust_with_central_dp_or_unknown_rule_is_refused() -> None:
    with pytest.raises(ConfigError, match="central"):
        _config(
            robust={"rule": "median"},
            privacy={"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0},
        )
    with pytest.raises(ConfigError, match="rule"):
        _config(robust={"rule": "mean-ish"})


def test_fltrust_scores_updates_against_the_servers_root_update(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(
        robust={"rule": "fltrust", "root_size": 50},
        attack={"kind": "sign_flip", "fraction": 0.2},
    )
    summary, run_dir = simulate(config, out=tmp_path / "flt", write_report=False)
    assert summary["status"] == "completed"
    record = RunDirectory(run_dir).read_metrics()[-1]
    # the sign-flipped updates point away from the root update: no trust
    assert record["fltrust/trusted"] <= 8 - 2
    attack = json.loads((run_dir / "attack.json").read_text())
    assert len(attack["malicious"]) == 2 and attack["kind"] == "sign_flip"
