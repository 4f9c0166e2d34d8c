"""Fixed-point encoding of float updates into the integers mod ``2**b``.

Masks only cancel in a finite group, so each client turns its float vector
into integers mod ``2**b`` (:func:`encode`), adds masks there
(:func:`add_mod`), and the server, once the masks are gone, reads the sum back
as signed fixed point (:func:`decode_sum`).

Encoding
    A value ``v`` is clipped to ``[-clip, clip]`` (and the clipped ones are
    counted and reported, never dropped silently), multiplied by ``scale``
    and rounded stochastically to an integer ``k``: ``floor(v * scale)`` plus
    one with probability equal to the fractional part, so ``E[k] = v * scale``
    exactly and the decoded sum is unbiased. ``k`` is stored as
    ``k mod 2**b`` (two's complement in ``b`` bits).
No wrap-around
    Every encoded value satisfies ``|k| <= M = ceil(clip * scale)``, so the
    true sum of ``n`` of them lies in ``[-n M, n M]``. :func:`choose_encoding`
    picks ``b >= ceil(log2(2 n clip scale)) + 1``, i.e.
    ``2 n M <= 2**(b - 1)``: the sum fits in the centred range
    ``[-2**(b-1), 2**(b-1))`` with a factor 2 to spare, so decoding it mod
    ``2**b`` recovers it exactly.
Why ``b <= 62``
    Values are reduced mod ``2**b`` and stored in ``uint64``; with ``b <= 62``
    up to four reduced values can be added before a reduction without
    overflowing 64 bits, and ``2**b`` and every centred value fit in
    ``int64``.
Quantisation error
    Each client's rounding error is below ``1 / scale`` in absolute value, so
    the decoded sum of ``n`` clients is within ``n / scale`` of the true sum
    of the clipped values (and has expectation equal to it).

Weighted FedAvg through the encoding
------------------------------------
The secure sum is unweighted, so client ``k`` encodes its update already
multiplied by its weight ``w_k = n_k / W_bound``, where ``n_k`` is its number
of examples and ``W_bound`` a public upper bound on the total number of
examples in a round. Then ``0 <= w_k <= sum_k w_k <= 1 = total_weight_bound``,
every weighted value lies in ``[-clip * total_weight_bound, clip *
total_weight_bound]`` if the raw update lies in ``[-clip, clip]``, and the
decoded sum is ``S = sum_k w_k Delta_k`` over the clients that survived. The
server divides ``S`` by ``sum_k w_k`` over the same survivors, which is public
(the weights are announced in the clear), or, to keep the individual ``n_k``
hidden too, is computed by the same secure sum: the client appends ``w_k`` as
one extra coordinate of the vector it encodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedshield.errors import ConfigError, InvalidUpdateError, ProtocolError

__all__ = [
    "MAX_MODULUS_BITS",
    "MAX_PRECISION_BITS",
    "Encoding",
    "add_mod",
    "choose_encoding",
    "decode_sum",
    "encode",
    "sub_mod",
]

MAX_MODULUS_BITS = 62
"""Largest ``b``: sums of a few reduced ``uint64`` values cannot overflow."""

MAX_PRECISION_BITS = 52
"""Largest precision: ``clip * scale`` stays exact in a float64 mantissa."""


@dataclass(frozen=True)
class Encoding:
    """How floats map to the integers mod ``2**modulus_bits``.

    Attributes
    ----------
    clip
        Each value is expected in ``[-clip, clip]`` after the client's own
        weighting; values outside are clipped and counted by :func:`encode`.
    scale
        Integer units per 1.0: the quantisation step is ``1 / scale``.
    modulus_bits
        ``b``: arithmetic is mod ``2**b``, ``2 <= b <= 62``.

    Raises
    ------
    ConfigError
        If a field is out of range or ``clip * scale`` exceeds ``2**52``.
    """

    clip: float
    scale: float
    modulus_bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"Encoding.clip must be finite and > 0, got {self.clip}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(
                f"Encoding.scale must be finite and > 0, got {self.scale}"
            )
        if not 2 <= self.modulus_bits <= MAX_MODULUS_BITS:
            raise ConfigError(
                f"Encoding.modulus_bits must be in [2, {MAX_MODULUS_BITS}], "
                f"got {self.modulus_bits}"
            )
        if self.clip * self.scale > 2.0**MAX_PRECISION_BITS:
            raise ConfigError(
                f"Encoding.clip * Encoding.scale = {self.clip * self.scale:.4g} "
                f"exceeds 2**{MAX_PRECISION_BITS}: float64 cannot round it exactly"
            )

    @property
    def max_units(self) -> int:
        """``M = ceil(clip * scale)``: the largest magnitude one client encodes."""
        return math.ceil(self.clip * self.scale)

    @property
    def max_clients(self) -> int:
        """The most clients whose sum cannot wrap: ``2 n M <= 2**(b - 1)``."""
        return (1 << (self.modulus_bits - 2)) // self.max_units

    def check_clients(self, num_clients: int) -> None:
        """Raise :class:`ConfigError` unless ``num_clients`` values can be summed.

        Raises
        ------
        ConfigError
            If ``num_clients`` is below 1 or above :attr:`max_clients`.
        """
        if num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
        if num_clients > self.max_clients:
            raise ConfigError(
                f"modulus too small for n: num_clients={num_clients} values of up "
                f"to {self.max_units} units can wrap around mod 2**{self.modulus_bits} "
                f"(at most {self.max_clients} clients fit)"
            )


def choose_encoding(
    num_clients: int,
    clip: float,
    *,
    total_weight_bound: float = 1.0,
    precision_bits: int = 24,
) -> Encoding:
    """The smallest modulus in which ``num_clients`` encoded values cannot wrap.

    Parameters
    ----------
    num_clients
        ``n``: the most clients whose values are summed.
    clip
        Bound on every coordinate of a client's raw (unweighted) update.
    total_weight_bound
        Bound on the weights ``w_k`` (and on their sum): the encoded value is
        ``w_k * Delta_k``, so the encoding's range is
        ``clip * total_weight_bound``. 1.0 for ``w_k = n_k / W_bound``.
    precision_bits
        ``p``: the range ``[0, clip * total_weight_bound]`` is divided into
        ``2**p`` steps, i.e. ``scale = 2**p / (clip * total_weight_bound)``.

    Returns
    -------
    Encoding
        With ``modulus_bits = b >= ceil(log2(2 n clip scale)) + 1``.

    Raises
    ------
    ConfigError
        If an argument is out of range, or ``b`` would exceed 62 ("modulus
        too small for n": lower ``precision_bits`` or the number of clients).
    """
    if (
        isinstance(num_clients, bool)
        or not isinstance(num_clients, int)
        or num_clients < 1
    ):
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"clip must be finite and > 0, got {clip}")
    if not (math.isfinite(total_weight_bound) and total_weight_bound > 0):
        raise ConfigError(
            f"total_weight_bound must be finite and > 0, got {total_weight_bound}"
        )
    if not 1 <= precision_bits <= MAX_PRECISION_BITS:
        raise ConfigError(
            f"precision_bits must be in [1, {MAX_PRECISION_BITS}], got {precision_bits}"
        )
    range_bound = clip * total_weight_bound
    if not (math.isfinite(range_bound) and range_bound > 0):
        raise ConfigError(
            f"clip * total_weight_bound = {range_bound} is not a usable range"
        )
    scale = 2.0**precision_bits / range_bound
    max_units = math.ceil(range_bound * scale)
    # ceil(log2(x)) for an integer x >= 1 is (x - 1).bit_length().
    bits = (2 * num_clients * max_units - 1).bit_length() + 1
    if bits > MAX_MODULUS_BITS:
        raise ConfigError(
            f"modulus too small for n: num_clients={num_clients} at "
            f"precision_bits={precision_bits} needs a {bits}-bit modulus, more than "
            f"the {MAX_MODULUS_BITS} bits uint64 arithmetic allows; lower "
            "precision_bits or the number of clients"
        )
    bits = max(bits, 2)
    assert 2 ** (bits - 1) >= 2 * num_clients * range_bound * scale  # no wrap
    encoding = Encoding(clip=range_bound, scale=scale, modulus_bits=bits)
    encoding.check_clients(num_clients)
    return encoding


def encode(
    values: np.ndarray, enc: Encoding, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Encode floats as integers mod ``2**b`` with unbiased stochastic rounding.

    Parameters
    ----------
    values
        Float array of any shape (already multiplied by the client's weight).
    enc
        The round's encoding.
    rng
        Draws the rounding directions; it needs no secrecy (masks hide the
        result), only independence between clients.

    Returns
    -------
    encoded : numpy.ndarray
        ``uint64`` array of the same shape, each entry in ``[0, 2**b)``.
    num_clipped : int
        How many values were outside ``[-clip, clip]`` and were clipped to
        it: report it (a large count means the clip or the weights are off).

    Raises
    ------
    InvalidUpdateError
        If a value is NaN or infinite.
    """
    array = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise InvalidUpdateError(f"cannot encode {bad} NaN or infinite value(s)")
    num_clipped = int(np.count_nonzero(np.abs(array) > enc.clip))
    units = np.clip(array, -enc.clip, enc.clip)
    units *= enc.scale
    floor = np.floor(units)
    units -= floor  # fractional part in [0, 1)
    floor += rng.random(array.shape) < units  # round up with that probability
    encoded = floor.astype(np.int64).view(np.uint64)  # two's complement mod 2**64
    encoded &= np.uint64((1 << enc.modulus_bits) - 1)  # ... reduced mod 2**b
    return encoded, num_clipped


def decode_sum(total: np.ndarray, enc: Encoding, num_clients: int) -> np.ndarray:
    """Read a sum of encoded values back as floats.

    Parameters
    ----------
    total
        ``uint64`` array: the unmasked sum mod ``2**b``.
    enc
        The encoding the clients used.
    num_clients
        How many values were summed; checked against the encoding's capacity.

    Returns
    -------
    numpy.ndarray
        float64: the centred representative of ``total`` (in
        ``[-2**(b-1), 2**(b-1))``) divided by ``scale``.

    Raises
    ------
    ConfigError
        If ``num_clients`` values could wrap around in this encoding.
    ProtocolError
        If an entry of ``total`` is not reduced mod ``2**b``.
    TypeError
        If ``total`` is not ``uint64``.
    """
    enc.check_clients(num_clients)
    array = np.asarray(total)
    if array.dtype != np.uint64:
        raise TypeError(f"total must be a uint64 array, got dtype {array.dtype}")
    modulus = 1 << enc.modulus_bits
    if array.size and int(array.max()) >= modulus:
        raise ProtocolError(f"sum is not reduced mod 2**{enc.modulus_bits}")
    signed = array.astype(np.int64)
    signed[array >= np.uint64(modulus >> 1)] -= np.int64(modulus)
    return signed / enc.scale


def add_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    """``(a + b) mod 2**modulus_bits`` for ``uint64`` arrays reduced mod ``2**b``.

    ``modulus_bits`` may be up to 64 (``uint64`` addition wraps mod ``2**64``).
    Returns a new array.
    """
    mask = _mask(modulus_bits)
    out: np.ndarray = np.add(_as_words(a, "a"), _as_words(b, "b"), dtype=np.uint64)
    out &= mask
    return out


def sub_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    """``(a - b) mod 2**modulus_bits`` for ``uint64`` arrays; a new array."""
    mask = _mask(modulus_bits)
    out: np.ndarray = np.subtract(_as_words(a, "a"), _as_words(b, "b"), dtype=np.uint64)
    out &= mask
    return out


def _mask(modulus_bits: int) -> np.uint64:
    if not 1 <= modulus_bits <= 64:
        raise ValueError(f"modulus_bits must be in [1, 64], got {modulus_bits}")
    return np.uint64((1 << modulus_bits) - 1)


def _as_words(array: np.ndarray, name: str) -> np.ndarray:
    out = np.asarray(array)
    if out.dtype != np.uint64:
        raise TypeError(f"{name} must be a uint64 array, got dtype {out.dtype}")
    return out
