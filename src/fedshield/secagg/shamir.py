"""Shamir secret sharing over the prime field GF(2**130 - 5).

A secret ``s`` (an integer below ``2**128``) is the constant term of a random
polynomial ``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` over GF(P) whose other
coefficients are drawn uniformly from the whole field with the operating
system's randomness (:mod:`secrets`, never numpy). Client ``x`` receives
``f(x)``. Any ``t`` shares determine ``f`` and hence ``s`` (Lagrange
interpolation at 0); any ``t - 1`` shares are consistent with every secret,
each by exactly one polynomial, so they carry no information about it.

The modulus ``P = 2**130 - 5`` is prime (the Poly1305 prime; the tests check
it with Miller-Rabin and prove it with a Lucas certificate) and larger than
``2**128``, so every 16-byte string is a field element. Longer secrets (a
32-byte seed, a 32-byte private key) go through :func:`share_bytes`, which
shares each 16-byte chunk with its own polynomial.

Reconstruction cost is dominated by the Lagrange coefficients, which depend
only on the set of share positions. In a SecAgg round every secret of a round
is rebuilt from the same surviving clients, so compute them once with
:func:`lagrange_at_zero` and pass them to :func:`reconstruct`; each further
secret then costs one multiply-add per share. Without them, reconstruct uses
a small cache keyed by the set of positions.

This is the only hand-written cryptography in fedshield. It is
information-theoretic (no hardness assumption) but not constant time: Python
integers leak timing, which matters only to an attacker timing the process
that holds the shares.

Examples
--------
>>> shares = share(b"sixteen byte key", threshold=2, xs=[1, 2, 3])
>>> reconstruct({1: shares[1], 3: shares[3]}, threshold=2)
b'sixteen byte key'
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

from fedshield.errors import ProtocolError

__all__ = [
    "CHUNK_BYTES",
    "PRIME",
    "lagrange_at_zero",
    "reconstruct",
    "reconstruct_bytes",
    "share",
    "share_bytes",
    "share_bytes_many",
]

PRIME: int = 2**130 - 5
"""The field modulus, a prime larger than ``2**128``."""

CHUNK_BYTES: int = 16
"""Bytes per field element: a secret of this many bytes is one share value."""

_SECRET_BOUND = 1 << (8 * CHUNK_BYTES)


def share(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Split a secret of at most 16 bytes into shares at the positions ``xs``.

    Parameters
    ----------
    secret
        The secret, read as a big-endian integer below ``2**128``. A shorter
        secret comes back from :func:`reconstruct` left-padded with zero
        bytes to 16; use :func:`share_bytes` to keep its length.
    threshold
        ``t``: how many shares reconstruct the secret; ``t - 1`` reveal
        nothing. ``1 <= t <= len(xs)``.
    xs
        Distinct share positions in ``[1, PRIME)`` (client indices, never 0:
        ``f(0)`` is the secret).

    Returns
    -------
    dict[int, int]
        Position ``x`` -> share value ``f(x)`` in ``[0, PRIME)``.

    Raises
    ------
    ValueError
        If the secret is longer than 16 bytes, the threshold is out of range,
        or a position is repeated or outside ``[1, PRIME)``.
    """
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    if len(secret) > CHUNK_BYTES:
        raise ValueError(
            f"share takes a secret of at most {CHUNK_BYTES} bytes, got "
            f"{len(secret)}; use share_bytes for longer secrets"
        )
    _check_positions(threshold, xs)
    return _split(int.from_bytes(secret, "big"), threshold, xs, PRIME)


