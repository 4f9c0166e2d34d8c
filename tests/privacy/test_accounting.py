"""fedshield.privacy.accounting against dp_accounting, used directly as the reference.

Every reference value here is computed by building dp_accounting's own
accountant and events in the test, never through fedshield code.
"""

from __future__ import annotations

import json
import math
import time

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshield.errors import ConfigError, UnsupportedEventError
from fedshield.privacy import accounting
from fedshield.privacy.accounting import (
    DpEventSpec,
    PrivacyLedger,
    calibrate_noise_multiplier,
    epsilon,
    epsilon_for,
    make_accountant,
    pld_value_discretization_interval,
)

DELTA = 1e-5
REL = 1e-9  # same computation on both sides: only float noise is allowed
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE

# (sampling rate q, noise multiplier sigma, steps T)
TABLE = [
    (1.0, 1.1, 1),
    (1.0, 5.0, 100),
    (0.01, 1.1, 1000),
    (0.001, 0.8, 10000),
    (0.1, 2.0, 50),
]


def reference_accountant(kind: str, relation=ADD_REMOVE):
    # The documented construction: PLD at value_discretization_interval=1e-3,
    # RDP with dp_accounting's default orders.
    if kind == "pld":
        return pld.PLDAccountant(
            neighboring_relation=relation, value_discretization_interval=1e-3
        )
    return rdp.RdpAccountant(neighboring_relation=relation)


def reference_poisson(kind: str, q: float, sigma: float, steps: int) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        steps,
    )
    return reference_accountant(kind).compose(event).get_epsilon(DELTA)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize(("q", "sigma", "steps"), TABLE)
def test_epsilon_equals_dp_accounting(kind, q, sigma, steps):
    expected = reference_poisson(kind, q, sigma, steps)
    spec = DpEventSpec(sigma, sampling="poisson", sampling_rate=q, count=steps)

    assert epsilon([spec], DELTA, kind) == pytest.approx(expected, rel=REL)
    assert epsilon_for(q, sigma, steps, DELTA, kind) == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_full_participation_equals_the_plain_gaussian(kind):
    # q = 1 and sampling = "none" are both the unsampled Gaussian mechanism.
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(5.0), 100)
    expected = reference_accountant(kind).compose(event).get_epsilon(DELTA)

    unsampled = DpEventSpec(5.0, count=100)
    q_one = DpEventSpec(5.0, sampling="poisson", sampling_rate=1.0, count=100)

    assert epsilon([unsampled], DELTA, kind) == pytest.approx(expected, rel=REL)
    # PLD discretises Gaussian(sigma / sqrt(100)) once for the plain event but
    # self-composes a discretised Gaussian(sigma) for the sampled one: the two
    # pessimistic estimates differ at the discretisation level (about 3e-6).
    assert epsilon([q_one], DELTA, kind) == pytest.approx(expected, rel=1e-4)


def test_pld_is_tighter_than_rdp_on_the_table():
    for q, sigma, steps in TABLE:
        assert epsilon_for(q, sigma, steps, DELTA, "pld") < epsilon_for(
            q, sigma, steps, DELTA, "rdp"
        )


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_ledger_of_identical_rounds_equals_one_self_composed_event(kind):
    q, sigma, rounds = 0.01, 1.1, 1000
    ledger = PrivacyLedger(kind, DELTA)
    for round_idx in range(rounds):
        ledger.record(round_idx, DpEventSpec(sigma, "poisson", q))

    assert ledger.epsilon() == pytest.approx(
        reference_poisson(kind, q, sigma, rounds), rel=REL
    )


def test_ledger_composes_identical_rounds_once(monkeypatch):
    calls = []
    original = pld.PLDAccountant.compose

    def counting(self, event, count=1):
        calls.append(event)
        return original(self, event, count)

    monkeypatch.setattr(pld.PLDAccountant, "compose", counting)
    ledger = PrivacyLedger("pld", DELTA)
    for round_idx in range(1000):
        ledger.record(round_idx, DpEventSpec(1.0, "poisson", 0.01))

    first = ledger.epsilon()
    assert ledger.epsilon() == first  # cached: no second composition
    assert len(calls) == 1
    assert calls[0].count == 1000


