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
   Differential Privacy", NeurIPS 2020, Algorithm 3, on uniforms drawn from
   the OS's cryptographic randomness: the noise is each client's secret
   against the server, which in a simulation knows the seed, so the seed
   fixes only the training);
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

import math
from collections.abc import Callable
from dataclasses import dataclass

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

MAX_SIGMA = 2.0**40
"""Largest per-client noise std (integer units) the float64 sampler serves:
the geometric draws ``-t ln U`` reach ``37 t`` and must stay well inside the
53-bit mantissa, or the noise's low bits stop being random (at ``σ ≈ 2^53``
draws come out even 71 % of the time)."""

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
    """``count`` independent draws of the discrete Gaussian ``N_Z(0, σ²)``.

    ``P[X = x] ∝ exp(-x² / (2σ²))`` over the integers, by the rejection
    sampler of Canonne, Kamath and Steinke (NeurIPS 2020, Algorithm 3),
    vectorised: draw ``Y`` from the discrete Laplace with scale
    ``t = ⌊σ⌋ + 1`` (the difference of two geometric variables, each
    ``⌊-t ln U⌋``), accept it with probability
    ``exp(-(|Y| - σ²/t)² / (2σ²))``, redraw the rejected ones. Each round
    accepts at least about half of them. The uniforms come from
    ``random_bytes``; their resolution truncates the geometric variables at
    about ``37 t``, beyond which the discrete Gaussian's mass (about
    ``exp(-37² / 2)``) is far below anything the accountant counts.

    It is the algorithm in floating point, not the exact one (which needs
    exact Bernoulli(exp(-γ)) draws): each draw is within about ``2^-50`` in
    total variation of the discrete Gaussian, which adds of the order of
    ``rounds × d' × n × 2^-50`` to δ (about 1e-8 for a million-coordinate
    model, 1,000 clients and 100 rounds). ``sigma`` is limited to
    :data:`MAX_SIGMA` so that ``-t ln U`` keeps its integer part exact.
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise ConfigError(f"the discrete Gaussian's sigma must be > 0; got {sigma}")
    if sigma > MAX_SIGMA:
        raise ConfigError(
            f"the discrete Gaussian's sigma must be <= 2^40 for float64 sampling; "
            f"got {sigma:.4g}: use fewer distributed_bits"
        )
    t = math.floor(sigma) + 1
    out = np.empty(count, dtype=np.int64)
    todo = np.arange(count)
    while todo.size:
        m = todo.size
        u = uniforms(3 * m, random_bytes)
        g1 = np.floor(-t * np.log(u[:m]))
        g2 = np.floor(-t * np.log(u[m : 2 * m]))
        y = g1 - g2
        accept = u[2 * m :] < np.exp(
            -((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2)
        )
        out[todo[accept]] = y[accept].astype(np.int64)
        todo = todo[~accept]
    return out


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
                "(scaled clip norm above 2^48 or noise std above 2^40 integer units)"
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
    """
    x = np.zeros(params.padded, dtype=np.float64)
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
