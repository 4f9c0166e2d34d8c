"""Model parameters as an immutable name → array mapping over one flat buffer.

A :class:`Params` stores every tensor of a model in a single contiguous
``float32`` vector; each named array is a read-only view into it. Norms,
masks, clipping and aggregation work on :attr:`Params.flat` without copying,
and serialising a model is writing one vector plus its :class:`ParamSpec`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedshield.errors import InvalidUpdateError

__all__ = ["ParamSpec", "Params"]

FloatVector = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """Names and shapes of a model's parameters, in order.

    Parameters
    ----------
    entries
        ``(name, shape)`` pairs in the order the flat buffer stores them.

    Examples
    --------
    >>> spec = ParamSpec((("w", (2, 3)), ("b", (3,))))
    >>> spec.size
    9
    """

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names must be unique; got {names}")
        for name, shape in self.entries:
            if any(int(s) < 0 for s in shape):
                raise ValueError(f"shape of {name!r} must be non-negative; got {shape}")

    @property
    def size(self) -> int:
        """Total number of scalar values."""
        return sum(math.prod(shape) for _, shape in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in storage order."""
        return tuple(name for name, _ in self.entries)

    def to_json(self) -> list[list[Any]]:
        """Return a JSON-serialisable form (see :meth:`from_json`)."""
        return [[name, list(shape)] for name, shape in self.entries]

    @classmethod
    def from_json(cls, data: list[list[Any]]) -> ParamSpec:
        """Rebuild a spec written by :meth:`to_json`."""
        return cls(tuple((str(n), tuple(int(s) for s in shape)) for n, shape in data))

    def mismatches(self, other: ParamSpec) -> list[str]:
        """Describe every way ``other`` differs from this spec (empty if equal)."""
        problems: list[str] = []
        mine = dict(self.entries)
        theirs = dict(other.entries)
        for name in mine.keys() - theirs.keys():
            problems.append(f"missing parameter {name!r}")
        for name in theirs.keys() - mine.keys():
            problems.append(f"unexpected parameter {name!r}")
        for name in mine.keys() & theirs.keys():
            if tuple(mine[name]) != tuple(theirs[name]):
                problems.append(
                    f"parameter {name!r} has shape {theirs[name]}, "
                    f"expected {mine[name]}"
                )
        if not problems and self.names != other.names:
            problems.append("parameters are in a different order")
        return sorted(problems)


class Params(Mapping[str, np.ndarray]):
    """Immutable mapping of parameter name to ``float32`` array.

    All arrays are read-only views into one contiguous buffer, available as
    :attr:`flat`. Arithmetic (``+``, ``-``, scalar ``*``) returns new
    :class:`Params` with the same spec.

    Parameters
    ----------
    arrays
        Name → array-like. Values are converted to ``float32`` and copied.

    Examples
    --------
    >>> p = Params({"w": [[3.0, 0.0]], "b": [4.0]})
    >>> p.norm()
    5.0
    >>> (p - p).flat.tolist()
    [0.0, 0.0, 0.0]
    """

    __slots__ = ("_flat", "_spec", "_views")

    def __init__(self, arrays: Mapping[str, ArrayLike]) -> None:
        converted = {name: np.asarray(value) for name, value in arrays.items()}
        spec = ParamSpec(
            tuple(
                (name, tuple(int(s) for s in a.shape)) for name, a in converted.items()
            )
        )
        flat = np.empty(spec.size, dtype=np.float32)
        offset = 0
        for _name, array in converted.items():
            flat[offset : offset + array.size] = array.reshape(-1)
            offset += array.size
        self._init(flat, spec)

    def _init(self, flat: FloatVector, spec: ParamSpec) -> None:
        flat.flags.writeable = False
        self._flat = flat
        self._spec = spec
        views: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in spec.entries:
            n = math.prod(shape)
            views[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        self._views = views

    @classmethod
    def from_flat(
        cls, flat: ArrayLike, spec: ParamSpec, *, copy: bool = True
    ) -> Params:
        """Build from a flat vector laid out as ``spec``.

        Parameters
        ----------
        flat
            One-dimensional vector of ``spec.size`` values.
        spec
            Names and shapes.
        copy
            Copy the vector (default). With ``False`` the vector is taken over
            and made read-only; the caller must not keep writing to it.

        Raises
        ------
        InvalidUpdateError
            If ``flat`` is not one-dimensional of length ``spec.size``.
        """
        vector = np.asarray(flat)
        if vector.ndim != 1 or vector.size != spec.size:
            raise InvalidUpdateError(
                f"flat parameter vector must have shape ({spec.size},); "
                f"got {vector.shape}"
            )
        if copy or vector.dtype != np.float32 or not vector.flags.c_contiguous:
            vector = np.array(vector, dtype=np.float32, copy=True)
        obj = cls.__new__(cls)
        obj._init(vector, spec)
        return obj

    @classmethod
    def zeros(cls, spec: ParamSpec) -> Params:
        """All-zero parameters with ``spec``."""
        return cls.from_flat(np.zeros(spec.size, dtype=np.float32), spec, copy=False)

    @property
    def flat(self) -> FloatVector:
        """Read-only flat ``float32`` view of all values, in spec order."""
        return self._flat

    @property
    def spec(self) -> ParamSpec:
        """Names and shapes."""
        return self._spec

    def norm(self) -> float:
        """L2 norm over all values (accumulated in float64)."""
        return float(np.sqrt(np.dot(self._flat.astype(np.float64), self._flat)))

    def is_finite(self) -> bool:
        """Whether no value is NaN or infinite."""
        return bool(np.isfinite(self._flat).all())

    def __getitem__(self, name: str) -> np.ndarray:
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def _check(self, other: Params) -> None:
        if other.spec != self._spec:
            raise InvalidUpdateError(
                "parameters do not match: "
                + "; ".join(self._spec.mismatches(other.spec))
            )

    def __add__(self, other: Params) -> Params:
        self._check(other)
        return Params.from_flat(self._flat + other.flat, self._spec, copy=False)

    def __sub__(self, other: Params) -> Params:
        self._check(other)
        return Params.from_flat(self._flat - other.flat, self._spec, copy=False)

    def __mul__(self, scalar: float) -> Params:
        return Params.from_flat(self._flat * np.float32(scalar), self._spec, copy=False)

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Params):
            return NotImplemented
        return self._spec == other.spec and bool(np.array_equal(self._flat, other.flat))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        size = self._spec.size
        return f"Params({len(self)} arrays, {size} values, norm={self.norm():.4g})"

    def __reduce__(self) -> tuple[Any, ...]:
        # ``from_flat``'s ``copy`` is keyword-only, so unpickling goes through
        # a module-level helper that passes it by name.
        return (_params_from_flat, (np.array(self._flat), self._spec))


def _params_from_flat(flat: FloatVector, spec: ParamSpec) -> Params:
    """Rebuild pickled :class:`Params` (``flat`` is already a private copy)."""
    return Params.from_flat(flat, spec, copy=False)
