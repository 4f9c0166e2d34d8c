"""Distributed DP (``[privacy] mode = "distributed"``) through simulated rounds."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedshield.api import parse_config, simulate
from fedshield.errors import ConfigError
from fedshield.simulation import RunDirectory

BASE = {
    "run": {"name": "ddp", "rounds": 4, "seed": 3, "federated_eval": False},
    "data": {"dataset": "digits", "num_clients": 12},
    "model": {"kind": "logistic"},
    "client": {"lr": 0.1},
    "strategy": {"clients_per_round": 12},
    "secagg": {"protocol": "secagg+"},
}
DDP = {
    "mode": "distributed",
    "clip_norm": 0.5,
    "noise_multiplier": 1.0,
    "delta": 1e-3,
    "accountant": "rdp",
}


def _config(**sections: dict[str, object]) -> object:
    data = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


def test_epsilon_composes_each_rounds_survivors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(privacy=DDP, faults={"dropout": 0.15}, run={"rounds": 5})
    summary, run_dir = simulate(config, out=tmp_path / "d", write_report=False)
    assert summary["status"] == "completed"
    records = RunDirectory(run_dir).read_metrics()
    done = [r for r in records if r.get("secagg/aborted") == 0.0]
    assert len({r["secagg/survivors"] for r in done}) >= 2  # dropouts varied it
    # Every client is sampled each round (rate 1), so every client's epsilon is
    # the composition of all completed rounds. With thousands of integer units
    # of noise per client, tau is ~0 and each round is the Gaussian mechanism of
    # multiplier sqrt(survivors) * sigma / sensitivity: dp-accounting's numbers.
    reference = rdp.RdpAccountant()
    for r in done:
        assert r["ddp/noise_std"] > 100 and r["ddp/near_wrap"] == 0.0
        multiplier = (
            math.sqrt(r["secagg/survivors"])
            * r["ddp/noise_std"]
            / r["ddp/l2_sensitivity"]
        )
        reference.compose(dp_accounting.GaussianDpEvent(multiplier))
    assert summary["epsilon"] == pytest.approx(reference.get_epsilon(1e-3), rel=1e-6)
    # The summed noise is at least central DP's z C whenever a round completes.
    assert all(r["ddp/summed_noise_std"] >= 1.0 * 0.5 - 1e-12 for r in done)


def test_with_little_noise_it_reaches_central_dps_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    quiet = {**DDP, "noise_multiplier": 1e-3}
    central, central_dir = simulate(
        _config(privacy={**quiet, "mode": "central"}, secagg={"protocol": "none"}),
        out=tmp_path / "c",
        write_report=False,
    )
    distributed, distributed_dir = simulate(
        _config(privacy=quiet), out=tmp_path / "d", write_report=False
    )
    a = RunDirectory(central_dir).load_checkpoint().params
    b = RunDirectory(distributed_dir).load_checkpoint().params
    # Same clipping, same mean over 12 clients; only the (tiny) noise, the
    # rounding and the rotation's float error separate them.
    np.testing.assert_allclose(b.flat, a.flat, atol=5e-3)
    assert abs(distributed["accuracy"] - central["accuracy"]) <= 0.01
    assert distributed["epsilon"] > 0 and central["epsilon"] > 0


def test_the_budget_stops_the_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(privacy={**DDP, "target_epsilon": 4.0}, run={"rounds": 50})
    summary, _ = simulate(config, out=tmp_path / "b", write_report=False)
    assert summary["status"] == "budget_exhausted"
    assert 0 < summary["epsilon"] <= 4.0
    assert 1 <= summary["rounds"] < 50


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"privacy": DDP, "secagg": {"protocol": "none"}}, "secure aggregation"),
        (
            {"privacy": DDP, "robust": {"rule": "norm_bound", "max_norm": 1.0}},
            "already clip",
        ),
        (
            {"privacy": {k: v for k, v in DDP.items() if k != "noise_multiplier"}},
            "noise_multiplier",
        ),
        ({"privacy": {**DDP, "distributed_bits": 70}}, "distributed_bits"),
    ],
)
def test_setups_that_cannot_work_are_refused(sections, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=needle):
        _config(**sections)


def test_too_few_bits_are_refused_before_round_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(privacy={**DDP, "distributed_bits": 8}, model={"kind": "mlp"})
    with pytest.raises(ConfigError, match=r"distributed_bits >= \d+"):
        simulate(config, out=tmp_path / "few", write_report=False)
    assert not (tmp_path / "few" / "metrics.jsonl").exists()


def test_each_client_is_charged_only_for_its_rounds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(privacy=DDP, strategy={"clients_per_round": 5}, run={"rounds": 6})
    summary, run_dir = simulate(config, out=tmp_path / "s", write_report=False)
    record = RunDirectory(run_dir).load_checkpoint().metadata["privacy"]
    events = record["events"]
    histograms = record["participation"].values()
    assert len(record["participation"]) >= 8  # 6 rounds x ~5 of 12 clients

    def client_epsilon(histogram: dict[str, int]) -> float:
        reference = rdp.RdpAccountant()
        for index, count in histogram.items():
            e = events[int(index)]
            multiplier = (
                math.sqrt(e["num_clients"])
                * e["noise_std_per_client"]
                / e["l2_sensitivity"]
            )
            reference.compose(
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.GaussianDpEvent(multiplier), count
                )
            )
        return float(reference.get_epsilon(1e-3))

    worst = max(client_epsilon(h) for h in histograms)
    assert summary["epsilon"] == pytest.approx(worst, rel=1e-6)
    most = max(sum(h.values()) for h in histograms)
    assert most < 6  # nobody took part in every round: charged for fewer


def test_a_resumed_run_reports_the_same_epsilon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedshield.core import ServerState

    config = _config(privacy=DDP, strategy={"clients_per_round": 6})
    full, _ = simulate(config, out=tmp_path / "full", write_report=False)

    def stop(state: ServerState, record: object) -> None:
        if state.round_idx == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(config, out=tmp_path / "part", on_round=stop, write_report=False)
    resumed, _ = simulate(
        config, out=tmp_path / "part", resume=True, write_report=False
    )
    assert resumed["epsilon"] == full["epsilon"] > 0
    a = RunDirectory(tmp_path / "full").read_metrics()
    b = RunDirectory(tmp_path / "part").read_metrics()
    assert [r["epsilon"] for r in a] == [r["epsilon"] for r in b]
