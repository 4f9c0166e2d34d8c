"""fedshield.secagg.shamir: correctness, threshold, secrecy, field, speed.

The second source for every reconstruction is the polynomial itself: the
tests interpolate with their own slow Lagrange code (``_interpolate``) and
never trust the module's coefficients for a reference value.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import secrets
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshield.errors import ProtocolError
from fedshield.secagg import shamir
from fedshield.secagg.shamir import (
    PRIME,
    lagrange_at_zero,
    reconstruct,
    reconstruct_bytes,
    share,
    share_bytes,
    share_bytes_many,
)

SETTINGS = settings(max_examples=60, deadline=None)


def _interpolate(points: dict[int, int], at: int, prime: int = PRIME) -> int:
    """Reference Lagrange interpolation, one division per term."""
    total = 0
    for xi, yi in points.items():
        num, den = 1, 1
        for xj in points:
            if xj != xi:
                num = num * (at - xj) % prime
                den = den * (xi - xj) % prime
        total += yi * num * pow(den, -1, prime)
    return total % prime


def _coefficients_through(points: dict[int, int], prime: int) -> list[int]:
    """Coefficients (constant first) of the polynomial of degree < len(points).

    Solves the Vandermonde system by Gaussian elimination mod ``prime``: a
    method independent of Lagrange interpolation.
    """
    xs = list(points)
    m = len(xs)
    rows = [[pow(x, k, prime) for k in range(m)] + [points[x]] for x in xs]
    for col in range(m):
        pivot = next(r for r in range(col, m) if rows[r][col] % prime)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        inv = pow(rows[col][col], -1, prime)
        rows[col] = [v * inv % prime for v in rows[col]]
        for r in range(m):
            if r != col and rows[r][col]:
                factor = rows[r][col]
                rows[r] = [
                    (a - factor * b) % prime
                    for a, b in zip(rows[r], rows[col], strict=True)
                ]
    return [rows[k][m] for k in range(m)]


def _evaluate(coefficients: list[int], x: int, prime: int) -> int:
    return sum(c * pow(x, k, prime) for k, c in enumerate(coefficients)) % prime


# -- the field -------------------------------------------------------------------------


def _is_strong_probable_prime(n: int, base: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    x = pow(base, d, n)
    if x in (1, n - 1):
        return True
    for _ in range(s - 1):
        x = x * x % n
        if x == n - 1:
            return True
    return False


SMALL_PRIMES = [p for p in range(2, 200) if all(p % q for q in range(2, p))]


MR_EXACT_BOUND = 3_317_044_064_679_887_385_961_981


def _is_prime_small(n: int) -> bool:
    """Deterministic Miller-Rabin: the first 13 prime bases are exact below 3.3e24."""
    assert n < MR_EXACT_BOUND
    if n < 2:
        return False
    for p in SMALL_PRIMES[:13]:
        if n % p == 0:
            return n == p
    return all(_is_strong_probable_prime(n, a) for a in SMALL_PRIMES[:13])


def test_prime_passes_miller_rabin_with_46_prime_bases() -> None:
    assert PRIME == 2**130 - 5
    assert PRIME > 2**128
    # 46 bases: a composite passes each with probability <= 1/4, so a
    # composite passes all with probability <= 4**-46. Evidence, not proof:
    # the Lucas certificate below is the proof.
    assert all(_is_strong_probable_prime(PRIME, a) for a in SMALL_PRIMES)


def _prove_prime(n: int) -> bool:
    """A proof, not a test: deterministic Miller-Rabin below 3.3e24, else a
    recursive Lucas (Pratt) certificate built from the factors of n - 1."""
    if n < MR_EXACT_BOUND:
        return _is_prime_small(n)
    if not all(_is_strong_probable_prime(n, a) for a in SMALL_PRIMES[:13]):
        return False  # a failed base proves compositeness
    factors = set(_factor(n - 1))
    return any(
        pow(a, n - 1, n) == 1 and all(pow(a, (n - 1) // q, n) != 1 for q in factors)
        for a in range(2, 200)
    )


def _factor(n: int) -> list[int]:
    """Prime factors (each one proven) by trial division and Pollard-Brent rho."""
    out: list[int] = []
    for p in SMALL_PRIMES:
        while n % p == 0:
            out.append(p)
            n //= p
    stack = [n] if n > 1 else []
    while stack:
        m = stack.pop()
        if all(_is_strong_probable_prime(m, a) for a in SMALL_PRIMES[:13]):
            assert _prove_prime(m), m
            out.append(m)
            continue
        d = _rho(m)
        stack += [d, m // d]
    return sorted(out)


def _rho(n: int) -> int:
    rng = random.Random(n)
    while True:
        y, c, m = rng.randrange(1, n), rng.randrange(1, n), 128
        g, r, q = 1, 1, 1
        x = ys = y
        while g == 1:
            x = y
            for _ in range(r):
                y = (y * y + c) % n
            k = 0
            while k < r and g == 1:
                ys = y
                for _ in range(min(m, r - k)):
                    y = (y * y + c) % n
                    q = q * abs(x - y) % n
                g = math.gcd(q, n)
                k += m
            r *= 2
        if g == n:
            g = 1
            while g == 1:
                ys = (ys * ys + c) % n
                g = math.gcd(abs(x - ys), n)
        if g != n:
            return g


def test_prime_has_a_lucas_certificate() -> None:
    # Lucas: n is prime iff some a has order exactly n - 1 mod n, i.e.
    # a**(n-1) == 1 and a**((n-1)/q) != 1 for every prime q | n - 1. The
    # 100-bit factor of P - 1 gets its own certificate, recursively.
    factors = _factor(PRIME - 1)
    assert factors == [2, 23, 32985101, 897064739519922787230182993783]
    assert math.prod(factors) == PRIME - 1
    assert _prove_prime(PRIME)
    assert not _prove_prime(PRIME + 2)  # 2**130 - 3 is composite
    assert not _prove_prime(3 * PRIME)


def test_miller_rabin_rejects_known_composites() -> None:
    # the helper must be able to say no, including to a Carmichael number
    for composite in (561, 2**130 - 3, 2**128 + 1, 3_215_031_751):
        assert not all(
            _is_strong_probable_prime(composite, a) for a in SMALL_PRIMES[:13]
        )


# -- correctness -----------------------------------------------------------------------


@SETTINGS
@given(
    secret=st.binary(min_size=16, max_size=16),
    n=st.integers(1, 12),
    data=st.data(),
)
def test_any_t_of_n_shares_reconstruct(
    secret: bytes, n: int, data: st.DataObject
) -> None:
    threshold = data.draw(st.integers(1, n))
    xs = data.draw(
        st.lists(st.integers(1, PRIME - 1), min_size=n, max_size=n, unique=True)
    )
    shares = share(secret, threshold, xs)
    assert set(shares) == set(xs)
    assert all(0 <= y < PRIME for y in shares.values())
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=threshold, unique=True))
    chosen = {x: shares[x] for x in subset}
    assert reconstruct(chosen, threshold) == secret
    assert _interpolate(chosen, 0).to_bytes(16, "big") == secret  # second source
    assert reconstruct(chosen, threshold, lagrange_at_zero(subset)) == secret


def test_every_t_subset_of_a_small_set() -> None:
    secret = secrets.token_bytes(16)
    xs = list(range(1, 8))
    shares = share(secret, 4, xs)
    for subset in itertools.combinations(xs, 4):
        assert reconstruct({x: shares[x] for x in subset}, 4) == secret


def test_shares_lie_on_a_polynomial_of_degree_t_minus_1() -> None:
    xs = list(range(1, 11))
    shares = share(secrets.token_bytes(16), 4, xs)
    coefficients = _coefficients_through({x: shares[x] for x in xs[:4]}, PRIME)
    assert all(_evaluate(coefficients, x, PRIME) == shares[x] for x in xs[4:])
    # and not of lower degree (the top coefficient vanishes w.p. 1/P)
    assert coefficients[3] != 0


def test_short_secret_comes_back_left_padded() -> None:
    shares = share(b"abc", 2, [1, 2])
    assert reconstruct(shares, 2) == bytes(13) + b"abc"
    assert reconstruct(share(b"", 1, [5]), 1) == bytes(16)


def test_threshold_one_and_threshold_n() -> None:
    secret = secrets.token_bytes(16)
    assert all(
        reconstruct({x: y}, 1) == secret for x, y in share(secret, 1, [3, 9]).items()
    )
    shares = share(secret, 5, [1, 2, 3, 4, 5])
    assert reconstruct(shares, 5) == secret


def test_extreme_secrets_and_positions() -> None:
    for secret in (bytes(16), b"\xff" * 16):
        xs = [1, PRIME - 1, 2**129, 12345]
        assert reconstruct(share(secret, 3, xs), 3) == secret


def test_shares_of_equal_secrets_differ_between_calls() -> None:
    secret = b"\x00" * 16
    first = share(secret, 3, [1, 2, 3])
    second = share(secret, 3, [1, 2, 3])
    assert first != second
    assert all(first[x] != second[x] for x in first)  # equal w.p. 3/P


def test_corrupted_share_changes_or_fails_reconstruction() -> None:
    secret = secrets.token_bytes(16)
    shares = share(secret, 3, [1, 2, 3])
    shares[2] = (shares[2] + 1) % PRIME
    # either a wrong secret, or >= 2**128 and detected as inconsistent
    with contextlib.suppress(ProtocolError):
        assert reconstruct(shares, 3) != secret


# -- threshold -------------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "given"), [(3, 2), (5, 0), (67, 66)])
def test_fewer_than_threshold_raises_with_both_numbers(
    threshold: int, given: int
) -> None:
    xs = list(range(1, threshold + 3))
    shares = share(bytes(16), threshold, xs)
    partial = {x: shares[x] for x in xs[:given]}
    with pytest.raises(
        ProtocolError, match=rf"at least {threshold} .* {given} were given"
    ):
        reconstruct(partial, threshold)
    with pytest.raises(
        ProtocolError, match=rf"at least {threshold} .* {given} were given"
    ):
        reconstruct_bytes({x: [y] for x, y in partial.items()}, threshold, 16)


def test_too_few_precomputed_coefficients_raise() -> None:
    shares = share(bytes(16), 3, [1, 2, 3, 4])
    with pytest.raises(ProtocolError, match=r"at least 3 .* 2 were given"):
        reconstruct(shares, 3, lagrange_at_zero([1, 2]))
    with pytest.raises(ProtocolError, match="without a share"):
        reconstruct(
            {1: shares[1], 2: shares[2], 3: shares[3]}, 3, lagrange_at_zero([1, 2, 4])
        )


@pytest.mark.parametrize(
    ("secret", "threshold", "xs"),
    [
        (bytes(17), 2, [1, 2]),
        (bytes(16), 0, [1, 2]),
        (bytes(16), 3, [1, 2]),
        (bytes(16), 2, [1, 1]),
        (bytes(16), 2, [0, 1]),
        (bytes(16), 2, [1, PRIME]),
        (bytes(16), 2, [-1, 2]),
    ],
)
def test_share_rejects_bad_arguments(
    secret: bytes, threshold: int, xs: list[int]
) -> None:
    with pytest.raises(ValueError):
        share(secret, threshold, xs)


def test_reconstruct_rejects_values_outside_the_field() -> None:
    with pytest.raises(ProtocolError, match="outside"):
        reconstruct({1: PRIME, 2: 0}, 2)
    with pytest.raises(ProtocolError, match="outside"):
        reconstruct({0: 1, 2: 0}, 2)


# -- secrecy ---------------------------------------------------------------------------


@SETTINGS
@given(
    t=st.integers(2, 8),
    data=st.data(),
)
def test_any_t_minus_1_shares_are_consistent_with_every_secret(
    t: int, data: st.DataObject
) -> None:
    # Take t - 1 real shares of some secret. For two different candidate
    # secrets s1 != s2, solve for the degree <= t - 1 polynomial through the
    # t - 1 share points and (0, s'). It exists (the Vandermonde system is
    # solvable), has constant term s', passes through every observed share,
    # and re-sharing with it reproduces the observed shares exactly: the
    # observer's view is explained equally well by either secret.
    xs = data.draw(
        st.lists(st.integers(1, PRIME - 1), min_size=t, max_size=t + 3, unique=True)
    )
    real = share(secrets.token_bytes(16), t, xs)
    seen = data.draw(
        st.lists(st.sampled_from(xs), min_size=t - 1, max_size=t - 1, unique=True)
    )
    observed = {x: real[x] for x in seen}
    s1, s2 = data.draw(
        st.lists(st.integers(0, 2**128 - 1), min_size=2, max_size=2, unique=True)
    )
    for candidate in (s1, s2):
        coefficients = _coefficients_through({0: candidate, **observed}, PRIME)
        assert len(coefficients) == t  # degree <= t - 1
        assert coefficients[0] == candidate
        assert all(_evaluate(coefficients, x, PRIME) == y for x, y in observed.items())
        # with a t-th point from this polynomial, reconstruction yields it
        extra = next(x for x in range(1, t + 2) if x not in observed)
        completed = {**observed, extra: _evaluate(coefficients, extra, PRIME)}
        assert reconstruct(completed, t) == candidate.to_bytes(16, "big")


def test_single_share_is_uniform_whatever_the_secret_in_a_tiny_field() -> None:
    # The module's own splitting code in GF(11), t = 2: the share at x = 3 must
    # be uniform over all 11 values for secret 0 and for secret 7 alike. A
    # generator that skipped 0 as a coefficient, or biased it, fails this.
    prime, draws = 11, 22_000
    for secret in (0, 7):
        counts = Counter(shamir._split(secret, 2, [3], prime)[3] for _ in range(draws))
        assert set(counts) == set(range(prime))
        expected = draws / prime
        chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
        assert chi2 < 35.0  # chi-square, 10 dof: p ~ 1.2e-4


def test_two_of_three_shares_in_a_tiny_field_enumerate_every_secret() -> None:
    # Exhaustive: in GF(7) with t = 3, any two share values at x = 1, 2 are
    # produced by exactly one polynomial for each of the 7 secrets.
    prime = 7
    for y1, y2 in itertools.product(range(prime), repeat=2):
        secrets_seen = Counter(
            a0
            for a0, a1, a2 in itertools.product(range(prime), repeat=3)
            if _evaluate([a0, a1, a2], 1, prime) == y1
            and _evaluate([a0, a1, a2], 2, prime) == y2
        )
        assert secrets_seen == Counter(range(prime))


# -- bytes -----------------------------------------------------------------------------


@SETTINGS
@given(secret=st.binary(min_size=0, max_size=80), data=st.data())
def test_bytes_round_trip(secret: bytes, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 8))
    threshold = data.draw(st.integers(1, n))
    xs = list(range(1, n + 1))
    shares = share_bytes(secret, threshold, xs)
    assert all(len(v) == -(-len(secret) // 16) for v in shares.values())
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=threshold, unique=True))
    chosen = {x: shares[x] for x in subset}
    assert reconstruct_bytes(chosen, threshold, len(secret)) == secret


def test_seed_round_trip_with_precomputed_coefficients() -> None:
    xs = list(range(1, 101))
    seeds = [secrets.token_bytes(32) for _ in range(5)]
    survivors = random.Random(0).sample(xs, 67)
    coefficients = lagrange_at_zero(survivors)
    for seed in seeds:
        shares = share_bytes(seed, 67, xs)
        chosen = {x: shares[x] for x in survivors}
        assert reconstruct_bytes(chosen, 67, 32, coefficients) == seed
        assert reconstruct_bytes(chosen, 67, 32) == seed


def test_reconstruct_bytes_checks_the_list_length() -> None:
    shares = share_bytes(secrets.token_bytes(32), 2, [1, 2])
    with pytest.raises(ProtocolError, match="needs 3"):
        reconstruct_bytes(shares, 2, 33)


def test_lagrange_coefficients_match_the_reference() -> None:
    xs = [3, 17, 2**100, 5, PRIME - 2]
    coefficients = lagrange_at_zero(xs)
    for i, x in enumerate(xs):
        unit = {xj: int(j == i) for j, xj in enumerate(xs)}
        assert coefficients[x] == _interpolate(unit, 0)
    assert sum(coefficients.values()) % PRIME == 1  # interpolating f = 1
    with pytest.raises(ProtocolError, match="distinct"):
        lagrange_at_zero([1, 1])


# -- speed -----------------------------------------------------------------------------


def test_reconstructing_100_secrets_from_67_shares_is_fast() -> None:
    xs = list(range(1, 101))
    survivors = xs[:67]
    all_shares = [share(secrets.token_bytes(16), 67, xs) for _ in range(100)]
    start = time.perf_counter()
    coefficients = lagrange_at_zero(survivors)
    out = [
        reconstruct({x: s[x] for x in survivors}, 67, coefficients) for s in all_shares
    ]
    elapsed = time.perf_counter() - start
    assert len(out) == 100
    assert elapsed < 1.0, f"{elapsed:.3f} s"  # measured ~0.01 s


# -- several secrets at once -----------------------------------------------------------


@SETTINGS
@given(
    secrets_=st.lists(st.binary(min_size=0, max_size=48), min_size=1, max_size=4),
    data=st.data(),
)
def test_share_bytes_many_round_trips_each_secret(
    secrets_: list[bytes], data: st.DataObject
) -> None:
    n = data.draw(st.integers(1, 9))
    threshold = data.draw(st.integers(1, n))
    # positions anywhere in the field: the packed evaluation must not overflow
    xs = data.draw(
        st.lists(st.integers(1, PRIME - 1), min_size=n, max_size=n, unique=True)
    )
    out = share_bytes_many(secrets_, threshold, xs)
    assert len(out) == len(secrets_)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=threshold, unique=True))
    for secret, shares in zip(secrets_, out, strict=True):
        assert set(shares) == set(xs)
        assert all(0 <= y < PRIME for ys in shares.values() for y in ys)
        chosen = {x: shares[x] for x in subset}
        assert reconstruct_bytes(chosen, threshold, len(secret)) == secret


def test_share_bytes_many_matches_the_polynomials_it_draws() -> None:
    # Each chunk's shares lie on a polynomial of degree t - 1 (checked by the
    # reference interpolation at a t + 1-th point), and the polynomials of
    # equal chunks differ (independent coefficients).
    t, xs = 5, list(range(1, 12))
    secret = bytes(16)
    first, second = share_bytes_many([secret, secret], t, xs)
    for shares in (first, second):
        points = {x: shares[x][0] for x in xs[:t]}
        for x in xs[t:]:
            assert _interpolate(points, x) == shares[x][0]
    assert [first[x] for x in xs] != [second[x] for x in xs]


def test_share_bytes_many_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="threshold"):
        share_bytes_many([b"a"], 3, [1, 2])
    with pytest.raises(ValueError, match="distinct"):
        share_bytes_many([b"a"], 1, [1, 1])
    with pytest.raises(TypeError):
        share_bytes_many(["text"], 1, [1])  # type: ignore[list-item]
    assert share_bytes_many([], 1, [1, 2]) == []
