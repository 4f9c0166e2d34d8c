"""The distributed discrete Gaussian mechanism's client and server halves."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
from scipy import stats

from fedshield.errors import ConfigError
from fedshield.privacy import distributed as ddg


def _bytes(seed: int):
    return np.random.default_rng(seed).bytes


def test_hadamard_is_an_orthogonal_involution():
    x = np.random.default_rng(0).normal(size=256)
    y = np.random.default_rng(1).normal(size=256)
    hx = ddg.hadamard(x)
    assert np.allclose(ddg.hadamard(hx), x, atol=1e-12)
    assert np.linalg.norm(hx) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.allclose(ddg.hadamard(x + y), hx + ddg.hadamard(y), atol=1e-12)
    # Against the dense Sylvester matrix.
    dense = np.array([[1.0]])
    while dense.shape[0] < 256:
        dense = np.block([[dense, dense], [dense, -dense]])
    assert np.allclose(hx, dense @ x / 16.0, atol=1e-12)
    with pytest.raises(ValueError, match="power of two"):
        ddg.hadamard(np.ones(6))


@pytest.mark.parametrize(("d", "padded"), [(1, 1), (2, 2), (3, 4), (4810, 8192)])
def test_padded_dimension(d, padded):
    assert ddg.padded_dimension(d) == padded


@pytest.mark.parametrize("sigma", [0.5, 1.5, 4.0])
def test_discrete_gaussian_matches_its_pmf(sigma):
    draws = ddg.discrete_gaussian(100_000, sigma, _bytes(3))
    support = np.arange(-int(6 * sigma) - 1, int(6 * sigma) + 2)
    pmf = np.exp(-(support.astype(float) ** 2) / (2 * sigma**2))
    pmf /= pmf.sum()
    keep = pmf * draws.size >= 5  # chi-square needs enough expected counts
    observed = np.array([np.count_nonzero(draws == k) for k in support[keep]])
    expected = pmf[keep] * draws.size
    rest = draws.size - observed.sum()
    observed = np.append(observed, rest)
    expected = np.append(expected, draws.size - expected.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_discrete_gaussian_large_sigma_and_a_wrong_sigma_is_caught():
    draws = ddg.discrete_gaussian(200_000, 1000.0, _bytes(4))
    assert abs(draws.mean()) < 10
    assert draws.std() == pytest.approx(1000.0, rel=0.01)
    # The chi-square test above would catch a sampler off by 10 % in sigma.
    wrong = ddg.discrete_gaussian(100_000, 1.65, _bytes(5))
    support = np.arange(-8, 9)
    pmf = np.exp(-(support.astype(float) ** 2) / (2 * 1.5**2))
    pmf /= pmf.sum()
    observed = np.array([np.count_nonzero(wrong == k) for k in support])
    assert stats.chisquare(observed, pmf * observed.sum()).pvalue < 1e-6
    with pytest.raises(ConfigError, match="sigma"):
        ddg.discrete_gaussian(3, 0.0, os.urandom)


def test_conditional_rounding_is_unbiased_and_within_its_bound():
    x = np.random.default_rng(6).normal(size=64) * 3
    bound_sq = float(np.dot(x, x)) + 64 / 4.0 + 2.0
    draws = []
    for seed in range(400):
        rounded, tries = ddg.conditional_round(x, bound_sq, _bytes(seed))
        assert tries >= 1
        assert float(np.dot(rounded, rounded)) <= bound_sq
        assert np.all(np.abs(rounded - x) < 1)
        draws.append(rounded)
    assert np.abs(np.mean(draws, axis=0) - x).max() < 0.15
    with pytest.raises(ConfigError, match="not clipped"):
        ddg.conditional_round(x, float(np.dot(x, x)) / 4, _bytes(0))


def test_parameters_follow_the_noise_share_and_refuse_too_few_bits():
    dp = ddg.DistributedDp(clip_norm=2.0, noise_multiplier=1.2)
    p = dp.parameters(dimension=1000, num_clients=12, threshold=8)
    assert p.padded == 1024 and p.modulus_bits == 20
    # t shares of sigma add up to the std of central DP-FedAvg's noise z C.
    assert math.sqrt(8) * p.noise_std * p.gamma == pytest.approx(1.2 * 2.0)
    assert p.l2_sensitivity * p.gamma == pytest.approx(2.0, rel=0.05)
    assert p.l2_sensitivity * p.gamma > 2.0
    with pytest.raises(ConfigError, match=r"distributed_bits >= (\d+)") as err:
        ddg.DistributedDp(1.0, 1.0, modulus_bits=10).parameters(
            dimension=10**6, num_clients=1000, threshold=667
        )
    needed = int(err.value.args[0].rsplit(">= ", 1)[1])
    ddg.DistributedDp(1.0, 1.0, modulus_bits=needed).parameters(
        dimension=10**6, num_clients=1000, threshold=667
    )
    with pytest.raises(ConfigError, match="threshold"):
        dp.parameters(dimension=10, num_clients=3, threshold=4)
    with pytest.raises(ConfigError, match="distributed_bits"):
        ddg.DistributedDp(1.0, 1.0, modulus_bits=63)


def _round(dp, deltas, survivors, seed=0, rotation_seed=7):
    params = dp.parameters(
        dimension=deltas[0].size,
        num_clients=len(deltas),
        threshold=math.ceil(2 * len(deltas) / 3),
    )
    mask = np.uint64((1 << params.modulus_bits) - 1)
    total = np.zeros(params.padded, dtype=np.uint64)
    for k in survivors:
        words, _info = ddg.encode(
            deltas[k],
            params,
            clip_norm=dp.clip_norm,
            rotation_seed=rotation_seed,
            random_bytes=_bytes(1000 * seed + k),
        )
        assert words.dtype == np.uint64 and int(words.max()) <= int(mask)
        total = (total + words) & mask
    decoded, near = ddg.decode_sum(total, params, rotation_seed=rotation_seed)
    return params, decoded, near


def test_the_sum_decodes_to_the_clipped_sum_plus_the_noise():
    rng = np.random.default_rng(8)
    deltas = [rng.normal(size=300) * s for s in (0.01, 0.05, 0.2, 0.5, 1.0)]
    dp = ddg.DistributedDp(clip_norm=1.0, noise_multiplier=0.5)
    clipped = sum(d * min(1.0, 1.0 / np.linalg.norm(d)) for d in deltas)
    errors = []
    for seed in range(40):
        _, decoded, near = _round(dp, deltas, range(5), seed=seed)
        assert near == 0
        errors.append(decoded - clipped)
    errors = np.asarray(errors)
    # Five shares of std z C / sqrt(t) each, t = 4 (rounding adds ~gamma).
    expected = 0.5 * math.sqrt(5 / 4)
    assert errors.std() == pytest.approx(expected, rel=0.03)
    assert abs(errors.mean()) < 0.01


def test_survivors_at_the_threshold_hold_at_least_the_central_noise():
    rng = np.random.default_rng(9)
    deltas = [rng.normal(size=100) for _ in range(9)]
    dp = ddg.DistributedDp(clip_norm=1.0, noise_multiplier=1.0)
    clipped = sum(d / np.linalg.norm(d) for d in deltas[:6])
    errors = [
        _round(dp, deltas, range(6), seed=seed)[1] - clipped for seed in range(40)
    ]
    assert np.std(errors) == pytest.approx(1.0, rel=0.05)  # t = 6 shares: z C


def test_identical_updates_at_the_clip_norm_do_not_wrap():
    one = np.zeros(64)
    one[0] = 1.0  # all the norm on one coordinate: the rotation spreads it
    deltas = [one.copy() for _ in range(30)]
    dp = ddg.DistributedDp(clip_norm=1.0, noise_multiplier=0.3, modulus_bits=12)
    _, decoded, near = _round(dp, deltas, range(30))
    assert near == 0
    assert decoded[0] == pytest.approx(30.0, abs=6 * 0.3 * math.sqrt(30 / 20) + 0.1)


def test_wrap_around_is_flagged():
    one = np.full(64, 1 / 8.0)
    dp = ddg.DistributedDp(clip_norm=1.0, noise_multiplier=0.3, modulus_bits=12)
    params = dp.parameters(dimension=64, num_clients=30, threshold=20)
    tight = dataclasses.replace(  # a granularity 40 times too fine: wraps
        params,
        gamma=params.gamma / 40,
        l2_sensitivity=params.l2_sensitivity * 40,
    )
    mask = np.uint64((1 << 12) - 1)
    total = np.zeros(64, dtype=np.uint64)
    for k in range(30):
        words, _ = ddg.encode(
            one, tight, clip_norm=1.0, rotation_seed=1, random_bytes=_bytes(k)
        )
        total = (total + words) & mask
    _, near = ddg.decode_sum(total, tight, rotation_seed=1)
    assert near > 0


def test_secure_randomness_differs_between_runs():
    dp = ddg.DistributedDp(clip_norm=1.0, noise_multiplier=1.0)
    params = dp.parameters(dimension=50, num_clients=3, threshold=2)
    delta = np.ones(50) * 0.01
    a, _ = ddg.encode(
        delta, params, clip_norm=1.0, rotation_seed=0, random_bytes=os.urandom
    )
    b, _ = ddg.encode(
        delta, params, clip_norm=1.0, rotation_seed=0, random_bytes=os.urandom
    )
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_update_is_encoded_as_zero(bad):
    # Whether training diverged depends on the data: encoded like the zero
    # update (same words from the same randomness), never an error.
    dp = ddg.DistributedDp(clip_norm=1.0, noise_multiplier=1.0, modulus_bits=16)
    params = dp.parameters(dimension=50, num_clients=3, threshold=2)
    delta = np.full(50, 0.01)
    delta[7] = bad
    words, _ = ddg.encode(
        delta, params, clip_norm=1.0, rotation_seed=3, random_bytes=_bytes(5)
    )
    zero, _ = ddg.encode(
        np.zeros(50), params, clip_norm=1.0, rotation_seed=3, random_bytes=_bytes(5)
    )
    np.testing.assert_array_equal(words, zero)


def _no_noise(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(
        ddg, "discrete_gaussian", lambda count, sigma, rb: np.zeros(count, np.int64)
    )


@pytest.mark.parametrize("shape", ["one-hot", "all-equal", "huge"])
def test_encoded_vectors_never_exceed_the_accounted_sensitivity(monkeypatch, shape):
    _no_noise(monkeypatch)
    d = 50
    dp = ddg.DistributedDp(clip_norm=1.0, noise_multiplier=1.0, modulus_bits=12)
    params = dp.parameters(dimension=d, num_clients=10, threshold=7)
    # A bound with almost no room above the clipped norm: plain stochastic
    # rounding would exceed it often; conditional rounding never may.
    scaled = 1.0 / params.gamma
    tight = dataclasses.replace(params, l2_sensitivity=math.sqrt(scaled**2 + 4.0))
    delta = {
        "one-hot": np.eye(d)[0] * 5.0,
        "all-equal": np.full(d, 3.0),
        "huge": np.random.default_rng(1).normal(size=d) * 1e6,
    }[shape]
    for p in (params, tight):
        for seed in range(60):
            words, _ = ddg.encode(
                delta, p, clip_norm=1.0, rotation_seed=seed, random_bytes=_bytes(seed)
            )
            ints = words.astype(np.int64)
            ints[ints >= 1 << 11] -= 1 << 12
            norm = float(np.linalg.norm(ints.astype(np.float64)))
            assert norm <= p.l2_sensitivity + 1e-9


def test_the_largest_noise_the_parameters_allow_has_random_low_bits():
    sigma = ddg.MAX_SIGMA
    draws = ddg.discrete_gaussian(40_000, sigma, _bytes(11))
    low = (draws & 7).astype(np.int64)
    counts = np.bincount(low, minlength=8)
    assert stats.chisquare(counts).pvalue > 1e-3
    with pytest.raises(ConfigError, match="fewer distributed_bits"):
        ddg.discrete_gaussian(3, 2.0**41, _bytes(0))


def test_too_many_bits_are_refused_with_a_smaller_number():
    with pytest.raises(ConfigError, match=r"distributed_bits <= (\d+)") as err:
        ddg.DistributedDp(1.0, 1.0, modulus_bits=62).parameters(
            dimension=4810, num_clients=10, threshold=7
        )
    most = int(err.value.args[0].rsplit("<= ", 1)[1])
    p = ddg.DistributedDp(1.0, 1.0, modulus_bits=most).parameters(
        dimension=4810, num_clients=10, threshold=7
    )
    assert p.noise_std <= ddg.MAX_SIGMA


def test_uniforms_stay_strictly_inside_the_unit_interval():
    low = ddg.uniforms(1, lambda n: b"\x00" * n)
    high = ddg.uniforms(1, lambda n: b"\xff" * n)
    assert 0.0 < low[0] < 1e-15 and 0.0 < 1.0 - high[0] < 1e-15
