"""The strict binary codec: round trips, refusals, and fuzzing."""

from __future__ import annotations

import contextlib
import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshield.core import ClientUpdate, Params
from fedshield.core.codec import MAGIC, VERSION, decode, encode
from fedshield.errors import ProtocolError


def _update() -> ClientUpdate:
    rng = np.random.default_rng(0)
    delta = Params(
        {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.ones(2, np.float32)}
    )
    return ClientUpdate(
        "site-a",
        delta,
        12,
        {"loss": 0.25, "accuracy": 1.0},
        extras={"scaffold/delta_c": delta * 0.5},
        state={"c": delta * 2.0},
    )


def test_an_update_round_trips_exactly():
    update = _update()
    back = decode(encode(update))
    assert isinstance(back, ClientUpdate)
    assert (back.client_id, back.num_examples) == ("site-a", 12)
    assert dict(back.metrics) == {"loss": 0.25, "accuracy": 1.0}
    assert back.delta.spec == update.delta.spec
    assert np.array_equal(back.delta.flat, update.delta.flat)
    assert np.array_equal(
        back.extras["scaffold/delta_c"].flat, update.extras["scaffold/delta_c"].flat
    )
    assert np.array_equal(back.state["c"].flat, update.state["c"].flat)


def test_params_round_trip_with_nan_kept_for_the_rounds_own_check():
    params = Params({"w": np.array([1.0, np.nan, -np.inf], np.float32)})
    back = decode(encode(params))
    assert isinstance(back, Params)
    assert np.array_equal(back.flat, params.flat, equal_nan=True)


def test_a_pickle_is_refused_and_never_unpickled():
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (pytest.fail, ("unpickled",))

    with pytest.raises(ProtocolError, match="not a fedshield message"):
        decode(pickle.dumps(Boom()))


def _with_header(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + bytes([VERSION]) + len(text).to_bytes(4, "big") + text + payload


GOOD = {"type": "params", "spec": [["w", [2]]]}


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (MAGIC + bytes([VERSION + 1]) + b"\0\0\0\0", "version"),
        (MAGIC + bytes([VERSION]) + b"\0\0\1\0{}", "overruns"),
        (_with_header(GOOD, b"\0" * 4), "payload holds 4 bytes"),
        (_with_header(GOOD, b"\0" * 12), "payload holds 12 bytes"),
        (_with_header({**GOOD, "extra": 1}, b"\0" * 8), "unknown keys"),
        (_with_header({"type": "params"}), "missing keys"),
        (_with_header({"type": "shell", "spec": []}), "unknown message type"),
        (_with_header({"type": "params", "spec": [["w", [-1]]]}), "malformed"),
        (_with_header({"type": "params", "spec": [["w", [True]]]}), "malformed"),
        (
            _with_header({"type": "params", "spec": [["w", [1]], ["w", [1]]]}),
            "spec",
        ),
        (
            MAGIC
            + bytes([VERSION])
            + (29).to_bytes(4, "big")
            + b'{"type":"params","type":"x"}x',
            "repeats the key|not UTF-8 JSON",
        ),
    ],
)
def test_malformed_messages_are_refused(message, match):
    with pytest.raises(ProtocolError, match=match):
        decode(message)


def test_update_fields_are_typed_strictly():
    raw = encode(_update())
    size = int.from_bytes(raw[5:9], "big")
    header = json.loads(raw[9 : 9 + size])
    payload = raw[9 + size :]
    for key, bad in (
        ("num_examples", True),
        ("num_examples", -1),
        ("client_id", ""),
        ("metrics", {"loss": "low"}),
    ):
        with pytest.raises(ProtocolError):
            decode(_with_header({**header, key: bad}, payload))


def test_the_size_limit_is_checked_first():
    raw = encode(_update())
    with pytest.raises(ProtocolError, match="over the limit"):
        decode(raw, max_bytes=len(raw) - 1)


def test_non_finite_metrics_are_not_sent():
    update = _update()
    bad = ClientUpdate("a", update.delta, 1, {"loss": float("nan")})
    with pytest.raises(ProtocolError, match="finite"):
        encode(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_either_decode_or_raise_protocol_error(data):
    # Anything but a ProtocolError (an IndexError, a ValueError...) fails.
    with contextlib.suppress(ProtocolError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_caught_or_harmless(position, value):
    raw = bytearray(encode(_update()))
    raw[position % len(raw)] = value
    try:
        back = decode(bytes(raw))
    except ProtocolError:
        return
    # A change inside the float payload or a metric's digits decodes to
    # another well-formed update of the same layout: the codec transports,
    # the round validates values.
    assert isinstance(back, ClientUpdate)
    assert back.delta.spec.size == _update().delta.spec.size


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=8),
            st.lists(st.integers(0, 4), max_size=3),
        ),
        min_size=1,
        max_size=4,
        unique_by=lambda t: t[0],
    ),
    st.dictionaries(
        st.text(max_size=8),
        st.floats(allow_nan=False, allow_infinity=False),
        max_size=4,
    ),
    st.integers(0, 10**6),
)
def test_round_trip_property(entries, metrics, count):
    tensors = {
        name: np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
        for name, shape in entries
    }
    update = ClientUpdate("c", Params(tensors), count, metrics)
    back = decode(encode(update))
    assert isinstance(back, ClientUpdate)
    assert back.delta.spec == update.delta.spec
    assert np.array_equal(back.delta.flat, update.delta.flat)
    assert dict(back.metrics) == {k: float(v) for k, v in metrics.items()}
    assert back.num_examples == count
