"""fs.fedavg with the TOML sections: DP, SecAgg and robust rules from Python."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield.api.config import PrivacySection, StrategySection
from fedshield.errors import ConfigError


def _model() -> torch.nn.Module:
    return torch.nn.Linear(4, 2)


def _clients(n: int = 6, rows: int = 20, seed: int = 0) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(n):
        x = rng.normal(size=(rows, 4)).astype(np.float32)
        out[f"c{k}"] = (x, (x[:, 0] > 0).astype(np.int64))
    return out


CENTRAL = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.2}


def test_central_dp_reports_the_accountants_epsilon_each_round():
    process = fs.fedavg(_model, privacy=CENTRAL)
    state = process.initialize()
    data = _clients()
    for _ in range(3):
        state, metrics = process.next(state, data)
    # Every client every round (fraction 1, Poisson at rate 1): three
    # Gaussian releases of sensitivity C at noise σC, add-or-remove.
    # Reference from dp-accounting directly (not through fedshield).
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.2)),
        3,
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    rdp_eps = accountant.get_epsilon(1e-5)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(event)
    expected = pld.get_epsilon(1e-5)
    assert math.isclose(metrics["epsilon"], expected, rel_tol=0.02)
    assert metrics["epsilon"] < rdp_eps
    assert metrics["delta"] == 1e-5
    # Under DP the clients' unnoised training metrics do not leave the round,
    # nor (central mode) who was sampled: no counts, no failures list.
    assert "train_loss" not in metrics and "train_accuracy" not in metrics
    assert "num_clients" not in metrics and "failures" not in metrics


def test_the_dp_round_adds_noise_of_the_configured_scale():
    data = _clients()
    plain = fs.fedavg(_model, lr=0.1)
    private = fs.fedavg(_model, lr=0.1, privacy={**CENTRAL, "clip_norm": 100.0})
    s0 = plain.initialize()
    a, _ = plain.next(s0, data)
    b, _ = private.next(private.initialize(), data)
    # Clip 100 never binds: the difference is the noise σC/n per coordinate.
    gap = (b.params.flat - a.params.flat).std()
    assert 100 * 1.2 / 6 * 0.3 < gap < 100 * 1.2 / 6 * 3


def test_typed_sections_are_accepted_like_dicts():
    process = fs.fedavg(
        _model,
        privacy=PrivacySection(**CENTRAL),
        strategy=StrategySection(fraction=0.5),
    )
    _, metrics = process.next(process.initialize(), _clients())
    assert metrics["epsilon"] > 0


def test_bad_keys_get_the_schemas_messages():
    with pytest.raises(ConfigError, match=r"privacy\.clip_nrom: unknown key"):
        fs.fedavg(_model, privacy={"mode": "central", "clip_nrom": 1.0})
    with pytest.raises(ConfigError, match="needs clip_norm"):
        fs.fedavg(_model, privacy={"mode": "central", "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="must be a dict"):
        fs.fedavg(_model, robust=["median"])  # type: ignore[arg-type]


def test_the_population_is_fixed_under_privacy():
    process = fs.fedavg(_model, privacy=CENTRAL)
    state, _ = process.next(process.initialize(), _clients(6))
    with pytest.raises(ConfigError, match="same clients"):
        process.next(state, _clients(4))


def test_secagg_round_equals_the_clear_round_up_to_quantisation():
    data = _clients()
    clear = fs.fedavg(_model, lr=0.1)
    secure = fs.fedavg(_model, lr=0.1, secagg={"protocol": "secagg"})
    a, _ = clear.next(clear.initialize(), data)
    b, metrics = secure.next(secure.initialize(), data)
    assert np.allclose(a.params.flat, b.params.flat, atol=1e-4)
    assert metrics["secagg/aborted"] == 0.0


def test_secagg_plus_with_central_dp():
    process = fs.fedavg(
        _model,
        privacy={**CENTRAL, "sampling": "fixed", "accountant": "rdp"},
        secagg={"protocol": "secagg+"},
    )
    _, metrics = process.next(process.initialize(), _clients(8))
    assert metrics["epsilon"] > 0 and "dp/noise_std" in metrics


def test_a_robust_rule_resists_an_outlier_client():
    data = _clients(7)
    x, y = data["c0"]
    data["c0"] = (x * 1e4, y)  # one client's data blows its update up
    mean = fs.fedavg(_model, lr=0.1)
    median = fs.fedavg(_model, lr=0.1, robust={"rule": "median"})
    a, _ = mean.next(mean.initialize(), data)
    b, _ = median.next(median.initialize(), data)
    s0 = mean.initialize().params.flat
    assert np.linalg.norm(b.params.flat - s0) < 0.1 * np.linalg.norm(a.params.flat - s0)


def test_fltrust_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="root data set"):
        fs.fedavg(_model, robust={"rule": "fltrust"})


def test_regression_task_reports_rmse():
    rng = np.random.default_rng(1)
    data = {}
    for k in range(3):
        x = rng.normal(size=(30, 4)).astype(np.float32)
        data[str(k)] = (x, (x @ np.array([1, -2, 0.5, 0], np.float32)))
    process = fs.fedavg(lambda: torch.nn.Linear(4, 1), task="regression", lr=0.1)
    state = process.initialize()
    for _ in range(15):
        state, metrics = process.next(state, data)
    assert "train_rmse" in metrics or "train_loss" in metrics
    x, y = data["0"]
    result = process.evaluate(state, x, y)
    assert result["rmse"] < 0.5 and "accuracy" not in result


def _record(privacy_extra=None):
    return {
        "mode": "record",
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        **(privacy_extra or {}),
    }


def test_record_mode_refuses_clients_whose_data_changed_size():
    # The review's attack: 2,000 rows in round 1, then 20, accounted at the
    # first round's sampling rate (batch / 2,000) instead of batch / 20.
    process = fs.fedavg(_model, batch_size=10, privacy=_record())
    state, _ = process.next(process.initialize(), _clients(2, rows=200))
    with pytest.raises(ConfigError, match="has 20 records this round but had 200"):
        process.next(state, _clients(2, rows=20))


def test_a_state_of_a_process_with_other_noise_cannot_continue():
    weak = fs.fedavg(_model, privacy={**CENTRAL, "mode": "local"})
    state, _ = weak.next(weak.initialize(), _clients())
    strong = fs.fedavg(
        _model, privacy={**CENTRAL, "mode": "local", "noise_multiplier": 50.0}
    )
    with pytest.raises(ConfigError, match="noise_multiplier"):
        strong.next(state, _clients())


@pytest.mark.parametrize("mode", ["central", "local"])
def test_replaying_an_old_state_is_refused(mode):
    process = fs.fedavg(_model, privacy={**CENTRAL, "mode": mode})
    s0 = process.initialize()
    s1, first = process.next(s0, _clients())
    _, second = process.next(s1, _clients())
    assert second["epsilon"] > first["epsilon"]
    for old in (s0, s1):  # each was charged: continuing from it under-reports
        with pytest.raises(ConfigError, match="older than the last round"):
            process.next(old, _clients())


def test_a_failed_round_is_charged_and_its_state_must_be_continued():
    from fedshield.errors import RoundFailedError

    data = _clients(4)
    x, _ = data["c3"]
    data["c3"] = (x, np.full(len(x), 7))  # a label the model has no logit for
    process = fs.fedavg(_model, min_clients=4, privacy={**CENTRAL, "mode": "local"})
    s0 = process.initialize()
    with pytest.raises(RoundFailedError) as failed:
        process.next(s0, data)
    spent = failed.value.state.metadata["privacy"]["epsilon"]
    assert spent > 0  # three clients sent noised updates: charged
    with pytest.raises(ConfigError, match="older than the last round"):
        process.next(s0, data)  # the retry pattern that dropped the charge


@pytest.mark.parametrize("mode", ["record", "local"])
def test_client_enforced_dp_takes_only_arrays(mode):
    from fedshield.core import ClientUpdate

    class Liar:
        client_id = "liar"
        num_train_examples = 10

        def fit(self, params, config, rng):
            return ClientUpdate(params.like(np.full(params.size, 0.5)), 10, {})

        def evaluate(self, params, config):
            return {}

    process = fs.fedavg(_model, privacy={**CENTRAL, "mode": mode})
    with pytest.raises(ConfigError, match=r"must be \(x, y\) arrays"):
        process.next(process.initialize(), {"liar": Liar(), **_clients(3)})


def test_keys_equal_as_strings_are_one_client_and_refused():
    data = _clients(2)
    with pytest.raises(ConfigError, match="same client"):
        fs.fedavg(_model).next(
            fs.fedavg(_model).initialize(), {1: data["c0"], "1": data["c1"]}
        )


def test_secagg_checks_run_without_privacy_too():
    process = fs.fedavg(_model, secagg={"protocol": "secagg+", "neighbours": 2})
    with pytest.raises(ConfigError, match="neighbours"):
        process.next(process.initialize(), _clients(12))


# The second review: lineages across processes -------------------------------


def test_a_new_process_cannot_replay_an_old_state_of_a_lineage():
    first = fs.fedavg(_model, privacy={**CENTRAL, "mode": "local"})
    s1, _ = first.next(first.initialize(), _clients())
    first.next(s1, _clients())  # s1 is now behind its lineage
    other = fs.fedavg(_model, privacy={**CENTRAL, "mode": "local"})
    with pytest.raises(ConfigError, match="older than the last round"):
        other.next(s1, _clients())


def test_record_accounting_facts_cannot_change_in_a_new_process():
    a = fs.fedavg(_model, batch_size=10, epochs=2, privacy=_record())
    state, _ = a.next(a.initialize(), _clients(3, rows=100))
    fewer_epochs = fs.fedavg(_model, batch_size=10, epochs=1, privacy=_record())
    with pytest.raises(ConfigError, match="accounted with epochs = 2"):
        fewer_epochs.next(state, _clients(3, rows=100))
    more_rows = fs.fedavg(_model, batch_size=10, epochs=2, privacy=_record())
    with pytest.raises(ConfigError, match="accounted with sizes"):
        more_rows.next(state, _clients(3, rows=1000))


def test_rounds_run_outside_the_dp_process_are_refused():
    private = fs.fedavg(_model, privacy=CENTRAL)
    state, _ = private.next(private.initialize(), _clients())
    plain = fs.fedavg(_model)
    for _ in range(2):
        state, _ = plain.next(state, _clients())  # no noise, no accounting
    with pytest.raises(ConfigError, match="rounds ran outside the DP process"):
        private.next(state, _clients())


def test_noise_is_not_seeded_by_default_in_the_python_api():
    data = _clients()
    a = fs.fedavg(_model, privacy=CENTRAL, seed=0)
    b = fs.fedavg(_model, privacy=CENTRAL, seed=0)
    sa, _ = a.next(a.initialize(), data)
    sb, _ = b.next(b.initialize(), data)
    # Seeded noise would be identical, and cancel in a difference of releases.
    assert not np.allclose(sa.params.flat, sb.params.flat)
    seeded = {**CENTRAL, "secure_rng": False}
    c = fs.fedavg(_model, privacy=seeded, seed=0)
    d = fs.fedavg(_model, privacy=seeded, seed=0)
    sc, _ = c.next(c.initialize(), data)
    sd, _ = d.next(d.initialize(), data)
    assert np.array_equal(sc.params.flat, sd.params.flat)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_failed_central_round_names_no_client():
    from fedshield.errors import RoundFailedError

    data = _clients(4)
    x, _ = data["c2"]
    data["c2"] = (x, np.full(len(x), 9))
    process = fs.fedavg(_model, server_lr=1e300, privacy=CENTRAL)
    with pytest.raises(RoundFailedError) as failed:
        process.next(process.initialize(), data)
    assert "c2" not in str(failed.value)
