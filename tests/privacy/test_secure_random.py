"""SecureRandom: an AES-256-CTR keystream keyed from the OS, and its draws."""

from __future__ import annotations

import copy
import math
import multiprocessing
import pickle
from itertools import combinations

import numpy as np
import pytest
from scipy import stats

from fedshield.errors import ConfigError
from fedshield.privacy import noise as noise_module
from fedshield.privacy.noise import SecureGaussian, SecureRandom

N = 200_000
# Significance of the statistical tests: a correct generator fails one
# about once in a million runs.
ALPHA = 1e-6

# NIST SP 800-38A, F.5.5 (CTR-AES256.Encrypt): key, initial counter block
# and the first two output blocks (the keystream).
NIST_KEY = bytes.fromhex(
    "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"
)
NIST_COUNTER = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_KEYSTREAM = bytes.fromhex(
    "0bdf7df1591716335e9a8b15c860c5025a6e699d536119065433863c8f657b94"
)


def test_the_keystream_is_aes_256_ctr_keyed_from_os_urandom(monkeypatch) -> None:
    asked: list[int] = []

    def nist(n: int) -> bytes:
        asked.append(n)
        return {32: NIST_KEY, 16: NIST_COUNTER}[n]

    monkeypatch.setattr(noise_module.os, "urandom", nist)
    words = SecureRandom().words(4)
    assert words.tobytes() == NIST_KEYSTREAM
    assert asked == [32, 16]


def test_uniforms_are_53_bit_and_strictly_inside_0_1() -> None:
    u = SecureRandom().random(N)
    assert u.dtype == np.float64 and u.shape == (N,)
    assert u.min() > 0.0 and u.max() < 1.0
    k = u * 2.0**53
    np.testing.assert_array_equal(k, np.round(k))  # on the grid k * 2**-53
    assert stats.kstest(u, "uniform").pvalue > ALPHA


class _Scripted(SecureRandom):
    """A SecureRandom whose words are given in advance, call by call."""

    def __init__(self, *calls: list[int]) -> None:
        super().__init__()
        self.calls = [np.array(c, dtype=np.uint64) for c in calls]
        self.sizes: list[int] = []

    def words(self, size: int) -> np.ndarray:
        self.sizes.append(size)
        return self.calls.pop(0)


def test_a_zero_uniform_is_drawn_again() -> None:
    top = 1 << 11  # k = 1 in the top 53 bits
    source = _Scripted([0, 5 * top, 0], [0, 7 * top], [9 * top])
    u = source.random(3)
    np.testing.assert_array_equal(u, np.array([9.0, 5.0, 7.0]) * 2.0**-53)
    assert source.sizes == [3, 2, 1]


def test_the_keystream_bytes_are_uniform() -> None:
    data = np.frombuffer(SecureRandom().words(N).tobytes(), dtype=np.uint8)
    counts = np.bincount(data, minlength=256)
    assert stats.chisquare(counts).pvalue > ALPHA


def test_normals_pass_a_ks_test_that_a_biased_generator_fails() -> None:
    z = SecureRandom().standard_normal(N)
    assert z.shape == (N,) and z.dtype == np.float64
    assert stats.kstest(z, "norm").pvalue > ALPHA
    # The same test, on the same number of draws, rejects a std 5 % too
    # large and a uniform bent by a power of 1.05: it would see such a bias.
    biased = np.random.default_rng(0).standard_normal(N) * 1.05
    assert stats.kstest(biased, "norm").pvalue < ALPHA
    bent = np.random.default_rng(0).random(N) ** 1.05
    assert stats.kstest(bent, "uniform").pvalue < ALPHA


def test_secure_gaussian_passes_a_ks_test() -> None:
    std = 1.7
    values = SecureGaussian().sample(N, std)
    assert stats.kstest(values / std, "norm").pvalue > ALPHA


@pytest.mark.parametrize("size", [0, 1, 7, 2 * noise_module._PAIRS + 3, 100_001])
def test_normals_of_any_size(size: int) -> None:
    z = SecureRandom().standard_normal(size)
    assert z.shape == (size,)
    assert np.isfinite(z).all()


