"""Byzantine-robust aggregation rules, as aggregators the strategies compose.

Each rule is a frozen dataclass implementing
:class:`~fedshield.core.Aggregator`, so it drops in where
:class:`~fedshield.core.WeightedMean` goes: ``FedAvg(aggregator=Krum(f=2))``.

============================  =========  =======  ============================
rule                          streaming  weights  needs (n updates, f faulty)
============================  =========  =======  ============================
:class:`Krum` (Multi-Krum)    no         ignored  n > 2f + 2
:class:`CoordinateMedian`     no         ignored  n >= 1
:class:`TrimmedMean`          no         ignored  n > 2f
:class:`Bulyan`               no         ignored  n >= 4f + 3
:class:`GeometricMedian`      no         used     n >= 1, some weight > 0
:class:`NormBound`            yes        used     n >= 1, some weight > 0
:class:`FLTrust`              yes        ignored  n >= 1, a reference update
============================  =========  =======  ============================

The non-streaming rules keep a reference to every update of the round (the
updates' buffers are immutable, so nothing is copied when they arrive) and
read them in blocks of columns when the round ends: pairwise distances come
from one Gram matrix ``G = X Xᵀ`` accumulated in float64 with BLAS
(``‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b``), and coordinate-wise rules sort one
cache-sized block of coordinates at a time. Peak extra memory is O(n² + d)
plus one block, never a second (n, d) matrix. BLAS runs on one thread
while a round is combined: on busy cores a multi-threaded OpenBLAS was
10-40 times slower (bench/test_robust_speed.py).

Updates are validated before any aggregator sees them
(:func:`fedshield.core.validate_update` in the round loop: NaN/Inf, shapes,
dtype, example counts); the rules here only check that an update has the
round's layout, as :class:`~fedshield.core.WeightedMean` does, and that
the weights they use are finite and >= 0. A rule whose requirement on the
number of updates fails raises :class:`~fedshield.errors.ConfigError` naming
``n``, ``f`` and what to change; a round with no update at all raises
:class:`~fedshield.errors.InvalidUpdateError`.

Every rule reports ``measurements``: ``"robust/norm_max"`` and
``"robust/norm_median"`` of the received updates' L2 norms, and its own
counts (``"krum/selected"``, ``"robust/rejected"``, ``"fltrust/zero_trust"``,
...). ``Aggregate.num_updates`` is the number of updates received.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, replace
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from fedshield.core import (
    Accumulator,
    Aggregate,
    Aggregator,
    ClientUpdate,
    Params,
    ParamSpec,
    WeightedMean,
)
from fedshield.core.registry import Registry
from fedshield.errors import ConfigError, InvalidUpdateError

__all__ = [
    "RULES",
    "RULE_NAMES",
    "Bulyan",
    "CoordinateMedian",
    "FLTrust",
    "GeometricMedian",
    "Krum",
    "NormBound",
    "RobustRule",
    "RuleName",
    "TrimmedMean",
    "make_robust",
]

FloatVector: TypeAlias = NDArray[np.float32]
Vector64: TypeAlias = NDArray[np.float64]

_BLOCK_VALUES = 1 << 18
"""Values per block of columns (n rows × width): 2 MB in float64, about one
L2 cache, so a block is gathered, multiplied or sorted without leaving it."""


# ------------------------------------------------------------ shared kernels


def _block_width(num_rows: int) -> int:
    return max(256, _BLOCK_VALUES // max(num_rows, 1))


def _column_blocks(
    rows: Sequence[FloatVector], dtype: type[np.floating[Any]]
) -> Iterator[tuple[slice, NDArray[Any]]]:
    """Yield ``(columns, block)``: ``block[i] = rows[i][columns]`` as ``dtype``.

    One buffer is reused for every block, so a caller must finish with a
    block before asking for the next. Python loops over rows and blocks
    (``n × d / width`` slice copies), never over coordinates.
    """
    size = rows[0].size
    width = _block_width(len(rows))
    buffer = np.empty((len(rows), min(width, max(size, 1))), dtype=dtype)
    for start in range(0, size, width):
        stop = min(size, start + width)
        block = buffer[:, : stop - start]
        for i, row in enumerate(rows):
            block[i] = row[start:stop]
        yield slice(start, stop), block


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Pin BLAS to one thread while a stored rule combines its round.

    OpenBLAS splits each product over its threads, and on busy cores (clients
    training in other processes) their hand-offs collapse: the Gram matrix
    of 100 updates of 10^6 values took 4-18 s with two threads on two shared
    cores and 0.37-0.45 s with one (bench/test_robust_speed.py). The limit
    is restored on exit; it applies to the whole process meanwhile.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()
    limits: contextlib.AbstractContextManager[Any] = threadpool_limits(
        limits=1, user_api="blas"
    )
    return limits


def _l2_norm(flat: FloatVector) -> float:
    # Accumulated in float64 like Params.norm(), without BLAS (see above).
    return math.sqrt(float(np.einsum("i,i->", flat, flat, dtype=np.float64)))


def _gram(rows: Sequence[FloatVector]) -> Vector64:
    """``G[i, j] = rows[i] · rows[j]``, accumulated in float64 by blocks.

    Products of float32 values are exact in float64, so ``G`` is accurate to
    about 1e-16 of ``‖rows[i]‖ ‖rows[j]‖`` (numpy runs ``B @ B.T`` as BLAS
    ``syrk``).
    """
    gram = np.zeros((len(rows), len(rows)), dtype=np.float64)
    for _, block in _column_blocks(rows, np.float64):
        gram += block @ block.T
    # Exactly symmetric whatever BLAS routine ran, so that d(i, j) and
    # d(j, i) are the same number and tied scores are really tied.
    upper: Vector64 = np.triu(gram) + np.triu(gram, 1).T
    return upper


def _squared_distances(gram: Vector64) -> Vector64:
    """Pairwise ``‖x_i − x_j‖²`` from a Gram matrix (clamped at 0)."""
    diag = np.diag(gram)
    dist = diag[:, None] + diag[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _krum_scores(dist: Vector64, num_neighbours: int) -> Vector64:
    """Each row's sum of squared distances to its ``num_neighbours`` nearest others.

    Blanchard et al. (2017), Section 4: ``s(i) = Σ_{i→j} ‖V_i − V_j‖²`` over
    the ``n − f − 2`` closest vectors ``V_j``, ``j ≠ i``.
    """
    n = dist.shape[0]
    if num_neighbours <= 0 or n <= 1:
        return np.zeros(n, dtype=np.float64)
    others = dist.copy()
    np.fill_diagonal(others, np.inf)
    nearest = np.partition(others, num_neighbours - 1, axis=1)[:, :num_neighbours]
    scores: Vector64 = nearest.sum(axis=1)
    return scores


def _krum_order(dist: Vector64, num_neighbours: int) -> tuple[Vector64, NDArray[Any]]:
    """Krum scores, and the indices from best to worst.

    Two mutual nearest neighbours always tie when ``num_neighbours`` is 1.
    Ties go to the smaller score over one more neighbour (so the order
    depends on the data, not on arrival order, and still not on the
    farthest updates), then to the update added first.
    """
    scores = _krum_scores(dist, num_neighbours)
    wider = _krum_scores(dist, min(num_neighbours + 1, dist.shape[0] - 1))
    order = np.lexsort((np.arange(scores.size), wider, scores))
    return scores, order


def _combine_rows(rows: Sequence[FloatVector], coeffs: Vector64) -> Vector64:
    """``Σ_k coeffs[k] rows[k]`` in float64; rows with coefficient 0 are not read."""
    used = np.flatnonzero(coeffs)
    out = np.zeros(rows[0].size, dtype=np.float64)
    if used.size == 0:
        return out
    picked = [rows[int(i)] for i in used]
    weights = coeffs[used]
    for columns, block in _column_blocks(picked, np.float64):
        out[columns] = weights @ block
    return out


def _coordinatewise(
    rows: Sequence[FloatVector], reduce: Callable[[FloatVector], Vector64]
) -> tuple[Vector64, Vector64]:
    """Sort each coordinate's values across rows, block by block, and reduce.

    ``reduce`` gets a block sorted along axis 0 (one column per coordinate)
    and returns one float64 value per column. Also returns the rows'
    squared L2 norms, summed in float64 on the way.
    """
    out = np.empty(rows[0].size, dtype=np.float64)
    squared = np.zeros(len(rows), dtype=np.float64)
    for columns, block in _column_blocks(rows, np.float32):
        squared += np.einsum("ij,ij->i", block, block, dtype=np.float64)
        block.sort(axis=0)
        out[columns] = reduce(block)
    return out, squared


def _sorted_median(block: FloatVector) -> Vector64:
    n = block.shape[0]
    middle: Vector64 = block[n // 2].astype(np.float64)
    if n % 2 == 0:
        middle += block[n // 2 - 1]
        middle *= 0.5
    return middle


def _sorted_trimmed_mean(block: FloatVector, trim: int) -> Vector64:
    n = block.shape[0]
    kept = block[trim : n - trim]
    mean: Vector64 = kept.sum(axis=0, dtype=np.float64) / (n - 2 * trim)
    return mean


def _sorted_closest_to_median_mean(block: FloatVector, keep: int) -> Vector64:
    """Mean of the ``keep`` values closest to the median, per column.

    The ``keep`` values nearest a point form a window ``[j, j + keep)`` of
    the sorted column. Sliding the window one step right swaps ``s[j]`` for
    ``s[j + keep]`` and helps exactly while ``|s[j + keep] − med| <
    |s[j] − med|``, which holds for a prefix of ``j`` only; so the best
    start ``j*`` is the number of ``j`` for which it holds.
    """
    n = block.shape[0]
    median = _sorted_median(block)
    slack = n - keep
    if slack == 0:
        mean: Vector64 = block.sum(axis=0, dtype=np.float64) / n
        return mean
    left = np.abs(block[:slack] - median)
    right = np.abs(block[keep:] - median)
    start = np.count_nonzero(right < left, axis=0)
    rows = start[None, :] + np.arange(keep)[:, None]
    window = np.take_along_axis(block, rows, axis=0)
    mean = window.sum(axis=0, dtype=np.float64) / keep
    return mean


def _norm_measurements(norms: Sequence[float] | Vector64) -> dict[str, float]:
    values = np.asarray(norms, dtype=np.float64)
    if values.size == 0:
        return {}
    return {
        "robust/norm_max": float(values.max()),
        "robust/norm_median": float(np.median(values)),
    }


def _gram_norms(gram: Vector64) -> dict[str, float]:
    return _norm_measurements(np.sqrt(np.maximum(np.diag(gram), 0.0)))


# --------------------------------------------------------------- validation


def _check_count(rule: str, name: str, value: object, minimum: int) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or value < minimum
    ):
        raise ConfigError(
            f"`{name}` of {rule} must be an integer >= {minimum}; got {value!r}"
        )


def _check_positive(rule: str, name: str, value: object, *, zero: bool) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.number)
        and math.isfinite(float(value))
        and (float(value) >= 0.0 if zero else float(value) > 0.0)
    )
    if not ok:
        bound = ">= 0" if zero else "> 0"
        raise ConfigError(
            f"`{name}` of {rule} must be a finite number {bound}; got {value!r}"
        )


def _check_weight(update: ClientUpdate, weight: float) -> None:
    if not (weight >= 0.0 and math.isfinite(weight)):
        raise InvalidUpdateError(
            f"weight of client {update.client_id!r} must be finite and >= 0; "
            f"got {weight}"
        )


def _check_layout(update: ClientUpdate, spec: ParamSpec) -> None:
    if update.delta.spec != spec:
        raise InvalidUpdateError(
            f"update from client {update.client_id!r} does not match the model: "
            + "; ".join(spec.mismatches(update.delta.spec))
        )


def _no_updates(rule: str) -> InvalidUpdateError:
    return InvalidUpdateError(f"cannot aggregate with {rule}: no update was added")


# -------------------------------------------------------- stored accumulator

_Combined: TypeAlias = tuple[Vector64, dict[str, float], float]
_Combine: TypeAlias = Callable[[Sequence[FloatVector], Vector64], _Combined]


class _AtLeastOneUpdate:
    """``check``: a rule that needs at least one update per round."""

    __slots__ = ()

    def check(self, n: int) -> None:
        """Refuse ``n < 1``.

        Raises
        ------
        ConfigError
            If ``n < 1``.
        """
        if n < 1:
            raise ConfigError(
                f"{type(self).__name__} needs at least 1 update per round; got n={n}"
            )


class _StoredAccumulator:
    """Keeps the round's updates (by reference) and combines them at the end.

    ``combine(rows, weights)`` returns the aggregate vector, the rule's
    measurements (with the updates' norms) and the total weight used; it runs
    with BLAS on one thread.
    """

    __slots__ = (
        "_combine",
        "_rows",
        "_rule",
        "_spec",
        "_uses_weights",
        "_weights",
    )

    def __init__(
        self, rule: str, spec: ParamSpec, combine: _Combine, *, uses_weights: bool
    ) -> None:
        self._rule = rule
        self._spec = spec
        self._combine = combine
        self._uses_weights = uses_weights
        self._rows: list[FloatVector] = []
        self._weights: list[float] = []

    def add(self, update: ClientUpdate, weight: float) -> None:
        _check_layout(update, self._spec)
        if self._uses_weights:
            _check_weight(update, float(weight))
        self._rows.append(update.delta.flat)
        self._weights.append(float(weight))

    def result(self) -> Aggregate:
        if not self._rows:
            raise _no_updates(self._rule)
        with _one_blas_thread():
            vector, measurements, total = self._combine(
                self._rows, np.asarray(self._weights, dtype=np.float64)
            )
        return Aggregate(
            delta=Params.from_flat(vector.astype(np.float32), self._spec, copy=False),
            num_updates=len(self._rows),
            total_weight=total,
            measurements=measurements,
        )


# --------------------------------------------------------------------- Krum


@dataclass(frozen=True, slots=True)
class Krum:
    """Krum and Multi-Krum: keep the updates closest to their neighbours.

    Each update ``V_i`` gets the score ``s(i) = Σ ‖V_i − V_j‖²`` over its
    ``n − f − 2`` nearest other updates; Krum returns the update with the
    lowest score, Multi-Krum (``m > 1``) the plain average of the ``m``
    lowest-scored ones. Ties (two mutual nearest neighbours always tie
    when ``n − f − 2 = 1``) go to the smaller score over ``n − f − 1``
    neighbours, then to the update added first.

    Parameters
    ----------
    f
        Number of Byzantine updates to tolerate per round.
    m
        How many of the best-scored updates to average: 1 is Krum; None
        means ``n − f`` (the choice Blanchard et al. suggest for
        Multi-Krum), fixed when the round's ``n`` is known.

    Raises
    ------
    ConfigError
        At construction if ``f < 0`` or ``m < 1``; in :meth:`check` and at
        the end of a round if ``n <= 2f + 2`` or ``m > n − f``.

    Notes
    -----
    Weights are ignored: Krum's guarantee is about the number of Byzantine
    updates, and an example count reported by a Byzantine client would let
    it buy influence. ``total_weight`` is the number of selected updates.

    Pairwise distances come from one float64 Gram matrix (O(n² d) flops in
    BLAS, O(n²) memory). With ``m`` updates selected, at least ``m − f`` of
    them are honest when at most ``f`` are Byzantine.

    Measurements: ``"krum/selected"`` (m), ``"robust/rejected"`` (n − m),
    ``"krum/score_min"`` and ``"krum/score_median"``.

    References
    ----------
    P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine
    Learning with Adversaries: Byzantine Tolerant Gradient Descent",
    NeurIPS 2017 (Krum: Section 4; Multi-Krum: Section 5).

    Examples
    --------
    >>> import numpy as np
    >>> from fedshield.core import ClientUpdate, Params, aggregate
    >>> values = [0.0, 1.0, 3.0, 4.5, 90.0]
    >>> ups = [ClientUpdate(str(i), Params({"w": [v]}), 1)
    ...        for i, v in enumerate(values)]
    >>> out = aggregate(Krum(f=1), ((u, 1.0) for u in ups), ups[0].delta.spec,
    ...                 rng=np.random.default_rng(0))
    >>> out.delta["w"].tolist(), out.measurements["robust/rejected"]
    ([1.0], 4.0)
    """

    f: int
    m: int | None = 1

    is_streaming = False

    def __post_init__(self) -> None:
        _check_count("Krum", "f", self.f, 0)
        if self.m is not None:
            _check_count("Krum", "m", self.m, 1)

    def check(self, n: int) -> None:
        """Refuse a round of ``n`` updates this rule cannot aggregate.

        Usable before round 1 with the expected number of clients per round.

        Raises
        ------
        ConfigError
            If ``n <= 2f + 2``, or ``m > n − f``.
        """
        f = self.f
        if n <= 2 * f + 2:
            fix = (
                f"lower f to at most {(n - 3) // 2}"
                if n >= 3
                else "Krum needs at least 3 updates whatever f is"
            )
            raise ConfigError(
                f"Krum with f={f} needs n > 2f + 2 = {2 * f + 2} updates per round; "
                f"got n={n}. Sample at least {2 * f + 3} clients per round (and set "
                f"min_clients >= {2 * f + 3}), or {fix}"
            )
        if self.m is not None and self.m > n - f:
            raise ConfigError(
                f"Multi-Krum with m={self.m} averages more than n - f = {n - f} "
                f"updates (n={n}, f={f}), so it would always include a Byzantine "
                f"one; lower m to at most {n - f} or sample more clients"
            )

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> Accumulator:
        """Open the round's accumulator (keeps every update until the end)."""
        return _StoredAccumulator("Krum", spec, self._combine, uses_weights=False)

    def _combine(self, rows: Sequence[FloatVector], weights: Vector64) -> _Combined:
        n = len(rows)
        self.check(n)
        m = n - self.f if self.m is None else self.m
        gram = _gram(rows)
        scores, order = _krum_order(_squared_distances(gram), n - self.f - 2)
        selected = order[:m]
        coeffs = np.zeros(n, dtype=np.float64)
        coeffs[selected] = 1.0 / m
        measurements = {
            "krum/selected": float(m),
            "robust/rejected": float(n - m),
            "krum/score_min": float(scores.min()),
            "krum/score_median": float(np.median(scores)),
            **_gram_norms(gram),
        }
        return _combine_rows(rows, coeffs), measurements, float(m)


# ------------------------------------------------------ coordinate-wise rules


@dataclass(frozen=True, slots=True)
class CoordinateMedian(_AtLeastOneUpdate):
    """Coordinate-wise median of the round's updates.

    For an even number of updates, the mean of the two middle values.

    Notes
    -----
    Weights are ignored (Yin et al.'s estimator is unweighted; a weighted
    median would let a Byzantine client's claimed example count move it).
    ``total_weight`` is ``n``. Each coordinate is bounded by honest values
    while fewer than half the updates are Byzantine. Costs one sort of n
    values per coordinate.

    Measurements: ``"median/trimmed_per_coordinate"`` (values not in the
    median: n − 1 or n − 2).

    References
    ----------
    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018
    (Definition 1, Algorithm 1 option I).

    Examples
    --------
    >>> import numpy as np
    >>> from fedshield.core import ClientUpdate, Params, aggregate
    >>> ups = [ClientUpdate(str(i), Params({"w": v}), 1)
    ...        for i, v in enumerate([[1.0, 5.0], [2.0, -1.0], [100.0, 0.0]])]
    >>> out = aggregate(CoordinateMedian(), ((u, 1.0) for u in ups),
    ...                 ups[0].delta.spec, rng=np.random.default_rng(0))
    >>> out.delta["w"].tolist()
    [2.0, 0.0]
    """

    is_streaming = False

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> Accumulator:
        """Open the round's accumulator (keeps every update until the end)."""
        return _StoredAccumulator(
            "CoordinateMedian", spec, self._combine, uses_weights=False
        )

    def _combine(self, rows: Sequence[FloatVector], weights: Vector64) -> _Combined:
        n = len(rows)
        vector, squared = _coordinatewise(rows, _sorted_median)
        measurements = {
            "median/trimmed_per_coordinate": float(n - 2 + n % 2),
            **_norm_measurements(np.sqrt(squared)),
        }
        return vector, measurements, float(n)


@dataclass(frozen=True, slots=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean: drop the f largest and f smallest values.

    Give either ``f`` (a count) or ``beta`` (a fraction of the round's
    updates, ``f = floor(beta · n)``), not both.

    Parameters
    ----------
    f
        Values removed at each end, per coordinate.
    beta
        Fraction removed at each end, in [0, 0.5).

    Raises
    ------
    ConfigError
        At construction if neither or both of ``f`` and ``beta`` are given
        or one is out of range; in :meth:`check` and at the end of a round
        if ``n <= 2f``.

    Notes
    -----
    Weights are ignored (Yin et al.'s estimator is unweighted).
    ``total_weight`` is ``n``. With at most ``f`` Byzantine updates every
    coordinate of the result lies within the range of the honest values.

    Measurements: ``"trimmed_mean/trimmed_per_coordinate"`` (2f).

    References
    ----------
    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018
    (Definition 2, Algorithm 1 option II).

    Examples
    --------
    >>> import numpy as np
    >>> from fedshield.core import ClientUpdate, Params, aggregate
    >>> ups = [ClientUpdate(str(i), Params({"w": [v]}), 1)
    ...        for i, v in enumerate([-50.0, 1.0, 2.0, 3.0, 80.0])]
    >>> out = aggregate(TrimmedMean(1), ((u, 1.0) for u in ups),
    ...                 ups[0].delta.spec, rng=np.random.default_rng(0))
    >>> out.delta["w"].tolist()
    [2.0]
    """

    f: int | None = None
    _: KW_ONLY
    beta: float | None = None

    is_streaming = False

    def __post_init__(self) -> None:
        if (self.f is None) == (self.beta is None):
            raise ConfigError(
                "TrimmedMean needs exactly one of `f` (a count) and `beta` (a "
                f"fraction); got f={self.f!r}, beta={self.beta!r}"
            )
        if self.f is not None:
            _check_count("TrimmedMean", "f", self.f, 0)
        if self.beta is not None:
            _check_positive("TrimmedMean", "beta", self.beta, zero=True)
            if not self.beta < 0.5:
                raise ConfigError(
                    f"`beta` of TrimmedMean must be in [0, 0.5); got {self.beta!r}"
                )

    def trim(self, n: int) -> int:
        """Values dropped at each end of a coordinate in a round of ``n``."""
        if self.f is not None:
            return self.f
        assert self.beta is not None
        return math.floor(self.beta * n + 1e-9)

    def check(self, n: int) -> None:
        """Refuse a round of ``n`` updates this rule cannot aggregate.

        Raises
        ------
        ConfigError
            If ``n <= 2f`` (or ``n < 1``).
        """
        f = self.trim(n)
        if n < 1 or n <= 2 * f:
            raise ConfigError(
                f"TrimmedMean with f={f} needs n > 2f = {2 * f} updates per round; "
                f"got n={n}. Sample at least {2 * f + 1} clients per round (and set "
                f"min_clients >= {2 * f + 1}), or lower f to at most "
                f"{max((n - 1) // 2, 0)}"
            )

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> Accumulator:
        """Open the round's accumulator (keeps every update until the end)."""
        return _StoredAccumulator(
            "TrimmedMean", spec, self._combine, uses_weights=False
        )

    def _combine(self, rows: Sequence[FloatVector], weights: Vector64) -> _Combined:
        n = len(rows)
        self.check(n)
        f = self.trim(n)
        vector, squared = _coordinatewise(
            rows, lambda block: _sorted_trimmed_mean(block, f)
        )
        measurements = {
            "trimmed_mean/trimmed_per_coordinate": float(2 * f),
            **_norm_measurements(np.sqrt(squared)),
        }
        return vector, measurements, float(n)


@dataclass(frozen=True, slots=True)
class Bulyan:
    """Bulyan: Krum selection of n − 2f updates, then a trimmed coordinate mean.

    1. Selection: apply Krum ``θ = n − 2f`` times, each time to the updates
       not yet selected, moving the winner to the selection set.
    2. Aggregation: per coordinate, average the ``β = θ − 2f`` selected
       values closest to the coordinate's median.

    Parameters
    ----------
    f
        Number of Byzantine updates to tolerate per round.

    Raises
    ------
    ConfigError
        At construction if ``f < 0``; in :meth:`check` and at the end of a
        round if ``n < 4f + 3``.

    Notes
    -----
    Weights are ignored, as in :class:`Krum`. ``total_weight`` is θ.

    Krum on the ``r`` remaining updates scores each with its
    ``r − f − 2`` nearest remaining neighbours; in the last selections,
    where ``r − f − 2 < 1``, one neighbour is used, so that the choice still
    depends on the data rather than on arrival order. Distances are those
    of one float64 Gram matrix, computed once.

    Measurements: ``"bulyan/selected"`` (θ), ``"robust/rejected"`` (n − θ),
    ``"bulyan/kept_per_coordinate"`` (β).

    References
    ----------
    E. M. El Mhamdi, R. Guerraoui, S. Rouault, "The Hidden Vulnerability of
    Distributed Learning in Byzantium", ICML 2018 (Section 4, Bulyan).

    Examples
    --------
    >>> import numpy as np
    >>> from fedshield.core import ClientUpdate, Params, aggregate
    >>> values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1000.0]
    >>> ups = [ClientUpdate(str(i), Params({"w": [v]}), 1)
    ...        for i, v in enumerate(values)]
    >>> out = aggregate(Bulyan(f=1), ((u, 1.0) for u in ups), ups[0].delta.spec,
    ...                 rng=np.random.default_rng(0))
    >>> out.delta["w"].tolist(), out.measurements["bulyan/kept_per_coordinate"]
    ([4.0], 3.0)
    """

    f: int

    is_streaming = False

    def __post_init__(self) -> None:
        _check_count("Bulyan", "f", self.f, 0)

    def check(self, n: int) -> None:
        """Refuse a round of ``n`` updates this rule cannot aggregate.

        Raises
        ------
        ConfigError
            If ``n < 4f + 3``.
        """
        f = self.f
        if n < 4 * f + 3:
            fix = (
                f"lower f to at most {(n - 3) // 4}"
                if n >= 3
                else "Bulyan needs at least 3 updates whatever f is"
            )
            raise ConfigError(
                f"Bulyan with f={f} needs n >= 4f + 3 = {4 * f + 3} updates per "
                f"round; got n={n}. Sample at least {4 * f + 3} clients per round "
                f"(and set min_clients >= {4 * f + 3}), or {fix}"
            )

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> Accumulator:
        """Open the round's accumulator (keeps every update until the end)."""
        return _StoredAccumulator("Bulyan", spec, self._combine, uses_weights=False)

    def select(self, dist: Vector64) -> list[int]:
        """Indices of the θ = n − 2f updates chosen by repeated Krum.

        Parameters
        ----------
        dist
            Pairwise squared distances, shape (n, n).
        """
        n = dist.shape[0]
        remaining = list(range(n))
        selected: list[int] = []
        while len(selected) < n - 2 * self.f:
            r = len(remaining)
            pool = np.asarray(remaining)
            neighbours = min(max(r - self.f - 2, 1), r - 1)
            _, order = _krum_order(dist[np.ix_(pool, pool)], neighbours)
            best = remaining.pop(int(order[0]))
            selected.append(best)
        return selected

    def _combine(self, rows: Sequence[FloatVector], weights: Vector64) -> _Combined:
        n = len(rows)
        self.check(n)
        theta = n - 2 * self.f
        keep = theta - 2 * self.f
        gram = _gram(rows)
        chosen = self.select(_squared_distances(gram))
        picked = [rows[i] for i in sorted(chosen)]
        vector, _ = _coordinatewise(
            picked, lambda block: _sorted_closest_to_median_mean(block, keep)
        )
        measurements = {
            "bulyan/selected": float(theta),
            "robust/rejected": float(n - theta),
            "bulyan/kept_per_coordinate": float(keep),
            **_gram_norms(gram),
        }
        return vector, measurements, float(theta)


# ---------------------------------------------------------- geometric median


@dataclass(frozen=True, slots=True)
class GeometricMedian(_AtLeastOneUpdate):
    """Weighted geometric median by smoothed Weiszfeld iterations (RFA).

    Approximately minimises ``g(z) = Σ_k α_k ‖z − x_k‖`` with
    ``α_k = w_k / Σ_j w_j``, starting from the weighted mean and iterating
    ``z ← Σ_k β_k x_k / Σ_k β_k`` with ``β_k = α_k / max(ν, ‖z − x_k‖)``
    (the smoothing ``ν`` keeps the step defined when ``z`` reaches a data
    point) until a step moves ``z`` by at most ``tol`` times the median
    distance from ``z`` to the updates, or ``max_iter`` iterations have run.

    Parameters
    ----------
    max_iter
        Most Weiszfeld iterations.
    eps
        Smoothing ``ν`` (in the units of the updates): distances below it
        count as ``ν``, which keeps the iteration defined at the data points.
    tol
        Relative step length at which to stop.

    Raises
    ------
    ConfigError
        At construction if a parameter is not positive.

    Notes
    -----
    Weights are used (``α_k`` above); zero-weight updates do not count. The
    breakdown point is 1/2 of the total weight: a minority of any size
    cannot move the result arbitrarily far.

    Every iterate is an affine combination ``z = Σ_k c_k x_k`` of the
    updates, so the iteration runs on the coefficients ``c`` alone, with
    ``‖z − x_j‖² = cᵀGc − 2 (Gc)_j + G_jj`` from one float64 Gram matrix
    ``G``: O(n² d) once, then O(n²) per iteration, and one pass over the
    updates at the end to form ``z``.

    The stopping test is relative to the *median* distance, a scale set by
    the majority. RFA's test on the objective's relative change would let
    one far outlier, which dominates ``g``, loosen it: with 10 updates, one
    of them at distance 10⁶, a relative change of 1e-6 in ``g`` is about 0.1
    in the honest updates' units.

    Measurements: ``"geomed/iterations"``, ``"geomed/converged"`` (1 if the
    ``tol`` test stopped it, 0 if ``max_iter`` did), ``"geomed/objective"``
    (``g`` at the result) and ``"geomed/max_coefficient"`` (largest ``c_k``;
    an outlier's is small).

    References
    ----------
    K. Pillutla, S. M. Kakade, Z. Harchaoui, "Robust Aggregation for
    Federated Learning", IEEE Trans. Signal Processing 70, 2022 (RFA,
    Algorithm 2, smoothed Weiszfeld). E. Weiszfeld, "Sur le point pour
    lequel la somme des distances de n points donnés est minimum", Tôhoku
    Math. J. 43, 1937.

    Examples
    --------
    >>> import numpy as np
    >>> from fedshield.core import ClientUpdate, Params, aggregate
    >>> pts = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1000.0, 1000.0]]
    >>> ups = [ClientUpdate(str(i), Params({"w": p}), 1) for i, p in enumerate(pts)]
    >>> out = aggregate(GeometricMedian(), ((u, 1.0) for u in ups),
    ...                 ups[0].delta.spec, rng=np.random.default_rng(0))
    >>> bool(np.linalg.norm(out.delta["w"]) < 1.0)
    True
    """

    max_iter: int = 100
    eps: float = 1e-6
    _: KW_ONLY
    tol: float = 1e-6

    is_streaming = False

    def __post_init__(self) -> None:
        _check_count("GeometricMedian", "max_iter", self.max_iter, 1)
        _check_positive("GeometricMedian", "eps", self.eps, zero=False)
        _check_positive("GeometricMedian", "tol", self.tol, zero=False)

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> Accumulator:
        """Open the round's accumulator (keeps every update until the end)."""
        return _StoredAccumulator(
            "GeometricMedian", spec, self._combine, uses_weights=True
        )

    def coefficients(
        self, gram: Vector64, weights: Vector64
    ) -> tuple[Vector64, int, bool, float]:
        """Run the iteration on a Gram matrix.

        Returns
        -------
        tuple
            ``(c, iterations, converged, objective)``, with the result
            ``z = Σ_k c_k x_k``.

        Raises
        ------
        InvalidUpdateError
            If no weight is positive.
        """
        total = float(weights.sum())
        if not total > 0.0:
            raise InvalidUpdateError(
                "cannot aggregate with GeometricMedian: no update with positive "
                "weight was added"
            )
        alpha = weights / total
        counted = alpha > 0.0
        diag = np.diag(gram)

        def distances(coeffs: Vector64) -> Vector64:
            # ‖z − x_j‖² = cᵀGc − 2 (Gc)_j + G_jj for z = Σ_k c_k x_k.
            gc = gram @ coeffs
            sq = float(coeffs @ gc) - 2.0 * gc + diag
            dist: Vector64 = np.sqrt(np.maximum(sq, 0.0))
            return dist

        coeffs = alpha.copy()
        dist = distances(coeffs)
        iterations = 0
        converged = False
        while iterations < self.max_iter:
            scaled = alpha / np.maximum(dist, self.eps)
            step = scaled / scaled.sum() - coeffs
            coeffs = coeffs + step
            dist = distances(coeffs)
            iterations += 1
            moved = math.sqrt(max(float(step @ gram @ step), 0.0))
            scale = max(float(np.median(dist[counted])), self.eps)
            if moved <= self.tol * scale:
                converged = True
                break
        return coeffs, iterations, converged, float(alpha @ dist)

    def _combine(self, rows: Sequence[FloatVector], weights: Vector64) -> _Combined:
        gram = _gram(rows)
        coeffs, iterations, converged, value = self.coefficients(gram, weights)
        measurements = {
            "geomed/iterations": float(iterations),
            "geomed/converged": float(converged),
            "geomed/objective": value,
            "geomed/max_coefficient": float(coeffs.max()),
            **_gram_norms(gram),
        }
        return _combine_rows(rows, coeffs), measurements, float(weights.sum())


# ------------------------------------------------------------- norm bounding


@dataclass(frozen=True, slots=True)
class NormBound(_AtLeastOneUpdate):
    """Clip each update to an L2 norm, take the weighted mean, add weak noise.

    ``Δ = Σ_k w_k Δ_k min(1, M / ‖Δ_k‖) / Σ_k w_k + N(0, σ² I)``.

    Parameters
    ----------
    max_norm
        ``M``, the largest L2 norm an update keeps.
    noise_std
        ``σ``, std of the Gaussian noise added to each coordinate of the
        mean (0: none). Drawn from the ``rng`` passed to :meth:`begin`.

    Raises
    ------
    ConfigError
        At construction if ``max_norm <= 0`` or ``noise_std < 0``.

    Notes
    -----
    Weights are used. Streaming: O(d) memory, one float64 accumulator. No
    update moves the mean by more than ``w_k M / Σ_j w_j``, so the result's
    norm is at most ``M`` before noise; a boosted (scaled-up) backdoor
    update is cut down to a benign one's size.

    The noise is Sun et al.'s "weak differential privacy": it is not
    calibrated to a privacy budget and no DP event is recorded; use
    :class:`~fedshield.strategies.dp.DpMean` (via ``DpFedAvg``) for a
    guarantee.

    Measurements: ``"norm_bound/clipped"`` (updates whose norm exceeded
    ``M``), ``"norm_bound/max_norm"``, ``"norm_bound/noise_std"``.

    References
    ----------
    Z. Sun, P. Kairouz, A. T. Suresh, H. B. McMahan, "Can You Really
    Backdoor Federated Learning?", arXiv:1911.07963, 2019 (Section 3,
    norm thresholding and weak differential privacy).

    Examples
    --------
    >>> import numpy as np
    >>> from fedshield.core import ClientUpdate, Params, aggregate
    >>> ups = [ClientUpdate("a", Params({"w": [3.0, 4.0]}), 1),
    ...        ClientUpdate("b", Params({"w": [0.0, 0.5]}), 1)]
    >>> out = aggregate(NormBound(max_norm=1.0), ((u, 1.0) for u in ups),
    ...                 ups[0].delta.spec, rng=np.random.default_rng(0))
    >>> out.delta["w"].astype(float).round(6).tolist()
    [0.3, 0.65]
    >>> out.measurements["norm_bound/clipped"]
    1.0
    """

    max_norm: float
    noise_std: float = 0.0

    is_streaming = True

    def __post_init__(self) -> None:
        _check_positive("NormBound", "max_norm", self.max_norm, zero=False)
        _check_positive("NormBound", "noise_std", self.noise_std, zero=True)

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> Accumulator:
        """Open the round's accumulator (O(d) memory)."""
        return _NormBoundAccumulator(self, spec, rng)


class _NormBoundAccumulator:
    __slots__ = (
        "_clipped",
        "_count",
        "_norms",
        "_rng",
        "_rule",
        "_spec",
        "_sum",
        "_total",
    )

    def __init__(
        self, rule: NormBound, spec: ParamSpec, rng: np.random.Generator
    ) -> None:
        self._rule = rule
        self._spec = spec
        self._rng = rng
        self._sum = np.zeros(spec.size, dtype=np.float64)
        self._total = 0.0
        self._count = 0
        self._clipped = 0
        self._norms: list[float] = []

    def add(self, update: ClientUpdate, weight: float) -> None:
        _check_layout(update, self._spec)
        weight = float(weight)
        _check_weight(update, weight)
        norm = _l2_norm(update.delta.flat)
        factor = 1.0
        if norm > self._rule.max_norm:
            factor = self._rule.max_norm / norm
            self._clipped += 1
        self._sum += np.asarray(update.delta.flat, dtype=np.float64) * (weight * factor)
        self._total += weight
        self._count += 1
        self._norms.append(norm)

    def result(self) -> Aggregate:
        if self._count == 0:
            raise _no_updates("NormBound")
        if not self._total > 0.0:
            raise InvalidUpdateError(
                "cannot aggregate with NormBound: no update with positive weight "
                "was added"
            )
        mean = self._sum / self._total
        if self._rule.noise_std > 0.0:
            mean += self._rng.normal(0.0, self._rule.noise_std, size=mean.shape)
        measurements = {
            "norm_bound/clipped": float(self._clipped),
            "norm_bound/max_norm": float(self._rule.max_norm),
            "norm_bound/noise_std": float(self._rule.noise_std),
        }
        measurements.update(_norm_measurements(self._norms))
        return Aggregate(
            delta=Params.from_flat(mean.astype(np.float32), self._spec, copy=False),
            num_updates=self._count,
            total_weight=self._total,
            measurements=measurements,
        )


# ------------------------------------------------------------------- FLTrust


@dataclass(frozen=True, slots=True)
class FLTrust(_AtLeastOneUpdate):
    """FLTrust: weight each update by its direction's agreement with the server's.

    With ``g_0`` the server's update on its small root data set, each client
    update gets the trust score ``TS_k = ReLU(cos(g_k, g_0))``, is rescaled
    to ``ĝ_k = (‖g_0‖ / ‖g_k‖) g_k``, and the result is
    ``Σ_k TS_k ĝ_k / Σ_k TS_k``. If every score is 0 the result is the zero
    update (``"fltrust/zero_trust"`` is 1).

    Parameters
    ----------
    reference
        This round's ``g_0``. The rule cannot compute it (it needs the model
        and the root data), so a strategy builds ``FLTrust(reference=g_0)``
        each round, or :meth:`with_reference` on a template, and passes it as
        the round's aggregator (``RoundPlan.aggregator``). None makes a
        template: :meth:`begin` refuses it.

    Raises
    ------
    ConfigError
        At construction if ``reference`` has NaN or infinite values; in
        :meth:`begin` if ``reference`` is None or does not match the model.

    Notes
    -----
    Weights are ignored (trust replaces them, as in Cao et al.); updates of
    norm 0 get trust 0. Streaming: O(d) memory. Scaling an update by any
    ``c > 0`` changes neither its score nor its rescaled version, so a
    boosted update gains nothing; an update pointing away from ``g_0``
    (cosine <= 0) is ignored. ``total_weight`` is ``Σ_k TS_k``.

    Measurements: ``"fltrust/trusted"`` (updates with TS > 0),
    ``"robust/rejected"`` (TS = 0), ``"fltrust/zero_trust"`` (1 if all are
    0), ``"fltrust/mean_trust"``, ``"fltrust/reference_norm"``.

    References
    ----------
    X. Cao, M. Fang, J. Liu, N. Z. Gong, "FLTrust: Byzantine-robust
    Federated Learning via Trust Bootstrapping", NDSS 2021 (Section III-C,
    Equations 3-5).

    Examples
    --------
    >>> import numpy as np
    >>> from fedshield.core import ClientUpdate, Params, aggregate
    >>> g0 = Params({"w": [1.0, 0.0]})
    >>> ups = [ClientUpdate("a", Params({"w": [10.0, 10.0]}), 1),
    ...        ClientUpdate("b", Params({"w": [-5.0, 0.0]}), 1)]
    >>> out = aggregate(FLTrust(g0), ((u, 1.0) for u in ups), g0.spec,
    ...                 rng=np.random.default_rng(0))
    >>> out.delta["w"].astype(float).round(4).tolist()
    [0.7071, 0.7071]
    >>> out.measurements["robust/rejected"]
    1.0
    """

    reference: Params | None = None

    is_streaming = True

    def __post_init__(self) -> None:
        if self.reference is not None and not self.reference.is_finite():
            raise ConfigError(
                "the reference update of FLTrust must be finite; it has NaN or "
                "infinite values"
            )

    def with_reference(self, reference: Params) -> FLTrust:
        """Return this rule with the round's server update ``g_0``."""
        return replace(self, reference=reference)

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> Accumulator:
        """Open the round's accumulator (O(d) memory).

        Raises
        ------
        ConfigError
            If there is no reference update, or it does not match ``spec``.
        """
        if self.reference is None:
            raise ConfigError(
                "FLTrust has no reference update: the strategy must build "
                "FLTrust(reference=g_0) (or template.with_reference(g_0)) each "
                "round from the server's update on its root data"
            )
        if self.reference.spec != spec:
            raise ConfigError(
                "the reference update of FLTrust does not match the model: "
                + "; ".join(spec.mismatches(self.reference.spec))
            )
        return _FLTrustAccumulator(self.reference, spec)


class _FLTrustAccumulator:
    __slots__ = ("_count", "_norms", "_ref", "_ref_norm", "_scores", "_spec", "_sum")

    def __init__(self, reference: Params, spec: ParamSpec) -> None:
        self._spec = spec
        self._ref = np.asarray(reference.flat, dtype=np.float64)
        self._ref_norm = math.sqrt(float(np.einsum("i,i->", self._ref, self._ref)))
        self._sum = np.zeros(spec.size, dtype=np.float64)
        self._scores: list[float] = []
        self._norms: list[float] = []
        self._count = 0

    def add(self, update: ClientUpdate, weight: float) -> None:
        _check_layout(update, self._spec)
        flat = np.asarray(update.delta.flat, dtype=np.float64)
        norm = math.sqrt(float(np.einsum("i,i->", flat, flat)))
        score = 0.0
        if norm > 0.0 and self._ref_norm > 0.0:
            cosine = float(np.einsum("i,i->", flat, self._ref)) / (
                norm * self._ref_norm
            )
            score = max(0.0, min(cosine, 1.0))
        if score > 0.0:
            flat *= score * self._ref_norm / norm
            self._sum += flat
        self._scores.append(score)
        self._norms.append(norm)
        self._count += 1

    def result(self) -> Aggregate:
        if self._count == 0:
            raise _no_updates("FLTrust")
        total = float(sum(self._scores))
        trusted = sum(1 for s in self._scores if s > 0.0)
        if total > 0.0:
            vector = (self._sum / total).astype(np.float32)
        else:
            vector = np.zeros(self._spec.size, dtype=np.float32)
        measurements = {
            "fltrust/trusted": float(trusted),
            "robust/rejected": float(self._count - trusted),
            "fltrust/zero_trust": float(total <= 0.0),
            "fltrust/mean_trust": total / self._count,
            "fltrust/reference_norm": self._ref_norm,
        }
        measurements.update(_norm_measurements(self._norms))
        return Aggregate(
            delta=Params.from_flat(vector, self._spec, copy=False),
            num_updates=self._count,
            total_weight=total,
            measurements=measurements,
        )


# ------------------------------------------------------------------ factory

RuleName: TypeAlias = str
"""A name registered in :data:`RULES`."""

_Options: TypeAlias = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RobustRule:
    """How :func:`make_robust` builds a rule from its parameters.

    Parameters
    ----------
    build
        Builds the aggregator from the parameters given (those not None).
    required
        Parameters the rule needs (``make_robust`` refuses their absence).
    optional
        Parameters it also takes; any other is refused.
    """

    build: Callable[[_Options], Aggregator]
    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()


def _trimmed_mean(options: _Options) -> Aggregator:
    if ("f" in options) == ("beta" in options):
        raise ConfigError(
            "robust rule 'trimmed_mean' needs exactly one of `f` and `beta`; got "
            + (" and ".join(sorted(options)) or "neither")
        )
    return TrimmedMean(options.get("f"), beta=options.get("beta"))


RULES: Registry[RobustRule] = Registry("robust rule", "[robust] rule")
"""The robust rules by name: what ``[robust] rule``, ``fedshield analyze
--defences`` and :func:`make_robust` accept.

Tags: ``"needs_f"``, the rule takes the number of attackers ``f`` (``analyze``
sets it from ``--fraction``); ``"needs_max_norm"``, it takes an L2 bound
``max_norm`` (``analyze``'s ``--max-norm``); ``"secagg"``, it works under
secure aggregation (it needs no individual update); ``"not_robust"``, one
attacker can move it anywhere (the report counts its failures as known);
``"server_data"``, the server trains on data drawn from the clients' own
(outside any differential privacy guarantee).
"""

_f, _m, _beta = frozenset({"f"}), frozenset({"m"}), frozenset({"beta"})
RULES.add(
    "fedavg",
    RobustRule(lambda o: WeightedMean()),
    "the weighted mean (no robust rule)",
    tags={"secagg", "not_robust"},
)
RULES.add(
    "krum",
    RobustRule(lambda o: Krum(o["f"], m=1), _f),
    "Krum: the update closest to its n - f - 2 nearest neighbours",
    tags={"needs_f"},
)
RULES.add(
    "multi_krum",
    RobustRule(lambda o: Krum(o["f"], m=o.get("m")), _f, _m),
    "Multi-Krum: the mean of the m updates Krum scores best",
    tags={"needs_f"},
)
RULES.add(
    "median",
    RobustRule(lambda o: CoordinateMedian()),
    "the coordinate-wise median",
)
RULES.add(
    "trimmed_mean",
    RobustRule(_trimmed_mean, optional=_f | _beta),
    "the coordinate-wise mean without the f (or a beta share) largest and "
    "smallest values",
    tags={"needs_f"},
)
RULES.add(
    "bulyan",
    RobustRule(lambda o: Bulyan(o["f"]), _f),
    "Bulyan: a trimmed mean of the updates Krum selects",
    tags={"needs_f"},
)
RULES.add(
    "geomed",
    RobustRule(
        lambda o: GeometricMedian(**o), optional=frozenset({"max_iter", "eps", "tol"})
    ),
    "the geometric median (Weiszfeld iterations)",
)
RULES.add(
    "norm_bound",
    RobustRule(
        lambda o: NormBound(**o), frozenset({"max_norm"}), frozenset({"noise_std"})
    ),
    "the mean of the updates clipped to an L2 bound max_norm",
    tags={"needs_max_norm", "secagg"},
)
RULES.add(
    "fltrust",
    RobustRule(lambda o: FLTrust(**o), optional=frozenset({"reference"})),
    "FLTrust: updates weighted by their agreement with the server's own "
    "update on a root set",
    tags={"server_data"},
)

RULE_NAMES: tuple[str, ...] = RULES.names()
"""The built-in names :func:`make_robust` accepts (``RULES.names()`` also
lists rules registered later)."""


def make_robust(
    rule: str,
    *,
    f: int | None = None,
    m: int | None = None,
    beta: float | None = None,
    max_iter: int | None = None,
    eps: float | None = None,
    tol: float | None = None,
    max_norm: float | None = None,
    noise_std: float | None = None,
    reference: Params | None = None,
) -> Aggregator:
    """Build an aggregation rule by name (for configuration files).

    Parameters
    ----------
    rule
        A name in :data:`RULES`: ``"fedavg"`` (:class:`WeightedMean`),
        ``"krum"`` (:class:`Krum`, m = 1), ``"multi_krum"`` (:class:`Krum`;
        ``m`` defaults to n − f), ``"median"`` (:class:`CoordinateMedian`),
        ``"trimmed_mean"``, ``"bulyan"``, ``"geomed"``
        (:class:`GeometricMedian`), ``"norm_bound"``, ``"fltrust"``.
    f, m, beta, max_iter, eps, tol, max_norm, noise_std, reference
        The rule's parameters (see each class); leave the others None.

    Returns
    -------
    Aggregator
        The rule.

    Raises
    ------
    ConfigError
        If ``rule`` is unknown (the message lists the names), a parameter
        the rule needs is missing, one it does not use is given, or a value
        is out of range.

    Examples
    --------
    >>> make_robust("multi_krum", f=2, m=5)
    Krum(f=2, m=5)
    >>> make_robust("median")
    CoordinateMedian()
    """
    recipe = RULES.get(rule)
    given = {
        name: value
        for name, value in {
            "f": f,
            "m": m,
            "beta": beta,
            "max_iter": max_iter,
            "eps": eps,
            "tol": tol,
            "max_norm": max_norm,
            "noise_std": noise_std,
            "reference": reference,
        }.items()
        if value is not None
    }
    missing = sorted(recipe.required - given.keys())
    unused = sorted(given.keys() - recipe.required - recipe.optional)
    problems = []
    if missing:
        problems.append("needs " + ", ".join(f"`{name}`" for name in missing))
    if unused:
        accepted = sorted(recipe.required | recipe.optional)
        problems.append(
            "does not use "
            + ", ".join(f"`{name}`" for name in unused)
            + " (it takes "
            + (", ".join(f"`{name}`" for name in accepted) or "no parameters")
            + ")"
        )
    if problems:
        raise ConfigError(f"robust rule {rule!r} " + "; ".join(problems))
    return recipe.build(given)
