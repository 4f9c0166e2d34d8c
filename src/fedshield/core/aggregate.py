"""Aggregators: how the server combines client updates into one.

An :class:`Aggregator` is a reusable, stateless rule; for each round it opens
an :class:`Accumulator` that receives updates one at a time (``add``) and
produces an :class:`Aggregate` (``result``). Streaming rules such as
:class:`WeightedMean` keep O(d) memory however many clients report; rules that
need every update at once (Krum, median) keep them and say so with
``is_streaming = False``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedshield.core.params import Params, ParamSpec
from fedshield.core.update import ClientUpdate
from fedshield.errors import InvalidUpdateError

__all__ = [
    "Accumulator",
    "Aggregate",
    "Aggregator",
    "WeightedMean",
    "aggregate",
]


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The combined update of one round.

    Parameters
    ----------
    delta
        The aggregated update.
    num_updates
        How many client updates went into it.
    total_weight
        Sum of the weights used (for FedAvg: the total example count).
    measurements
        Rule-specific scalars, namespaced (``"krum/selected"``, ...).
    extras
        Unweighted means of the updates' ``extras`` tensors, by name.
    """

    delta: Params
    num_updates: int
    total_weight: float
    measurements: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, Params] = field(default_factory=dict)


class Accumulator(Protocol):
    """One round's aggregation in progress."""

    def add(self, update: ClientUpdate, weight: float) -> None:
        """Take in one (already validated) update with its weight."""

    def result(self) -> Aggregate:
        """Combine everything added so far."""


@runtime_checkable
class Aggregator(Protocol):
    """A rule that combines client updates; opens one accumulator per round."""

    @property
    def is_streaming(self) -> bool:
        """Whether the rule keeps O(d) memory (does not store every update)."""

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> Accumulator:
        """Open an accumulator for updates laid out as ``spec``."""


def aggregate(
    aggregator: Aggregator,
    updates: Iterable[tuple[ClientUpdate, float]],
    spec: ParamSpec,
    *,
    rng: np.random.Generator,
) -> Aggregate:
    """Run ``aggregator`` over ``(update, weight)`` pairs in one call."""
    acc = aggregator.begin(spec, rng=rng)
    for update, weight in updates:
        acc.add(update, weight)
    return acc.result()


def _numpy_axpy(x: np.ndarray, y: np.ndarray, a: float) -> np.ndarray:
    y += np.float32(a) * x
    return y


class _AdaptiveAxpy:
    """``y += a * x`` in place with BLAS ``saxpy``, threaded or single-threaded.

    OpenBLAS splits a long axpy across its threads: on idle cores that is
    what lets one stream of updates keep up with a multi-threaded ``w @ M``;
    on busy cores (clients training in other processes) the threads' hand-off
    collapses, measured at 8 ms instead of 0.1 ms per million values. So each
    call runs in the mode whose last measured cost per value was lower, and
    the other mode is tried again after 4 calls, then 8, ... up to 256 while
    it keeps losing (back to 4 when it wins).
    """

    def __init__(self, saxpy: Callable[..., np.ndarray], libs: list[Any]) -> None:
        self._saxpy = saxpy
        self._libs = libs
        self._cost: dict[bool, float] = {}  # single-threaded? -> seconds/value
        self._calls = 0
        self._explore_every = 4
        self._exploring: bool | None = None

    def _pick(self) -> bool:
        if not self._libs:
            return False
        for single in (False, True):
            if single not in self._cost:
                return single
        best = min(self._cost, key=self._cost.__getitem__)
        self._calls += 1
        if self._calls >= self._explore_every:
            self._calls = 0
            self._exploring = not best
            return not best
        return best

    def __call__(self, x: np.ndarray, y: np.ndarray, a: float) -> np.ndarray:
        single = self._pick() if x.size > 65_536 else False
        started = time.perf_counter()
        if single:
            before = [lib.get_num_threads() for lib in self._libs]
            for lib in self._libs:
                lib.set_num_threads(1)
            try:
                out = self._saxpy(x, y, a=a)
            finally:
                for lib, n in zip(self._libs, before, strict=True):
                    lib.set_num_threads(n)
        else:
            out = self._saxpy(x, y, a=a)
        if x.size > 65_536:
            self._cost[single] = (time.perf_counter() - started) / x.size
            if self._exploring is not None and len(self._cost) == 2:
                won = self._cost[single] < self._cost[not single]
                self._explore_every = 4 if won else min(2 * self._explore_every, 256)
                self._exploring = None
        return out