def test_polar_draws_are_bounded_as_documented() -> None:
    z = SecureRandom().standard_normal(N)
    assert np.abs(z).max() <= math.sqrt(208 * math.log(2)) * (1 + 1e-12)
    # and the tails are there: P(|Z| > 3) = 0.0027
    tail = np.mean(np.abs(z) > 3)
    assert abs(tail - 0.0027) < 5 * math.sqrt(0.0027 / N)


def test_subsets_are_uniform_and_sorted() -> None:
    source = SecureRandom()
    counts = dict.fromkeys(combinations(range(5), 2), 0)
    for _ in range(20_000):
        picked = source.subset(5, 2)
        assert list(picked) == sorted(picked)
        counts[tuple(int(i) for i in picked)] += 1
    assert stats.chisquare(list(counts.values())).pvalue > ALPHA


def test_subset_edge_cases() -> None:
    source = SecureRandom()
    assert source.subset(4, 0).size == 0
    np.testing.assert_array_equal(source.subset(4, 4), np.arange(4))
    assert source.subset(0, 0).size == 0
    with pytest.raises(ConfigError, match="k = 5 of n = 4"):
        source.subset(4, 5)
    for bad in (-1, 2.0, True):
        with pytest.raises(ConfigError, match="int >= 0"):
            source.subset(bad, 1)  # type: ignore[arg-type]


def test_a_tie_across_the_cut_is_drawn_again() -> None:
    # 5 and 5 tie for the smallest word with k = 1: drawn again.
    source = _Scripted([5, 9, 5, 7], [6, 9, 4, 7])
    np.testing.assert_array_equal(source.subset(4, 1), [2])
    assert source.sizes == [4, 4]
    np.testing.assert_array_equal(_Scripted([5, 9, 4, 7]).subset(4, 2), [0, 2])
    # A tie away from the cut changes nothing: no second draw.
    np.testing.assert_array_equal(_Scripted([5, 9, 9, 7]).subset(4, 1), [0])


@pytest.mark.parametrize("size", [-1, 1.5, "3", None])
def test_invalid_sizes_are_refused(size: object) -> None:
    source = SecureRandom()
    for draw in (source.words, source.random, source.standard_normal):
        with pytest.raises(ConfigError, match="size must be an int >= 0"):
            draw(size)  # type: ignore[arg-type]


def test_never_reproducible() -> None:
    a, b = SecureRandom(), SecureRandom()
    assert not np.array_equal(a.words(8), b.words(8))
    assert not np.array_equal(a.words(8), a.words(8))


def test_a_copy_gets_its_own_key() -> None:
    source = SecureRandom()
    source.words(1)  # keyed
    for clone in (pickle.loads(pickle.dumps(source)), copy.deepcopy(source)):
        assert isinstance(clone, SecureRandom)
        assert not np.array_equal(clone.words(8), source.words(8))


def _child_draw(source: SecureRandom, queue: multiprocessing.Queue) -> None:
    queue.put(source.words(8).tobytes())


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork"
)
def test_a_forked_child_does_not_repeat_its_parents_keystream() -> None:
    source = SecureRandom()
    source.words(1)  # keyed before the fork: the child inherits the state
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_draw, args=(source, queue))
    child.start()
    theirs = queue.get(timeout=60)
    child.join(timeout=60)
    assert theirs != source.words(8).tobytes()


def test_the_key_changes_after_its_share_of_keystream(monkeypatch) -> None:
    keys: list[int] = []
    real = noise_module.os.urandom

    def counting(n: int) -> bytes:
        keys.append(n)
        return real(n)

    monkeypatch.setattr(noise_module.os, "urandom", counting)
    monkeypatch.setattr(noise_module, "_REKEY_BYTES", 64)
    source = SecureRandom()
    source.words(8)  # 64 bytes: the first key is used up
    assert keys == [32, 16]
    source.words(8)
    assert keys == [32, 16, 32, 16]
