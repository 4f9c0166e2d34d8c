"""Gaussian noise for DP releases: seeded for simulation, or cryptographically secure.

:class:`SeededGaussian` draws from a ``numpy.random.Generator`` the caller
passes in, so a simulation is reproducible from its seed. Its output is
predictable from the seed and is exposed to the floating-point attack below:
use it to study algorithms, not to protect real data.

:class:`SecureGaussian` draws from the operating system's cryptographic
random number generator (``os.urandom``) and defends against the
floating-point attack of Mironov (2012) as Holohan and Braghin (2021)
propose. Use it for any release whose privacy matters.

Both return float64 arrays; neither imports torch.
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

__all__ = ["GaussianNoise", "SecureGaussian", "SeededGaussian", "make_noise"]

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


# Outputs per chunk: bounds memory at about 100 MB of temporaries whatever the
# requested size (4 draws per output, 8 random bytes per draw).
_CHUNK = 1 << 20
# Draws summed per output: sum of 4 draws of std s, halved, has std s.
_DRAWS = 4
_TWO_PI = 2.0 * math.pi
_2_POW_M53 = 2.0**-53


def _secure_standard_normals(count: int) -> NDArray[np.float64]:
    """``count`` N(0, 1) values by Box–Muller on 53-bit uniforms from the OS."""
    pairs = (count + 1) // 2
    # 53 random bits per uniform: every float64 in the grid k * 2**-53.
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64) >> np.uint64(11)
    # u1 in (0, 1] so that log(u1) is finite; u2 in [0, 1).
    u1 = (bits[:pairs] + np.uint64(1)).astype(np.float64) * _2_POW_M53
    u2 = bits[pairs:].astype(np.float64) * _2_POW_M53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = u2 * _TWO_PI
    out = np.empty(2 * pairs, dtype=np.float64)
    np.multiply(radius, np.cos(angle), out=out[:pairs])
    np.multiply(radius, np.sin(angle), out=out[pairs:])
    return out[:count]


class SecureGaussian:
    """Gaussian noise from OS cryptographic randomness, hardened for DP.

    Randomness comes only from ``os.urandom`` (the kernel's CSPRNG), never
    from a statistical PRNG, so the noise cannot be predicted from a seed and
    is not reproducible.

    Each output is the sum of four independent N(0, std²) draws divided by
    two, which has exactly variance std². This is the defence of Holohan and
    Braghin, "Secure Random Sampling in Differential Privacy" (ESORICS 2021,
    arXiv:2107.10138), against the floating-point attack of Mironov, "On
    Significance of the Least Significant Bits for Differential Privacy"
    (CCS 2012).

    Notes
    -----
    *The attack.* A textbook sampler maps a few random words to a float through
    a fixed formula (here Box–Muller: ``sqrt(-2 ln u1) · cos(2π u2)`` on 53-bit
    uniforms). Only some floats can come out of it, and once the true value
    is added, which floats the release can be depends on that value: an
    adversary who sees the exact bits may rule out one of two neighbouring
    inputs, with no privacy loss recorded. Holohan and Braghin show this for
    common Gaussian samplers.

    *The defence.* Adding independent samples convolves their sets of
    reachable floats, so the set of possible outputs becomes much denser and
    far less dependent on the released value, and an observed output is
    (almost always) reachable from either neighbouring input. Holohan and
    Braghin propose summing several draws and report that it defeats their
    attack; four draws (the number Opacus' secure mode uses) cost four times
    the randomness and arithmetic of one.

    *Limits.* This is a mitigation with empirical support, not a proof that
    the floating-point mechanism satisfies the claimed (ε, δ): rounding in
    the final ``value + noise`` is still there, and each Box–Muller draw is
    truncated at about 8.6 standard deviations (u1 >= 2**-53), so the output
    is at most about 17 std from zero; the outputs only one neighbouring
    input can reach lie in that far tail, whose probability is negligible
    next to any practical δ. Exact guarantees need integer
    noise such as the discrete Gaussian (Canonne, Kamath and Steinke 2020),
    sampled exactly. Timing side channels and the security of the operating
    system's generator are out of scope.
    """

    secure: bool = True

    def __repr__(self) -> str:
        return "SecureGaussian()"

    def sample(self, shape: Shape, std: float) -> NDArray[np.float64]:
        """Draw N(0, std²) values from OS randomness (see the class Notes).

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
        out = np.zeros(size, dtype=np.float64)
        if scale == 0.0:
            return out.reshape(dims)
        for start in range(0, size, _CHUNK):
            stop = min(start + _CHUNK, size)
            draws = _secure_standard_normals(_DRAWS * (stop - start))
            np.sum(draws.reshape(_DRAWS, stop - start), axis=0, out=out[start:stop])
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
