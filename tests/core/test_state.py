"""Tests of ServerState: immutable, and serialised without pickle."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from fedshield.core import Params, ServerState
from fedshield.errors import CheckpointError


def _state() -> ServerState:
    params = Params({"w": np.arange(6.0).reshape(2, 3), "b": [0.5, -1.5, 2.25]})
    return ServerState(
        round_idx=3,
        params=params,
        optimizer_state={
            "momentum": params * 0.1,
            "second": Params({"v": [1.0, 2.0]}),
            "a_first": Params({"x": [[3.0]]}),
        },
        metadata={"fingerprint": "abc123", "epsilon": 1.25, "nested": {"k": [1, 2]}},
    )


# ---------------------------------------------------------------- immutability


def test_server_state_is_frozen() -> None:
    state = _state()

    with pytest.raises(dataclasses.FrozenInstanceError):
        state.round_idx = 4  # type: ignore[misc]


def test_server_state_evolve_returns_new_object_and_keeps_original() -> None:
    state = _state()
    new_params = state.params * 2.0

    evolved = state.evolve(round_idx=4, params=new_params)

    assert evolved is not state
    assert evolved.round_idx == 4
    assert evolved.params == new_params
    assert evolved.optimizer_state == state.optimizer_state
    assert evolved.metadata == state.metadata
    assert state.round_idx == 3
    assert state.params == _state().params


def test_server_state_evolve_unknown_field_raises() -> None:
    with pytest.raises(TypeError):
        _state().evolve(no_such_field=1)


def test_server_state_negative_round_raises() -> None:
    with pytest.raises(ValueError, match="round_idx"):
        ServerState(round_idx=-1, params=Params({"w": [1.0]}))


def test_server_state_defaults_are_empty_and_not_shared() -> None:
    a = ServerState(round_idx=0, params=Params({"w": [1.0]}))
    b = ServerState(round_idx=0, params=Params({"w": [1.0]}))

    assert a.optimizer_state == {}
    assert a.metadata == {}
    assert a.optimizer_state is not b.optimizer_state


# ---------------------------------------------------------------- round trip


def test_server_state_bytes_round_trip() -> None:
    # Prepare
    state = _state()

    # Execute
    loaded = ServerState.from_bytes(state.to_bytes())

    # Assert
    assert loaded == state
    assert loaded.round_idx == 3
    assert loaded.params.spec == state.params.spec
    assert_array_equal(loaded.params["w"], state.params["w"])
    assert set(loaded.optimizer_state) == {"momentum", "second", "a_first"}
    for key, value in state.optimizer_state.items():
        assert loaded.optimizer_state[key].spec == value.spec, key
        assert_array_equal(loaded.optimizer_state[key].flat, value.flat)
    assert loaded.metadata == {
        "fingerprint": "abc123",
        "epsilon": 1.25,
        "nested": {"k": [1, 2]},
    }


def test_server_state_round_trip_is_bit_exact_for_awkward_floats() -> None:
    values = np.array(
        [np.finfo(np.float32).tiny, -0.0, 1e-45, 3.4e38, np.pi], dtype=np.float32
    )
    state = ServerState(round_idx=0, params=Params({"w": values}))

    loaded = ServerState.from_bytes(state.to_bytes())

    assert loaded.params.flat.tobytes() == values.tobytes()


def test_server_state_round_trip_without_optimizer_state() -> None:
    state = ServerState(round_idx=0, params=Params({"w": [1.0, 2.0]}))

    loaded = ServerState.from_bytes(state.to_bytes())

    assert loaded == state
    assert loaded.optimizer_state == {}
    assert loaded.metadata == {}


def test_server_state_loaded_params_are_read_only() -> None:
    loaded = ServerState.from_bytes(_state().to_bytes())

    assert not loaded.params.flat.flags.writeable
    assert not loaded.optimizer_state["momentum"].flat.flags.writeable


def test_server_state_to_bytes_is_deterministic() -> None:
    assert _state().to_bytes() == _state().to_bytes()


def test_server_state_archive_needs_no_pickle() -> None:
    data = _state().to_bytes()

    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        for name in archive.files:
            assert archive[name].dtype != object, name


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "data",
    [b"", b"not a checkpoint", b"PK\x03\x04" + b"\x00" * 40],
    ids=["empty", "text", "broken-zip"],
)
def test_server_state_from_garbage_raises_checkpoint_error(data: bytes) -> None:
    with pytest.raises(CheckpointError, match="corrupt"):
        ServerState.from_bytes(data)


def test_server_state_truncated_bytes_raise_checkpoint_error() -> None:
    data = _state().to_bytes()

    with pytest.raises(CheckpointError):
        ServerState.from_bytes(data[: len(data) // 2])


def test_server_state_flipped_bytes_raise_checkpoint_error() -> None:
    # Flipping every byte of the archive's middle breaks its zip structure or
    # its CRC; either way loading must fail with CheckpointError.
    data = bytearray(_state().to_bytes())
    middle = len(data) // 2
    for i in range(middle - 8, middle + 8):
        data[i] ^= 0xFF

    with pytest.raises(CheckpointError):
        ServerState.from_bytes(bytes(data))


def _archive(header: object, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    encoded = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    np.savez(buffer, header=encoded, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def test_server_state_wrong_format_raises_checkpoint_error() -> None:
    data = _archive(
        {
            "format": "someone.else/9",
            "round_idx": 0,
            "spec": [["w", [1]]],
            "optimizer_specs": {},
            "metadata": {},
        },
        params=np.zeros(1, np.float32),
    )

    with pytest.raises(CheckpointError, match=r"someone\.else/9"):
        ServerState.from_bytes(data)


def test_server_state_missing_format_raises_checkpoint_error() -> None:
    data = _archive({"round_idx": 0}, params=np.zeros(1, np.float32))

    with pytest.raises(CheckpointError, match="not a fedshield server state"):
        ServerState.from_bytes(data)


def test_server_state_header_not_object_raises_checkpoint_error() -> None:
    data = _archive([1, 2, 3], params=np.zeros(1, np.float32))

    with pytest.raises(CheckpointError):
        ServerState.from_bytes(data)


def test_server_state_params_size_mismatch_raises_checkpoint_error() -> None:
    data = _archive(
        {
            "format": "fedshield.ServerState/1",
            "round_idx": 0,
            "spec": [["w", [3]]],
            "optimizer_specs": {},
            "metadata": {},
        },
        params=np.zeros(2, np.float32),
    )

    with pytest.raises(CheckpointError, match="corrupt"):
        ServerState.from_bytes(data)


def test_server_state_missing_optimizer_array_raises_checkpoint_error() -> None:
    data = _archive(
        {
            "format": "fedshield.ServerState/1",
            "round_idx": 0,
            "spec": [["w", [1]]],
            "optimizer_specs": {"momentum": [["w", [1]]]},
            "metadata": {},
        },
        params=np.zeros(1, np.float32),
    )

    with pytest.raises(CheckpointError, match="corrupt"):
        ServerState.from_bytes(data)


def test_server_state_pickled_archive_is_refused() -> None:
    # An .npz holding an object array would need pickle to load: refused.
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(CheckpointError):
        ServerState.from_bytes(buffer.getvalue())


def _good_header() -> dict[str, object]:
    return {
        "format": "fedshield.ServerState/1",
        "round_idx": 0,
        "spec": [["w", [1]]],
        "optimizer_specs": {},
        "metadata": {},
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("round_idx", None),
        ("metadata", None),
        ("spec", None),
        ("round_idx", -2),
        ("round_idx", "three"),
        ("metadata", [1, 2]),
    ],
    ids=[
        "no-round",
        "no-metadata",
        "no-spec",
        "negative-round",
        "text-round",
        "list-metadata",
    ],
)
def test_server_state_bad_header_field_raises_checkpoint_error(
    key: str, value: object
) -> None:
    header = _good_header()
    if value is None:
        del header[key]
    else:
        header[key] = value
    data = _archive(header, params=np.zeros(1, np.float32))

    with pytest.raises(CheckpointError, match="corrupt"):
        ServerState.from_bytes(data)


def test_server_state_good_hand_written_header_loads() -> None:
    # The control for the test above: the same archive, unbroken, loads.
    data = _archive(_good_header(), params=np.ones(1, np.float32))

    state = ServerState.from_bytes(data)

    assert state.round_idx == 0
    assert state.params == Params({"w": [1.0]})


def test_a_non_finite_metadata_number_round_trips_in_strict_json() -> None:
    # An unbounded epsilon (PLD at delta = 1e-300) once made the checkpoint's
    # header say Infinity, which strict JSON parsers refuse.
    params = Params({"w": np.zeros(3, np.float32)})
    state = ServerState(
        round_idx=2,
        params=params,
        metadata={"privacy": {"epsilon": float("inf"), "list": [float("-inf"), 1.0]}},
    )
    data = state.to_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        text = bytes(archive["header"]).decode("utf-8")

    def refuse(name: str) -> float:
        raise ValueError(name)

    json.loads(text, parse_constant=refuse)  # strict
    back = ServerState.from_bytes(data)
    assert back.metadata["privacy"]["epsilon"] == float("inf")
    assert back.metadata["privacy"]["list"] == [float("-inf"), 1.0]
