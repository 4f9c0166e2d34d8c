"""Central and local DP-FedAvg: clipping, noise, fixed denominator, accounting."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshield.api import parse_config, simulate
from fedshield.core import ClientUpdate, Params, ServerState
from fedshield.errors import ConfigError, PrivacyBudgetExceeded
from fedshield.simulation import RunDirectory
from fedshield.strategies import FedAvg
from fedshield.strategies.dp import (
    DpFedAvg,
    DpMean,
    PoissonSampler,
    PrivacySettings,
    adaptive_noise_split,
)

SPEC = Params({"w": np.zeros(50, np.float32)}).spec


def _update(cid: str, values: np.ndarray) -> ClientUpdate:
    return ClientUpdate(cid, Params({"w": values.astype(np.float32)}), num_examples=10)


class _NoNoise:
    secure = False

    def sample(self, shape: int | tuple[int, ...], std: float) -> np.ndarray:
        return np.zeros(shape, dtype=np.float64)


# --- the sampler -------------------------------------------------------------


def test_poisson_sampler_samples_each_client_with_its_rate() -> None:
    sampler = PoissonSampler(0.1)
    rng = np.random.default_rng(0)
    clients = [str(i) for i in range(1000)]
    sizes = [len(sampler.sample(clients, round_idx=0, rng=rng)) for _ in range(200)]
    # mean of 200 Binomial(1000, 0.1): sd of the mean = sqrt(90 / 200) ≈ 0.67
    assert abs(np.mean(sizes) - 100) < 4 * math.sqrt(90 / 200)
    assert np.std(sizes) == pytest.approx(math.sqrt(90), rel=0.2)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        PoissonSampler(0.0)


# --- clipping, noise and the fixed denominator ----------------------------


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    clip=st.floats(1e-2, 10.0),
    seed=st.integers(0, 2**16),
)
def test_each_update_counts_at_most_clip_norm(
    scale: float, clip: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    rule = DpMean(clip_norm=clip, noise_std=0.0, denominator=1.0, noise=_NoNoise())
    acc = rule.begin(SPEC, rng=rng)
    acc.add(_update("a", rng.normal(size=50) * scale), 1.0)
    result = acc.result()
    assert result.delta.norm() <= clip * (1 + 1e-5)


def test_mean_of_clipped_updates_over_the_expected_count() -> None:
    small = np.full(50, 0.01)  # norm 0.0707 < clip: kept as is
    big = np.full(50, 10.0)  # norm 70.7 > clip: scaled to norm 1
    rule = DpMean(clip_norm=1.0, noise_std=0.0, denominator=4.0, noise=_NoNoise())
    acc = rule.begin(SPEC, rng=np.random.default_rng(0))
    acc.add(_update("a", small), 123.0)  # the weight is ignored
    acc.add(_update("b", big), 1.0)
    result = acc.result()
    expected = (small + big / np.linalg.norm(big)) / 4.0  # fixed denominator 4, not 2
    np.testing.assert_allclose(result.delta.flat, expected, rtol=1e-5)
    assert result.measurements["dp/denominator"] == 4.0


def test_one_client_moves_the_aggregate_by_at_most_clip_over_denominator() -> None:
    # The sensitivity the accountant assumes: adding any one client, however
    # large its update, changes the released sum by at most C (same noise).
    rng = np.random.default_rng(3)
    honest = [rng.normal(size=50) for _ in range(5)]
    rule = DpMean(clip_norm=0.5, noise_std=0.7, denominator=5.0)

    def release(updates: list[np.ndarray]) -> np.ndarray:
        acc = rule.begin(SPEC, rng=np.random.default_rng(11))  # same noise
        for k, u in enumerate(updates):
            acc.add(_update(str(k), u), 1.0)
        return np.asarray(acc.result().delta.flat, np.float64)

    without = release(honest)
    with_attacker = release([*honest, np.full(50, 1e6)])
    assert np.linalg.norm(with_attacker - without) <= 0.5 / 5.0 * (1 + 1e-4)


def test_noise_has_the_std_it_claims() -> None:
    rule = DpMean(clip_norm=1.0, noise_std=2.0, denominator=10.0)
    spec = Params({"w": np.zeros(200_000, np.float32)}).spec
    acc = rule.begin(spec, rng=np.random.default_rng(5))
    out = np.asarray(acc.result().delta.flat, np.float64)  # no updates: noise only
    n = out.size
    assert abs(out.mean()) < 5 * 0.2 / math.sqrt(n)
    # std of the noise / denominator = 0.2; se of a std estimate ≈ σ/sqrt(2n)
    assert abs(out.std() - 0.2) < 5 * 0.2 / math.sqrt(2 * n)


def test_adaptive_split_combines_to_the_accounted_multiplier() -> None:
    for sigma, count_std in [(1.0, 5.0), (0.8, 0.5), (3.0, 100.0)]:
        delta_sigma = adaptive_noise_split(sigma, count_std)
        combined = (delta_sigma**-2 + (2 * count_std) ** -2) ** -0.5
        assert combined == pytest.approx(sigma, rel=1e-12)
        assert delta_sigma > sigma  # the update pays for the count's release
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        adaptive_noise_split(2.0, 1.0)


# --- the strategy and its accountant --------------------------------------


def _strategy(**privacy: object) -> DpFedAvg:
    settings_ = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.1}
    settings_.update(privacy)
    return DpFedAvg(
        base=FedAvg(),
        privacy=PrivacySettings(**settings_),  # type: ignore[arg-type]
        sampler=PoissonSampler(0.1),
        num_clients=1000,
    )


def _reference_epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        rounds,
    )
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def _run_rounds(strategy: DpFedAvg, rounds: int) -> ServerState:
    clients = [str(i) for i in range(strategy.num_clients)]
    state = strategy.init(Params({"w": np.zeros(50, np.float32)}))
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        plan = strategy.configure(state, clients, rng=rng)
        rule = plan.aggregator or strategy.aggregator
        acc = rule.begin(state.params.spec, rng=rng)
        for cid in plan.clients:
            acc.add(_update(cid, rng.normal(size=50) * 0.1), 1.0)
        state = strategy.apply(state, acc.result(), plan=plan, rng=rng)
    return state


def test_epsilon_after_each_round_is_dp_accountings() -> None:
    strategy = _strategy(accountant="rdp")
    state = _run_rounds(strategy, 5)
    want = _reference_epsilon(0.1, 1.1, 5, 1e-5)
    assert strategy.epsilon_of(state) == pytest.approx(want, rel=1e-6)
    # survives the checkpoint's JSON round trip
    restored = ServerState.from_bytes(state.to_bytes())
    assert strategy.epsilon_of(restored) == pytest.approx(want, rel=1e-6)


def test_pld_epsilon_is_dp_accountings_pld() -> None:
    strategy = _strategy(accountant="pld")
    state = _run_rounds(strategy, 3)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 3
    )
    reference = pld.PLDAccountant()
    reference.compose(event)
    # the ledger's PLD discretisation may differ from the library default;
    # both are upper bounds, within a small relative gap
    assert strategy.epsilon_of(state) == pytest.approx(
        reference.get_epsilon(1e-5), rel=0.02
    )


def test_the_budget_stops_before_the_round_that_would_exceed_it() -> None:
    one = _reference_epsilon(0.1, 1.1, 1, 1e-5)
    three = _reference_epsilon(0.1, 1.1, 3, 1e-5)
    four = _reference_epsilon(0.1, 1.1, 4, 1e-5)
    target = (three + four) / 2
    strategy = _strategy(accountant="rdp", target_epsilon=target)
    state = _run_rounds(strategy, 3)
    assert one < strategy.epsilon_of(state) <= target
    with pytest.raises(PrivacyBudgetExceeded, match="target_epsilon"):
        strategy.configure(
            state, [str(i) for i in range(1000)], rng=np.random.default_rng(1)
        )


def test_adaptive_clipping_moves_the_clip_norm_toward_the_quantile() -> None:
    # Every update has norm 0.1 · sqrt(50) ≈ 0.71; starting at C = 10 every
    # update is unclipped, so C must shrink (target quantile 0.5).
    strategy = _strategy(
        clip_norm=10.0,
        noise_multiplier=0.5,
        target_quantile=0.5,
        clipped_count_stddev=50.0,
    )
    state = _run_rounds(strategy, 30)
    clip = state.metadata["privacy"]["clip_norm"]
    assert clip < 10.0 * math.exp(-0.2 * 0.3 * 10)
    assert clip > 0.05


def test_setups_the_accountant_cannot_honour_are_refused() -> None:
    with pytest.raises(ConfigError, match="delta"):
        DpFedAvg(
            base=FedAvg(),
            privacy=PrivacySettings(
                mode="central", clip_norm=1.0, noise_multiplier=1.0, delta=0.01
            ),
            sampler=PoissonSampler(0.5),
            num_clients=100,
        )
    from fedshield.strategies import CountSampler

    with pytest.raises(ConfigError, match="RDP"):
        DpFedAvg(
            base=FedAvg(),
            privacy=PrivacySettings(
                mode="central", clip_norm=1.0, noise_multiplier=1.0
            ),
            sampler=CountSampler(10),
            num_clients=1000,
        )
    with pytest.raises(ConfigError, match="noise_multiplier"):
        PrivacySettings(mode="central", clip_norm=1.0, noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="clip_norm"):
        PrivacySettings(mode="central", clip_norm=-1.0, noise_multiplier=1.0)


# --- end to end, through the config ------------------------------------------

BASE = {
    "run": {"name": "dp", "rounds": 4, "seed": 3},
    "data": {"dataset": "digits", "num_clients": 100, "min_samples": 1},
    "model": {"kind": "logistic"},
    "client": {"lr": 0.1},
    "strategy": {"clients_per_round": 20},
}


def _config(privacy: dict[str, object], **run: object) -> object:
    data = json.loads(json.dumps(BASE))
    data["run"].update(run)
    data["privacy"] = privacy
    return parse_config(data)


def test_a_central_run_reports_epsilon_every_round(tmp_path) -> None:  # type: ignore[no-untyped-def]
    privacy = {
        "mode": "central",
        "clip_norm": 0.5,
        "noise_multiplier": 1.0,
        "accountant": "rdp",
    }
    summary, run_dir = simulate(
        _config(privacy), out=tmp_path / "c", write_report=False
    )
    records = RunDirectory(run_dir).read_metrics()
    eps = [r["epsilon"] for r in records]
    assert [r["delta"] for r in records] == [1e-5] * 4
    assert eps == sorted(eps) and eps[0] > 0
    for t, value in enumerate(eps, start=1):
        assert value == pytest.approx(_reference_epsilon(0.2, 1.0, t, 1e-5), rel=1e-6)
    assert summary["epsilon"] == pytest.approx(eps[-1])
    assert summary["privacy"]["accountant"] == "rdp"


def test_a_budget_ends_the_run_with_its_status(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = (
        _reference_epsilon(0.2, 1.0, 2, 1e-5) + _reference_epsilon(0.2, 1.0, 3, 1e-5)
    ) / 2
    privacy = {
        "mode": "central",
        "clip_norm": 0.5,
        "noise_multiplier": 1.0,
        "accountant": "rdp",
        "target_epsilon": target,
    }
    summary, _ = simulate(
        _config(privacy, rounds=10), out=tmp_path / "b", write_report=False
    )
    assert summary["status"] == "budget_exhausted"
    assert summary["rounds"] == 2
    assert summary["epsilon"] <= target


def test_a_missing_noise_multiplier_is_calibrated_to_the_target(tmp_path) -> None:  # type: ignore[no-untyped-def]
    privacy = {
        "mode": "central",
        "clip_norm": 0.5,
        "target_epsilon": 3.0,
        "accountant": "rdp",
    }
    summary, _ = simulate(_config(privacy), out=tmp_path / "t", write_report=False)
    assert summary["status"] == "completed" and summary["rounds"] == 4
    assert 2.5 < summary["epsilon"] <= 3.0
    sigma = summary["privacy"]["noise_multiplier"]
    assert _reference_epsilon(0.2, sigma, 4, 1e-5) <= 3.0


def test_a_resumed_run_reports_the_same_epsilon(tmp_path) -> None:  # type: ignore[no-untyped-def]
    privacy = {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 1.0}
    full, _ = simulate(_config(privacy), out=tmp_path / "full", write_report=False)

    def stop(state: ServerState, record: object) -> None:
        if state.round_idx == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(
            _config(privacy), out=tmp_path / "part", on_round=stop, write_report=False
        )
    resumed, _ = simulate(
        _config(privacy), out=tmp_path / "part", resume=True, write_report=False
    )
    assert resumed["epsilon"] == full["epsilon"]
    a = RunDirectory(tmp_path / "full").read_metrics()
    b = RunDirectory(tmp_path / "part").read_metrics()
    assert [r["epsilon"] for r in a] == [r["epsilon"] for r in b]


class _StopAfterFit:
    """A backend that counts who was asked to train, and is stopped (Ctrl-C)
    once the fit stage of round ``stop_in`` (1-based) has reached the server,
    the first time only (``stopped`` is shared by the runs)."""

    def __init__(
        self, inner: Any, stop_in: int, asked: Counter[str], stopped: list[bool]
    ) -> None:
        self.inner, self.stop_in = inner, stop_in
        self.asked, self.stopped = asked, stopped

    def run_stage(self, request: Any, *, client_fn: Any, seed: int) -> Any:
        replies = list(self.inner.run_stage(request, client_fn=client_fn, seed=seed))
        if request.stage == "fit":
            self.asked.update(list(request.messages))
            if request.round_idx + 1 == self.stop_in and not self.stopped:
                self.stopped.append(True)
                raise KeyboardInterrupt
        return iter(replies)

    def end_round(self) -> None:
        self.inner.end_round()

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("mode", ["local", "central"])
def test_a_round_interrupted_after_its_release_is_charged_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # The round is checkpointed charged before its clients train: stopped
    # after round 2's updates reached the server, the resumed run (which
    # repeats round 2, freshly noised) is charged for both releases.
    import fedshield.api.run as run_module

    asked: Counter[str] = Counter()
    stopped_once: list[bool] = []
    make = run_module.make_backend
    monkeypatch.setattr(
        run_module,
        "make_backend",
        lambda *a, **k: _StopAfterFit(make(*a, **k), 2, asked, stopped_once),
    )
    privacy = {
        "mode": mode,
        "clip_norm": 0.5,
        "noise_multiplier": 2.0 if mode == "local" else 1.0,
        "accountant": "rdp",
    }
    config = _config(privacy, rounds=3)
    with pytest.raises(KeyboardInterrupt):
        simulate(config, out=tmp_path / "r", write_report=False)
    stopped = json.loads((tmp_path / "r" / "summary.json").read_text())
    asked_before = Counter(asked)
    summary, run_dir = simulate(
        config, out=tmp_path / "r", resume=True, write_report=False
    )
    assert summary["status"] == "completed" and summary["rounds"] == 3
    record = RunDirectory(run_dir).load_checkpoint().metadata["privacy"]
    if mode == "local":
        assert record["participation"] == dict(asked)
        expected = _local_reference(max(asked.values()), sigma=2.0)
        expected_stopped = _local_reference(max(asked_before.values()), sigma=2.0)
    else:
        # Four releases: rounds 1, 2 (interrupted), 2 again, 3.
        assert sum(len(e["rounds"]) for e in record["ledger"]["events"]) == 4
        expected = _reference_epsilon(0.2, 1.0, 4, 1e-5)
        expected_stopped = _reference_epsilon(0.2, 1.0, 2, 1e-5)
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-6)
    # The interrupted run's summary already counts round 2's release.
    assert stopped["status"] == "interrupted" and stopped["rounds"] == 1
    assert stopped["epsilon"] == pytest.approx(expected_stopped, rel=1e-6)


def _local_reference(participations: int, sigma: float) -> float:
    """Local mode's epsilon: Gaussian releases of multiplier sigma / 2 (RDP)."""
    reference = rdp.RdpAccountant()
    reference.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(sigma / 2.0), participations
        )
    )
    return float(reference.get_epsilon(1e-5))