def test_ledger_of_mixed_rounds_equals_the_composed_reference():
    specs = [
        DpEventSpec(1.0, "poisson", 0.01),
        DpEventSpec(2.0, "poisson", 0.05, count=3),
        DpEventSpec(1.0, "poisson", 0.01),
        DpEventSpec(4.0),
    ]
    ledger = PrivacyLedger("pld", DELTA)
    for round_idx, spec in enumerate(specs):
        ledger.record(round_idx, spec)
    gauss = dp_accounting.GaussianDpEvent
    poisson = dp_accounting.PoissonSampledDpEvent
    reference = reference_accountant("pld")
    reference.compose(poisson(0.01, gauss(1.0)), 2)
    reference.compose(poisson(0.05, gauss(2.0)), 3)
    reference.compose(gauss(4.0))

    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(DELTA), rel=1e-6)


def test_empty_ledger_has_zero_epsilon():
    assert PrivacyLedger().epsilon() == 0.0
    assert epsilon([], DELTA) == 0.0


def test_epsilon_if_predicts_without_recording():
    ledger = PrivacyLedger("rdp", DELTA)
    spec = DpEventSpec(1.1, "poisson", 0.01)
    ledger.record(0, spec)

    predicted = ledger.epsilon_if(spec)

    assert len(ledger) == 1
    assert predicted > ledger.epsilon()
    ledger.record(1, spec)
    assert ledger.epsilon() == pytest.approx(predicted, rel=REL)


specs = st.builds(
    DpEventSpec,
    noise_multiplier=st.floats(0.5, 8.0),
    sampling=st.just("poisson"),
    sampling_rate=st.floats(0.001, 1.0),
    count=st.integers(1, 50),
) | st.builds(
    DpEventSpec, noise_multiplier=st.floats(0.5, 8.0), sampling=st.just("none")
)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@settings(
    max_examples=15,
    deadline=None,
)
@given(rounds=st.lists(specs, min_size=1, max_size=4))
def test_epsilon_never_decreases_as_rounds_are_recorded(kind, rounds):
    ledger = PrivacyLedger(kind, DELTA)
    previous = ledger.epsilon()
    for round_idx, spec in enumerate(rounds):
        ledger.record(round_idx, spec)
        current = ledger.epsilon()
        assert current >= previous
        previous = current


def test_json_round_trip_gives_the_same_epsilon():
    ledger = PrivacyLedger("rdp", 1e-6)
    for round_idx in range(20):
        ledger.record(round_idx, DpEventSpec(1.3, "poisson", 0.02, count=5))
    ledger.record(20, DpEventSpec(0.9))
    ledger.record(21, DpEventSpec(1.3, "poisson", 0.02, count=5))

    restored = PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))

    assert restored.events == ledger.events
    assert restored.accountant == "rdp" and restored.delta == 1e-6
    assert restored.epsilon() == ledger.epsilon()


def test_spec_json_round_trip_and_validation():
    spec = DpEventSpec(1.5, "fixed", population=100, sample_size=10, count=7)
    assert DpEventSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ConfigError, match="unknown"):
        DpEventSpec.from_json({"noise_multiplier": 1.0, "sigma": 2.0})
    with pytest.raises(ConfigError, match="noise_multiplier"):
        DpEventSpec.from_json({"sampling": "none"})
    with pytest.raises(ConfigError, match="noise_multiplier"):
        DpEventSpec.from_json({"noise_multiplier": "1.0"})
    with pytest.raises(ConfigError, match="sampling_rate"):
        DpEventSpec.from_json({"noise_multiplier": 1.0, "sampling": "poisson"})


