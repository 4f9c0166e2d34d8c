"""Gaussian noise sources: reproducibility, OS randomness, distribution checks."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedshield.errors import ConfigError
from fedshield.privacy import noise as noise_module
from fedshield.privacy.noise import (
    GaussianNoise,
    SecureGaussian,
    SecureRandom,
    SeededGaussian,
    make_noise,
)

N = 200_000


def sources():
    return [SeededGaussian(np.random.default_rng(1234)), SecureGaussian()]


def test_seeded_noise_is_reproducible():
    first = SeededGaussian(np.random.default_rng(7)).sample((3, 5), 2.0)
    again = SeededGaussian(np.random.default_rng(7)).sample((3, 5), 2.0)
    other = SeededGaussian(np.random.default_rng(8)).sample((3, 5), 2.0)

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_secure_noise_is_not_reproducible():
    source = SecureGaussian()
    assert not np.array_equal(source.sample(64, 1.0), source.sample(64, 1.0))
    assert not np.array_equal(
        SecureGaussian().sample(64, 1.0), SecureGaussian().sample(64, 1.0)
    )


def test_secure_noise_is_keyed_only_from_os_urandom(monkeypatch):
    calls = []

    def fake_urandom(n: int) -> bytes:
        calls.append(n)
        return random.Random(n).randbytes(n)

    monkeypatch.setattr(noise_module.os, "urandom", fake_urandom)
    monkeypatch.setattr(
        np.random, "default_rng", lambda *a, **k: pytest.fail("used numpy's PRNG")
    )
    first = SecureGaussian().sample(1000, 1.0)
    again = SecureGaussian().sample(1000, 1.0)

    # With the key fixed the output is fixed: os.urandom is the only source,
    # read once per key (32 bytes of AES-256 key, 16 of initial counter).
    np.testing.assert_array_equal(first, again)
    assert calls == [32, 16, 32, 16]


class _Fixed(SecureRandom):
    """A SecureRandom whose normals are 0, 1, 2, ... (to see what is summed)."""

    def standard_normal(self, size: int) -> np.ndarray:
        return np.arange(size, dtype=np.float64)


def test_secure_noise_sums_four_draws_and_halves():
    std = 3.0
    out = SecureGaussian(_Fixed()).sample(10, std)
    draws = np.arange(40, dtype=np.float64).reshape(4, 10)
    np.testing.assert_array_equal(out, draws.sum(axis=0) * std / 2)


def test_secure_gaussian_takes_only_a_secure_random():
    with pytest.raises(ConfigError, match="SecureRandom"):
        SecureGaussian(np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("source", sources(), ids=["seeded", "secure"])
def test_mean_and_std_within_sampling_error(source: GaussianNoise):
    std = 2.5
    values = source.sample(N, std)

    # Standard errors: mean sigma / sqrt(n); sample std about sigma / sqrt(2n).
    assert abs(values.mean()) < 5 * std / math.sqrt(N)
    assert abs(values.std() - std) < 5 * std / math.sqrt(2 * N)


@pytest.mark.parametrize("source", sources(), ids=["seeded", "secure"])
def test_fractions_within_k_std_are_gaussian(source: GaussianNoise):
    std = 0.7
    values = source.sample(N, std)
    for k in (1, 2, 3):
        p = math.erf(k / math.sqrt(2))  # 0.6827, 0.9545, 0.9973
        fraction = np.mean(np.abs(values) < k * std)
        assert abs(fraction - p) < 5 * math.sqrt(p * (1 - p) / N), k
    # Symmetric: as many positive as negative values.
    assert abs(np.mean(values > 0) - 0.5) < 5 * math.sqrt(0.25 / N)


@pytest.mark.parametrize("source", sources(), ids=["seeded", "secure"])
def test_shape_and_dtype(source: GaussianNoise):
    assert source.sample((3, 4), 1.0).shape == (3, 4)
    assert source.sample(5, 1.0).shape == (5,)
    assert source.sample(0, 1.0).shape == (0,)
    assert source.sample((2, 0, 3), 1.0).shape == (2, 0, 3)
    assert source.sample((), 1.0).shape == ()
    assert source.sample((7, 3), 1.0).dtype == np.float64
    assert source.sample(3, 1).dtype == np.float64


@pytest.mark.parametrize("source", sources(), ids=["seeded", "secure"])
def test_zero_std_gives_zeros(source: GaussianNoise):
    values = source.sample((4, 2), 0.0)
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, np.zeros((4, 2)))


@pytest.mark.parametrize("source", sources(), ids=["seeded", "secure"])
@pytest.mark.parametrize("std", [-1.0, -1e-300, math.nan, math.inf, "1"])
def test_invalid_std_raises(source: GaussianNoise, std):
    with pytest.raises(ConfigError, match="std"):
        source.sample(3, std)  # type: ignore[arg-type]


@pytest.mark.parametrize("source", sources(), ids=["seeded", "secure"])
@pytest.mark.parametrize("shape", [-1, (2, -1), 2.5, (True,)])
def test_invalid_shape_raises(source: GaussianNoise, shape):
    with pytest.raises(ConfigError, match="shape"):
        source.sample(shape, 1.0)


def test_make_noise():
    secure = make_noise(True, None)
    seeded = make_noise(False, np.random.default_rng(0))

    assert isinstance(secure, SecureGaussian) and secure.secure is True
    assert isinstance(seeded, SeededGaussian) and seeded.secure is False
    assert isinstance(secure, GaussianNoise) and isinstance(seeded, GaussianNoise)
    np.testing.assert_array_equal(
        seeded.sample(4, 1.0), SeededGaussian(np.random.default_rng(0)).sample(4, 1.0)
    )
    with pytest.raises(ConfigError, match="rng"):
        make_noise(False, None)
    with pytest.raises(ConfigError, match="rng"):
        SeededGaussian(np.random.RandomState(0))  # type: ignore[arg-type]