def lagrange_at_zero(xs: Sequence[int]) -> dict[int, int]:
    """Lagrange coefficients that interpolate the value at 0 from positions ``xs``.

    ``f(0) = sum(coefficients[x] * f(x) for x in xs) mod PRIME`` for every
    polynomial ``f`` of degree below ``len(xs)``. Compute them once per set of
    surviving clients and pass them to :func:`reconstruct` for every secret.

    Parameters
    ----------
    xs
        Distinct positions in ``[1, PRIME)``.

    Returns
    -------
    dict[int, int]
        Position -> coefficient ``prod_{j != i} x_j / (x_j - x_i)`` mod P.

    Raises
    ------
    ProtocolError
        If a position is repeated or outside ``[1, PRIME)``.
    """
    key = tuple(sorted(xs))
    if len(set(key)) != len(key):
        raise ProtocolError(f"share positions must be distinct, got {list(xs)}")
    for x in key:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 < x < PRIME:
            raise ProtocolError(f"share position {x!r} is outside [1, PRIME)")
    return dict(zip(key, _lagrange_cached(key), strict=True))


def reconstruct(
    shares: Mapping[int, int],
    threshold: int,
    coefficients: Mapping[int, int] | None = None,
) -> bytes:
    """Rebuild a secret made by :func:`share` from at least ``threshold`` shares.

    Parameters
    ----------
    shares
        Position -> share value. All given shares are used (more than
        ``threshold`` is fine: they lie on the same polynomial).
    threshold
        The ``t`` the secret was shared with.
    coefficients
        Precomputed :func:`lagrange_at_zero` coefficients. When given, only
        the shares at their positions are used; every one of those positions
        must be in ``shares`` and there must be at least ``threshold``.

    Returns
    -------
    bytes
        The secret as 16 bytes, big-endian.

    Raises
    ------
    ProtocolError
        If fewer than ``threshold`` shares are given (the message says how
        many were needed and how many given), a share value or position is
        outside the field, ``coefficients`` names a position without a share,
        or the shares interpolate to a value of ``2**128`` or more (they were
        not made by one :func:`share` call: corrupted or mixed).
    """
    value = _reconstruct_int(shares, threshold, coefficients)
    if value >= _SECRET_BOUND:
        raise ProtocolError(
            "shares are inconsistent: they interpolate to a value that is not "
            "a 16-byte secret (corrupted shares, or shares of different secrets)"
        )
    return value.to_bytes(CHUNK_BYTES, "big")


def share_bytes(
    secret: bytes, threshold: int, xs: Sequence[int]
) -> dict[int, list[int]]:
    """Split a secret of any length: each 16-byte chunk is shared on its own.

    Parameters
    ----------
    secret
        The secret; the last chunk may be shorter than 16 bytes.
    threshold, xs
        As in :func:`share`.

    Returns
    -------
    dict[int, list[int]]
        Position -> one field element per chunk (``ceil(len(secret) / 16)``).

    Raises
    ------
    ValueError
        As in :func:`share`.
    """
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    _check_positions(threshold, xs)
    return _split_many(_chunks(secret), threshold, xs, PRIME)


def share_bytes_many(
    secrets_: Sequence[bytes], threshold: int, xs: Sequence[int]
) -> list[dict[int, list[int]]]:
    """:func:`share_bytes` for several secrets at once (faster than one by one).

    Every chunk of every secret gets its own independent random polynomial,
    exactly as if each secret went through :func:`share_bytes` separately;
    the polynomials are only evaluated together.

    Parameters
    ----------
    secrets_
        The secrets, each of any length.
    threshold, xs
        As in :func:`share`.

    Returns
    -------
    list[dict[int, list[int]]]
        One :func:`share_bytes` result per secret, in order.

    Raises
    ------
    ValueError
        As in :func:`share`.
    """
    for secret in secrets_:
        if not isinstance(secret, bytes | bytearray):
            raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    _check_positions(threshold, xs)
    chunks = [_chunks(secret) for secret in secrets_]
    flat = [value for values in chunks for value in values]
    shares = _split_many(flat, threshold, xs, PRIME)
    out: list[dict[int, list[int]]] = []
    start = 0
    for values in chunks:
        stop = start + len(values)
        out.append({x: ys[start:stop] for x, ys in shares.items()})
        start = stop
    return out