def test_ledger_from_json_rejects_malformed_data():
    good = PrivacyLedger("pld", DELTA, [(0, DpEventSpec(1.0))]).to_json()
    with pytest.raises(ConfigError):
        PrivacyLedger.from_json({**good, "format": "other"})
    with pytest.raises(ConfigError):
        PrivacyLedger.from_json({**good, "events": [{"spec": {}, "rounds": [0]}]})
    with pytest.raises(ConfigError):
        PrivacyLedger.from_json({**good, "events": [{"rounds": [0]}]})
    with pytest.raises(ConfigError):
        PrivacyLedger.from_json({**good, "accountant": "moments"})


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "record nothing"),
        ({"noise_multiplier": 1.0, "sampling": "poisson"}, "sampling_rate"),
        (
            {"noise_multiplier": 1.0, "sampling": "poisson", "sampling_rate": 0.0},
            "sampling_rate",
        ),
        (
            {"noise_multiplier": 1.0, "sampling": "poisson", "sampling_rate": 1.01},
            "sampling_rate",
        ),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1}, "sampling_rate"),
        (
            {
                "noise_multiplier": 1.0,
                "sampling": "fixed",
                "population": 10,
                "sample_size": 11,
            },
            "sample_size",
        ),
        ({"noise_multiplier": 1.0, "sampling": "fixed"}, "population"),
        ({"noise_multiplier": 1.0, "count": 0}, "count"),
        ({"noise_multiplier": 1.0, "count": 2.5}, "count"),
        ({"noise_multiplier": 1.0, "sampling": "shuffle"}, "sampling"),
        ({"noise_multiplier": 1.0, "num_clients": 3}, "num_clients"),
        (
            {"noise_multiplier": 1.0, "mechanism": "distributed_discrete_gaussian"},
            "num_clients",
        ),
    ],
)
def test_invalid_spec_names_what_to_change(kwargs, names):
    with pytest.raises(ConfigError, match=names):
        DpEventSpec(**kwargs)


def test_distributed_discrete_gaussian_reports_its_gaussian_approximation():
    spec = DpEventSpec.distributed_discrete_gaussian(
        num_clients=100, noise_std_per_client=3.0, l2_sensitivity=50.0, dimension=10
    )
    # sqrt(100) * 3 / 50 = 0.6, worked by hand (its epsilon: see
    # tests/privacy/test_distributed_accounting.py)
    assert spec.noise_multiplier == pytest.approx(0.6, rel=1e-12)
    with pytest.raises(ConfigError, match="sqrt"):
        DpEventSpec(
            1.0,
            mechanism="distributed_discrete_gaussian",
            num_clients=100,
            noise_std_per_client=3.0,
            l2_sensitivity=50.0,
            dimension=10,
        )
    with pytest.raises(ConfigError, match="num_clients"):
        DpEventSpec.distributed_discrete_gaussian(
            num_clients=0, noise_std_per_client=3.0, l2_sensitivity=5.0, dimension=1
        )


@pytest.mark.parametrize(
    ("kind", "q", "steps", "target"),
    [
        ("pld", 0.01, 1000, 1.0),
        ("rdp", 0.01, 1000, 1.0),
        ("pld", 1.0, 10, 3.0),
        ("pld", 0.001, 10000, 0.5),
    ],
)
def test_calibrated_sigma_is_just_enough(kind, q, steps, target):
    sigma = calibrate_noise_multiplier(
        target, DELTA, sampling_rate=q, steps=steps, accountant=kind
    )

    assert reference_poisson(kind, q, sigma, steps) <= target
    assert reference_poisson(kind, q, 0.99 * sigma, steps) > target


def test_calibration_for_fixed_sampling_with_rdp():
    sigma = calibrate_noise_multiplier(
        2.0,
        DELTA,
        sampling_rate=None,
        steps=100,
        accountant="rdp",
        sampling="fixed",
        population=1000,
        sample_size=10,
    )

    def reference(s: float) -> float:
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                1000, 10, dp_accounting.GaussianDpEvent(s)
            ),
            100,
        )
        return (
            reference_accountant("rdp", REPLACE_ONE).compose(event).get_epsilon(DELTA)
        )

    assert reference(sigma) <= 2.0 < reference(0.99 * sigma)


@pytest.mark.parametrize(
    ("target", "delta", "steps", "match"),
    [
        (0.0, DELTA, 1000, "target_epsilon"),
        (-1.0, DELTA, 1000, "target_epsilon"),
        (math.nan, DELTA, 1000, "target_epsilon"),
        (math.inf, DELTA, 1000, "target_epsilon"),
        # sigma = 1e4 still gives about 0.05 over 1000 steps at delta 1e-10
        (1e-4, 1e-10, 1000, "unreachable"),
        # one release at sigma = 0.1 already stays below 500 (about 92)
        (500.0, DELTA, 1, "lower target_epsilon"),
        (1.0, 0.0, 1000, "delta"),
        (1.0, 1.0, 1000, "delta"),
        (1.0, DELTA, 0, "steps"),
    ],
)
def test_unreachable_or_invalid_target_raises(target, delta, steps, match):
    with pytest.raises(ConfigError, match=match):
        calibrate_noise_multiplier(target, delta, sampling_rate=1.0, steps=steps)


