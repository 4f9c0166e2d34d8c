"""Tests of the streaming WeightedMean aggregator."""

from __future__ import annotations

import gc
import itertools
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from fedshield.core import (
    Aggregate,
    Aggregator,
    ClientUpdate,
    Params,
    ParamSpec,
    WeightedMean,
    aggregate,
)
from fedshield.errors import InvalidUpdateError


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _update(client_id: str, values: object, num_examples: int = 1) -> ClientUpdate:
    vector = np.asarray(values, dtype=np.float32).reshape(-1)
    spec = ParamSpec((("w", (vector.size,)),))
    return ClientUpdate(client_id, Params.from_flat(vector, spec), num_examples)


def _mean(pairs: list[tuple[ClientUpdate, float]]) -> Aggregate:
    spec = pairs[0][0].delta.spec
    return aggregate(WeightedMean(), pairs, spec, rng=_rng())


# ---------------------------------------------------------------- interface


def test_weighted_mean_is_a_streaming_aggregator() -> None:
    rule = WeightedMean()

    assert isinstance(rule, Aggregator)
    assert rule.is_streaming is True
    assert repr(rule) == "WeightedMean()"


# ---------------------------------------------------------------- hand-computed


def test_weighted_mean_hand_computed_case() -> None:
    # Prepare: (1*[1, 0, 2] + 2*[4, 3, -1] + 5*[0, 6, 1]) / 8
    #        = ([1, 0, 2] + [8, 6, -2] + [0, 30, 5]) / 8 = [9, 36, 5] / 8
    pairs = [
        (_update("a", [1.0, 0.0, 2.0]), 1.0),
        (_update("b", [4.0, 3.0, -1.0]), 2.0),
        (_update("c", [0.0, 6.0, 1.0]), 5.0),
    ]

    # Execute
    result = _mean(pairs)

    # Assert
    assert_allclose(result.delta["w"], [1.125, 4.5, 0.625], rtol=1e-6, atol=0)
    assert result.num_updates == 3
    assert result.total_weight == pytest.approx(8.0, rel=1e-12)
    assert result.delta.spec == pairs[0][0].delta.spec


def test_weighted_mean_keeps_named_shapes() -> None:
    spec = ParamSpec((("w", (2, 2)), ("b", (2,))))
    a = Params.from_flat(np.arange(6, dtype=np.float32), spec)
    b = Params.from_flat(np.arange(6, dtype=np.float32) + 3.0, spec)

    result = aggregate(
        WeightedMean(),
        [(ClientUpdate("a", a, 1), 2.0), (ClientUpdate("b", b, 1), 1.0)],
        spec,
        rng=_rng(),
    )

    # (2*x + (x + 3)) / 3 = x + 1
    assert_allclose(result.delta["w"], [[1.0, 2.0], [3.0, 4.0]], rtol=1e-6)
    assert_allclose(result.delta["b"], [5.0, 6.0], rtol=1e-6)
    assert result.delta.flat.dtype == np.float32


def test_weighted_mean_zero_weight_update_is_ignored_in_value() -> None:
    pairs = [(_update("a", [2.0, 4.0]), 1.0), (_update("b", [1e6, -1e6]), 0.0)]

    result = _mean(pairs)

    assert_array_equal(result.delta["w"], [2.0, 4.0])
    assert result.num_updates == 2
    assert result.total_weight == 1.0


def test_weighted_mean_accumulator_incremental_add_matches_aggregate() -> None:
    pairs = [(_update(str(k), [k, -k, 2 * k]), float(k + 1)) for k in range(5)]
    acc = WeightedMean().begin(pairs[0][0].delta.spec, rng=_rng())

    for update, weight in pairs:
        acc.add(update, weight)

    assert acc.result().delta == _mean(pairs).delta


def test_weighted_mean_accepts_integer_and_numpy_weights() -> None:
    pairs: list[tuple[ClientUpdate, float]] = [
        (_update("a", [1.0]), 3),
        (_update("b", [5.0]), np.float32(1.0)),  # type: ignore[list-item]
    ]

    assert_allclose(_mean(pairs).delta["w"], [2.0], rtol=1e-6)