def test_a_local_run_noises_updates_on_the_client(tmp_path) -> None:  # type: ignore[no-untyped-def]
    privacy = {
        "mode": "local",
        "clip_norm": 0.5,
        "noise_multiplier": 2.0,
        "accountant": "rdp",
    }
    summary, run_dir = simulate(
        _config(privacy), out=tmp_path / "l", write_report=False
    )
    state = RunDirectory(run_dir).load_checkpoint()
    most = max(state.metadata["privacy"]["participation"].values())
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), most)
    reference = rdp.RdpAccountant()
    reference.compose(event)
    assert summary["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)


@pytest.mark.parametrize(
    ("privacy", "needle"),
    [
        ({"mode": "central", "noise_multiplier": 1.0}, "clip_norm"),
        ({"mode": "central", "clip_norm": 1.0}, "noise_multiplier"),
        (
            {"mode": "distributed", "clip_norm": 1.0, "noise_multiplier": 1.0},
            "secure aggregation",
        ),
        (
            {
                "mode": "local",
                "clip_norm": 1.0,
                "noise_multiplier": 1.0,
                "adaptive_clipping": True,
            },
            "central",
        ),
        (
            {"mode": "central", "clip_norm": 1.0, "noise_multiplier": -1.0},
            "noise_multiplier",
        ),
    ],
)
def test_bad_privacy_sections_are_refused(
    privacy: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        _config(privacy)


# --- record mode: DP-SGD in every client ------------------------------------


def _record_config(**privacy: object) -> object:
    data = json.loads(json.dumps(BASE))
    data["data"]["num_clients"] = 5
    data["strategy"]["clients_per_round"] = 3
    data["run"]["rounds"] = 3
    data["privacy"] = {
        "mode": "record",
        "clip_norm": 1.0,
        "noise_multiplier": 1.2,
        "delta": 1e-4,
        **privacy,
    }
    return parse_config(data)


def test_a_record_run_accounts_each_clients_records(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = _record_config()
    summary, run_dir = simulate(config, out=tmp_path / "r", write_report=False)
    assert summary["backend"] == "sequential"  # DP-SGD trains client by client
    state = RunDirectory(run_dir).load_checkpoint()
    privacy = state.metadata["privacy"]
    from fedshield.api.experiment import build_federation

    sizes = build_federation(config).train_sizes()  # type: ignore[arg-type]
    for cid, rounds in privacy["participation"].items():
        q = min(1.0, 32 / sizes[cid])
        steps = max(1, round(1 / q)) * rounds
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.2)),
            steps,
        )
        # The record count is public (it sets q and the steps), so the
        # neighbours are one record replaced: dp-accounting's PLD, REPLACE_ONE.
        reference = pld.PLDAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
            value_discretization_interval=1e-3,
        )
        reference.compose(event)
        assert privacy["client_epsilon"][cid] == pytest.approx(
            reference.get_epsilon(1e-4), rel=1e-6
        )
        add_or_remove = pld.PLDAccountant(value_discretization_interval=1e-3)
        add_or_remove.compose(event)
        assert privacy["client_epsilon"][cid] > add_or_remove.get_epsilon(1e-4)
    assert summary["epsilon"] == max(privacy["client_epsilon"].values())
    records = RunDirectory(run_dir).read_metrics()
    assert [r["epsilon"] for r in records] == sorted(r["epsilon"] for r in records)


