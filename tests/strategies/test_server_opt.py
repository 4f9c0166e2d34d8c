"""Tests of the server optimizers."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedshield.core import Params
from fedshield.errors import ConfigError, InvalidUpdateError
from fedshield.strategies import ServerSgd


def _params() -> Params:
    return Params({"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5, -0.5]})


def test_server_sgd_lr_one_adds_delta() -> None:
    params = _params()
    delta = Params({"w": [[0.5, -1.0], [0.0, 2.0]], "b": [1.0, 1.0]})

    new, state = ServerSgd(1.0).step(params, delta, {})

    assert_array_equal(new["w"], [[1.5, 1.0], [3.0, 6.0]])
    assert_array_equal(new["b"], [1.5, 0.5])
    assert new.spec == params.spec
    assert state == {}


@pytest.mark.parametrize("lr", [0.1, 0.5, 2.0, 3.7])
def test_server_sgd_scales_delta_by_lr(lr: float) -> None:
    params = _params()
    delta = Params({"w": [[1.0, -2.0], [4.0, 0.0]], "b": [8.0, -8.0]})

    new, _ = ServerSgd(lr).step(params, delta, {})

    assert_allclose(new.flat, params.flat + lr * delta.flat, rtol=1e-6, atol=1e-6)


def test_server_sgd_does_not_modify_inputs() -> None:
    params, delta = _params(), _params() * 0.5
    before_p, before_d = params.flat.copy(), delta.flat.copy()

    new, _ = ServerSgd(0.3).step(params, delta, {})

    assert_array_equal(params.flat, before_p)
    assert_array_equal(delta.flat, before_d)
    assert new is not params
    assert not new.flat.flags.writeable


def test_server_sgd_init_has_no_state() -> None:
    assert dict(ServerSgd().init(_params())) == {}


def test_server_sgd_passes_state_through() -> None:
    state = {"unused": _params()}

    _, new_state = ServerSgd(0.5).step(_params(), _params(), state)

    assert new_state == state


def test_server_sgd_spec_mismatch_raises() -> None:
    with pytest.raises(InvalidUpdateError):
        ServerSgd(1.0).step(_params(), Params({"w": np.zeros((2, 2))}), {})
    with pytest.raises(InvalidUpdateError):
        ServerSgd(0.5).step(_params(), Params({"w": np.zeros((2, 2))}), {})


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan")])
def test_server_sgd_invalid_lr_raises_config_error(lr: float) -> None:
    with pytest.raises(ConfigError, match="server_lr"):
        ServerSgd(lr)


def test_server_sgd_default_lr_is_one() -> None:
    assert ServerSgd().server_lr == 1.0
