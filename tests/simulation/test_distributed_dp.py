"""Distributed DP (``[privacy] mode = "distributed"``) through simulated rounds."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

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


class _StopAt:
    """A backend that counts who was asked to train and is stopped (Ctrl-C)
    at stage ``stage`` of round 2, once (``stopped`` is shared by the runs)."""

    def __init__(
        self, inner: Any, stage: str, asked: Counter[str], stopped: list[bool]
    ) -> None:
        self.inner, self.stage, self.asked, self.stopped = inner, stage, asked, stopped

    def run_stage(self, request: Any, *, client_fn: Any, seed: int) -> Any:
        if request.stage == "fit":
            self.asked.update(list(request.messages))
        if request.stage == self.stage and request.round_idx == 1 and not self.stopped:
            self.stopped.append(True)
            raise KeyboardInterrupt
        return self.inner.run_stage(request, client_fn=client_fn, seed=seed)

    def end_round(self) -> None:
        self.inner.end_round()

    def close(self) -> None:
        self.inner.close()


def test_a_round_stopped_after_its_sum_was_unmasked_is_charged_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Round 2's sum is unmasked (released), then the run stops before its
    # checkpoint (in federated evaluation). The round was checkpointed
    # charged before its clients trained, at the costliest release it could
    # make: the resumed run, which repeats round 2, counts both.
    import fedshield.api.run as run_module

    config = _config(
        privacy=DDP,
        strategy={"clients_per_round": 6},
        run={"rounds": 3, "federated_eval": True},
    )
    simulate(config, out=tmp_path / "full", write_report=False)
    full = [r["epsilon"] for r in RunDirectory(tmp_path / "full").read_metrics()]
    asked: Counter[str] = Counter()
    stopped: list[bool] = []
    make = run_module.make_backend
    monkeypatch.setattr(
        run_module,
        "make_backend",
        lambda *a, **k: _StopAt(make(*a, **k), "evaluate", asked, stopped),
    )
    with pytest.raises(KeyboardInterrupt):
        simulate(config, out=tmp_path / "part", write_report=False)
    cut = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert cut["status"] == "interrupted" and cut["rounds"] == 1
    # Round 2 as charged bounds round 2 as it was.
    assert cut["epsilon"] >= full[1] * (1 - 1e-9) and cut["epsilon"] > full[0]
    resumed, run_dir = simulate(
        config, out=tmp_path / "part", resume=True, write_report=False
    )
    participation = (
        RunDirectory(run_dir).load_checkpoint().metadata["privacy"]["participation"]
    )
    assert {cid: sum(h.values()) for cid, h in participation.items()} == dict(asked)
    assert resumed["epsilon"] > full[-1]


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
@pytest.mark.parametrize(
    "stage", ["fit", "advertise_keys", "share_keys", "masked_input", "unmask"]
)
def test_the_accounted_survivors_are_the_clients_in_the_sum(protocol, stage) -> None:  # type: ignore[no-untyped-def]
    from fedshield.core import ClientUpdate, Params, ParamSpec
    from fedshield.privacy.distributed import DistributedDp
    from fedshield.simulation.secure import SecureAggregation, secure_sum
    from fedshield.strategies.secure_inputs import SecureInput

    n = 8
    spec = ParamSpec((("w", (n,)),))
    # Client i's update is 0.5 on coordinate i: the sum shows who is in it.
    updates = {
        f"c{i}": ClientUpdate(
            f"c{i}", Params.from_flat(np.eye(n, dtype=np.float32)[i] * 0.5, spec), 10
        )
        for i in range(n)
    }
    gone = {"c1": stage, "c5": stage}
    held = {c: u for c, u in updates.items() if not (stage == "fit" and c in gone)}
    result = secure_sum(
        held,
        settings=SecureAggregation(protocol=protocol, threshold=0.6),
        spec=spec,
        round_idx=0,
        max_examples=10,
        drop_at={} if stage == "fit" else gone,
        rng=np.random.default_rng(0),
        transform=SecureInput(
            "distributed", 1.0, DistributedDp(clip_norm=1.0, noise_multiplier=1e-3)
        ),
    )
    assert result.total is not None
    present = {f"c{i}" for i in range(n) if result.total[i] > 0.25}
    if stage == "unmask":  # their masked inputs had arrived: they are summed
        assert present == set(updates)
    else:
        assert present == set(updates) - set(gone)
    assert result.metrics["secagg/survivors"] == len(present)


def test_sampled_clients_are_charged_even_if_they_drop_and_aborted_rounds_cost_nothing(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    config = _config(privacy=DDP, faults={"dropout": 0.3}, run={"rounds": 3})
    _, run_dir = simulate(config, out=tmp_path / "drop", write_report=False)
    record = RunDirectory(run_dir).load_checkpoint().metadata["privacy"]
    records = RunDirectory(run_dir).read_metrics()
    completed = sum(1 for r in records if r.get("secagg/aborted") == 0.0)
    assert completed >= 1
    # Every client is sampled every round (rate 1): each is charged for every
    # completed round, including those it dropped out of.
    for histogram in record["participation"].values():
        assert sum(histogram.values()) == completed
    aborted = _config(
        privacy=DDP,
        secagg={"protocol": "secagg", "threshold": 1.0},
        faults={"dropout": 0.5},
        run={"rounds": 2},
    )
    summary, run_dir = simulate(aborted, out=tmp_path / "abort", write_report=False)
    assert all(r["secagg/aborted"] == 1.0 for r in RunDirectory(run_dir).read_metrics())
    assert summary["epsilon"] == 0.0


def test_poisson_rounds_never_take_epsilon_past_the_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(
        privacy={**DDP, "target_epsilon": 6.0, "distributed_bits": 12},
        strategy={"clients_per_round": 6},
        run={"rounds": 40},
    )
    summary, run_dir = simulate(config, out=tmp_path / "p", write_report=False)
    assert summary["status"] == "budget_exhausted"
    assert 0 < summary["epsilon"] <= 6.0
    sizes = {r["secagg/clients"] for r in RunDirectory(run_dir).read_metrics()}
    assert len(sizes) >= 2  # Poisson sampling varied the rounds


def test_a_budget_no_round_fits_is_refused_before_round_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _config(privacy={**DDP, "target_epsilon": 0.5})
    with pytest.raises(ConfigError, match="one round alone costs"):
        simulate(config, out=tmp_path / "no", write_report=False)


def test_noise_is_calibrated_from_the_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedshield.privacy.accounting import DpEventSpec, calibrate_distributed_noise
    from fedshield.privacy.accounting import epsilon as eps_of
    from fedshield.privacy.distributed import DistributedDp

    def parameters(z: float):  # type: ignore[no-untyped-def]
        return DistributedDp(0.5, z).parameters(
            dimension=650, num_clients=12, threshold=8
        )

    def spent(z: float) -> float:
        p = parameters(z)
        spec = DpEventSpec.distributed_discrete_gaussian(
            num_clients=8,
            noise_std_per_client=p.noise_std,
            l2_sensitivity=p.l2_sensitivity,
            dimension=p.padded,
            count=4,
        )
        return eps_of([spec], 1e-3)

    z = calibrate_distributed_noise(5.0, 1e-3, rounds=4, parameters=parameters)
    assert spent(z) <= 5.0 < spent(z * 0.999)  # just enough
    with pytest.raises(ConfigError, match="unreachable"):
        calibrate_distributed_noise(1e-6, 1e-3, rounds=4, parameters=parameters)

    privacy = {k: v for k, v in DDP.items() if k != "noise_multiplier"}
    summary, _ = simulate(
        _config(privacy={**privacy, "target_epsilon": 5.0}),
        out=tmp_path / "cal",
        write_report=False,
    )
    assert summary["status"] == "completed" and summary["rounds"] == 4
    assert summary["privacy"]["noise_multiplier"] == pytest.approx(z, rel=1e-9)
    assert 0 < summary["epsilon"] <= 5.0


def test_no_training_metrics_leave_the_clients_in_distributed_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, run_dir = simulate(_config(privacy=DDP), out=tmp_path / "m", write_report=False)
    for record in RunDirectory(run_dir).read_metrics():
        assert "train_loss" not in record and "train_accuracy" not in record


def test_a_client_whose_training_diverges_is_never_rejected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # lr = 1e38 makes every client's training diverge (NaN update and loss).
    # Its own half of secure aggregation encodes a non-finite update as zero
    # and reports no metrics: the server cannot reject it, which would tell
    # whether its training diverged (a function of its data).
    config = _config(
        privacy=DDP, client={"lr": 1e38, "epochs": 3}, strategy={"clients_per_round": 6}
    )
    summary, run_dir = simulate(config, out=tmp_path / "nan", write_report=False)
    assert summary["status"] == "completed"
    records = RunDirectory(run_dir).read_metrics()
    assert [r["rejected_updates"] for r in records] == [0] * 4
    assert all(r["num_clients"] == r["sampled_clients"] > 0 for r in records)
    assert not (run_dir / "failures.jsonl").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", ["distributed", "central"])
def test_a_release_before_a_failed_server_step_stays_accounted(tmp_path, mode) -> None:  # type: ignore[no-untyped-def]
    from fedshield.errors import RoundFailedError

    privacy = {**DDP, "mode": mode}
    secagg = {"protocol": "secagg+" if mode == "distributed" else "none"}
    config = _config(
        privacy=privacy, secagg=secagg, strategy={"server_lr": 1e39}, run={"rounds": 2}
    )
    with pytest.raises(RoundFailedError, match="NaN or infinite"):
        simulate(config, out=tmp_path / "nan", write_report=False)
    directory = RunDirectory(tmp_path / "nan")
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "failed"
    # The aggregate of round 1 was released (to the server) before the step
    # failed: its epsilon is in the summary and in the checkpoint.
    assert summary["epsilon"] > 0
    state = directory.load_checkpoint()
    assert state.round_idx == 0
    assert state.metadata["privacy"]["epsilon"] == summary["epsilon"]


def test_the_seed_fixes_the_training_not_the_clients_noise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runs = [
        simulate(_config(privacy=DDP), out=tmp_path / f"r{i}", write_report=False)
        for i in range(2)
    ]
    a, b = (RunDirectory(d).load_checkpoint().params for _, d in runs)
    assert not np.array_equal(a.flat, b.flat)  # noise from os.urandom
    assert runs[0][0]["epsilon"] == runs[1][0]["epsilon"]  # the same rounds
    assert runs[0][0]["privacy"]["secure_rng"] is True
