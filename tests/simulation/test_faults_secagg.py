"""Injected dropouts, and secure aggregation inside a simulated round."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedshield.api import parse_config, simulate
from fedshield.errors import ConfigError
from fedshield.simulation import RunDirectory
from fedshield.simulation.secure import Faults, SecureAggregation

BASE = {
    "run": {"name": "sa", "rounds": 3, "seed": 5, "federated_eval": False},
    "data": {"dataset": "digits", "num_clients": 12},
    "model": {"kind": "logistic"},
    "client": {"lr": 0.1},
    "strategy": {"clients_per_round": 10},
}


def _config(**sections: dict[str, object]) -> object:
    data = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


def test_faults_draw_each_client_with_its_probability() -> None:
    faults = Faults(0.3)
    clients = [str(i) for i in range(20_000)]
    drops = faults.draw(clients, ("a", "b", "c"), seed=0, round_idx=0)
    assert abs(len(drops) / 20_000 - 0.3) < 5 * (0.21 / 20_000) ** 0.5
    counts = [sum(1 for s in drops.values() if s == x) for x in "abc"]
    assert max(counts) - min(counts) < 0.1 * len(drops)
    assert Faults(0.0).draw(clients, ("a",), seed=0, round_idx=0) == {}
    with pytest.raises(ConfigError, match="dropout"):
        Faults(1.0)


def test_a_clients_fate_does_not_depend_on_who_else_was_sampled() -> None:
    # Drawn by position in the sample, one client more (or fewer) would move
    # every later client's fate: under central DP one client's presence
    # would change the sum by more than its own clipped update.
    faults = Faults(0.3)
    stages = ("fit", "a", "b")
    others = [str(i) for i in range(1, 200, 3)]
    for round_idx in range(20):
        alone = faults.draw(others, stages, seed=4, round_idx=round_idx)
        for extra in (["0"], ["0", "2", "5"]):
            more = faults.draw(extra + others, stages, seed=4, round_idx=round_idx)
            assert {c: s for c, s in more.items() if c in others} == alone
        assert faults.draw(others[::-1], stages, seed=4, round_idx=round_idx) == alone
        assert alone != faults.draw(others, stages, seed=5, round_idx=round_idx)


def test_dropouts_without_secure_aggregation_are_recorded_and_survived(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    summary, run_dir = simulate(
        _config(faults={"dropout": 0.3}), out=tmp_path / "f", write_report=False
    )
    assert summary["status"] == "completed"
    records = RunDirectory(run_dir).read_metrics()
    dropped = [int(r["dropped/fit"]) for r in records]
    assert sum(dropped) > 0
    assert [r["num_clients"] for r in records] == [10 - d for d in dropped]
    failures = RunDirectory(run_dir)._read_jsonl("failures.jsonl")
    assert sum(1 for f in failures if f["kind"] == "dropped") == sum(dropped)


def test_thresholds_that_are_weak_or_too_high_are_refused() -> None:
    settings = SecureAggregation(threshold=0.5)
    with pytest.raises(ConfigError, match="exceed half"):
        settings.threshold_for(10)
    with pytest.raises(ConfigError, match="above the 10 clients"):
        SecureAggregation(threshold=11).threshold_for(10)
    assert SecureAggregation(threshold=2 / 3).threshold_for(10) == 7


def test_secure_aggregation_reaches_the_plain_runs_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    plain, plain_dir = simulate(_config(), out=tmp_path / "plain", write_report=False)
    secure, secure_dir = simulate(
        _config(secagg={"protocol": "secagg"}), out=tmp_path / "sa", write_report=False
    )
    a = RunDirectory(plain_dir).load_checkpoint().params
    b = RunDirectory(secure_dir).load_checkpoint().params
    # Only the fixed-point quantisation separates them (2^-24 per unit).
    np.testing.assert_allclose(b.flat, a.flat, atol=1e-5)
    assert abs(secure["accuracy"] - plain["accuracy"]) <= 0.01
    record = RunDirectory(secure_dir).read_metrics()[-1]
    assert record["secagg/aborted"] == 0.0
    assert record["secagg/survivors"] == 10.0
    assert record["secagg/out_of_range"] == 0.0


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_secure_aggregation_survives_dropouts_at_every_stage(
    protocol: str,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    config = _config(
        secagg={"protocol": protocol, "threshold": 0.6},
        faults={"dropout": 0.25},
        run={"rounds": 6},
    )
    summary, run_dir = simulate(config, out=tmp_path / protocol, write_report=False)
    assert summary["status"] == "completed"
    records = RunDirectory(run_dir).read_metrics()
    stages = {k for r in records for k in r if k.startswith("dropped/")}
    assert len(stages) >= 2  # drops happened at several stages
    for r in records:
        if r["secagg/aborted"] == 0.0:
            assert r["secagg/survivors"] >= r["secagg/threshold"]


def test_below_the_threshold_the_round_releases_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(
        secagg={"protocol": "secagg", "threshold": 1.0},  # every client needed
        faults={"dropout": 0.5},
        run={"rounds": 2},
    )
    summary, run_dir = simulate(config, out=tmp_path / "abort", write_report=False)
    directory = RunDirectory(run_dir)
    records = directory.read_metrics()
    assert all(r["secagg/aborted"] == 1.0 for r in records)
    assert all("needed" in r["secagg/abort_reason"] for r in records)
    # nothing was released: the model is still the initial one
    from fedshield.api.experiment import build_federation

    start = build_federation(config).model.init_params(5)  # type: ignore[arg-type]
    assert directory.load_checkpoint().params == start
    assert summary["rounds"] == 2


def test_secagg_with_an_incompatible_setup_is_refused() -> None:
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        _config(secagg={"protocol": "secagg"}, strategy={"name": "scaffold"})


def test_the_malicious_server_variant_runs_with_signed_messages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(
        secagg={"protocol": "secagg", "malicious": True},
        faults={"dropout": 0.1},
        run={"rounds": 2},
    )
    summary, run_dir = simulate(config, out=tmp_path / "m", write_report=False)
    assert summary["status"] == "completed"
    records = RunDirectory(run_dir).read_metrics()
    assert any(r["secagg/aborted"] == 0.0 for r in records)


def test_a_weak_threshold_is_refused_before_round_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(secagg={"protocol": "secagg", "threshold": 0.5})
    with pytest.raises(ConfigError, match="half"):
        simulate(config, out=tmp_path / "w", write_report=False)
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_central_dp_on_top_of_secure_aggregation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Clients clip, the protocol sums, the server noises the unmasked sum:
    # with noise ~0 it equals central DP without secure aggregation.
    privacy = {
        "mode": "central",
        "clip_norm": 0.05,
        "noise_multiplier": 1e-3,
        "accountant": "rdp",
        "sampling": "fixed",  # Poisson is refused with [secagg]
        "delta": 1e-3,
    }
    plain, plain_dir = simulate(
        _config(privacy=privacy), out=tmp_path / "dp", write_report=False
    )
    secure, secure_dir = simulate(
        _config(privacy=privacy, secagg={"protocol": "secagg"}),
        out=tmp_path / "dp-sa",
        write_report=False,
    )
    a = RunDirectory(plain_dir).load_checkpoint().params
    b = RunDirectory(secure_dir).load_checkpoint().params
    assert secure["epsilon"] == plain["epsilon"] > 0
    np.testing.assert_allclose(b.flat, a.flat, atol=2e-4)
    record = RunDirectory(secure_dir).read_metrics()[-1]
    assert record["secagg/aborted"] == 0.0 and record["dp/noise_std"] > 0


def test_training_metrics_come_out_of_the_secure_sum(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, plain_dir = simulate(_config(), out=tmp_path / "p", write_report=False)
    _, secure_dir = simulate(
        _config(secagg={"protocol": "secagg+"}), out=tmp_path / "s", write_report=False
    )
    for a, b in zip(
        RunDirectory(plain_dir).read_metrics(),
        RunDirectory(secure_dir).read_metrics(),
        strict=True,
    ):
        # Learned only as weighted sums, to the encoding's precision.
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-3)
        assert b["train_accuracy"] == pytest.approx(a["train_accuracy"], abs=1e-5)
        assert b["secagg/out_of_range"] == 0.0


def test_a_small_clip_norm_does_not_clip_the_extra_words(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Central DP with adaptive clipping: the unclipped count rides in the sum;
    # with clip_norm < 1 it once got clipped to clip_norm (and counted).
    privacy = {
        "mode": "central",
        "clip_norm": 0.5,
        "noise_multiplier": 1e-3,
        "accountant": "rdp",
        "sampling": "fixed",
        "delta": 1e-3,
        "adaptive_clipping": True,
        "clipped_count_stddev": 1e-2,
    }
    slow = {"lr": 0.001}  # small updates: most are within the clip norm
    _, plain_dir = simulate(
        _config(privacy=privacy, client=slow), out=tmp_path / "dp", write_report=False
    )
    _, secure_dir = simulate(
        _config(privacy=privacy, client=slow, secagg={"protocol": "secagg"}),
        out=tmp_path / "dp-sa",
        write_report=False,
    )
    plain = RunDirectory(plain_dir).read_metrics()
    secure = RunDirectory(secure_dir).read_metrics()
    for a, b in zip(plain, secure, strict=True):
        # Central DP writes no un-noised counts (see DpFedAvg.released).
        assert "secagg/out_of_range" not in b
        assert b["dp/unclipped_fraction"] == pytest.approx(
            a["dp/unclipped_fraction"], abs=0.05
        )


def test_secure_sum_reports_the_weighted_training_metrics() -> None:
    from fedshield.core import ClientUpdate, Params, ParamSpec
    from fedshield.simulation.secure import secure_sum

    spec = ParamSpec((("w", (4,)),))
    rows = [(10, 2.0, 0.5), (30, 1.0, 0.9), (20, 50.0, 0.1)]
    updates = {
        f"c{i}": ClientUpdate(
            f"c{i}",
            Params.from_flat(np.full(4, 0.01, dtype=np.float32), spec),
            n,
            metrics={"loss": loss, "accuracy": acc},
        )
        for i, (n, loss, acc) in enumerate(rows)
    }
    result = secure_sum(
        updates,
        settings=SecureAggregation(protocol="secagg", clip=0.1),
        spec=spec,
        round_idx=0,
        max_examples=30,
        drop_at={},
        rng=np.random.default_rng(0),
    )
    total = sum(n for n, _, _ in rows)
    assert result.metrics["train_loss"] == pytest.approx(
        sum(n * loss for n, loss, _ in rows) / total, rel=1e-4
    )
    assert result.metrics["train_accuracy"] == pytest.approx(
        sum(n * acc for n, _, acc in rows) / total, abs=1e-5
    )
    # clip 0.1 < 1: the weights are scaled into range, not clipped.
    assert result.metrics["secagg/out_of_range"] == 0.0
    assert result.aggregate is not None
    np.testing.assert_allclose(result.aggregate.delta.flat, 0.01, atol=1e-6)


@pytest.mark.parametrize("precision_bits", [8, 24])
def test_out_of_range_counts_do_not_saturate(precision_bits: int) -> None:
    # Review item 16: the count word once saturated at 2^precision_bits (1,000
    # clipped values were reported as 256 at 8 bits).
    from fedshield.core import ClientUpdate, Params, ParamSpec
    from fedshield.simulation.secure import secure_sum

    spec = ParamSpec((("w", (1000,)),))
    clipped = {"c0": 1000, "c1": 700, "c2": 3}
    updates = {}
    for cid, count in clipped.items():
        delta = np.zeros(1000, dtype=np.float32)
        delta[:count] = 5.0  # outside [-clip, clip] = [-1, 1]
        updates[cid] = ClientUpdate(cid, Params.from_flat(delta, spec), 10)
    result = secure_sum(
        updates,
        settings=SecureAggregation(protocol="secagg", precision_bits=precision_bits),
        spec=spec,
        round_idx=0,
        max_examples=10,
        drop_at={},
        rng=np.random.default_rng(16),
    )
    reported = result.metrics["secagg/out_of_range"]
    if precision_bits == 24:  # 1006 words <= 2^24: one unit per value, exact
        assert reported == sum(clipped.values())
    else:  # one unit per ceil(1006 / 2^8) = 4 values, each count rounded to it
        assert reported % 4 == 0
        assert abs(reported - sum(clipped.values())) < 4 * len(clipped)


def test_explicit_neighbours_below_the_secure_minimum_are_refused_by_the_config() -> (
    None
):
    # Review item 14: 10 clients a round need k >= 9 for sigma = 40.
    with pytest.raises(
        ConfigError,
        match=r"secagg\.neighbours: secagg\+ neighbours=3 is below 9.*"
        r"\[secagg\] allow_insecure_neighbours = true",
    ):
        _config(secagg={"protocol": "secagg+", "neighbours": 3})
    # Named explicitly, the risk is accepted (and reaches the protocol).
    from fedshield.api.experiment import secure_settings

    config = _config(
        secagg={
            "protocol": "secagg+",
            "neighbours": 3,
            "allow_insecure_neighbours": True,
        }
    )
    settings = secure_settings(config)  # type: ignore[arg-type]
    assert settings is not None and settings.allow_insecure_neighbours
    assert settings.protocol_config(10, 20, 4).neighbour_count(10) == 3
    with pytest.raises(ConfigError, match="below 9"):
        SecureAggregation(protocol="secagg+", neighbours=3).protocol_config(
            10, 20, 4
        ).neighbour_count(10)
    with pytest.raises(ConfigError, match="applies only to"):
        _config(secagg={"protocol": "secagg", "allow_insecure_neighbours": True})


def test_malicious_mode_defaults_to_a_threshold_above_two_thirds() -> None:
    # Bonawitz et al. §6: t > 2n/3, so that fewer than n/3 colluding clients
    # are tolerated (n_C < 2t - n). At n = 9 the semi-honest default 2/3
    # gives t = 6 = 2n/3; malicious mode gets 7.
    from fedshield.api.experiment import secure_settings

    assert SecureAggregation().threshold_for(9) == 6
    assert SecureAggregation(malicious=True).threshold_for(9) == 7
    assert SecureAggregation(malicious=True).threshold_for(10) == 7
    assert SecureAggregation(threshold=2 / 3, malicious=True).threshold_for(9) == 6
    for malicious, expected in ((False, 6), (True, 7)):
        config = _config(secagg={"protocol": "secagg", "malicious": malicious})
        settings = secure_settings(config)  # type: ignore[arg-type]
        assert settings is not None and settings.threshold_for(9) == expected
        config_t = settings.protocol_config(9, 20, 4)
        assert config_t.colluders_tolerated(9) == 2 * expected - 9 - 1


def test_a_malicious_threshold_that_tolerates_no_colluder_is_warned_about(
    caplog,  # type: ignore[no-untyped-def]
) -> None:
    # t = 6 of n = 11: 2t - n = 1, so one client colluding with the server
    # is enough to unmask another (tests/secagg/test_protocol_attacks.py).
    with caplog.at_level("WARNING", logger="fedshield.simulation.secure"):
        SecureAggregation(threshold=6, malicious=True).check(11, 8)
    assert "colluding with a single client" in caplog.text
    assert "leave it unset for 8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedshield.simulation.secure"):
        SecureAggregation(malicious=True).check(11, 8)  # t = 8: 2t - n = 5
        SecureAggregation(threshold=6).check(11, 8)  # semi-honest
    assert caplog.text == ""
