"""DP randomness: seeded for simulation, or cryptographically secure.

:class:`SeededGaussian` draws from a ``numpy.random.Generator`` the caller
passes in, so a simulation is reproducible from its seed. Its output is
predictable from the seed and is exposed to the floating-point attack below:
use it to study algorithms, not to protect real data.

:class:`SecureRandom` is secret randomness made fast: an AES-256-CTR
keystream (the ``cryptography`` library) keyed from the operating system's
cryptographic generator (``os.urandom``), turned into uniforms, normals and
random subsets with vectorised numpy. These draw from it:
:class:`SecureGaussian` (DP noise, hardened against the floating-point
attack of Mironov (2012) as Holohan and Braghin (2021) propose), client
sampling with ``secure_rng``
(:meth:`fedshield.strategies.dp.DpFedAvg.configure`) and DP-SGD's Poisson
sampling of records with a secure noise source
(:mod:`fedshield.models.dp_sgd`): amplification by sampling assumes that
the sample is as secret as the noise.

Everything returns float64 (or index) arrays; nothing here imports torch.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from fedshield.errors import ConfigError

__all__ = [
    "GaussianNoise",
    "SecureGaussian",
    "SecureRandom",
    "SeededGaussian",
    "make_noise",
]

Shape = int | tuple[int, ...]


@runtime_checkable
class GaussianNoise(Protocol):
    """A source of centred Gaussian noise.

    Attributes
    ----------
    secure
        Whether the noise is unpredictable (cryptographic randomness) and
        hardened against floating-point attacks.
    """

    secure: bool

    def sample(self, shape: Shape, std: float) -> NDArray[np.float64]:
        """Draw independent N(0, std²) values.

        Parameters
        ----------
        shape
            Shape of the result (an int for a vector).
        std
            Standard deviation, finite and >= 0; 0 gives zeros.

        Returns
        -------
        numpy.ndarray
            float64 array of ``shape``.

        Raises
        ------
        ConfigError
            When ``std`` is negative or not finite, or ``shape`` is invalid.
        """
        ...


def _check_std(std: object) -> float:
    if isinstance(std, bool) or not isinstance(std, numbers.Real):
        raise ConfigError(f"std must be a number; got {std!r}")
    value = float(std)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"std must be finite and >= 0; got {value!r}")
    return value


def _check_shape(shape: object) -> tuple[int, ...]:
    dims = shape if isinstance(shape, tuple) else (shape,)
    for dim in dims:
        if (
            isinstance(dim, bool)
            or not isinstance(dim, numbers.Integral)
            or int(dim) < 0
        ):
            raise ConfigError(
                f"shape must be an int or a tuple of ints >= 0; got {shape!r}"
            )
    return tuple(operator.index(dim) for dim in dims)


class SeededGaussian:
    """Reproducible Gaussian noise from a numpy ``Generator`` (simulation).

    Parameters
    ----------
    rng
        The generator to draw from; the same seed gives the same noise.

    Raises
    ------
    ConfigError
        When ``rng`` is not a ``numpy.random.Generator``.
    """

    secure: bool = False

    def __init__(self, rng: np.random.Generator) -> None:
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(
                f"rng must be a numpy.random.Generator; got {type(rng).__name__}"
            )
        self._rng = rng

    def __repr__(self) -> str:
        return f"SeededGaussian({self._rng!r})"

    def sample(self, shape: Shape, std: float) -> NDArray[np.float64]:
        """Draw N(0, std²) values from the generator.

        Parameters
        ----------
        shape
            Shape of the result.
        std
            Standard deviation, finite and >= 0; 0 gives zeros and draws
            nothing from the generator.

        Returns
        -------
        numpy.ndarray
            float64 array of ``shape``.

        Raises
        ------
        ConfigError
            When ``std`` is negative or not finite, or ``shape`` is invalid.
        """
        dims = _check_shape(shape)
        scale = _check_std(std)
        if scale == 0.0:
            return np.zeros(dims, dtype=np.float64)
        out = self._rng.standard_normal(dims, dtype=np.float64)
        out *= scale
        return out


# Keystream words (8 bytes each) per call of the cipher: the size of the
# reusable buffers, 256 KiB of keystream. The polar method takes two words
# per candidate pair, so one call serves half as many candidate pairs.
_WORDS = 1 << 15
_PAIRS = _WORDS // 2
# A fresh key after this much keystream (AES-CTR is sound far beyond it;
# rekeying keeps every key's use small).
_REKEY_BYTES = 1 << 36
# The plaintext of the keystream: zero bytes (read-only, shared).
_ZEROS = memoryview(bytes(8 * _WORDS))
_2_POW_M52 = 2.0**-52
_2_POW_M53 = 2.0**-53
# Acceptance rate of the polar method: the unit disc's share of the square.
_ACCEPT = math.pi / 4.0


class SecureRandom:
    """Uniforms, normals and subsets from an AES-256-CTR keystream keyed by the OS.

    The keystream is AES-256 in counter mode (``cryptography``'s
    ``Cipher(algorithms.AES(key), modes.CTR(counter))`` encrypting zero
    bytes, which OpenSSL runs with the CPU's AES instructions), keyed with
    ``os.urandom(32)`` from a random initial counter block
    (``os.urandom(16)``): a cryptographically secure generator whose output
    cannot be predicted from any seed, from the run's configuration or from
    earlier output. It is how ``secure_rng`` draws its noise and its samples
    fast: one ``os.urandom`` call per key instead of one per draw.

    Every draw is vectorised: keystream bytes are read as 64-bit words, and
    the words become 53-bit uniforms (:meth:`random`), Gaussian draws by
    Marsaglia's polar method (:meth:`standard_normal`), or a uniformly random
    subset (:meth:`subset`).

    Not reproducible, by design. A forked child process re-keys before its
    first draw (it would otherwise repeat its parent's keystream), and so
    does a copy made by ``pickle`` or ``copy``; the key also changes after
    every 2**36 bytes of keystream. Not thread-safe: use one per thread.

    Examples
    --------
    >>> source = SecureRandom()
    >>> u = source.random(5)
    >>> bool(((u > 0) & (u < 1)).all())
    True
    >>> picked = source.subset(10, 3)
    >>> len(picked), bool((picked[:-1] < picked[1:]).all())
    (3, True)
    """

    secure: bool = True

    def __init__(self) -> None:
        self._pid = -1  # no key yet: the first draw keys the cipher
        self._used = 0
        self._encryptor: _Encryptor | None = None
        self._stream = bytearray(8 * _WORDS + 15)  # update_into's block slack
        self._work: _PolarWork | None = None

    def __repr__(self) -> str:
        return "SecureRandom()"

    def __reduce__(self) -> tuple[type[SecureRandom], tuple[()]]:
        # A copy must never replay this keystream: it gets its own key.
        return (SecureRandom, ())

    def _rekey(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key = os.urandom(32)
        counter = os.urandom(16)
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        self._pid = os.getpid()
        self._used = 0

    def _keystream(self, words: int) -> NDArray[np.uint64]:
        """The next ``words`` (<= ``_WORDS``) keystream words, in a reused buffer.

        The view is overwritten by the next call: use it before then.
        """
        if self._pid != os.getpid() or self._used >= _REKEY_BYTES:
            self._rekey()
        assert self._encryptor is not None
        size = 8 * words
        self._encryptor.update_into(_ZEROS[:size], self._stream)
        self._used += size
        return np.frombuffer(self._stream, dtype=np.uint64, count=words)

    def words(self, size: int) -> NDArray[np.uint64]:
        """``size`` independent uniform 64-bit words.

        Raises
        ------
        ConfigError
            When ``size`` is not an int >= 0.
        """
        count = _check_count(size, "size")
        out = np.empty(count, dtype=np.uint64)
        for start in range(0, count, _WORDS):
            stop = min(start + _WORDS, count)
            out[start:stop] = self._keystream(stop - start)
        return out

    def random(self, size: int) -> NDArray[np.float64]:
        """``size`` uniforms strictly inside (0, 1), on the grid ``k · 2**-53``.

        The top 53 bits of a word give ``k`` in ``[0, 2**53)``; ``k = 0`` (a
        chance of ``2**-53`` per draw) is drawn again, so every value is one
        of ``k · 2**-53`` for ``k`` in ``[1, 2**53)``, all equally likely:
        ``random(n) < q`` holds with probability ``q`` up to ``2**-53``.

        Raises
        ------
        ConfigError
            When ``size`` is not an int >= 0.
        """
        bits = self.words(size)
        bits >>= np.uint64(11)
        zero = np.flatnonzero(bits == 0)
        while zero.size:
            fresh = self.words(zero.size)
            fresh >>= np.uint64(11)
            bits[zero] = fresh
            zero = zero[fresh == 0]
        out = bits.astype(np.float64)
        out *= _2_POW_M53
        return out

    def standard_normal(self, size: int) -> NDArray[np.float64]:
        """``size`` independent N(0, 1) draws by Marsaglia's polar method.

        Each candidate pair takes two words, ``v = k · 2**-52`` with ``k``
        the word's top 53 bits as a signed integer (so ``v`` is uniform on
        the grid of ``[-1, 1)``); a pair with ``0 < s = v1² + v2² < 1`` (a
        share ``π/4``) gives the two independent normals ``v1 · f`` and
        ``v2 · f``, ``f = sqrt(-2 ln s / s)`` (Marsaglia and Bray, 1964).
        Rejection and the arithmetic are whole-array numpy operations on
        reused buffers; only ``log`` and ``sqrt`` are transcendental (no
        sine or cosine, unlike Box–Muller).

        The smallest ``s`` is ``2**-104``, so ``|draw| <= sqrt(208 ln 2)``,
        about 12.0: a Gaussian exceeds that with probability about
        ``4e-33``.

        Raises
        ------
        ConfigError
            When ``size`` is not an int >= 0.
        """
        count = _check_count(size, "size")
        total = count + (count & 1)
        out = np.empty(total, dtype=np.float64)
        if self._work is None:
            self._work = _PolarWork()
        work = self._work
        filled = 0
        while filled < total:
            wanted = (total - filled) // 2
            # Enough candidates to fill the rest with high probability
            # (about 4 standard deviations of the binomial margin).
            pairs = min(_PAIRS, int(wanted / _ACCEPT + 4.0 * math.sqrt(wanted)) + 16)
            signed = self._keystream(2 * pairs).view(np.int64)
            v = work.v[: 2 * pairs].reshape(2, pairs)
            np.right_shift(signed, 11, out=signed)  # in the keystream buffer
            np.multiply(signed.reshape(2, pairs), _2_POW_M52, out=v)
            s, t = work.s[:pairs], work.t[:pairs]
            np.multiply(v[0], v[0], out=s)
            np.multiply(v[1], v[1], out=t)
            s += t
            inside, positive = work.inside[:pairs], work.positive[:pairs]
            np.less(s, 1.0, out=inside)
            np.greater(s, 0.0, out=positive)
            inside &= positive
            kept = np.compress(inside, v, axis=1)  # (faster than into a buffer)
            got = min(kept.shape[1], wanted)
            kept = kept[:, :got]
            s, t, f = work.s[:got], work.t[:got], work.f[:got]
            np.multiply(kept[0], kept[0], out=s)
            np.multiply(kept[1], kept[1], out=t)
            s += t
            np.log(s, out=f)
            f *= -2.0
            f /= s
            np.sqrt(f, out=f)
            np.multiply(kept, f, out=out[filled : filled + 2 * got].reshape(2, got))
            filled += 2 * got
        return out[:count]

    def subset(self, n: int, k: int) -> NDArray[np.intp]:
        """A uniformly random ``k``-subset of ``range(n)``, sorted.

        The ``k`` indices with the smallest of ``n`` random words; a tie
        across the cut (a chance below ``n² · 2**-64``) is drawn again, so
        every subset is exactly equally likely.

        Raises
        ------
        ConfigError
            When ``n`` or ``k`` is not an int >= 0, or ``k > n``.
        """
        total = _check_count(n, "n")
        size = _check_count(k, "k")
        if size > total:
            raise ConfigError(f"cannot choose k = {size} of n = {total} items")
        if size == total:
            return np.arange(total, dtype=np.intp)
        while True:
            keys = self.words(total)
            order = np.argpartition(keys, size)
            chosen = order[:size]
            if size == 0 or keys[chosen].max() < keys[order[size]]:
                return np.sort(chosen)


class _Encryptor(Protocol):
    def update_into(self, data: memoryview, buf: bytearray) -> int: ...


class _PolarWork:
    """Reused buffers of :meth:`SecureRandom.standard_normal` (one call's worth)."""

    def __init__(self) -> None:
        self.v = np.empty(2 * _PAIRS, dtype=np.float64)
        self.s = np.empty(_PAIRS, dtype=np.float64)
        self.t = np.empty(_PAIRS, dtype=np.float64)
        self.f = np.empty(_PAIRS, dtype=np.float64)
        self.inside = np.empty(_PAIRS, dtype=bool)
        self.positive = np.empty(_PAIRS, dtype=bool)


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int >= 0; got {value!r}")
    count = operator.index(value)
    if count < 0:
        raise ConfigError(f"{name} must be an int >= 0; got {count}")
    return count


# Outputs per chunk of SecureGaussian: bounds memory at about 40 MB of draws
# whatever the requested size (4 draws of 8 bytes per output).
_CHUNK = 1 << 20
# Draws summed per output: sum of 4 draws of std s, halved, has std s.
_DRAWS = 4


class SecureGaussian:
    """Gaussian noise from cryptographic randomness, hardened for DP.

    The draws come from a :class:`SecureRandom` (an AES-256-CTR keystream
    keyed from ``os.urandom``), never from a statistical PRNG, so the noise
    cannot be predicted from a seed and is not reproducible.

    Each output is the sum of four independent N(0, std²) draws divided by
    two, which has exactly variance std². This is the defence of Holohan and
    Braghin, "Secure Random Sampling in Differential Privacy" (ESORICS 2021,
    arXiv:2107.10138), against the floating-point attack of Mironov, "On
    Significance of the Least Significant Bits for Differential Privacy"
    (CCS 2012).

    Parameters
    ----------
    source
        The keystream to draw from; None (default): a new
        :class:`SecureRandom`, keyed on the first draw.

    Notes
    -----
    *The attack.* A textbook sampler maps a few random words to a float through
    a fixed formula (here Marsaglia's polar method: ``v1 · sqrt(-2 ln s / s)``
    on 53-bit uniforms, see :meth:`SecureRandom.standard_normal`). Only some
    floats can come out of it, and once the true value is added, which
    floats the release can be depends on that value: an adversary who sees
    the exact bits may rule out one of two neighbouring inputs, with no
    privacy loss recorded. Holohan and Braghin show this for common Gaussian
    samplers.

    *The defence.* Adding independent samples convolves their sets of
    reachable floats, so the set of possible outputs becomes much denser and
    far less dependent on the released value, and an observed output is
    (almost always) reachable from either neighbouring input. Holohan and
    Braghin propose summing several draws and report that it defeats their
    attack; four draws (the number Opacus' secure mode uses) cost four times
    the randomness and arithmetic of one.

    *Limits.* This is a mitigation with empirical support, not a proof that
    the floating-point mechanism satisfies the claimed (ε, δ): rounding in
    the final ``value + noise`` is still there, and each polar draw is
    bounded by about 12.0 standard deviations (see
    :meth:`SecureRandom.standard_normal`), so the output is at most about
    24 std from zero; the outputs only one neighbouring input can reach lie
    in that far tail, whose probability is negligible next to any practical
    δ. Exact guarantees need integer noise such as the discrete Gaussian
    (Canonne, Kamath and Steinke 2020), sampled exactly. Timing side
    channels and the security of the operating system's generator and of
    AES are out of scope.
    """

    secure: bool = True

    def __init__(self, source: SecureRandom | None = None) -> None:
        if source is not None and not isinstance(source, SecureRandom):
            raise ConfigError(
                f"source must be a SecureRandom; got {type(source).__name__}"
            )
        self._source = source if source is not None else SecureRandom()

    def __repr__(self) -> str:
        return "SecureGaussian()"

    def sample(self, shape: Shape, std: float) -> NDArray[np.float64]:
        """Draw N(0, std²) values from the keystream (see the class Notes).

        Parameters
        ----------
        shape
            Shape of the result.
        std
            Standard deviation, finite and >= 0; 0 gives zeros.

        Returns
        -------
        numpy.ndarray
            float64 array of ``shape``.

        Raises
        ------
        ConfigError
            When ``std`` is negative or not finite, or ``shape`` is invalid.
        """
        dims = _check_shape(shape)
        scale = _check_std(std)
        size = math.prod(dims)
        if scale == 0.0:
            return np.zeros(dims, dtype=np.float64)
        out = np.empty(size, dtype=np.float64)
        for start in range(0, size, _CHUNK):
            stop = min(start + _CHUNK, size)
            draws = self._source.standard_normal(_DRAWS * (stop - start))
            z1, z2, z3, z4 = draws.reshape(_DRAWS, stop - start)
            part = out[start:stop]
            np.add(z1, z2, out=part)
            part += z3
            part += z4
        # Var(z1 + z2 + z3 + z4) = 4, so (sum / 2) * std has variance std².
        out *= scale / 2.0
        return out.reshape(dims)


def make_noise(secure: bool, rng: np.random.Generator | None = None) -> GaussianNoise:
    """The noise source a run asks for.

    Parameters
    ----------
    secure
        True: :class:`SecureGaussian` (``rng`` is not used). False:
        :class:`SeededGaussian` drawing from ``rng``.
    rng
        The generator for seeded noise; required when ``secure`` is False.

    Returns
    -------
    GaussianNoise
        The noise source.

    Raises
    ------
    ConfigError
        When ``secure`` is False and ``rng`` is not a numpy ``Generator``.
    """
    if secure:
        return SecureGaussian()
    if rng is None:
        raise ConfigError(
            "seeded noise needs rng: pass a numpy.random.Generator (for example "
            "fedshield.core.derive_rng(seed, ...)), or use secure noise"
        )
    return SeededGaussian(rng)