def _load_axpy() -> Callable[[np.ndarray, np.ndarray, float], np.ndarray]:
    # BLAS saxpy updates y in place in one pass over memory; numpy's
    # ``y += a * x`` makes a temporary and runs at about half the throughput
    # (BENCHMARKS.md, "WeightedMean").
    try:
        from scipy.linalg.blas import saxpy
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return _numpy_axpy
    return _AdaptiveAxpy(saxpy, _scipy_blas_libraries())


def _scipy_blas_libraries() -> list[Any]:
    # The BLAS that scipy.linalg.blas calls: the OpenBLAS that SciPy's wheels
    # vendor in ``scipy.libs`` (or, for other builds, every loaded BLAS).
    # Setting its thread count directly costs about 4 us, a tenth of a
    # threadpoolctl context over every library.
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with sklearn
        return []
    blas = [
        lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"
    ]
    own = [lib for lib in blas if "scipy.libs" in str(lib.filepath)]
    return own or blas


_axpy: Callable[[np.ndarray, np.ndarray, float], np.ndarray] | None = None

_BLAS_MIN_SIZE = 65_536
"""Below this many values numpy's ``y += a * x`` is as fast, and importing
SciPy's BLAS binding (about 0.1 s) is not worth it."""


def _get_axpy() -> Callable[[np.ndarray, np.ndarray, float], np.ndarray]:
    global _axpy
    if _axpy is None:
        _axpy = _load_axpy()
    return _axpy


class WeightedMean:
    """Streaming weighted mean: the FedAvg rule ``Σ_k w_k Δ_k / Σ_k w_k``.

    Keeps one ``float32`` accumulator of d values, whatever the number of
    clients (it never stacks the updates), and adds each update with a BLAS
    ``axpy``.

    Examples
    --------
    >>> import numpy as np
    >>> from fedshield.core import ClientUpdate, Params
    >>> a = ClientUpdate("a", Params({"w": [1.0, 0.0]}), 1)
    >>> b = ClientUpdate("b", Params({"w": [4.0, 3.0]}), 2)
    >>> rule = WeightedMean()
    >>> acc = rule.begin(a.delta.spec, rng=np.random.default_rng(0))
    >>> acc.add(a, 1.0); acc.add(b, 2.0)
    >>> acc.result().delta["w"].tolist()
    [3.0, 2.0]
    """

    is_streaming = True

    def begin(self, spec: ParamSpec, *, rng: np.random.Generator) -> _MeanAccumulator:
        """Open an accumulator for one round."""
        return _MeanAccumulator(spec)

    def __repr__(self) -> str:
        return "WeightedMean()"


class _MeanAccumulator:
    __slots__ = ("_count", "_spec", "_sum", "_total")

    def __init__(self, spec: ParamSpec) -> None:
        self._spec = spec
        self._sum = np.zeros(spec.size, dtype=np.float32)
        self._total = 0.0
        self._count = 0

    def add(self, update: ClientUpdate, weight: float) -> None:
        if not (weight >= 0.0 and np.isfinite(weight)):
            raise InvalidUpdateError(
                f"weight of client {update.client_id!r} must be finite and >= 0; "
                f"got {weight}"
            )
        if update.delta.spec != self._spec:
            raise InvalidUpdateError(
                f"update from client {update.client_id!r} does not match the model: "
                + "; ".join(self._spec.mismatches(update.delta.spec))
            )
        axpy = _numpy_axpy if self._spec.size < _BLAS_MIN_SIZE else _get_axpy()
        self._sum = axpy(update.delta.flat, self._sum, float(weight))
        self._total += float(weight)
        self._count += 1

    def result(self) -> Aggregate:
        if self._count == 0 or self._total <= 0.0:
            raise InvalidUpdateError(
                "cannot average: no update with positive weight was added"
            )
        mean = self._sum * np.float32(1.0 / self._total)
        return Aggregate(
            delta=Params.from_flat(mean, self._spec, copy=False),
            num_updates=self._count,
            total_weight=self._total,
        )
