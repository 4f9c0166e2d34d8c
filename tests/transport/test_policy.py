"""A site's policy: loaded strictly, and refusing what its operator refuses.

The site's own ε must be what the server's accountant reports for the same
plan: each agreement test runs the simulator on a tiny plan and compares.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pytest

from fedshield.api import parse_config, simulate
from fedshield.errors import ConfigError, ConfigFileError
from fedshield.transport.policy import PolicyRefusal, SiteGuard, SitePolicy

EXAMPLE = Path(__file__).parents[2] / "examples" / "network" / "policy.toml"
SITES = ["a", "b", "c", "d"]
CENTRAL = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}


def _plan(**sections: dict[str, Any]) -> dict[str, Any]:
    """An announced plan: a validated configuration without ``[data]``."""
    data: dict[str, Any] = {
        "run": {"name": "pol", "rounds": 10, "seed": 1},
        "data": {"dataset": "digits", "num_clients": 4, "min_samples": 1},
        "model": {"kind": "mlp"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    announced = parse_config(data).to_dict()
    announced.pop("data")
    return announced


def _guard(policy: SitePolicy, **sections: dict[str, Any]) -> SiteGuard:
    return SiteGuard(policy, _plan(**sections), SITES)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


# --- loading ---------------------------------------------------------------------


def test_the_example_policy_loads() -> None:
    policy = SitePolicy.load(EXAMPLE)
    assert policy == SitePolicy(
        max_epsilon=10,
        max_delta=1e-5,
        require_secagg=True,
        require_dp=True,
        min_clients=3,
        models=("mlp",),
        metrics=("loss", "accuracy", "num_examples"),
    )


def test_an_empty_policy_constrains_nothing(tmp_path: Path) -> None:
    assert SitePolicy.load(_write(tmp_path, "[policy]\n")) == SitePolicy()


def test_a_misspelt_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, "[policy]\nmax_epsilom = 3\n")
    with pytest.raises(ConfigError) as info:
        SitePolicy.load(path)
    message = str(info.value)
    assert str(path) in message and "max_epsilom" in message
    assert "did you mean 'max_epsilon'?" in message


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('max_epsilon = "8"', "max_epsilon"),
        ("max_epsilon = -1", "max_epsilon"),
        ("max_delta = 1.5", "max_delta"),
        ('require_secagg = "yes"', "require_secagg"),
        ("min_clients = 2.5", "min_clients"),
        ("min_clients = 0", "min_clients"),
        ('models = "mlp"', "models"),
        ('models = ["python"]', "models"),
        ('models = ["sha256:abc"]', "models"),
        ("metrics = [1, 2]", "metrics"),
    ],
)
def test_a_wrong_type_or_range_is_refused(tmp_path: Path, line: str, key: str) -> None:
    path = _write(tmp_path, f"[policy]\n{line}\n")
    with pytest.raises(ConfigError, match=f"policy.{key}") as info:
        SitePolicy.load(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="not found"):
        SitePolicy.load(tmp_path / "nowhere.toml")


def test_a_file_without_the_policy_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'policy'"):
        SitePolicy.load(_write(tmp_path, "[polcy]\nmax_epsilon = 1\n"))


# --- refusals at join ----------------------------------------------------------------


def test_a_model_not_allowed_is_refused() -> None:
    guard = _guard(SitePolicy(models=("logistic",)), model={"kind": "mlp"})
    with pytest.raises(PolicyRefusal, match="model 'mlp' is not in") as info:
        guard.check_run()
    assert info.value.exit_code == 43
    _guard(SitePolicy(models=("logistic", "mlp"))).check_run()


def test_a_python_model_must_match_the_sites_own_factory(tmp_path: Path) -> None:
    source = b"def build():\n    return None\n"
    factory = tmp_path / "model.py"
    factory.write_bytes(source)
    plan = _plan(model={"kind": "python", "factory": f"{factory}:build"})
    allowed = SitePolicy(models=("sha256:" + hashlib.sha256(source).hexdigest(),))
    SiteGuard(allowed, plan, SITES, factory_source=source).check_run()
    other = SiteGuard(allowed, plan, SITES, factory_source=source + b"# changed\n")
    with pytest.raises(PolicyRefusal, match="factory file"):
        other.check_run()
    with pytest.raises(PolicyRefusal, match="holds no factory file"):
        SiteGuard(allowed, plan, SITES).check_run()
    # A built-in kind allows no Python factory.
    with pytest.raises(PolicyRefusal):
        SiteGuard(
            SitePolicy(models=("mlp",)), plan, SITES, factory_source=source
        ).check_run()


def test_secure_aggregation_can_be_required() -> None:
    policy = SitePolicy(require_secagg=True)
    with pytest.raises(PolicyRefusal, match="no secure aggregation"):
        _guard(policy).check_run()
    _guard(policy, secagg={"protocol": "secagg"}).check_run()


def test_differential_privacy_can_be_required() -> None:
    policy = SitePolicy(require_dp=True)
    with pytest.raises(PolicyRefusal, match="no differential privacy"):
        _guard(policy).check_run()
    _guard(policy, privacy=CENTRAL).check_run()


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [({"fraction": 0.5}, 2), ({"clients_per_round": 3}, 3), ({}, 4)],
)
def test_min_clients_counts_the_expected_round(
    strategy: dict[str, Any], expected: int
) -> None:
    guard = _guard(SitePolicy(min_clients=3), strategy=strategy)
    assert guard.expected_clients() == expected
    if expected < 3:
        with pytest.raises(PolicyRefusal, match=f"expects {expected} clients"):
            guard.check_run()
    else:
        guard.check_run()


def test_min_clients_counts_the_secagg_threshold() -> None:
    # Four clients a round; a threshold of 0.6 unmasks the sum of 3.
    policy = SitePolicy(min_clients=4)
    guard = _guard(policy, secagg={"protocol": "secagg", "threshold": 0.6})
    assert guard.secagg_threshold() == 3
    with pytest.raises(PolicyRefusal, match="sum of 3 clients"):
        guard.check_run()
    _guard(SitePolicy(min_clients=3), secagg={"protocol": "secagg"}).check_run()


def test_delta_above_the_cap_is_refused() -> None:
    with pytest.raises(PolicyRefusal, match=r"delta = 0\.001 is above"):
        _guard(SitePolicy(max_delta=1e-4), privacy=CENTRAL).check_run()
    _guard(SitePolicy(max_delta=1e-3), privacy=CENTRAL).check_run()
    with pytest.raises(PolicyRefusal, match="no delta"):
        _guard(SitePolicy(max_delta=1e-3)).check_run()


def test_a_malformed_plan_is_refused() -> None:
    plan = _plan(privacy=CENTRAL)
    plan["privacy"]["noise_multiplier"] = "1.0"
    with pytest.raises(PolicyRefusal, match=r"privacy\.noise_multiplier"):
        SiteGuard(SitePolicy(), plan, SITES)
    plan = _plan(privacy=CENTRAL)
    plan["run"]["rounds"] = True
    with pytest.raises(PolicyRefusal, match=r"run\.rounds"):
        SiteGuard(SitePolicy(), plan, SITES)
    with pytest.raises(PolicyRefusal, match="names a site twice"):
        SiteGuard(SitePolicy(), _plan(), ["a", "a"])


def test_the_sites_must_match_the_plans_network() -> None:
    plan = _plan()
    plan["network"] = {"sites": ["a", "b", "c"]}
    with pytest.raises(PolicyRefusal, match=r"network\.sites"):
        SiteGuard(SitePolicy(), plan, SITES)
    plan["network"] = {"sites": ["d", "c", "b", "a"]}
    SiteGuard(SitePolicy(), plan, SITES).check_run()


# --- the ε cap, before each task ----------------------------------------------------


def test_the_epsilon_cap_refuses_from_the_first_round_above_it() -> None:
    probe = _guard(SitePolicy(), privacy=CENTRAL)
    eps = [probe.epsilon_after(r) for r in range(1, 11)]
    assert eps == sorted(eps) and eps[0] > 0
    # A cap between the 6th and the 7th round's ε.
    cap = (eps[5] + eps[6]) / 2
    guard = _guard(SitePolicy(max_epsilon=cap), privacy=CENTRAL)
    guard.check_run()
    for round_idx in range(6):
        guard.check_task(round_idx, "fit")
    with pytest.raises(PolicyRefusal, match="epsilon after round 7 would be") as info:
        guard.check_task(6, "fit")
    assert f"max_epsilon = {cap:g}" in info.value.reason
    with pytest.raises(PolicyRefusal):
        guard.check_task(7, "evaluate")


def test_a_plan_without_dp_has_infinite_epsilon() -> None:
    guard = _guard(SitePolicy(max_epsilon=100.0))
    assert guard.epsilon_after(1) == math.inf
    guard.check_run()  # refused per task, not at join
    with pytest.raises(PolicyRefusal, match="epsilon is infinite"):
        guard.check_task(0, "fit")
    _guard(SitePolicy()).check_task(0, "fit")


def test_a_task_beyond_the_plans_rounds_is_refused() -> None:
    guard = _guard(SitePolicy(), run={"rounds": 3})
    guard.check_task(2, "fit")
    with pytest.raises(PolicyRefusal, match="round 4 is beyond the plan's 3 rounds"):
        guard.check_task(3, "fit")


def test_check_task_reruns_the_static_checks() -> None:
    guard = _guard(SitePolicy(require_secagg=True))
    with pytest.raises(PolicyRefusal, match="no secure aggregation"):
        guard.check_task(0, "fit")


def test_target_epsilon_is_calibrated_as_the_server_does() -> None:
    privacy = {"mode": "central", "clip_norm": 1.0, "target_epsilon": 4.0}
    guard = _guard(SitePolicy(), privacy=privacy, strategy={"fraction": 0.5})
    assert guard.epsilon_after(10) == pytest.approx(4.0, rel=1e-2)
    assert guard.epsilon_after(10) <= 4.0


# --- metrics ----------------------------------------------------------------------


def test_only_the_allowed_metrics_leave_the_site() -> None:
    metrics = {"loss": 0.5, "accuracy": 0.9, "num_examples": 12.0, "secret": 1.0}
    allowed = _guard(SitePolicy(metrics=("loss", "num_examples")))
    assert allowed.filter_metrics(metrics) == {"loss": 0.5, "num_examples": 12.0}
    assert _guard(SitePolicy(metrics=())).filter_metrics(metrics) == {}
    assert _guard(SitePolicy()).filter_metrics(metrics) == metrics


def test_describe_is_one_line() -> None:
    line = _guard(SitePolicy.load(EXAMPLE), privacy=CENTRAL).describe()
    assert "\n" not in line and "max_epsilon=10" in line and "privacy central" in line


# --- agreement with the server's accountant ------------------------------------


def _simulated(tmp_path: Path, **sections: dict[str, Any]) -> tuple[float, Any]:
    data: dict[str, Any] = {
        "run": {"name": "agree", "rounds": 3, "seed": 1, "report": False},
        "data": {"dataset": "digits", "num_clients": 4, "min_samples": 1},
        "model": {"kind": "logistic"},
        **sections,
    }
    config = parse_config(data)
    summary, _ = simulate(config, out=tmp_path / "run", write_report=False)
    assert summary["status"] == "completed"
    return float(summary["epsilon"]), config


def _announced(config: Any) -> dict[str, Any]:
    plan = config.to_dict()
    plan.pop("data")
    return dict(plan)


def test_central_epsilon_agrees_with_the_simulator(tmp_path: Path) -> None:
    reported, config = _simulated(tmp_path, strategy={"fraction": 0.5}, privacy=CENTRAL)
    guard = SiteGuard(SitePolicy(), _announced(config), SITES)
    assert guard.epsilon_after(3) == pytest.approx(reported, rel=1e-6)
    assert guard.epsilon_after(2) < reported


def test_local_epsilon_agrees_with_the_simulator(tmp_path: Path) -> None:
    # Every client takes part in every round: the site's worst case is the run's.
    privacy = {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 3.0}
    reported, config = _simulated(
        tmp_path, strategy={"clients_per_round": 4}, privacy=privacy
    )
    guard = SiteGuard(SitePolicy(), _announced(config), SITES)
    assert guard.epsilon_after(3) == pytest.approx(reported, rel=1e-6)


def test_record_epsilon_agrees_with_the_simulator(tmp_path: Path) -> None:
    from fedshield.api.experiment import build_federation

    privacy = {"mode": "record", "clip_norm": 1.0, "noise_multiplier": 1.5}
    reported, config = _simulated(
        tmp_path,
        client={"batch_size": 64},
        strategy={"clients_per_round": 4},
        privacy={**privacy, "delta": 1e-4},
    )
    sizes = build_federation(config).train_sizes()
    guards = [
        SiteGuard(SitePolicy(), _announced(config), SITES, num_records=n)
        for n in sizes.values()
    ]
    # The server reports the largest of the clients' own ε.
    own = max(g.epsilon_after(3) for g in guards)
    assert own == pytest.approx(reported, rel=1e-6)


def test_distributed_epsilon_bounds_the_simulators(tmp_path: Path) -> None:
    from fedshield.api.experiment import build_federation

    privacy = {"mode": "distributed", "clip_norm": 1.0, "noise_multiplier": 1.0}
    reported, config = _simulated(
        tmp_path,
        strategy={"clients_per_round": 4},
        secagg={"protocol": "secagg"},
        privacy={**privacy, "delta": 1e-3},
    )
    dimension = build_federation(config).model.spec.size
    guard = SiteGuard(SitePolicy(), _announced(config), SITES, dimension=dimension)
    # Every release a round could make is charged: never below the report.
    assert reported <= guard.epsilon_after(3) < 2 * reported
    # Without the model's dimension the site cannot account: refused.
    blind = SiteGuard(SitePolicy(max_epsilon=1e6), _announced(config), SITES)
    assert blind.epsilon_after(3) == math.inf
    with pytest.raises(PolicyRefusal, match="unknown"):
        blind.check_task(0, "fit")


def test_record_mode_needs_the_sites_size() -> None:
    privacy = {"mode": "record", "clip_norm": 1.0, "noise_multiplier": 1.5}
    with pytest.raises(ValueError, match="num_records"):
        _guard(SitePolicy(max_epsilon=5.0), privacy={**privacy, "delta": 1e-4})