def reconstruct_bytes(
    shares: Mapping[int, Sequence[int]],
    threshold: int,
    length: int,
    coefficients: Mapping[int, int] | None = None,
) -> bytes:
    """Rebuild a secret made by :func:`share_bytes`.

    Parameters
    ----------
    shares
        Position -> that position's list of field elements.
    threshold
        The ``t`` the secret was shared with.
    length
        The secret's length in bytes (public: e.g. 32 for a seed or key).
    coefficients
        Optional precomputed :func:`lagrange_at_zero` coefficients, as in
        :func:`reconstruct`.

    Returns
    -------
    bytes
        The secret, ``length`` bytes.

    Raises
    ------
    ProtocolError
        As in :func:`reconstruct`, and if a share list does not hold
        ``ceil(length / 16)`` elements.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    num_chunks = -(-length // CHUNK_BYTES)
    for x, values in shares.items():
        if len(values) != num_chunks:
            raise ProtocolError(
                f"share at position {x} holds {len(values)} field elements; a "
                f"{length}-byte secret needs {num_chunks}"
            )
    if coefficients is None:
        _require_count(len(shares), threshold)
        coefficients = lagrange_at_zero(list(shares))
    parts: list[bytes] = []
    for index in range(num_chunks):
        size = min(CHUNK_BYTES, length - index * CHUNK_BYTES)
        chunk = {x: values[index] for x, values in shares.items()}
        value = _reconstruct_int(chunk, threshold, coefficients)
        if value >= 1 << (8 * size):
            raise ProtocolError(
                f"shares are inconsistent: chunk {index} interpolates to a value "
                f"that does not fit in {size} bytes (corrupted or mixed shares)"
            )
        parts.append(value.to_bytes(size, "big"))
    return b"".join(parts)


def _chunks(secret: bytes) -> list[int]:
    """The 16-byte chunks of ``secret`` as big-endian integers."""
    return [
        int.from_bytes(secret[start : start + CHUNK_BYTES], "big")
        for start in range(0, len(secret), CHUNK_BYTES)
    ]


# --------------------------------------------------------------------------
# Internals. ``prime`` is a parameter so that the tests can check secrecy
# exhaustively in a tiny field; the public functions always use PRIME.


def _split(
    secret: int, threshold: int, xs: Sequence[int], prime: int
) -> dict[int, int]:
    """Evaluate a fresh random polynomial with constant term ``secret`` at ``xs``."""
    return {
        x: values[0]
        for x, values in _split_many([secret], threshold, xs, prime).items()
    }


def _split_many(
    values: Sequence[int], threshold: int, xs: Sequence[int], prime: int
) -> dict[int, list[int]]:
    """Share each of ``values`` with its own fresh random polynomial, at ``xs``.

    Position ``x`` gets ``[f_0(x), f_1(x), ...]`` where ``f_i`` has constant
    term ``values[i]`` and ``threshold - 1`` further coefficients drawn
    uniformly and independently from ``[0, prime)``.

    All the polynomials are evaluated in one pass: their coefficients of the
    same degree are packed into one integer, one lane of ``width`` bits per
    polynomial, and Horner's rule runs on the packed integers without
    reducing mod ``prime`` (every coefficient and ``x`` are non-negative, so
    lanes never borrow, and ``width`` is chosen so that they never carry into
    one another). Each lane is reduced once at the end. This costs about as
    much Python work as evaluating one polynomial the plain way.
    """
    count = len(values)
    degree = threshold - 1
    if count == 0:
        return {x: [] for x in xs}
    # Coefficients uniform over the whole field, zero included: the leading
    # one may vanish, which is what makes every secret equally likely given
    # t - 1 shares (a uniform polynomial of degree <= t - 1).
    coefficients = _uniform_below(prime, degree * count)
    # Bound on a lane before reduction: sum_j a_j x^j with every a_j < prime
    # (the constant term, a secret, too) is below
    # prime * (degree + 1) * max(x)^degree.
    top = max(xs)
    width = (
        prime.bit_length() + degree * top.bit_length() + (degree + 1).bit_length() + 1
    )
    # packed[j] holds the degree-j coefficient of every polynomial.
    packed = [sum(value << (width * i) for i, value in enumerate(values))]
    for j in range(degree):
        packed.append(
            sum(coefficients[i * degree + j] << (width * i) for i in range(count))
        )
    highest = packed[-1]
    rest = packed[-2::-1]
    lane = (1 << width) - 1
    out: dict[int, list[int]] = {}
    for x in xs:
        acc = highest
        for a in rest:  # Horner, highest degree first, reduced only at the end
            acc = acc * x + a
        out[x] = [(acc >> (width * i) & lane) % prime for i in range(count)]
    return out


def _uniform_below(prime: int, count: int) -> list[int]:
    """``count`` integers uniform in ``[0, prime)`` from the OS's randomness.

    Each is drawn from ``prime.bit_length()`` random bits and redrawn while it
    is not below ``prime`` (rejection sampling: exactly uniform; for ``2**130
    - 5`` a redraw happens with probability ``5 / 2**130``).
    """
    bits = prime.bit_length()
    size = -(-bits // 8)
    mask = (1 << bits) - 1
    data = secrets.token_bytes(size * count)
    out = [
        int.from_bytes(data[i : i + size], "little") & mask
        for i in range(0, size * count, size)
    ]
    for i, value in enumerate(out):
        while value >= prime:
            value = int.from_bytes(secrets.token_bytes(size), "little") & mask
        out[i] = value
    return out


@lru_cache(maxsize=256)
def _lagrange_cached(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange coefficients at 0 for sorted, distinct, validated ``xs``."""
    return tuple(_lagrange(xs, PRIME))


