"""Tests of ClientUpdate and validate_update."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedshield.core import ClientUpdate, Params, ParamSpec, validate_update
from fedshield.errors import InvalidUpdateError

SPEC = ParamSpec((("w", (2, 3)), ("b", (3,))))


def _delta(**overrides: object) -> Params:
    arrays: dict[str, object] = {"w": np.ones((2, 3)), "b": np.zeros(3)}
    arrays.update(overrides)
    return Params(arrays)  # type: ignore[arg-type]


def _update(delta: object = None, num_examples: object = 10) -> ClientUpdate:
    return ClientUpdate(
        "client-7",
        _delta() if delta is None else delta,  # type: ignore[arg-type]
        num_examples,  # type: ignore[arg-type]
    )


def test_client_update_is_frozen_and_has_empty_metrics() -> None:
    update = _update()

    assert update.metrics == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        update.num_examples = 3  # type: ignore[misc]


def test_validate_update_good_update_passes_and_is_returned() -> None:
    update = _update()

    assert validate_update(update, SPEC) is update


def test_validate_update_numpy_integer_num_examples_passes() -> None:
    update = _update(num_examples=np.int64(5))

    assert validate_update(update, SPEC, max_examples=5) is update


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_validate_update_non_finite_value_rejected(value: float) -> None:
    w = np.ones((2, 3))
    w[1, 2] = value
    update = _update(_delta(w=w))

    with pytest.raises(InvalidUpdateError, match="1 NaN or infinite"):
        validate_update(update, SPEC)


def test_validate_update_counts_every_non_finite_value() -> None:
    update = _update(_delta(w=np.full((2, 3), np.nan), b=[np.inf, 0.0, -np.inf]))

    with pytest.raises(InvalidUpdateError, match="8 NaN or infinite"):
        validate_update(update, SPEC)


def test_validate_update_wrong_shape_rejected() -> None:
    update = _update(_delta(w=np.ones((3, 2))))

    with pytest.raises(InvalidUpdateError, match=r"'w' has shape \(3, 2\)"):
        validate_update(update, SPEC)


def test_validate_update_missing_param_rejected() -> None:
    update = _update(Params({"w": np.ones((2, 3))}))

    with pytest.raises(InvalidUpdateError, match="missing parameter 'b'"):
        validate_update(update, SPEC)


def test_validate_update_extra_param_rejected() -> None:
    update = _update(_delta(extra=[1.0]))

    with pytest.raises(InvalidUpdateError, match="unexpected parameter 'extra'"):
        validate_update(update, SPEC)


def test_validate_update_wrong_order_rejected() -> None:
    update = _update(Params({"b": np.zeros(3), "w": np.ones((2, 3))}))

    with pytest.raises(InvalidUpdateError, match="different order"):
        validate_update(update, SPEC)


@pytest.mark.parametrize(
    "num_examples",
    [0, -1, True, False, 2.0, "10", None],
    ids=["zero", "negative", "true", "false", "float", "str", "none"],
)
def test_validate_update_bad_num_examples_rejected(num_examples: object) -> None:
    update = _update(num_examples=num_examples)

    with pytest.raises(InvalidUpdateError, match="num_examples must be a positive"):
        validate_update(update, SPEC)


def test_validate_update_too_many_examples_rejected() -> None:
    update = _update(num_examples=1001)

    with pytest.raises(InvalidUpdateError, match="num_examples must be <= 1000"):
        validate_update(update, SPEC, max_examples=1000)


def test_validate_update_max_examples_is_inclusive() -> None:
    update = _update(num_examples=1000)

    assert validate_update(update, SPEC, max_examples=1000) is update


@pytest.mark.parametrize(
    "thing",
    [None, {"w": np.ones((2, 3))}, _delta(), ("client", _delta(), 10)],
    ids=["none", "dict", "params", "tuple"],
)
def test_validate_update_not_a_client_update_rejected(thing: object) -> None:
    with pytest.raises(InvalidUpdateError, match="expected a ClientUpdate"):
        validate_update(thing, SPEC)


def test_validate_update_delta_not_params_rejected() -> None:
    update = _update(delta={"w": np.ones((2, 3)), "b": np.zeros(3)})

    with pytest.raises(InvalidUpdateError, match="delta must be Params; got dict"):
        validate_update(update, SPEC)


def test_validate_update_message_names_client_and_every_problem() -> None:
    update = _update(Params({"w": np.ones((3, 2))}), num_examples=0)

    with pytest.raises(InvalidUpdateError) as info:
        validate_update(update, SPEC)

    message = str(info.value)
    assert "'client-7'" in message
    assert "missing parameter 'b'" in message
    assert "'w' has shape" in message
    assert "num_examples" in message


def test_invalid_update_error_is_a_value_error_with_exit_code() -> None:
    with pytest.raises(ValueError) as info:
        validate_update(None, SPEC)

    assert isinstance(info.value, InvalidUpdateError)
    assert info.value.exit_code == 31
