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
from fedshield.core.codec import (
    MAGIC,
    MAX_DEPTH,
    VERSION,
    decode,
    decode_tree,
    encode,
    encode_tree,
)
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


# -- trees ---------------------------------------------------------------------


def _tree_header(raw: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(raw[5:9], "big")
    return json.loads(raw[9 : 9 + size]), raw[9 + size :]


def test_a_tree_round_trips_with_every_leaf_type():
    params = Params({"w": np.array([[1.0, -2.5]], np.float32)})
    value = {
        "none": None,
        "flags": [True, False],
        "ints": (0, -(2**63), 2**64 - 1),
        "floats": [0.1, -0.0, 1e300, float("inf"), float("-inf")],
        "text": "héllo \u2603",
        "blob": b"\x00\xff" * 3,
        "params": params,
        "nested": {"m": {"l": [{}]}},
        "numpy": [np.float32(0.5), np.int64(3), np.bool_(True)],
    }
    back = decode_tree(encode_tree(value))
    assert list(back) == list(value)
    assert back["none"] is None and back["flags"] == (True, False)
    assert back["ints"] == (0, -(2**63), 2**64 - 1)
    assert back["floats"] == (0.1, -0.0, 1e300, float("inf"), float("-inf"))
    assert str(back["floats"][1]) == "-0.0"
    assert back["text"] == value["text"] and back["blob"] == value["blob"]
    assert back["params"] == params and back["params"].flat.flags.owndata
    assert back["nested"] == {"m": {"l": ({},)}}
    assert back["numpy"] == (0.5, 3, True)
    assert type(back["numpy"][1]) is int and type(back["numpy"][2]) is bool
    (nan,) = decode_tree(encode_tree([float("nan")]))
    assert np.isnan(nan)


def test_a_tree_sends_one_object_once():
    params = Params({"w": np.zeros(1000, np.float32)})
    one = encode_tree([params])
    many = encode_tree([params] * 50)
    assert len(many) < len(one) + 50 * 10
    back = decode_tree(many)
    assert back[0] is back[49]
    copy = Params.from_flat(params.flat, params.spec)  # equal, another object
    assert len(encode_tree([params, copy])) > 2 * 4000


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({1: "a"}, "not a string"),
        ({"a": object()}, r"\['a'\]: cannot send a object"),
        ([2**64], "beyond 64 bits"),
        ([-(2**63) - 1], "beyond 64 bits"),
        ({1.5}, "cannot send a set"),
    ],
)
def test_a_tree_refuses_to_send_what_it_cannot_hold(value, match):
    with pytest.raises(ProtocolError, match=match):
        encode_tree(value)


def test_a_tree_refuses_to_nest_too_deep():
    deep: list = []
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ProtocolError, match="deeper"):
        encode_tree(deep)
    header, payload = _tree_header(encode_tree([]))
    node: dict = {"l": []}
    for _ in range(MAX_DEPTH + 1):
        node = {"l": [node]}
    with pytest.raises(ProtocolError, match="deeper"):
        decode_tree(_with_header({**header, "body": node}, payload))


_TREE = {"type": "tree", "body": {"m": [["a", {"p": 0}], ["b", {"b": 0}]]}}


@pytest.mark.parametrize(
    ("header", "payload", "match"),
    [
        ({**_TREE, "tensors": [[["w", [2]]]], "blobs": [3]}, b"\0" * 10, "need 11"),
        ({**_TREE, "tensors": [[["w", [2]]]], "blobs": [3]}, b"\0" * 12, "need 11"),
        ({**_TREE, "tensors": [], "blobs": [3]}, b"\0" * 3, "refers to nothing"),
        ({**_TREE, "tensors": [[["w", [2]]]], "blobs": [-1]}, b"", "lengths >= 0"),
        (
            {**_TREE, "tensors": [[["w", [2]]], [["v", [1]]]], "blobs": [3]},
            b"\0" * 15,
            r"never refers to tensors \[1\]",
        ),
        (
            {"type": "tree", "body": [1], "tensors": [], "blobs": []},
            b"",
            "bare JSON array",
        ),
        (
            {"type": "tree", "body": {"x": 1}, "tensors": [], "blobs": []},
            b"",
            "unknown tree node tag",
        ),
        (
            {"type": "tree", "body": {"l": [], "m": []}, "tensors": [], "blobs": []},
            b"",
            "malformed tree node",
        ),
        (
            {"type": "tree", "body": {"f": "NaN"}, "tensors": [], "blobs": []},
            b"",
            "non-finite float",
        ),
        (
            {
                "type": "tree",
                "body": {"m": [["a", 1], ["a", 2]]},
                "tensors": [],
                "blobs": [],
            },
            b"",
            "repeats the key",
        ),
        (
            {"type": "tree", "body": {"m": [[1, 2]]}, "tensors": [], "blobs": []},
            b"",
            "not a string",
        ),
        (
            {"type": "tree", "body": {"p": True}, "tensors": [], "blobs": []},
            b"",
            "refers to nothing",
        ),
        (
            {"type": "tree", "body": 2**64, "tensors": [], "blobs": []},
            b"",
            "beyond 64 bits",
        ),
        ({"type": "tree", "body": None, "tensors": []}, b"", "missing keys"),
    ],
)
def test_malformed_trees_are_refused(header, payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode_tree(_with_header(header, payload))


def test_numbers_that_overflow_or_run_on_are_refused():
    for body in (b"1e400", b"-1e999", b"1" * 5000):
        text = b'{"type":"tree","body":' + body + b',"tensors":[],"blobs":[]}'
        message = MAGIC + bytes([VERSION]) + len(text).to_bytes(4, "big") + text
        with pytest.raises(ProtocolError):
            decode_tree(message)


def test_trees_and_the_other_messages_are_not_confused():
    with pytest.raises(ProtocolError, match="read it with decode_tree"):
        decode(encode_tree({"a": 1}))
    with pytest.raises(ProtocolError, match="expected a tree message"):
        decode_tree(encode(_update()))


def test_a_tree_over_the_limit_is_refused_first():
    raw = encode_tree({"blob": b"x" * 100})
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_tree(raw, max_bytes=len(raw) - 1)


_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.binary(max_size=6)
)
_TREES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(_TREES)
def test_tree_round_trip_property(value):
    assert decode_tree(encode_tree(value)) == value


@settings(max_examples=300, deadline=None)
@given(_TREES, st.integers(min_value=0), st.binary(min_size=1, max_size=3))
def test_a_changed_tree_decodes_or_raises_protocol_error(value, position, patch):
    raw = bytearray(encode_tree(value))
    at = position % len(raw)
    raw[at : at + len(patch)] = patch
    with contextlib.suppress(ProtocolError):
        decode_tree(bytes(raw))