def test_weighted_mean_does_not_modify_updates() -> None:
    pairs = [(_update("a", [1.0, 2.0]), 2.0), (_update("b", [3.0, 4.0]), 1.0)]
    before = [u.delta.flat.copy() for u, _ in pairs]

    result = _mean(pairs)

    for (update, _), old in zip(pairs, before, strict=True):
        assert_array_equal(update.delta.flat, old)
        assert not np.shares_memory(result.delta.flat, update.delta.flat)


def test_weighted_mean_accumulators_are_independent() -> None:
    spec = ParamSpec((("w", (2,)),))
    rule = WeightedMean()
    first = rule.begin(spec, rng=_rng())
    second = rule.begin(spec, rng=_rng())

    first.add(_update("a", [1.0, 1.0]), 1.0)
    second.add(_update("b", [5.0, 7.0]), 1.0)

    assert_array_equal(first.result().delta.flat, [1.0, 1.0])
    assert_array_equal(second.result().delta.flat, [5.0, 7.0])


# ---------------------------------------------------------------- properties


@st.composite
def _stack_and_weights(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    k = draw(st.integers(1, 20))
    d = draw(st.integers(1, 200))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    stack = (rng.uniform(-1.0, 1.0, size=(k, d)) * scale).astype(np.float32)
    weights = draw(
        st.lists(
            st.floats(1e-3, 1e4, allow_nan=False, allow_infinity=False),
            min_size=k,
            max_size=k,
        )
    )
    return stack, np.asarray(weights, dtype=np.float64)


@settings(max_examples=200, deadline=None)
@given(_stack_and_weights())
def test_weighted_mean_equals_numpy_average(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    # Prepare
    stack, weights = data
    spec = ParamSpec((("w", (stack.shape[1],)),))
    pairs = [
        (ClientUpdate(str(k), Params.from_flat(row, spec), 1), float(w))
        for k, (row, w) in enumerate(zip(stack, weights, strict=True))
    ]

    # Execute
    result = aggregate(WeightedMean(), pairs, spec, rng=_rng())

    # Assert: float32 accumulation against a float64 reference; the absolute
    # tolerance scales with the magnitude of the inputs.
    expected = np.average(stack.astype(np.float64), axis=0, weights=weights)
    scale = float(np.abs(stack).max())
    assert_allclose(result.delta.flat, expected, rtol=1e-5, atol=1e-6 * scale)
    assert result.num_updates == len(pairs)
    assert result.total_weight == pytest.approx(weights.sum(), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(_stack_and_weights(), st.randoms(use_true_random=False))
def test_weighted_mean_is_permutation_invariant(
    data: tuple[np.ndarray, np.ndarray], random: object
) -> None:
    stack, weights = data
    spec = ParamSpec((("w", (stack.shape[1],)),))
    pairs = [
        (ClientUpdate(str(k), Params.from_flat(row, spec), 1), float(w))
        for k, (row, w) in enumerate(zip(stack, weights, strict=True))
    ]
    shuffled = list(pairs)
    random.shuffle(shuffled)  # type: ignore[attr-defined]

    a = aggregate(WeightedMean(), pairs, spec, rng=_rng())
    b = aggregate(WeightedMean(), shuffled, spec, rng=_rng())

    scale = float(np.abs(stack).max())
    assert_allclose(a.delta.flat, b.delta.flat, rtol=1e-5, atol=1e-6 * scale)
    assert a.total_weight == pytest.approx(b.total_weight, rel=1e-12)


def test_weighted_mean_every_permutation_of_small_case_agrees() -> None:
    pairs = [
        (_update("a", [1.0, -2.0, 0.5]), 3.0),
        (_update("b", [4.0, 0.0, 0.25]), 1.0),
        (_update("c", [-1.0, 8.0, 2.0]), 4.0),
        (_update("d", [0.0, 1.0, -3.0]), 2.0),
    ]
    reference = _mean(pairs).delta.flat

    for order in itertools.permutations(pairs):
        assert_allclose(_mean(list(order)).delta.flat, reference, rtol=1e-6, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 30),
    values=st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=50
    ),
    weights=st.lists(st.floats(1e-3, 1e3), min_size=30, max_size=30),
)
def test_weighted_mean_of_equal_inputs_is_that_input(
    n: int, values: list[float], weights: list[float]
) -> None:
    pairs = [(_update(str(k), values), weights[k]) for k in range(n)]

    result = _mean(pairs)

    assert_allclose(
        result.delta.flat,
        np.asarray(values, dtype=np.float32),
        rtol=1e-5,
        atol=1e-30,
    )


# ---------------------------------------------------------------- errors


def test_weighted_mean_no_updates_raises() -> None:
    acc = WeightedMean().begin(ParamSpec((("w", (2,)),)), rng=_rng())

    with pytest.raises(InvalidUpdateError, match="positive weight"):
        acc.result()


def test_weighted_mean_zero_total_weight_raises() -> None:
    pairs = [(_update("a", [1.0, 2.0]), 0.0), (_update("b", [3.0, 4.0]), 0.0)]

    with pytest.raises(InvalidUpdateError, match="positive weight"):
        _mean(pairs)


@pytest.mark.parametrize(
    "weight", [-1.0, -1e-12, float("nan"), float("inf"), float("-inf")]
)
def test_weighted_mean_bad_weight_raises_and_leaves_state_unchanged(
    weight: float,
) -> None:
    acc = WeightedMean().begin(ParamSpec((("w", (2,)),)), rng=_rng())
    acc.add(_update("good", [1.0, 3.0]), 1.0)

    with pytest.raises(InvalidUpdateError, match="'bad'"):
        acc.add(_update("bad", [100.0, 100.0]), weight)

    result = acc.result()
    assert_array_equal(result.delta.flat, [1.0, 3.0])
    assert result.num_updates == 1


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"w": np.zeros(3)}, "shape"),
        ({"v": np.zeros(2)}, "missing parameter 'w'"),
        ({"w": np.zeros(2), "b": np.zeros(1)}, "unexpected parameter 'b'"),
    ],
    ids=["shape", "name", "extra"],
)
def test_weighted_mean_spec_mismatch_raises_and_leaves_state_unchanged(
    values: dict[str, np.ndarray], fragment: str
) -> None:
    acc = WeightedMean().begin(ParamSpec((("w", (2,)),)), rng=_rng())
    acc.add(_update("good", [1.0, 3.0]), 1.0)
    bad = ClientUpdate("bad", Params(values), 1)

    with pytest.raises(InvalidUpdateError, match=fragment):
        acc.add(bad, 1.0)

    result = acc.result()
    assert_array_equal(result.delta.flat, [1.0, 3.0])
    assert result.num_updates == 1
    assert result.total_weight == 1.0


