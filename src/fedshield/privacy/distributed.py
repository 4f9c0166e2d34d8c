"""Distributed DP: the distributed discrete Gaussian under secure aggregation.

The mechanism of Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML 2021
(arXiv:2102.06387), Algorithms 1 and 2. Each client, on its own update
``Δ ∈ R^d``:

1. clips it to L2 norm ``C``;
2. pads it with zeros to ``d' = 2^⌈log2 d⌉`` and rotates it with the
   randomized Walsh–Hadamard transform ``x ↦ H D x / sqrt(d')`` (``D`` a
   diagonal of random signs drawn from a *public* per-round seed, the same
   for every client and the server, so the rotation commutes with the sum):
   the rotation spreads the norm evenly over the coordinates, so that the
   sum rarely wraps around the modulus;
3. scales by ``1/γ`` (the granularity) and rounds each coordinate
   stochastically to an integer, *conditionally*: the rounding is redrawn
   until the rounded vector's squared norm is at most ``bound²`` (their
   Theorem 1 / Proposition 22 with parameter ``β``), so every client's
   integer vector has norm at most ``bound`` — the L2 sensitivity that the
   accountant uses, quantisation included;
4. adds discrete Gaussian noise ``N_Z(0, σ²)`` to each coordinate (by the
   sampler of Canonne, Kamath and Steinke, "The Discrete Gaussian for
   Differential Privacy", NeurIPS 2020, Algorithm 3, run exactly: floats
   decide a draw only where rigorous error bounds say they cannot be
   wrong, exact arithmetic the rest, see :func:`discrete_gaussian`; on
   bits drawn from the OS's cryptographic randomness: the noise is each
   client's secret against the server, which in a simulation knows the
   seed, so the seed fixes only the training);
5. reduces it mod ``m = 2^b`` and hands it to secure aggregation, which
   reveals only the sum mod ``m``.

The server maps the sum to ``[-m/2, m/2)``, multiplies by ``γ``, undoes the
rotation and drops the padding. It never holds an un-noised sum.

Privacy
    The released sum mod ``m`` is a function of the integer sum
    ``Σ_i x̃_i + Σ_i z_i``, so modular wrap-around is post-processing and
    costs no privacy (it costs accuracy, which is why ``γ`` is chosen so that
    it is unlikely, see :meth:`DistributedDp.parameters`). The accountant
    (:meth:`fedshield.privacy.accounting.DpEventSpec.
    distributed_discrete_gaussian`) composes the Rényi-DP bound of the sum of
    ``n`` discrete Gaussians (Kairouz et al., Theorem 1 with Proposition 14),
    with ``n`` the clients whose noise the sum holds, ``σ`` the per-client
    std and ``bound`` the sensitivity, in integer units.
Noise share
    A round completes only if at least ``t`` (the secure-aggregation
    threshold) clients' masked inputs arrive, so each client adds
    ``σ = z C / (γ sqrt(t))``: the sum of any ``≥ t`` shares has std at least
    ``z C / γ``, the std central DP-FedAvg would add with noise multiplier
    ``z``. More survivors add more noise (and the accountant counts them).
Neighbouring relation
    One client's update replaced by zero (the relation of Kairouz et al.):
    the sensitivity is the norm bound of one client's rounded vector.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from fedshield.errors import ConfigError

__all__ = [
    "DdgParameters",
    "DistributedDp",
    "RandomBytes",
    "conditional_round",
    "decode_sum",
    "discrete_gaussian",
    "encode",
    "hadamard",
    "padded_dimension",
    "rotation_signs",
    "uniforms",
]

RandomBytes = Callable[[int], bytes]
"""A source of random bytes: ``os.urandom`` or a seeded ``Generator.bytes``."""

MAX_BITS = 62
"""Largest modulus: the centred sum must fit in ``int64``."""

MAX_SENSITIVITY_INFLATION = 0.05
"""How much rounding may add to the clip norm (relative) before the
parameters are refused: more means too few bits for the dimension."""

MAX_SIGMA = 2.0**32
"""Largest per-client noise std (integer units) :func:`discrete_gaussian`
serves. The sampler is exact at any σ, but its float64 fast path leaves
about ``1.5e-13 σ`` of the draws to exact arithmetic (the geometric draws
``⌊t E⌋`` need ``E`` to within ``1/t``): about 700 of a million draws at
``2^32`` (some 0.2 s more), and most of them by ``2^45``. No modulus needs
more: at ``σ ≈ 2^20`` rounding already adds well under 0.1 % to the
sensitivity."""

LOG_RELATIVE_ERROR = 2.0**-46
"""Bound the fast path assumes on the relative error of ``numpy.log`` in
float64: 16 times the worst documented (4 ulp for numpy's SIMD
implementations, under 1 ulp for glibc's); ``tests/privacy/
test_distributed_sampler.py`` measures it against correctly rounded
``decimal`` logarithms on the machine the tests run on."""

MAX_SCALED_NORM = 2.0**48
"""Largest ``C / γ``: above it a scaled coordinate has too few fractional
bits left in float64 for stochastic rounding to mean anything."""

MAX_ROUNDING_TRIES = 1000
"""Conditional rounding gives up (and raises) after this many draws."""


def padded_dimension(dimension: int) -> int:
    """``d' = 2^⌈log2 d⌉``, the length the Walsh–Hadamard transform needs."""
    if dimension < 1:
        raise ConfigError(f"the dimension must be >= 1; got {dimension}")
    return 1 << (dimension - 1).bit_length()


def hadamard(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The orthonormal Walsh–Hadamard transform ``H x / sqrt(len(x))``.

    ``len(x)`` must be a power of two. ``H / sqrt(d')`` is symmetric and
    orthogonal, so the transform is its own inverse. In O(d' log d') by
    butterflies, in place on a copy.
    """
    n = x.shape[0]
    if n & (n - 1):
        raise ValueError(f"the length must be a power of two; got {n}")
    y = np.array(x, dtype=np.float64, copy=True)
    h = 1
    while h < n:
        view = y.reshape(-1, 2, h)
        low = view[:, 0, :].copy()
        view[:, 0, :] += view[:, 1, :]
        np.subtract(low, view[:, 1, :], out=view[:, 1, :])
        h *= 2
    y *= 1.0 / math.sqrt(n)
    return y


def rotation_signs(seed: int, length: int) -> npt.NDArray[np.float64]:
    """The public random signs ``D`` of the round's rotation.

    Public randomness: every client and the server derive the same signs
    from ``seed`` (the round), so the rotation is linear over the sum. It
    protects nothing secret; it only makes wrap-around unlikely.
    """
    rng = np.random.default_rng([int(seed), 0xDD6A])
    signs = rng.integers(0, 2, size=length).astype(np.float64)
    return signs * 2.0 - 1.0


def uniforms(count: int, random_bytes: RandomBytes) -> npt.NDArray[np.float64]:
    """``count`` uniforms in (0, 1) from 52 random bits each.

    ``(k + 1/2) / 2^52`` for a 52-bit ``k``: every value is exact in float64,
    the smallest is ``2^-53`` and the largest ``1 - 2^-53`` (never 0 or 1).
    """
    words = np.frombuffer(random_bytes(8 * count), dtype=np.uint64)
    return ((words >> np.uint64(12)).astype(np.float64) + 0.5) * 2.0**-52


def discrete_gaussian(
    count: int, sigma: float, random_bytes: RandomBytes
) -> npt.NDArray[np.int64]:
    """``count`` independent draws of the discrete Gaussian ``N_Z(0, σ²)``, exactly.

    ``P[X = x] ∝ exp(-x² / (2σ²))`` over the integers (``σ`` the float
    given, an exact rational), by the rejection sampler of Canonne, Kamath
    and Steinke (NeurIPS 2020, Algorithm 3): draw ``Y = G₁ - G₂`` from the
    discrete Laplace with scale ``t = ⌊σ⌋ + 1`` (``Gᵢ = ⌊t Eᵢ⌋``, ``Eᵢ``
    standard exponentials: geometric), accept it if an exponential ``E₃``
    exceeds ``γ = (|Y| - σ²/t)² / (2σ²)`` (probability ``exp(-γ)``),
    redraw the rejected ones. Each round accepts at least about half.

    Exact, not floating-point: each ``Eᵢ = -ln Uᵢ`` for a uniform real
    ``Uᵢ`` in (0, 1) of which ``random_bytes`` supplies the bits on demand.
    The first 52 bits put ``Uᵢ`` in a cell of width ``2^-52``; numpy
    computes ``-ln`` at the cell's midpoint and bounds how far ``Eᵢ`` can be
    from it anywhere in the cell (the cell's own spread plus
    :data:`LOG_RELATIVE_ERROR`). Where the whole interval gives the same
    ``⌊t Eᵢ⌋`` and the same side of ``γ`` (all but about ``1.5e-13 σ`` of
    the draws), that is the answer; the others are finished one by one in
    exact arithmetic (:func:`_exact_attempt`: 64 more random bits at a
    time, bounds from ``decimal``'s correctly rounded logarithm, compared
    as fractions) until the interval decides. So, with uniform random
    bytes and numpy's logarithm within :data:`LOG_RELATIVE_ERROR` (a test
    measures it), the output is the discrete Gaussian itself and the
    accountant's δ needs no term for the sampler.

    The float algorithm this replaces (``⌊-t ln u⌋`` on the 52-bit
    midpoint, ``u < exp(-γ)``) was off in total variation by about
    ``5.5 t 2^-52`` per geometric draw (``1.4e-12`` at ``σ ≈ 1,200``,
    counted exactly over all ``2^52`` cells), some ``4e-12`` per noise draw
    (1.3 attempts of two geometric draws): over a run of ``2^20``
    coordinates, 1,000 clients and 100 rounds (``1e11`` draws) that bounds
    δ by about 0.4, nothing useful. Its docstring charged
    ``2^-50`` per draw and put the total at "about 1e-8"; that formula gives
    ``9.3e-5``, and the truth per draw is some ``t`` times larger still.

    ``sigma`` is limited to :data:`MAX_SIGMA` to keep the exact fallback rare.
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise ConfigError(f"the discrete Gaussian's sigma must be > 0; got {sigma}")
    if sigma > MAX_SIGMA:
        raise ConfigError(
            f"the discrete Gaussian's sigma must be <= 2^32 for fast exact "
            f"sampling; got {sigma:.4g}: use fewer distributed_bits"
        )
    t = math.floor(sigma) + 1
    shift = sigma * sigma / t
    two_var = 2.0 * sigma * sigma
    out = np.empty(count, dtype=np.int64)
    todo = np.arange(count)
    while todo.size:
        m = todo.size
        cells = np.frombuffer(random_bytes(24 * m), dtype=np.uint64) >> np.uint64(12)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            log_u, spread = _log_midpoints(cells)  # log_u = -E at the midpoint
            # ⌊t E⌋ for E1, E2 is decided where no integer lies within the
            # interval's reach of t E.
            x = -t * log_u[: 2 * m]
            reach = t * spread[: 2 * m]
            reach += _REACH * x
            g = np.floor(x)
            frac = x - g
            frac -= 0.5
            decided = np.abs(frac) < (0.5 - 2.0**-50) - reach  # 2^-50: frac's rounding
            decided = decided[:m] & decided[m:]
            y = g[:m] - g[m:]
            # Accept iff E3 > γ(Y), decided where E3's interval is on one side
            # of γ; γ's float error, under 6·2^-53 (|Y| + σ²/t)² / σ², is
            # covered by 2^-45 (|Y| + σ²/t)² / σ².
            size = np.abs(y)
            gamma = size - shift
            gamma *= gamma
            gamma /= two_var
            size += shift
            size *= size
            size *= 4.0 * LOG_RELATIVE_ERROR / two_var
            gap = -log_u[2 * m :] - gamma
            accept = gap > 0.0
            size -= _REACH * log_u[2 * m :]
            size += spread[2 * m :]
            decided &= np.abs(gap) > size
        for i in np.flatnonzero(~decided):
            y[i], accept[i] = _exact_attempt(
                (int(cells[i]), int(cells[m + i]), int(cells[2 * m + i])),
                t,
                sigma,
                random_bytes,
            )
        out[todo[accept]] = y[accept].astype(np.int64)
        todo = todo[~accept]
    return out


_REACH = 2.0 * LOG_RELATIVE_ERROR
"""Relative reach added for numpy's log (:data:`LOG_RELATIVE_ERROR`) and,
with as much again, for the fast path's float products and sums (each off
by at most 2^-53 of its value)."""


def _log_midpoints(
    cells: npt.NDArray[np.uint64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``ln`` of each 52-bit cell's midpoint, and the cell's spread around it.

    For ``U`` anywhere in ``[k, k + 1) / 2^52``, ``|ln U - ln (k + ½) 2^-52|
    <= ln(1 + 1/(2k)) <= 1/(2k)`` (returned slightly enlarged, for its own
    rounding); numpy's error on the midpoint's logarithm is left to the
    caller (:data:`_REACH`). Infinite for ``k = 0`` (``U`` may be
    arbitrarily small): such draws always go to the exact path.
    """
    k = cells.astype(np.float64)  # exact: k < 2^52
    spread = np.divide(0.5 + 2.0**-40, k)
    k += 0.5
    k *= 2.0**-52  # the midpoint, exact in float64
    return np.log(k, out=k), spread


_MAX_UNIFORM_BITS = 52 + 16 * 64


@dataclass
class _Uniform:
    """A uniform real in [0, 1) of which the first ``bits`` bits are known.

    ``U ∈ [num, num + 1) / 2^bits``; :meth:`refine` draws 64 more bits.
    """

    num: int
    bits: int
    random_bytes: RandomBytes

    def refine(self) -> None:
        if self.bits >= _MAX_UNIFORM_BITS:
            # A uniform source needs this with probability about 2^-1000.
            raise ConfigError(
                f"the discrete Gaussian sampler needed more than "
                f"{_MAX_UNIFORM_BITS} bits of one uniform: the random source "
                "does not return uniform random bytes"
            )
        more = int.from_bytes(self.random_bytes(8), "little")
        self.num = (self.num << 64) | more
        self.bits += 64

    def exponential_bounds(self) -> tuple[Fraction, Fraction | None]:
        """Bounds on ``E = -ln U`` over the cell (upper ``None``: unbounded)."""
        lower = -_ln_bounds(self.num + 1, self.bits)[1]
        if self.num == 0:
            return max(lower, Fraction(0)), None
        return max(lower, Fraction(0)), -_ln_bounds(self.num, self.bits)[0]


def _ln_bounds(num: int, bits: int) -> tuple[Fraction, Fraction]:
    """Rigorous bounds on ``ln(num / 2^bits)``, to about ``2^-bits``.

    ``decimal`` rounds the quotient and the logarithm correctly (to half
    a unit in the last of ``prec`` digits); each error moves the result by
    at most ``½ 10^(1-prec) (1 + |ln|)``, so twice that bounds both.
    """
    with decimal.localcontext() as ctx:
        ctx.prec = bits // 3 + 20
        value = (decimal.Decimal(num) / decimal.Decimal(1 << bits)).ln()
        margin = Fraction(decimal.Decimal(10) ** (1 - ctx.prec))
    centre = Fraction(value)
    margin *= 1 + abs(centre)
    return centre - margin, centre + margin


def _exact_attempt(
    cells: tuple[int, int, int], t: int, sigma: float, random_bytes: RandomBytes
) -> tuple[int, bool]:
    """One attempt of the sampler in exact arithmetic, from its three 52-bit cells.

    ``G₁ = ⌊t E₁⌋``, ``G₂ = ⌊t E₂⌋``, ``Y = G₁ - G₂``, accepted iff ``E₃ >
    γ(Y)`` with ``γ`` the exact rational of ``σ``; each ``Uᵢ`` gets more
    random bits until its interval decides.
    """
    u1, u2, u3 = (_Uniform(cell, 52, random_bytes) for cell in cells)
    y = _exact_floor(u1, t) - _exact_floor(u2, t)
    var = Fraction(sigma) ** 2
    gamma = (abs(y) - var / t) ** 2 / (2 * var)
    while True:
        lower, upper = u3.exponential_bounds()
        if lower > gamma:
            return y, True
        if upper is not None and upper < gamma:
            return y, False
        u3.refine()


def _exact_floor(u: _Uniform, t: int) -> int:
    """``⌊t (-ln U)⌋``, refining ``U`` until its interval decides it."""
    while True:
        lower, upper = u.exponential_bounds()
        if upper is not None and math.floor(t * lower) == math.floor(t * upper):
            return math.floor(t * lower)
        u.refine()


def _norm_sq(x: npt.NDArray[np.float64]) -> float:
    # einsum's own loop, not BLAS: OpenBLAS's threaded dot collapses when the
    # cores are busy (measured 1.3 ms for 16k values instead of 10 us).
    return float(np.einsum("i,i->", x, x))


def conditional_round(
    x: npt.NDArray[np.float64],
    bound_sq: float,
    random_bytes: RandomBytes,
) -> tuple[npt.NDArray[np.int64], int]:
    """Round ``x`` stochastically to integers whose squared norm is <= ``bound_sq``.

    Each coordinate becomes ``⌊x⌋ + 1`` with probability ``x - ⌊x⌋``, else
    ``⌊x⌋`` (unbiased); the whole vector is redrawn while its squared norm
    exceeds ``bound_sq`` (Kairouz et al. 2021, conditional randomized
    rounding). Returns the integers and how many draws it took.

    Raises
    ------
    ConfigError
        If no draw meets the bound in :data:`MAX_ROUNDING_TRIES` (the bound
        is below what rounding can reach: ``x`` is not clipped).
    """
    floor = np.floor(x)
    frac = x - floor
    base = floor.astype(np.int64)
    for tries in range(1, MAX_ROUNDING_TRIES + 1):
        rounded = base + (uniforms(x.size, random_bytes) < frac)
        norm_sq = _norm_sq(rounded.astype(np.float64))
        if norm_sq <= bound_sq:
            return rounded, tries
    raise ConfigError(
        f"conditional rounding found no rounding of norm^2 <= {bound_sq:.6g} in "
        f"{MAX_ROUNDING_TRIES} draws: the vector was not clipped to the clip norm"
    )


@dataclass(frozen=True)
class DdgParameters:
    """One round's distributed discrete Gaussian, in integer units.

    Attributes
    ----------
    dimension
        ``d``, the update's length.
    padded
        ``d'``, the rotated (power-of-two) length: what is masked and summed.
    modulus_bits
        ``b``: the sum is taken mod ``2^b``.
    gamma
        ``γ``: one integer unit is ``γ`` in the update's units.
    noise_std
        ``σ``, each client's discrete Gaussian std, in integer units.
    l2_sensitivity
        ``bound``: the largest norm of one client's rounded vector, in
        integer units (the sensitivity the accountant uses).
    threshold
        ``t``: the fewest noise shares a completed round holds.
    num_clients
        Clients in the round (the sampled ones).
    """

    dimension: int
    padded: int
    modulus_bits: int
    gamma: float
    noise_std: float
    l2_sensitivity: float
    threshold: int
    num_clients: int

    @property
    def bound_sq(self) -> float:
        """``bound²``: conditional rounding's acceptance threshold."""
        return self.l2_sensitivity**2


@dataclass(frozen=True)
class DistributedDp:
    """What ``[privacy] mode = "distributed"`` asks for.

    Parameters
    ----------
    clip_norm
        ``C``: each client clips its update to this L2 norm.
    noise_multiplier
        ``z``: a completed round's summed noise has std at least ``z C``
        (in the update's units), as central DP-FedAvg's would.
    modulus_bits
        ``b``: the sum is taken mod ``2^b`` (the masked vector's bits per
        coordinate). More bits: a finer ``γ`` (less rounding) for the same
        wrap-around probability.
    beta
        Conditional rounding's ``β`` in (0, 1): a smaller ``β`` loosens the
        norm bound (more sensitivity) but redraws the rounding less often;
        ``exp(-1/2)`` as in Kairouz et al.
    wrap_probability
        Target probability that any coordinate of a round's sum wraps
        around the modulus, for the worst case of identical updates (it
        sets ``γ``).
    secure_rng
        Draw the clients' rounding and noise from the OS's cryptographic
        randomness (``os.urandom``, the default, and what a run always
        uses) instead of the simulation's seeded generator, which only
        tests and benchmarks ask for (reproducible, but known to whoever
        knows the seed).
    """

    clip_norm: float
    noise_multiplier: float
    modulus_bits: int = 20
    beta: float = math.exp(-0.5)
    wrap_probability: float = 1e-6
    secure_rng: bool = True

    def __post_init__(self) -> None:
        for key in ("clip_norm", "noise_multiplier"):
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"[privacy] {key} must be a finite number > 0; got {value}"
                )
        if not 8 <= self.modulus_bits <= MAX_BITS:
            raise ConfigError(
                f"[privacy] distributed_bits must be in [8, {MAX_BITS}]; got "
                f"{self.modulus_bits}"
            )
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(
                f"[privacy] rounding_beta must be in (0, 1); got {self.beta}"
            )
        if not 0.0 < self.wrap_probability < 1.0:
            raise ConfigError(
                f"wrap_probability must be in (0, 1); got {self.wrap_probability}"
            )

    def parameters(
        self, *, dimension: int, num_clients: int, threshold: int
    ) -> DdgParameters:
        """γ, σ and the sensitivity for a round of ``num_clients`` (threshold ``t``).

        Choosing ``γ``: after the rotation each coordinate of a clipped update
        is sub-Gaussian with variance proxy ``C² / d'``, so a coordinate of
        the sum of ``n`` updates is at most ``k n C / sqrt(d')`` in absolute
        value, the summed noise (``n`` shares of std ``z C / sqrt(t)``) at
        most ``k z C sqrt(n / t)``, and the summed rounding errors at most
        ``k sqrt(n) / 2`` integer units, each except with probability
        ``2 exp(-k²/2)``; ``k = sqrt(2 ln(6 d' / p))`` makes the three, over
        all ``d'`` coordinates, fail with probability at most ``p``
        (``wrap_probability``). ``γ`` is the smallest step for which the
        three together fit in ``[-m/2, m/2)``. The bound is for the worst
        case of ``n`` identical updates; real updates sum to far less.

        Raises
        ------
        ConfigError
            If ``b`` is too small for ``n`` and ``d`` (no ``γ`` fits, or
            rounding would add more than 5 % to the sensitivity), or the
            per-client noise falls below ``1/2`` integer unit (Kairouz et
            al.'s Theorem 1 needs ``σ >= 1/2``); the message says how many
            bits would do.
        """
        if num_clients < 1 or threshold < 1 or threshold > num_clients:
            raise ConfigError(
                f"distributed DP needs 1 <= threshold <= clients; got threshold "
                f"{threshold} of {num_clients} clients"
            )
        found = self._compute(dimension, num_clients, threshold, self.modulus_bits)
        if isinstance(found, DdgParameters):
            return found
        working = [
            bits
            for bits in range(8, MAX_BITS + 1)
            if isinstance(
                self._compute(dimension, num_clients, threshold, bits), DdgParameters
            )
        ]
        if not working:
            advice = "raise noise_multiplier, or sample fewer clients per round"
        elif working[0] > self.modulus_bits:
            advice = f"use distributed_bits >= {working[0]}"
        else:
            advice = f"use distributed_bits <= {working[-1]}"
        raise ConfigError(
            f"[privacy] distributed_bits = {self.modulus_bits} cannot serve "
            f"{num_clients} clients and {padded_dimension(dimension)} (padded) "
            f"coordinates: {found}; {advice}"
        )

    def _compute(
        self, dimension: int, n: int, t: int, bits: int
    ) -> DdgParameters | str:
        """The parameters at ``bits``, or why there are none."""
        padded = padded_dimension(dimension)
        c, z = self.clip_norm, self.noise_multiplier
        k = math.sqrt(2.0 * math.log(6.0 * padded / self.wrap_probability))
        room = 2.0 ** (bits - 1) - 1.0 - k * math.sqrt(n) / 2.0
        if room <= 0:
            return "the summed rounding errors alone could wrap around the modulus"
        gamma = k * (n * c / math.sqrt(padded) + z * c * math.sqrt(n / t)) / room
        scaled = c / gamma
        if scaled > MAX_SCALED_NORM or z * scaled / math.sqrt(t) > MAX_SIGMA:
            return (
                "the granularity would be finer than float64 can round and noise "
                "(scaled clip norm above 2^48 or noise std above 2^32 integer units)"
            )
        root = math.sqrt(padded)
        bound_sq = min(
            (scaled + root) ** 2,
            scaled**2
            + padded / 4.0
            + math.sqrt(2.0 * math.log(1.0 / self.beta)) * (scaled + root / 2.0),
        )
        bound = math.sqrt(bound_sq)
        if bound > scaled * (1.0 + MAX_SENSITIVITY_INFLATION):
            return (
                f"rounding would add {100 * (bound / scaled - 1):.3g} % to the "
                f"sensitivity (at most {100 * MAX_SENSITIVITY_INFLATION:g} %)"
            )
        noise_std = z * c / (gamma * math.sqrt(t))
        if noise_std < 0.5:
            return (
                f"each client's noise would be {noise_std:.3g} integer units, below "
                "the 1/2 that the distributed discrete Gaussian's bound needs"
            )
        return DdgParameters(
            dimension=dimension,
            padded=padded,
            modulus_bits=bits,
            gamma=gamma,
            noise_std=noise_std,
            l2_sensitivity=bound,
            threshold=t,
            num_clients=n,
        )


def encode(
    delta: npt.NDArray[np.float64],
    params: DdgParameters,
    *,
    clip_norm: float,
    rotation_seed: int,
    random_bytes: RandomBytes,
) -> tuple[npt.NDArray[np.uint64], dict[str, float]]:
    """One client's noised, rounded, rotated update, mod ``2^b`` (steps 1-5).

    Returns the ``d'`` words for secure aggregation and what the client
    measured: ``clipped`` (1 if its update was above the clip norm) and
    ``rounding_tries``.

    A ``delta`` with a NaN or infinite value (local training diverged) is
    encoded as the zero update, noised like any other: whether training
    diverged depends on the client's data and must not show.
    """
    x = np.zeros(params.padded, dtype=np.float64)
    if np.isfinite(delta).all():
        x[: params.dimension] = delta
    norm = math.sqrt(_norm_sq(x))
    clipped = norm > clip_norm
    if clipped:
        x *= clip_norm / norm
    x *= rotation_signs(rotation_seed, params.padded)
    x = hadamard(x)
    x /= params.gamma
    rounded, tries = conditional_round(x, params.bound_sq, random_bytes)
    rounded += discrete_gaussian(params.padded, params.noise_std, random_bytes)
    mask = np.uint64((1 << params.modulus_bits) - 1)
    words = rounded.view(np.uint64) & mask
    return words, {"clipped": float(clipped), "rounding_tries": float(tries)}


def decode_sum(
    total: npt.NDArray[np.uint64],
    params: DdgParameters,
    *,
    rotation_seed: int,
) -> tuple[npt.NDArray[np.float64], int]:
    """The noised sum in the update's units, and a count of near-wraps.

    ``total`` is the unmasked sum mod ``2^b``. It is centred into
    ``[-2^(b-1), 2^(b-1))``, scaled by ``γ`` and rotated back; the padding is
    dropped. The second value counts coordinates whose centred sum lies in
    the outer quarter of the range (beyond ``3/4`` of ``2^(b-1)``): by the
    choice of ``γ`` that is rare unless the sum wrapped around, so a count
    well above 0 flags wrap-around (which no party can detect exactly).
    """
    b = params.modulus_bits
    words = np.asarray(total, dtype=np.uint64) & np.uint64((1 << b) - 1)
    centred = words.astype(np.int64)
    centred[centred >= (1 << (b - 1))] -= 1 << b
    near = int(np.count_nonzero(np.abs(centred) > 3 * (1 << (b - 3))))
    x = hadamard(centred.astype(np.float64) * params.gamma)
    x *= rotation_signs(rotation_seed, params.padded)
    return x[: params.dimension].copy(), near