def test_fixed_sampling_with_pld_is_refused():
    spec = DpEventSpec(1.0, "fixed", population=100, sample_size=10)
    message = "fixed-size sampling is accounted only by the RDP accountant"

    with pytest.raises(UnsupportedEventError, match=message):
        epsilon([spec], DELTA, "pld")
    ledger = PrivacyLedger("pld", DELTA)
    with pytest.raises(UnsupportedEventError, match=message):
        ledger.record(0, spec)
    assert len(ledger) == 0 and ledger.epsilon() == 0.0
    with pytest.raises(UnsupportedEventError, match=message):
        calibrate_noise_multiplier(
            1.0,
            DELTA,
            sampling_rate=None,
            steps=10,
            sampling="fixed",
            population=100,
            sample_size=10,
        )
    # A replace-one PLD accountant is built (record mode's Poisson events need
    # it); fixed-size sampling is refused by the events' check above.
    accountant = make_accountant("pld", replace_one=True)
    assert accountant.neighboring_relation == REPLACE_ONE


@pytest.mark.parametrize(("population", "sample_size"), [(1000, 10), (100, 100)])
def test_fixed_sampling_with_rdp_equals_sampled_without_replacement(
    population, sample_size
):
    sigma, steps = 1.1, 100
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            population, sample_size, dp_accounting.GaussianDpEvent(sigma)
        ),
        steps,
    )
    expected = (
        reference_accountant("rdp", REPLACE_ONE).compose(event).get_epsilon(DELTA)
    )
    spec = DpEventSpec(sigma, "fixed", population=population, sample_size=sample_size)

    ledger = PrivacyLedger("rdp", DELTA)
    for round_idx in range(steps):
        ledger.record(round_idx, spec)

    assert ledger.epsilon() == pytest.approx(expected, rel=REL)
    if sample_size < population:
        # Never silently accounted as Poisson sampling at the same rate (at
        # q = 1 both are the plain Gaussian and agree).
        assert expected != pytest.approx(
            reference_poisson("rdp", sample_size / population, sigma, steps), rel=1e-3
        )


def test_ledger_refuses_mixing_neighbouring_relations():
    ledger = PrivacyLedger("rdp", DELTA)
    ledger.record(0, DpEventSpec(1.0, "fixed", population=100, sample_size=10))
    before = ledger.epsilon()

    for other in (DpEventSpec(1.0, "poisson", 0.1), DpEventSpec(1.0)):
        with pytest.raises(UnsupportedEventError, match="one sampling scheme"):
            ledger.record(1, other)
        with pytest.raises(UnsupportedEventError, match="one sampling scheme"):
            ledger.epsilon_if(other)
    # Fixed-size sampling and replace-one Poisson share the relation, but no
    # accountant takes both.
    with pytest.raises(UnsupportedEventError):
        ledger.record(1, DpEventSpec(1.0, "poisson", 0.1, replace_one=True))
    assert len(ledger) == 1 and ledger.epsilon() == before


# --- replace-one Poisson sampling (record mode: the record count is public) ----


@pytest.mark.parametrize(("q", "sigma", "steps"), [(64 / 6000, 1.0, 940), *TABLE])
def test_replace_one_poisson_equals_dp_accountings_pld_replace_one(q, sigma, steps):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        steps,
    )
    expected = (
        reference_accountant("pld", REPLACE_ONE).compose(event).get_epsilon(DELTA)
    )
    spec = DpEventSpec(
        sigma, sampling="poisson", sampling_rate=q, count=steps, replace_one=True
    )
    assert spec.is_replace_one
    assert epsilon([spec], DELTA, "pld") == pytest.approx(expected, rel=REL)
    ledger = PrivacyLedger("pld", DELTA)
    ledger.record(0, spec)
    assert ledger.epsilon() == pytest.approx(expected, rel=REL)
    add_remove = DpEventSpec(sigma, sampling="poisson", sampling_rate=q, count=steps)
    assert epsilon([add_remove], DELTA, "pld") < epsilon([spec], DELTA, "pld")