# ---------------------------------------------------------------- memory


def _streamed_updates(
    spec: ParamSpec, count: int
) -> Iterator[tuple[ClientUpdate, float]]:
    for k in range(count):
        flat = np.full(spec.size, float(k), dtype=np.float32)
        yield ClientUpdate(str(k), Params.from_flat(flat, spec, copy=False), 1), 1.0


def _peak_bytes_of(func: object) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        func()  # type: ignore[operator]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start


def test_tracemalloc_sees_numpy_allocations() -> None:
    # Guards the streaming test below: if numpy buffers were invisible to
    # tracemalloc, a small peak would prove nothing.
    d = 250_000

    def stack() -> None:
        kept = [np.ones(d, dtype=np.float32) for _ in range(20)]
        assert len(kept) == 20

    assert _peak_bytes_of(stack) >= 20 * d * 4


def test_weighted_mean_streams_in_constant_memory() -> None:
    # Prepare: 200 updates of d values, 200 MB if they were ever stacked.
    d, count = 250_000, 200
    spec = ParamSpec((("w", (d,)),))
    results: list[Aggregate] = []

    # Execute
    def run() -> None:
        results.append(
            aggregate(WeightedMean(), _streamed_updates(spec, count), spec, rng=_rng())
        )

    # Warm up once so that importing the BLAS binding on first use (module
    # objects, not update buffers) is not counted.
    aggregate(WeightedMean(), _streamed_updates(spec, 2), spec, rng=_rng())
    peak = _peak_bytes_of(run)

    # Assert: a handful of d-sized buffers at most (accumulator, the update
    # in flight, the result), never anything proportional to the count.
    assert peak < 10 * d * 4, f"peak {peak / 1e6:.1f} MB for d={d}, {count} updates"
    result = results[0]
    assert result.num_updates == count
    assert_allclose(result.delta.flat, np.full(d, (count - 1) / 2), rtol=1e-6)
