"""What a DP round releases, against what the accountant assumes.

For every DP mode and option, in the clear and under secure aggregation, the
round is run on neighbouring sets of clients (add, remove, replace or negate
one client: the neighbouring relation the accountant uses) with the noise
recorded instead of drawn. The change in every released word (the summed
update, the unclipped count, any other word that leaves), each divided by
the noise std actually added to it, is the release's sensitivity in units of
noise; times the noise multiplier of the DP event the ledger recorded it must
be at most 1 (the Gaussian mechanism the accountant composes), and it must
reach 1 on the worst neighbour (the accountant is not handed a looser bound
than the worst case, which would hide a unit error).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedshield.core import ClientUpdate, Params, ServerState
from fedshield.privacy.accounting import DpEventSpec, PrivacyLedger, epsilon
from fedshield.simulation.secure import SecureAggregation, secure_sum
from fedshield.strategies import CountSampler, FedAvg
from fedshield.strategies.dp import DpFedAvg, DpMean, PoissonSampler, PrivacySettings
from fedshield.strategies.secure_inputs import SecureInput, secure_input

DIM = 20
CLIP = 1.0
SPEC = Params({"w": np.zeros(DIM, np.float32)}).spec


class _RecordedNoise:
    """Adds nothing; remembers the std asked for each word."""

    secure = False

    def __init__(self) -> None:
        self.stds: list[tuple[int, float]] = []

    def sample(self, shape: int | tuple[int, ...], std: float) -> np.ndarray:
        size = int(np.prod(shape))
        self.stds.append((size, float(std)))
        return np.zeros(shape, dtype=np.float64)


def _update(cid: str, values: np.ndarray) -> ClientUpdate:
    return ClientUpdate(cid, Params({"w": values.astype(np.float32)}), num_examples=7)


def _base_clients() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    out = {}
    for i, norm in enumerate([0.3, 0.9, 2.0, 5.0, 0.5, 1.7]):
        v = rng.normal(size=DIM)
        out[f"c{i}"] = v / np.linalg.norm(v) * norm
    return out


def _extreme() -> tuple[np.ndarray, np.ndarray]:
    """Two updates as far apart as clipping allows, with opposite bits.

    ``inside`` has norm exactly C (unclipped: bit 1), ``outside`` points the
    other way with norm 3C (clipped to −C·e: bit 0).
    """
    e = np.zeros(DIM)
    e[0] = 1.0
    return e * CLIP * (1 - 1e-6), -3.0 * CLIP * e


@dataclasses.dataclass
class _Release:
    total: np.ndarray  # the summed, clipped update before noise
    count: float | None  # the (centred) unclipped count before noise
    update_std: float
    count_std: float | None
    event: DpEventSpec


def _strategy(sampling: str, adaptive: bool) -> DpFedAvg:
    privacy = PrivacySettings(
        mode="central",
        clip_norm=CLIP,
        noise_multiplier=1.3,
        accountant="rdp",
        target_quantile=0.5 if adaptive else None,
        clipped_count_stddev=2.0 if adaptive else None,
    )
    sampler = PoissonSampler(0.25) if sampling == "poisson" else CountSampler(8)
    return DpFedAvg(base=FedAvg(), privacy=privacy, sampler=sampler, num_clients=16)


def _release(
    strategy: DpFedAvg, clients: dict[str, np.ndarray], secure: bool
) -> _Release:
    state = strategy.init(Params({"w": np.zeros(DIM, np.float32)}))
    rng = np.random.default_rng(0)
    plan = strategy.configure(state, [str(i) for i in range(16)], rng=rng)
    rule = plan.aggregator
    assert isinstance(rule, DpMean)
    noise = _RecordedNoise()
    rule = dataclasses.replace(rule, noise=noise)
    updates = {cid: _update(cid, v) for cid, v in clients.items()}
    if secure:
        result = secure_sum(
            updates,
            settings=SecureAggregation(protocol="secagg", threshold=0.6),
            spec=SPEC,
            round_idx=0,
            max_examples=7,
            drop_at={},
            rng=np.random.default_rng(1),
            transform=secure_input(rule),
        )
        assert result.total is not None
        aggregate = rule.release(
            result.total,
            centred_unclipped=result.centred_unclipped,
            count=len(updates),
            spec=SPEC,
            rng=rng,
            measurements=result.metrics,
        )
    else:
        acc = rule.begin(SPEC, rng=rng)
        for update in updates.values():
            acc.add(update, 1.0)
        aggregate = acc.result()
    new = strategy.apply(state, aggregate, plan=plan, rng=rng)
    ledger = PrivacyLedger.from_json(new.metadata["privacy"]["ledger"])
    ((_, event),) = ledger.events
    total = np.asarray(aggregate.delta.flat, dtype=np.float64) * rule.denominator
    fraction = aggregate.measurements.get("dp/unclipped_fraction")
    count = None if fraction is None else float(fraction) * rule.denominator
    stds = dict(noise.stds)
    return _Release(
        total=total,
        count=count,
        update_std=stds[DIM],
        count_std=stds.get(1),
        event=event,
    )


def _neighbours(
    sampling: str,
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Pairs of client sets under the relation the accountant uses."""
    base = _base_clients()
    inside, outside = _extreme()
    if sampling == "poisson":  # add or remove one client
        return [
            (base, {**base, "x": inside}),
            (base, {**base, "x": outside}),
            ({**base, "x": inside}, base),
        ]
    # replace one client (fixed-size samples stay the same size)
    return [
        ({**base, "x": inside}, {**base, "x": outside}),  # replace
        ({**base, "x": inside}, {**base, "x": -inside}),  # negate
        ({**base, "x": base["c0"]}, {**base, "x": outside}),
    ]