def test_the_reviews_example_is_2_95_under_replace_one():
    # n = 6000, batch 64 (q = 64/6000, 94 steps an epoch), 10 rounds of one
    # epoch, sigma = 1, delta = 1e-5: 1.904 for add or remove, 2.954 replaced.
    common = {"sampling": "poisson", "sampling_rate": 64 / 6000, "count": 940}
    assert epsilon([DpEventSpec(1.0, **common)], DELTA) == pytest.approx(
        1.904, abs=1e-3
    )
    replaced = DpEventSpec(1.0, **common, replace_one=True)
    assert epsilon([replaced], DELTA) == pytest.approx(2.954, abs=1e-3)


def test_replace_one_poisson_with_rdp_is_refused():
    spec = DpEventSpec(1.0, "poisson", 0.01, count=10, replace_one=True)
    message = "only the PLD accountant supports for Poisson sampling"
    with pytest.raises(UnsupportedEventError, match=message):
        epsilon([spec], DELTA, "rdp")
    ledger = PrivacyLedger("rdp", DELTA)
    with pytest.raises(UnsupportedEventError, match=message):
        ledger.record(0, spec)
    assert len(ledger) == 0
    with pytest.raises(UnsupportedEventError, match=message):
        calibrate_noise_multiplier(
            1.0, DELTA, sampling_rate=0.01, steps=10, accountant="rdp", replace_one=True
        )


def test_replace_one_does_not_mix_with_add_or_remove():
    ledger = PrivacyLedger("pld", DELTA)
    ledger.record(0, DpEventSpec(1.0, "poisson", 0.01, replace_one=True))
    before = ledger.epsilon()
    for other in (DpEventSpec(1.0, "poisson", 0.01), DpEventSpec(1.0)):
        with pytest.raises(UnsupportedEventError, match="one relation"):
            ledger.record(1, other)
    assert len(ledger) == 1 and ledger.epsilon() == before


def test_calibration_under_replace_one_meets_the_target_with_a_larger_sigma():
    kwargs = {"sampling_rate": 64 / 6000, "steps": 940}
    sigma = calibrate_noise_multiplier(2.0, DELTA, replace_one=True, **kwargs)
    old = calibrate_noise_multiplier(2.0, DELTA, **kwargs)
    assert sigma > old
    spec = DpEventSpec(sigma, "poisson", 64 / 6000, count=940, replace_one=True)
    assert 1.99 < epsilon([spec], DELTA) <= 2.0


def test_replace_one_json_round_trip_and_old_json():
    spec = DpEventSpec(1.0, "poisson", 0.01, count=5, replace_one=True)
    data = json.loads(json.dumps(spec.to_json()))
    assert data["replace_one"] is True
    assert DpEventSpec.from_json(data) == spec
    # Add-or-remove specs write what they always did: JSON without the field
    # (ledgers and checkpoints written before it existed) reads as add/remove.
    old = DpEventSpec(1.0, "poisson", 0.01, count=5)
    assert "replace_one" not in old.to_json()
    old_json = {
        "noise_multiplier": 1.0,
        "sampling": "poisson",
        "sampling_rate": 0.01,
        "count": 5,
    }
    assert DpEventSpec.from_json(old_json) == old
    ledger_json = {
        "format": "fedshield.privacy_ledger",
        "version": 1,
        "accountant": "pld",
        "delta": DELTA,
        "events": [
            {
                "spec": {
                    "noise_multiplier": 1.0,
                    "sampling": "poisson",
                    "sampling_rate": 0.01,
                    "count": 5,
                },
                "rounds": [0, 1],
            }
        ],
    }
    ledger = PrivacyLedger.from_json(ledger_json)
    assert ledger.events == ((0, old), (1, old))
    assert "replace_one" not in ledger.to_json()["events"][0]["spec"]
    replaced = PrivacyLedger("pld", DELTA, [(0, spec)])
    assert PrivacyLedger.from_json(
        json.loads(json.dumps(replaced.to_json()))
    ).events == ((0, spec),)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling": "fixed", "population": 10, "sample_size": 2}, "always"),
        ({"replace_one": 1}, "true or false"),
    ],
)
def test_replace_one_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DpEventSpec(1.0, **{"replace_one": True, **kwargs})
    with pytest.raises(ConfigError, match="Gaussian mechanism only"):
        DpEventSpec(
            2.0, mechanism="distributed_discrete_gaussian", num_clients=4,
            noise_std_per_client=1.0, l2_sensitivity=1.0, dimension=3, replace_one=True,
        )  # fmt: skip


