"""Tests of the client samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshield.errors import ConfigError
from fedshield.strategies import ClientSampler, CountSampler, FractionSampler


def _clients(n: int) -> list[str]:
    return [f"client-{i:03d}" for i in range(n)]


# ---------------------------------------------------------------- FractionSampler


@pytest.mark.parametrize(
    ("fraction", "n", "expected"),
    [
        (1.0, 10, 10),
        (0.5, 10, 5),
        (0.3, 10, 3),
        (0.1, 30, 3),  # 0.1 * 30 == 3.0000000000000004 in floating point
        (0.25, 10, 3),
        (0.01, 10, 1),
        (0.7, 10, 7),  # 0.7 * 10 == 7.000000000000001
        (0.2, 1, 1),
    ],
)
def test_fraction_sampler_count_is_ceil_of_fraction(
    fraction: float, n: int, expected: int
) -> None:
    sampler = FractionSampler(fraction)

    picked = sampler.sample(_clients(n), round_idx=0, rng=np.random.default_rng(0))

    assert sampler.expected_count(n) == expected
    assert len(picked) == expected


@settings(max_examples=200, deadline=None)
@given(
    fraction=st.floats(0.001, 1.0),
    n=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_fraction_sampler_sample_is_subset_without_duplicates(
    fraction: float, n: int, seed: int
) -> None:
    available = _clients(n)
    sampler = FractionSampler(fraction)

    picked = sampler.sample(available, round_idx=0, rng=np.random.default_rng(seed))

    assert len(picked) == len(set(picked))
    assert set(picked) <= set(available)
    expected = max(1, math.ceil(round(fraction * n, 9)))
    assert len(picked) == expected


def test_fraction_sampler_is_deterministic_given_rng() -> None:
    sampler = FractionSampler(0.3)
    available = _clients(50)

    a = sampler.sample(available, round_idx=2, rng=np.random.default_rng(42))
    b = sampler.sample(available, round_idx=2, rng=np.random.default_rng(42))

    assert a == b


def test_fraction_sampler_different_rng_different_sample() -> None:
    sampler = FractionSampler(0.3)
    available = _clients(50)

    draws = {
        tuple(sampler.sample(available, round_idx=0, rng=np.random.default_rng(s)))
        for s in range(10)
    }

    assert len(draws) > 1


def test_fraction_sampler_is_roughly_uniform() -> None:
    # 2000 rounds of 2 out of 10: each client expected 400 times; with a
    # binomial sd of ~18, 400 +- 100 is over 5 sd.
    sampler = FractionSampler(0.2)
    available = _clients(10)
    rng = np.random.default_rng(123)
    counts = dict.fromkeys(available, 0)

    for r in range(2000):
        for c in sampler.sample(available, round_idx=r, rng=rng):
            counts[c] += 1

    assert all(300 <= v <= 500 for v in counts.values()), counts


def test_fraction_sampler_full_fraction_returns_all_in_order() -> None:
    available = _clients(7)

    picked = FractionSampler(1.0).sample(
        available, round_idx=0, rng=np.random.default_rng(0)
    )

    assert picked == available


def test_fraction_sampler_sample_keeps_available_order() -> None:
    available = _clients(40)

    picked = FractionSampler(0.25).sample(
        available, round_idx=0, rng=np.random.default_rng(3)
    )

    positions = [available.index(c) for c in picked]
    assert positions == sorted(positions)


def test_fraction_sampler_accepts_tuple_and_does_not_modify_input() -> None:
    available = tuple(_clients(20))

    picked = FractionSampler(0.5).sample(
        available, round_idx=0, rng=np.random.default_rng(0)
    )

    assert available == tuple(_clients(20))
    assert len(picked) == 10


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, 2.0, float("nan")])
def test_fraction_sampler_invalid_fraction_raises_config_error(
    fraction: float,
) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        FractionSampler(fraction)


# ---------------------------------------------------------------- CountSampler


@pytest.mark.parametrize(("count", "n", "expected"), [(3, 10, 3), (10, 10, 10)])
def test_count_sampler_samples_count_clients(count: int, n: int, expected: int) -> None:
    sampler = CountSampler(count)
    available = _clients(n)

    picked = sampler.sample(available, round_idx=0, rng=np.random.default_rng(0))

    assert len(picked) == expected
    assert sampler.expected_count(n) == expected
    assert len(set(picked)) == len(picked)
    assert set(picked) <= set(available)


def test_count_sampler_fewer_available_returns_all() -> None:
    sampler = CountSampler(10)
    available = _clients(4)

    picked = sampler.sample(available, round_idx=0, rng=np.random.default_rng(0))

    assert picked == available
    assert sampler.expected_count(4) == 4


def test_count_sampler_is_deterministic_given_rng() -> None:
    sampler = CountSampler(5)
    available = _clients(30)

    a = sampler.sample(available, round_idx=0, rng=np.random.default_rng(9))
    b = sampler.sample(available, round_idx=0, rng=np.random.default_rng(9))

    assert a == b


@pytest.mark.parametrize("count", [0, -3])
def test_count_sampler_invalid_count_raises_config_error(count: int) -> None:
    with pytest.raises(ConfigError, match=">= 1"):
        CountSampler(count)


def test_samplers_are_immutable_values() -> None:
    sampler = FractionSampler(0.5)

    with pytest.raises(AttributeError):
        sampler.fraction = 0.9  # type: ignore[misc]
    assert FractionSampler(0.5) == sampler
    assert CountSampler(3) == CountSampler(3)


def test_samplers_satisfy_protocol_structurally() -> None:
    samplers: list[ClientSampler] = [FractionSampler(0.5), CountSampler(2)]

    for sampler in samplers:
        assert sampler.sample(
            _clients(4), round_idx=0, rng=np.random.default_rng(0)
        ) == sampler.sample(_clients(4), round_idx=0, rng=np.random.default_rng(0))