def test_record_mode_with_the_rdp_accountant_is_refused_before_round_1() -> None:
    from fedshield.api.experiment import build_federation

    message = 'record mode is accounted under replace-one.*accountant = "pld"'
    with pytest.raises(ConfigError, match=message):
        _record_config(accountant="rdp")
    federation = build_federation(_record_config())  # type: ignore[arg-type]
    base = FedAvg()
    with pytest.raises(ConfigError, match=message):
        DpFedAvg(
            base=base,
            sampler=base.sampler,
            privacy=PrivacySettings(
                mode="record", clip_norm=1.0, noise_multiplier=1.2, delta=1e-4,
                accountant="rdp",
            ),
            num_clients=5,
            client_sizes=federation.train_sizes(),
        )  # fmt: skip


def test_record_calibration_meets_the_target_under_replace_one() -> None:
    from fedshield.api.experiment import build_federation, build_strategy

    config = _record_config(noise_multiplier=None, target_epsilon=3.0)
    sizes = build_federation(config).train_sizes()  # type: ignore[arg-type]
    strategy = build_strategy(config, num_clients=5, client_sizes=sizes)  # type: ignore[arg-type]
    sigma = strategy.privacy.noise_multiplier  # type: ignore[attr-defined]

    def replace_one(n: int) -> float:
        # dp-accounting itself: 3 rounds of one epoch, batch 32, REPLACE_ONE.
        q = min(1.0, 32 / n)
        reference = pld.PLDAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
            value_discretization_interval=1e-3,
        )
        reference.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    q, dp_accounting.GaussianDpEvent(sigma)
                ),
                max(1, round(1 / q)) * 3,
            )
        )
        return float(reference.get_epsilon(1e-4))

    worst = max(replace_one(n) for n in sizes.values())
    assert 2.97 < worst <= 3.0 + 1e-9


def test_record_mode_refuses_the_vectorised_backend_and_a_large_delta() -> None:
    from fedshield.api.backends import resolve_backend
    from fedshield.api.experiment import build_federation, build_strategy

    config = _record_config()
    federation = build_federation(config)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="DP-SGD"):
        resolve_backend("vectorised", federation.model, privacy_mode="record")
    with pytest.raises(ConfigError, match="records of the largest client"):
        build_strategy(
            _record_config(delta=0.01),  # type: ignore[arg-type]
            num_clients=5,
            client_sizes=federation.train_sizes(),
        )
