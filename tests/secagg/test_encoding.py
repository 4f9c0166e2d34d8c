"""fedshield.secagg.encoding: fixed point mod 2**b, rounding, clipping, no wrap.

Reference sums are computed with Python integers (exact, unbounded), never
with the module's modular helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshield.errors import ConfigError, InvalidUpdateError, ProtocolError
from fedshield.secagg.crypto import expand_mask, random_seed
from fedshield.secagg.encoding import (
    MAX_MODULUS_BITS,
    Encoding,
    add_mod,
    choose_encoding,
    decode_sum,
    encode,
    sub_mod,
)

SETTINGS = settings(max_examples=60, deadline=None)


def _exact_sum(arrays: list[np.ndarray], bits: int) -> np.ndarray:
    """Sum mod 2**bits with Python integers."""
    total = [sum(int(a[i]) for a in arrays) % 2**bits for i in range(arrays[0].size)]
    return np.array(total, dtype=np.uint64)


# -- round trip ------------------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(1, 30),
    d=st.integers(1, 50),
    clip=st.floats(1e-3, 1e3),
    precision_bits=st.integers(4, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_sum_is_within_n_over_scale(
    n: int, d: int, clip: float, precision_bits: int, seed: int
) -> None:
    enc = choose_encoding(n, clip, precision_bits=precision_bits)
    rng = np.random.default_rng(seed)
    values = rng.uniform(-clip, clip, size=(n, d))
    encoded = []
    for row in values:
        words, clipped = encode(row, enc, rng)
        assert clipped == 0
        assert words.dtype == np.uint64
        assert int(words.max()) < 2**enc.modulus_bits
        encoded.append(words)
    decoded = decode_sum(_exact_sum(encoded, enc.modulus_bits), enc, n)
    assert decoded.dtype == np.float64
    error = np.abs(decoded - values.sum(axis=0))
    assert np.all(error <= n / enc.scale * (1 + 1e-9)), (error.max(), n / enc.scale)


def test_round_trip_through_masks_that_cancel() -> None:
    # the way the protocol uses it: encode, add pairwise +/- masks and a self
    # mask mod 2**b, sum, remove the self masks, decode
    n, d = 5, 1000
    enc = choose_encoding(n, 1.0)
    bits = enc.modulus_bits
    rng = np.random.default_rng(1)
    values = rng.uniform(-1, 1, size=(n, d))
    pair_seeds = {(u, v): random_seed() for u in range(n) for v in range(u + 1, n)}
    self_seeds = [random_seed() for _ in range(n)]
    masked = []
    for u in range(n):
        y, _ = encode(values[u], enc, rng)
        y = add_mod(y, expand_mask(self_seeds[u], d, bits), bits)
        for (a, b), seed in pair_seeds.items():
            if u == a:
                y = add_mod(y, expand_mask(seed, d, bits), bits)
            elif u == b:
                y = sub_mod(y, expand_mask(seed, d, bits), bits)
        masked.append(y)
    total = masked[0]
    for y in masked[1:]:
        total = add_mod(total, y, bits)
    for seed in self_seeds:
        total = sub_mod(total, expand_mask(seed, d, bits), bits)
    decoded = decode_sum(total, enc, n)
    np.testing.assert_allclose(decoded, values.sum(axis=0), atol=n / enc.scale)


def test_weighted_fedavg_through_the_encoding() -> None:
    num_examples = np.array([10, 250, 40, 700])
    w_bound = 2000  # public bound on the total number of examples
    weights = num_examples / w_bound
    rng = np.random.default_rng(2)
    deltas = rng.uniform(-0.5, 0.5, size=(4, 300))
    enc = choose_encoding(4, 0.5, total_weight_bound=1.0)
    encoded = [
        encode(w * delta, enc, rng)[0] for w, delta in zip(weights, deltas, strict=True)
    ]
    total = decode_sum(_exact_sum(encoded, enc.modulus_bits), enc, 4)
    mean = total / weights.sum()
    expected = np.average(deltas, axis=0, weights=num_examples)
    np.testing.assert_allclose(mean, expected, atol=4 / enc.scale / weights.sum())


# -- stochastic rounding ---------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9, 0.01])
def test_stochastic_rounding_is_unbiased(fraction: float) -> None:
    enc = Encoding(clip=1.0, scale=2.0**10, modulus_bits=40)
    value = (123 + fraction) / enc.scale  # between two grid points
    draws = 200_000
    words, _ = encode(np.full(draws, value), enc, np.random.default_rng(3))
    units = words.astype(np.int64)
    assert set(np.unique(units)) <= {123, 124}
    mean = units.mean()
    # std of one draw is sqrt(f (1 - f)) <= 0.5 units; 6 sigma of the mean
    tolerance = 6 * math.sqrt(fraction * (1 - fraction) / draws)
    assert abs(mean - (123 + fraction)) < tolerance
    # round-to-nearest would be off by min(f, 1 - f) >> tolerance
    assert min(fraction, 1 - fraction) > tolerance


def test_negative_values_round_both_ways_and_are_unbiased() -> None:
    enc = Encoding(clip=1.0, scale=2.0**10, modulus_bits=40)
    value = -(77 + 0.25) / enc.scale
    words, _ = encode(np.full(100_000, value), enc, np.random.default_rng(4))
    decoded_units = (
        np.array([decode_sum(w[None], enc, 1)[0] for w in words[:2000]]) * enc.scale
    )
    assert set(np.unique(decoded_units)) == {-78.0, -77.0}
    units = words.astype(np.int64) - 2**40  # all negative: stored as 2**40 - k
    assert abs(units.mean() - (-77.25)) < 6 * math.sqrt(0.25 * 0.75 / 100_000)


def test_grid_values_are_exact() -> None:
    enc = Encoding(clip=2.0, scale=4.0, modulus_bits=10)
    values = np.array([-2.0, -0.25, 0.0, 0.75, 2.0])
    words, clipped = encode(values, enc, np.random.default_rng(0))
    assert clipped == 0
    assert words.tolist() == [1024 - 8, 1024 - 1, 0, 3, 8]
    np.testing.assert_array_equal(decode_sum(words, enc, 1), values)


# -- clipping --------------------------------------------------------------------------


def test_out_of_range_values_are_clipped_and_counted() -> None:
    enc = Encoding(clip=1.0, scale=2.0**8, modulus_bits=20)
    values = np.array([-5.0, -1.0, -1.0 - 1e-12, 0.5, 1.0, 1.0 + 2**-30, 3.0, 1e300])
    words, clipped = encode(values, enc, np.random.default_rng(0))
    assert (
        clipped == 5
    )  # -5, -1-1e-12, 1+2**-30, 3, 1e300; the bounds themselves are in
    decoded = decode_sum(words, enc, 1)
    np.testing.assert_allclose(
        decoded, [-1.0, -1.0, -1.0, 0.5, 1.0, 1.0, 1.0, 1.0], atol=1 / enc.scale
    )
    assert np.all(np.abs(decoded) <= 1.0)


def test_clipping_keeps_the_shape_and_counts_over_any_shape() -> None:
    enc = Encoding(clip=0.1, scale=2.0**12, modulus_bits=30)
    values = np.linspace(-0.3, 0.3, 24).reshape(2, 3, 4)
    words, clipped = encode(values, enc, np.random.default_rng(0))
    assert words.shape == (2, 3, 4)
    assert clipped == int(np.count_nonzero(np.abs(values) > 0.1))
    assert clipped > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    enc = Encoding(clip=1.0, scale=2.0**8, modulus_bits=20)
    with pytest.raises(InvalidUpdateError, match="1 NaN or infinite"):
        encode(np.array([0.0, bad, 0.5]), enc, np.random.default_rng(0))


# -- choosing the modulus --------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(1, 100_000),
    clip=st.floats(1e-6, 1e6),
    total_weight_bound=st.floats(1e-3, 1e3),
    precision_bits=st.integers(1, 40),
)
def test_no_wrap_around_with_every_client_at_the_clip(
    n: int, clip: float, total_weight_bound: float, precision_bits: int
) -> None:
    try:
        enc = choose_encoding(
            n,
            clip,
            total_weight_bound=total_weight_bound,
            precision_bits=precision_bits,
        )
    except ConfigError as exc:
        assert "modulus too small for n" in str(exc)
        assert math.log2(n) + precision_bits + 2 > MAX_MODULUS_BITS
        return
    bits = enc.modulus_bits
    assert bits <= MAX_MODULUS_BITS
    assert bits >= math.ceil(math.log2(2 * n * enc.clip * enc.scale)) + 1
    for sign in (+1.0, -1.0):
        # one client's encoding of its extreme value, summed n times exactly
        words, clipped = encode(
            np.array([sign * enc.clip, sign * 2 * enc.clip]),
            enc,
            np.random.default_rng(0),
        )
        assert clipped == 1
        total = np.array([int(w) * n % 2**bits for w in words], dtype=np.uint64)
        decoded = decode_sum(total, enc, n)
        expected = sign * n * enc.clip
        np.testing.assert_allclose(
            decoded, [expected, expected], rtol=0, atol=n / enc.scale
        )
        assert np.all(np.sign(decoded) == sign)


def test_one_bit_less_would_wrap() -> None:
    # the bound is not vacuous: with b - 2 bits, n clients at +clip decode wrong
    n = 1000
    enc = choose_encoding(n, 1.0, precision_bits=20)
    small = Encoding(enc.clip, enc.scale, enc.modulus_bits - 2)
    words, _ = encode(np.array([enc.clip]), small, np.random.default_rng(0))
    total = np.array([int(words[0]) * n % 2**small.modulus_bits], dtype=np.uint64)
    with pytest.raises(ConfigError, match="modulus too small for n"):
        decode_sum(total, small, n)
    signed = int(total[0]) - (
        2**small.modulus_bits if total[0] >= 2 ** (small.modulus_bits - 1) else 0
    )
    assert signed / small.scale != pytest.approx(n * enc.clip)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 2**40, "clip": 1.0}, "modulus too small for n"),
        ({"num_clients": 100, "clip": 1.0, "precision_bits": 55}, "precision_bits"),
        (
            {"num_clients": 2**21, "clip": 1.0, "precision_bits": 40},
            "modulus too small",
        ),
        ({"num_clients": 2**20, "clip": 1.0, "precision_bits": 41}, "needs a 63-bit"),
        ({"num_clients": 0, "clip": 1.0}, "num_clients"),
        ({"num_clients": 10, "clip": 0.0}, "clip"),
        ({"num_clients": 10, "clip": float("nan")}, "clip"),
        ({"num_clients": 10, "clip": 1.0, "total_weight_bound": -1.0}, "total_weight"),
        ({"num_clients": 10, "clip": 1.0, "precision_bits": 0}, "precision_bits"),
    ],
)
def test_choose_encoding_refuses_impossible_setups(
    kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        choose_encoding(**kwargs)  # type: ignore[arg-type]


def test_choose_encoding_picks_the_smallest_safe_modulus() -> None:
    enc = choose_encoding(100, 1.0, precision_bits=24)
    assert enc.clip == 1.0
    assert enc.scale == 2.0**24
    # 2 n M = 200 * 2**24 <= 2**32: 32 bits to hold it, one more for sign room
    assert enc.modulus_bits == 33
    assert enc.max_clients >= 100
    assert choose_encoding(100, 3.0, total_weight_bound=0.5).clip == 1.5


@pytest.mark.parametrize(
    "fields",
    [(0.0, 1.0, 10), (1.0, 0.0, 10), (1.0, 1.0, 1), (1.0, 1.0, 63), (1.0, 2.0**53, 62)],
)
def test_encoding_validates_its_fields(fields: tuple[float, float, int]) -> None:
    with pytest.raises(ConfigError):
        Encoding(*fields)


# -- decoding and modular arithmetic ---------------------------------------------------


def test_decode_sum_refuses_unreduced_or_mistyped_input() -> None:
    enc = Encoding(clip=1.0, scale=2.0**8, modulus_bits=20)
    with pytest.raises(ProtocolError, match="not reduced"):
        decode_sum(np.array([2**20], dtype=np.uint64), enc, 1)
    with pytest.raises(TypeError):
        decode_sum(np.array([1], dtype=np.int64), enc, 1)
    with pytest.raises(ConfigError, match="modulus too small for n"):
        decode_sum(np.array([1], dtype=np.uint64), enc, enc.max_clients + 1)


def test_decode_sum_centres_the_range() -> None:
    enc = Encoding(clip=1.0, scale=1.0, modulus_bits=4)
    words = np.arange(16, dtype=np.uint64)
    assert decode_sum(words, enc, 1).tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        -8,
        -7,
        -6,
        -5,
        -4,
        -3,
        -2,
        -1,
    ]


@SETTINGS
@given(
    bits=st.integers(1, 64),
    data=st.data(),
)
def test_add_and_sub_mod_match_python_integers(bits: int, data: st.DataObject) -> None:
    elements = st.integers(0, 2**bits - 1)
    xs = data.draw(st.lists(elements, min_size=1, max_size=20))
    ys = data.draw(st.lists(elements, min_size=len(xs), max_size=len(xs)))
    a = np.array(xs, dtype=np.uint64)
    b = np.array(ys, dtype=np.uint64)
    assert add_mod(a, b, bits).tolist() == [
        (x + y) % 2**bits for x, y in zip(xs, ys, strict=True)
    ]
    assert sub_mod(a, b, bits).tolist() == [
        (x - y) % 2**bits for x, y in zip(xs, ys, strict=True)
    ]
    np.testing.assert_array_equal(sub_mod(add_mod(a, b, bits), b, bits), a)


def test_modular_helpers_refuse_other_dtypes_and_widths() -> None:
    a = np.zeros(3, dtype=np.uint64)
    with pytest.raises(TypeError):
        add_mod(a, np.zeros(3, dtype=np.int64), 10)
    with pytest.raises(ValueError):
        sub_mod(a, a, 65)