def _lagrange(xs: Sequence[int], prime: int) -> list[int]:
    """``prod_{j != i} x_j / (x_j - x_i)`` mod ``prime`` for each ``i``."""
    numerators: list[int] = []
    denominators: list[int] = []
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        numerators.append(num)
        denominators.append(den)
    # One modular inversion for all denominators (Montgomery's trick).
    prefix = [1]
    for den in denominators:
        prefix.append(prefix[-1] * den % prime)
    inverse = pow(prefix[-1], -1, prime)
    out = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        out[i] = numerators[i] * inverse * prefix[i] % prime
        inverse = inverse * denominators[i] % prime
    return out


def _reconstruct_int(
    shares: Mapping[int, int],
    threshold: int,
    coefficients: Mapping[int, int] | None,
) -> int:
    """Interpolate the shares' polynomial at 0."""
    if coefficients is None:
        _require_count(len(shares), threshold)
        coefficients = lagrange_at_zero(list(shares))
    else:
        _require_count(len(coefficients), threshold)
        missing = [x for x in coefficients if x not in shares]
        if missing:
            raise ProtocolError(
                f"coefficients name positions without a share: {sorted(missing)}"
            )
    total = 0
    for x, coefficient in coefficients.items():
        y = shares[x]
        if not isinstance(y, int) or not 0 <= y < PRIME:
            raise ProtocolError(f"share value at position {x} is outside [0, PRIME)")
        total += coefficient * y
    return total % PRIME


def _require_count(given: int, threshold: int) -> None:
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if given < threshold:
        raise ProtocolError(
            f"reconstruction needs at least {threshold} shares (the threshold), "
            f"but {given} were given"
        )


def _check_positions(threshold: int, xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError(f"share positions must be distinct, got {list(xs)}")
    for x in xs:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 < x < PRIME:
            raise ValueError(f"share position {x!r} is outside [1, PRIME)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(
            f"threshold must be in [1, number of positions = {len(xs)}], "
            f"got {threshold}"
        )