def _shift_in_noise_units(a: _Release, b: _Release) -> float:
    assert a.update_std == b.update_std and a.count_std == b.count_std
    squares = (np.linalg.norm(a.total - b.total) / a.update_std) ** 2
    if a.count is not None:
        assert b.count is not None and a.count_std is not None
        squares += ((a.count - b.count) / a.count_std) ** 2
    return float(math.sqrt(squares))


@pytest.mark.parametrize("secure", [False, True], ids=["clear", "secagg"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-clip", "adaptive"])
@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_central_release_sensitivity_is_what_the_accountant_assumes(
    sampling: str, adaptive: bool, secure: bool
) -> None:
    strategy = _strategy(sampling, adaptive)
    worst = 0.0
    for left, right in _neighbours(sampling):
        a, b = _release(strategy, left, secure), _release(strategy, right, secure)
        assert a.event == b.event
        assert a.event.is_replace_one == (sampling == "fixed")
        worst = max(worst, _shift_in_noise_units(a, b) * a.event.noise_multiplier)
    # At most one noise multiplier's worth (the Gaussian mechanism accounted),
    # and reached by the worst neighbour (secure aggregation's encoding
    # rounds the words: 1e-3).
    assert worst <= 1.0 + 1e-3
    assert worst >= 0.99


# --- the review's example: fixed-size sampling against dp-accounting ----------


def _fixed_reference(sigma: float, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            100, 10, dp_accounting.GaussianDpEvent(sigma / 2.0)
        ),
        rounds,
    )
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def _run(strategy: DpFedAvg, rounds: int) -> ServerState:
    state = strategy.init(Params({"w": np.zeros(DIM, np.float32)}))
    rng = np.random.default_rng(0)
    clients = [str(i) for i in range(strategy.num_clients)]
    for _ in range(rounds):
        plan = strategy.configure(state, clients, rng=rng)
        rule = plan.aggregator or strategy.aggregator
        acc = rule.begin(SPEC, rng=rng)
        for cid in plan.clients:
            acc.add(_update(cid, rng.normal(size=DIM) * 0.1), 1.0)
        state = strategy.apply(state, acc.result(), plan=plan, rng=rng)
    return state


def test_fixed_sampling_epsilon_is_dp_accountings_at_half_sigma() -> None:
    # N = 100, 10 a round, sigma = 1, delta = 1e-5, 100 rounds: the review
    # measured 14.05 reported against 83.9 true.
    strategy = DpFedAvg(
        base=FedAvg(),
        privacy=PrivacySettings(
            mode="central", clip_norm=1.0, noise_multiplier=1.0, accountant="rdp"
        ),
        sampler=CountSampler(10),
        num_clients=100,
    )
    # Two rounds through the strategy (its ledger's answer), then the ledger's
    # event composed 100 times (each round of a run records the same event;
    # recomputing fixed-sampling RDP every round would take 20 s here).
    state = _run(strategy, 2)
    assert strategy.epsilon_of(state) == pytest.approx(
        _fixed_reference(1.0, 2, 1e-5), rel=0.01
    )
    ledger = PrivacyLedger.from_json(state.metadata["privacy"]["ledger"])
    ((_, event), (_, again)) = ledger.events
    assert event == again
    hundred = epsilon([dataclasses.replace(event, count=100)], 1e-5, "rdp")
    want = _fixed_reference(1.0, 100, 1e-5)
    assert want == pytest.approx(83.9, rel=0.01)
    assert hundred == pytest.approx(want, rel=0.01)


def _calibrated(sampling: str, target: float, rounds: int) -> DpFedAvg:
    from fedshield.api import parse_config
    from fedshield.api.experiment import build_strategy

    config = parse_config(
        {
            "run": {"rounds": rounds},
            "data": {"dataset": "digits", "num_clients": 100},
            "strategy": {"clients_per_round": 10},
            "privacy": {
                "mode": "central",
                "clip_norm": 1.0,
                "target_epsilon": target,
                "accountant": "rdp",
                "sampling": sampling,
            },
        }
    )
    strategy = build_strategy(config, num_clients=100)
    assert isinstance(strategy, DpFedAvg)
    return strategy


def test_calibration_under_fixed_sampling_delivers_the_target() -> None:
    # The review: epsilon = 3 requested, 7.40 delivered.
    strategy = _calibrated("fixed", 3.0, 50)
    sigma = strategy.privacy.noise_multiplier
    delivered = _fixed_reference(sigma, 50, 1e-5)
    assert delivered <= 3.0 + 1e-6
    assert delivered >= 2.9  # the smallest sigma that fits, not a safe overshoot


# --- distributed mode: what the unmasked sum moves by, against the event -------


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_distributed_release_sensitivity_is_the_events(
    monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    # With the clients' noise shares switched off, adding one client moves
    # the unmasked, decoded sum by its rounded vector: at most the event's
    # l2_sensitivity in integer units, which is what ddg_rdp is given. The
    # masked vector carries no other word (no weight, count or metric).
    from fedshield.privacy import distributed as ddg
    from fedshield.strategies.dp import _distributed_event

    monkeypatch.setattr(
        ddg, "discrete_gaussian", lambda count, sigma, rb: np.zeros(count, np.int64)
    )
    mechanism = ddg.DistributedDp(clip_norm=CLIP, noise_multiplier=1.0)
    settings = SecureAggregation(protocol=protocol, threshold=0.6)
    inside, outside = _extreme()
    # The other clients send zero updates, which round to exactly zero: their
    # rounding (fresh OS randomness in every run) would otherwise differ
    # between the two runs and blur the one client's shift.
    base = {cid: np.zeros(DIM) for cid in _base_clients()}
    shifts, bounds = [], []
    for extra in (inside, outside, 50.0 * np.ones(DIM)):
        results = []
        for clients in (base, {**base, "x": extra}):
            updates = {cid: _update(cid, v) for cid, v in clients.items()}
            # The same number of survivors on both sides keeps gamma equal:
            # the smaller set gets a zero update (the zero-out neighbour).
            if "x" not in clients:
                updates["x"] = _update("x", np.zeros(DIM))
            result = secure_sum(
                updates,
                settings=settings,
                spec=SPEC,
                round_idx=0,
                max_examples=7,
                drop_at={},
                rng=np.random.default_rng(2),
                transform=SecureInput("distributed", mechanism.clip_norm, mechanism),
            )
            assert result.total is not None
            results.append(result)
        a, b = results
        assert a.metrics["ddp/gamma"] == b.metrics["ddp/gamma"]
        event = _distributed_event(a.metrics)
        assert event == _distributed_event(b.metrics)
        assert a.total is not None and b.total is not None
        assert a.total.shape == (DIM,)  # the released vector: the update only
        shifts.append(np.linalg.norm(b.total - a.total) / a.metrics["ddp/gamma"])
        bounds.append(event.l2_sensitivity)
    assert max(s / b for s, b in zip(shifts, bounds, strict=True)) <= 1.0 + 1e-9
    # Not vacuous: a clipped client moves the sum by nearly the bound.
    assert max(s / b for s, b in zip(shifts, bounds, strict=True)) >= 0.8


# --- local mode: what leaves the client, against sigma / 2 ---------------------


class _RecordedGaussian:
    """Stands in for SecureGaussian in privatize: zero noise, std recorded."""

    stds: ClassVar[list[float]] = []
    secure = True

    def sample(self, shape: int | tuple[int, ...], std: float) -> np.ndarray:
        type(self).stds.append(float(std))
        return np.zeros(shape, dtype=np.float64)


def _local_update(cid: str, values: np.ndarray) -> ClientUpdate:
    from fedshield.core import FitConfig
    from fedshield.models.client import build_update
    from fedshield.privacy.local import LOCAL_CLIP, LOCAL_SIGMA

    zero = Params({"w": np.zeros(DIM, np.float32)})
    config = FitConfig(
        round_idx=0, options={LOCAL_CLIP: CLIP, LOCAL_SIGMA: LOCAL_NOISE}
    )
    new = Params({"w": values.astype(np.float32)})
    metrics = {"loss": 0.7, "accuracy": 0.5}
    return build_update(cid, zero, new, metrics, num_examples=123, config=config)


LOCAL_NOISE = 1.5


@pytest.mark.parametrize("secure", [False, True], ids=["clear", "secagg"])
def test_local_release_sensitivity_is_what_the_accountant_assumes(
    monkeypatch: pytest.MonkeyPatch, secure: bool
) -> None:
    from fedshield.privacy import noise as noise_module

    monkeypatch.setattr(noise_module, "SecureGaussian", _RecordedGaussian)
    _RecordedGaussian.stds = []
    inside, outside = _extreme()
    base = _base_clients()
    pairs = [(inside, outside), (inside, -inside), (base["c0"], outside)]
    worst = 0.0
    for left, right in pairs:
        a, b = _local_update("x", left), _local_update("x", right)
        # Only the noised update leaves: no count, no metric, no clip bit.
        assert a.num_examples == b.num_examples == 1
        assert a.metrics == b.metrics == {}
        if secure:
            totals = []
            for update in (a, b):
                updates = {cid: _local_update(cid, v) for cid, v in base.items()}
                updates["x"] = update
                result = secure_sum(
                    updates,
                    settings=SecureAggregation(
                        protocol="secagg", threshold=0.6, clip=4.0
                    ),
                    spec=SPEC,
                    round_idx=0,
                    max_examples=1,
                    drop_at={},
                    rng=np.random.default_rng(3),
                )
                assert result.aggregate is not None
                n = result.aggregate.num_updates
                totals.append(np.asarray(result.aggregate.delta.flat) * n)
            shift = float(np.linalg.norm(totals[0] - totals[1]))
        else:
            shift = float(np.linalg.norm(a.delta.flat - b.delta.flat))
        worst = max(worst, shift / (LOCAL_NOISE * CLIP))
    assert set(_RecordedGaussian.stds) == {LOCAL_NOISE * CLIP}
    # The accountant charges one participation as the Gaussian at sigma / 2.
    strategy = DpFedAvg(
        base=FedAvg(),
        privacy=PrivacySettings(
            mode="local", clip_norm=CLIP, noise_multiplier=LOCAL_NOISE
        ),
        sampler=PoissonSampler(0.5),
        num_clients=16,
    )
    z = LOCAL_NOISE / 2.0
    assert strategy.mechanism.first_round_epsilon(strategy, None) == pytest.approx(
        epsilon([DpEventSpec(noise_multiplier=z)], 1e-5, "pld"), rel=1e-9
    )
    assert worst * z <= 1.0 + 1e-3
    assert worst * z >= 0.99


# --- record mode: one DP-SGD step, against the event the server accounts -------


@pytest.mark.parametrize("path", ["chain", "general"])
def test_record_step_sensitivity_is_what_the_accountant_assumes(path: str) -> None:
    pytest.importorskip("torch")
    import functools

    from fedshield.core import FitConfig
    from fedshield.models import TorchModel, build_module
    from fedshield.models.dp_sgd import DpSgdConfig, _make_step
    from fedshield.privacy.records import record_level_event

    sigma, clip = 1.2, 0.5
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=10)
    # A record whose gradient is far above the clip norm, and a quiet one.
    loud = (x[:1] * 40.0, np.array([(y[0] + 1) % 3]))
    quiet = (x[1:2], y[1:2])

    def one_step(
        xs: np.ndarray, ys: np.ndarray, *, classes: int = 3, zero: bool = False
    ) -> tuple[np.ndarray, float]:
        model = TorchModel(
            functools.partial(
                build_module, "mlp", input_shape=(8,), num_classes=classes,
                hidden=(16,),
            ),
            input_shape=(8,),
        )  # fmt: skip
        bound = model._get_bound()
        params = model.init_params(0)
        if zero:
            params = Params({k: np.zeros_like(v) for k, v in params.items()})
        bound.load(params)
        noise = _RecordedNoise()
        step = _make_step(
            model,
            bound,
            FitConfig(round_idx=0, lr=1.0, batch_size=10),
            DpSgdConfig(clip_norm=clip, noise_multiplier=sigma),
            noise,
            denominator=1.0,
            anchor=None,
            mu=0.0,
            path=path,  # type: ignore[arg-type]
            input_ndim=2,
        )
        before = bound.flat.clone().numpy().astype(np.float64)
        xb, yb = model._tensors(xs, ys)
        step(xb, yb)
        after = bound.flat.numpy().astype(np.float64)
        ((_, std),) = noise.stds
        return before - after, std  # lr 1, denominator 1: the noised sum

    base = one_step(x, y)
    worst = 0.0
    for extra_x, extra_y in (loud, quiet):
        added = one_step(np.concatenate([x, extra_x]), np.concatenate([y, extra_y]))
        assert added[1] == base[1] == sigma * clip
        worst = max(worst, float(np.linalg.norm(added[0] - base[0])) / base[1])
    # One record added or removed moves the noised sum by at most C.
    assert worst * sigma <= 1.0 + 1e-4
    assert worst * sigma >= 0.99

    # One record replaced (the record count is public, so this is the
    # relation): its clipped gradient moves from g to g', up to 2C apart.
    replaced = 0.0
    for swap_x, swap_y in (loud, quiet):
        xs, ys = x.copy(), y.copy()
        xs[0], ys[0] = swap_x[0], swap_y[0]
        swapped = one_step(xs, ys)
        replaced = max(replaced, float(np.linalg.norm(swapped[0] - base[0])) / base[1])
    # The worst case: a record whose clipped gradient points the other way. At
    # zero weights a 2-class model's gradient is (p - e_y) with p = (1/2, 1/2)
    # on the last bias only: labels 0 and 1 give opposite gradients of norm
    # 1/sqrt(2) > C, clipped to +C and -C.
    zx = rng.normal(size=(4, 8)).astype(np.float32)
    zy = np.array([0, 1, 0, 1])
    zero_base = one_step(zx, zy, classes=2, zero=True)
    flipped = zy.copy()
    flipped[0] = 1
    opposite = one_step(zx, flipped, classes=2, zero=True)
    assert zero_base[1] == opposite[1] == sigma * clip
    shift = float(np.linalg.norm(opposite[0] - zero_base[0])) / zero_base[1]
    assert shift == pytest.approx(2.0 / sigma, rel=1e-5)
    replaced = max(replaced, shift)
    # The server accounts each step as the Poisson-subsampled Gaussian at sigma
    # under replace-one neighbours: dp-accounting's PLD then models the
    # replaced record's contribution moving from +C to -C, a shift of 2C, in
    # units of the noise std sigma*C: 2/sigma, i.e. 2 once times sigma.
    event = record_level_event(100, batch_size=10, epochs=1, noise_multiplier=sigma)
    assert event.noise_multiplier == sigma and event.sampling == "poisson"
    assert event.is_replace_one
    assert replaced * event.noise_multiplier <= 2.0 + 1e-4
    assert replaced * event.noise_multiplier >= 1.99


def test_a_record_mode_client_sends_no_unnoised_metrics() -> None:
    pytest.importorskip("torch")
    from fedshield.api import parse_config
    from fedshield.api.experiment import build_federation
    from fedshield.core import FitConfig
    from fedshield.privacy.records import DP_SGD_CLIP, DP_SGD_SIGMA

    config = parse_config(
        {
            "data": {"dataset": "digits", "num_clients": 4},
            "model": {"kind": "logistic"},
            "privacy": {
                "mode": "record",
                "clip_norm": 1.0,
                "noise_multiplier": 1.0,
                "delta": 1e-4,
            },
        }
    )
    federation = build_federation(config)
    cid = federation.client_ids[0]
    client = federation.client_fn(cid)
    fit = FitConfig(
        round_idx=0,
        batch_size=16,
        lr=0.1,
        options={DP_SGD_CLIP: 1.0, DP_SGD_SIGMA: 1.0},
    )
    update = client.fit(federation.model.init_params(0), fit, np.random.default_rng(0))
    # Only the spending record (public: it follows from the record count).
    assert set(update.metrics) == {"dp_sgd/sampling_rate", "dp_sgd/steps"}
