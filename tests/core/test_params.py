"""Tests of Params and ParamSpec: one flat read-only buffer behind named views."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedshield.core import Params, ParamSpec
from fedshield.errors import InvalidUpdateError


def _params() -> Params:
    return Params({"w": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "b": [7.0, 8.0, 9.0]})


# ---------------------------------------------------------------- ParamSpec


def test_paramspec_size_and_names_follow_entries() -> None:
    spec = ParamSpec((("w", (2, 3)), ("b", (3,)), ("s", ())))

    assert spec.size == 2 * 3 + 3 + 1
    assert spec.names == ("w", "b", "s")


def test_paramspec_duplicate_names_raise() -> None:
    with pytest.raises(ValueError, match="unique"):
        ParamSpec((("w", (2,)), ("w", (3,))))


def test_paramspec_negative_shape_raises() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        ParamSpec((("w", (2, -1)),))


def test_paramspec_json_round_trip_is_equal() -> None:
    spec = ParamSpec((("w", (2, 3)), ("b", (3,)), ("s", ())))

    assert ParamSpec.from_json(spec.to_json()) == spec


def test_paramspec_mismatches_equal_specs_is_empty() -> None:
    spec = ParamSpec((("w", (2, 3)), ("b", (3,))))

    assert spec.mismatches(ParamSpec((("w", (2, 3)), ("b", (3,))))) == []


def test_paramspec_mismatches_lists_every_problem() -> None:
    # Prepare
    expected = ParamSpec((("w", (2, 3)), ("b", (3,)), ("gone", (1,))))
    received = ParamSpec((("w", (3, 2)), ("b", (3,)), ("extra", (4,))))

    # Execute
    problems = expected.mismatches(received)

    # Assert
    assert len(problems) == 3
    text = "\n".join(problems)
    assert "missing parameter 'gone'" in text
    assert "unexpected parameter 'extra'" in text
    assert "'w'" in text
    assert "(3, 2)" in text
    assert "(2, 3)" in text


def test_paramspec_mismatches_reports_different_order() -> None:
    a = ParamSpec((("w", (2,)), ("b", (3,))))
    b = ParamSpec((("b", (3,)), ("w", (2,))))

    assert a.mismatches(b) == ["parameters are in a different order"]


# ---------------------------------------------------------------- construction


def test_params_init_converts_to_float32_and_keeps_values() -> None:
    p = Params({"w": np.arange(6, dtype=np.float64).reshape(2, 3), "b": [1, 2]})

    assert p.flat.dtype == np.float32
    assert p["w"].dtype == np.float32
    assert p["w"].shape == (2, 3)
    assert_array_equal(p["w"], np.arange(6).reshape(2, 3))
    assert_array_equal(p["b"], [1.0, 2.0])
    assert p.spec == ParamSpec((("w", (2, 3)), ("b", (2,))))


def test_params_init_copies_its_input() -> None:
    source = np.array([1.0, 2.0], dtype=np.float32)
    p = Params({"w": source})

    source[0] = 99.0

    assert_array_equal(p["w"], [1.0, 2.0])
    assert source.flags.writeable


def test_params_flat_concatenates_arrays_in_spec_order() -> None:
    p = _params()

    assert_array_equal(p.flat, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert p.flat.flags.c_contiguous
    assert p.flat.ndim == 1


def test_params_mapping_protocol() -> None:
    p = _params()

    assert list(p) == ["w", "b"]
    assert len(p) == 2
    assert "w" in p
    assert "x" not in p
    with pytest.raises(KeyError):
        p["x"]


def test_params_zeros_has_spec_and_zero_values() -> None:
    spec = ParamSpec((("w", (2, 2)), ("b", (2,))))

    p = Params.zeros(spec)

    assert p.spec == spec
    assert_array_equal(p.flat, np.zeros(6))


def test_params_empty_mapping_is_allowed() -> None:
    p = Params({})

    assert len(p) == 0
    assert p.flat.size == 0
    assert p.norm() == 0.0


# ---------------------------------------------------------------- read-only, shared


def test_params_flat_is_read_only() -> None:
    p = _params()

    with pytest.raises(ValueError, match="read-only"):
        p.flat[0] = 1.0


def test_params_named_views_are_read_only() -> None:
    p = _params()

    with pytest.raises(ValueError, match="read-only"):
        p["w"][0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        p["b"][...] = 0.0


def test_params_named_views_cannot_be_made_writeable() -> None:
    p = _params()

    with pytest.raises(ValueError):
        p["w"].flags.writeable = True


def test_params_named_views_share_memory_with_flat() -> None:
    p = _params()

    for name in p:
        assert np.shares_memory(p[name], p.flat), name
    # Views are exactly the right window of the buffer, in order.
    flat_address = p.flat.__array_interface__["data"][0]
    assert p["w"].__array_interface__["data"][0] == flat_address
    assert p["b"].__array_interface__["data"][0] == flat_address + 6 * 4


def test_params_flat_is_not_copied_on_access() -> None:
    p = _params()

    assert p.flat is p.flat
    assert p["w"] is p["w"]


# ---------------------------------------------------------------- from_flat


def test_params_from_flat_copy_false_takes_contiguous_float32_without_copy() -> None:
    spec = ParamSpec((("w", (2, 3)),))
    vector = np.arange(6, dtype=np.float32)

    p = Params.from_flat(vector, spec, copy=False)

    assert np.shares_memory(p.flat, vector)
    assert not vector.flags.writeable


def test_params_from_flat_copy_false_on_matrix_row_does_not_copy() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    spec = ParamSpec((("w", (4,)),))

    p = Params.from_flat(matrix[1], spec, copy=False)

    assert np.shares_memory(p.flat, matrix[1])
    assert_array_equal(p["w"], [4, 5, 6, 7])
    assert matrix.flags.writeable  # only the row view was frozen


def test_params_from_flat_default_copies() -> None:
    spec = ParamSpec((("w", (3,)),))
    vector = np.array([1.0, 2.0, 3.0], dtype=np.float32)

    p = Params.from_flat(vector, spec)
    vector[0] = 99.0

    assert not np.shares_memory(p.flat, vector)
    assert_array_equal(p.flat, [1.0, 2.0, 3.0])
    assert vector.flags.writeable


@pytest.mark.parametrize(
    "vector",
    [
        np.arange(3, dtype=np.float64),
        np.arange(6, dtype=np.float32)[::2],
        [0.0, 1.0, 2.0],
    ],
    ids=["float64", "strided", "list"],
)
def test_params_from_flat_copy_false_converts_when_needed(vector: object) -> None:
    spec = ParamSpec((("w", (3,)),))

    p = Params.from_flat(vector, spec, copy=False)  # type: ignore[arg-type]

    assert p.flat.dtype == np.float32
    assert p.flat.flags.c_contiguous
    assert not p.flat.flags.writeable
    assert_array_equal(p.flat, np.asarray(vector, dtype=np.float32))


@pytest.mark.parametrize(
    "vector",
    [np.zeros(5, np.float32), np.zeros(7, np.float32), np.zeros((2, 3), np.float32)],
    ids=["short", "long", "2d"],
)
def test_params_from_flat_wrong_size_raises_invalid_update(vector: object) -> None:
    spec = ParamSpec((("w", (2, 3)),))

    with pytest.raises(InvalidUpdateError, match=r"\(6,\)"):
        Params.from_flat(vector, spec)  # type: ignore[arg-type]


def test_params_from_flat_restores_named_shapes() -> None:
    spec = ParamSpec((("w", (2, 3)), ("b", (3,))))

    p = Params.from_flat(np.arange(9, dtype=np.float32), spec)

    assert_array_equal(p["w"], [[0, 1, 2], [3, 4, 5]])
    assert_array_equal(p["b"], [6, 7, 8])


# ---------------------------------------------------------------- arithmetic


def test_params_add_sub_mul_elementwise() -> None:
    p = _params()
    q = Params.from_flat(np.full(9, 0.5, dtype=np.float32), p.spec)

    assert_allclose((p + q).flat, p.flat + 0.5, rtol=0, atol=0)
    assert_allclose((p - q).flat, p.flat - 0.5, rtol=0, atol=0)
    assert_allclose((p * 2.0).flat, p.flat * 2.0, rtol=0, atol=0)
    assert_allclose((3.0 * p).flat, p.flat * 3.0, rtol=0, atol=0)


def test_params_arithmetic_returns_new_params_with_same_spec() -> None:
    p = _params()
    before = p.flat.copy()

    results = [p + p, p - p, p * 2.0, 2.0 * p]

    for r in results:
        assert isinstance(r, Params)
        assert r.spec == p.spec
        assert r["w"].shape == (2, 3)
        assert not np.shares_memory(r.flat, p.flat)
        assert not r.flat.flags.writeable
        assert r.flat.dtype == np.float32
    assert_array_equal(p.flat, before)


@pytest.mark.parametrize("op", ["add", "sub"])
def test_params_arithmetic_spec_mismatch_raises(op: str) -> None:
    p = _params()
    other = Params({"w": np.zeros((3, 2)), "b": np.zeros(3)})

    with pytest.raises(InvalidUpdateError, match="'w'"):
        if op == "add":
            p + other
        else:
            p - other


def test_params_norm_is_l2_norm() -> None:
    p = Params({"w": [[3.0, 0.0]], "b": [4.0]})

    assert p.norm() == pytest.approx(5.0, rel=1e-12)


def test_params_is_finite() -> None:
    assert _params().is_finite()
    assert not Params({"w": [1.0, np.nan]}).is_finite()
    assert not Params({"w": [1.0, -np.inf]}).is_finite()


# ---------------------------------------------------------------- equality, pickle


def test_params_equal_when_spec_and_values_equal() -> None:
    assert _params() == _params()
    assert _params() != _params() * 2.0


def test_params_not_equal_when_spec_differs_even_with_same_values() -> None:
    a = Params({"w": [1.0, 2.0]})
    b = Params({"v": [1.0, 2.0]})
    c = Params({"w": [[1.0, 2.0]]})

    assert a != b
    assert a != c


def test_params_not_equal_to_other_types() -> None:
    p = Params({"w": [1.0]})

    assert p != {"w": np.array([1.0], dtype=np.float32)}
    assert p != 1.0


def test_params_is_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(_params())


def test_params_pickle_round_trip() -> None:
    p = _params()

    q = pickle.loads(pickle.dumps(p))

    assert q == p
    assert q.spec == p.spec
    assert not q.flat.flags.writeable
    assert not q["w"].flags.writeable
    assert np.shares_memory(q["w"], q.flat)
    assert not np.shares_memory(q.flat, p.flat)


def test_params_deepcopy_is_equal_and_independent() -> None:
    p = _params()

    q = copy.deepcopy(p)

    assert q == p
    assert not np.shares_memory(q.flat, p.flat)


def test_params_repr_mentions_counts() -> None:
    text = repr(Params({"w": [[3.0, 0.0]], "b": [4.0]}))

    assert "2 arrays" in text
    assert "3 values" in text