def test_ledger_validates_rounds_delta_and_accountant():
    ledger = PrivacyLedger("pld", DELTA)
    ledger.record(3, DpEventSpec(1.0))
    with pytest.raises(ConfigError, match="goes back"):
        ledger.record(2, DpEventSpec(1.0))
    with pytest.raises(ConfigError, match="round_idx"):
        ledger.record(-1, DpEventSpec(1.0))
    with pytest.raises(ConfigError, match="delta"):
        PrivacyLedger("pld", 0.0)
    with pytest.raises(ConfigError, match="accountant"):
        PrivacyLedger("moments")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="steps"):
        epsilon_for(0.1, 1.0, 0, DELTA)


# --- the PLD grid stays bounded (issue 11, item 10) ----------------------------


@pytest.mark.parametrize(("q", "sigma", "steps"), TABLE)
def test_ordinary_noise_keeps_the_default_grid(q, sigma, steps):
    spec = DpEventSpec(sigma, sampling="poisson", sampling_rate=q, count=steps)
    assert pld_value_discretization_interval([spec]) == 1e-3


def test_tiny_noise_is_refused_before_any_grid_is_built():
    # Used to allocate ~373 GiB (numpy ArrayMemoryError) inside dp_accounting.
    spec = DpEventSpec(1e-4, sampling="poisson", sampling_rate=0.01, count=1000)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"noise_multiplier 0\.0001.*RDP accountant"):
        epsilon([spec], DELTA, "pld")
    assert time.perf_counter() - start < 5
    with pytest.raises(ConfigError, match="RDP accountant"):
        PrivacyLedger("pld", DELTA, [(0, spec)]).epsilon()
    assert math.isfinite(epsilon([spec], DELTA, "rdp"))


def test_a_coarsened_grid_fits_its_bounds_and_is_what_dp_accounting_computes(
    monkeypatch,
):
    # Small bounds so that the check is quick: the grid dp_accounting builds
    # at the chosen step must hold no more points than allowed, and epsilon()
    # must be dp_accounting's PLD at that step.
    monkeypatch.setattr(accounting, "PLD_MAX_RELEASE_POINTS", 2**10)
    monkeypatch.setattr(accounting, "PLD_MAX_POINTS", 2**15)
    accounting._pld_composed_points.cache_clear()
    q, sigma, steps = 0.01, 0.5, 1000
    spec = DpEventSpec(sigma, sampling="poisson", sampling_rate=q, count=steps)
    try:
        interval = pld_value_discretization_interval([spec])
        got = epsilon([spec], DELTA, "pld")
    finally:
        accounting._pld_composed_points.cache_clear()

    assert interval > 1e-3
    release = pld.privacy_loss_distribution.from_gaussian_mechanism(
        sigma, value_discretization_interval=interval, sampling_prob=q
    )
    composed = release.self_compose(steps)
    assert max(release._pmf_remove.size, release._pmf_add.size) <= 2**10
    assert composed._pmf_remove.size + composed._pmf_add.size <= 2**15
    reference = pld.PLDAccountant(value_discretization_interval=interval)
    reference.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(sigma)
            ),
            steps,
        )
    )
    assert got == pytest.approx(reference.get_epsilon(DELTA), rel=REL)
    # A looser upper bound than the default grid's, by well under 1 %.
    fine = reference_poisson("pld", q, sigma, steps)
    assert fine <= got <= fine * 1.01


def test_small_noise_is_accounted_in_seconds():
    # Used to run past a minute and 17 GB (sigma 1e-3, 1000 steps).
    spec = DpEventSpec(1e-3, sampling="poisson", sampling_rate=0.01, count=1000)
    start = time.perf_counter()
    value = epsilon([spec], DELTA, "pld")
    assert math.isfinite(value) and value > epsilon([spec], DELTA, "rdp") / 100
    assert time.perf_counter() - start < 60


def test_a_delta_below_the_pld_truncation_gives_infinity_not_a_number():
    spec = DpEventSpec(1.1, sampling="poisson", sampling_rate=0.01, count=1000)
    assert epsilon([spec], 1e-300, "pld") == math.inf
    assert math.isfinite(epsilon([spec], 1e-300, "rdp"))
