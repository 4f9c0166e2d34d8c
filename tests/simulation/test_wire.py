"""The wire format of stage messages, and the backends that carry it.

Round trips of every message type, refusals of malformed, oversized,
truncated and unknown messages, fuzzing (random bytes, changed bytes,
changed trees), and what a pool backend does with a reply that is not a
wire message: that client fails as ``rejected``, the round goes on, and
nothing the worker sent is run.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import os
import pickle
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params
from fedshield.core.codec import decode_tree, encode_tree
from fedshield.errors import ProtocolError
from fedshield.privacy.distributed import DdgParameters
from fedshield.secagg.protocol import SecAggConfig
from fedshield.simulation import (
    ClientFailure,
    EvaluateIns,
    FailureKind,
    FitIns,
    FitReceipt,
    HoldUpdate,
    ProcessPoolBackend,
    StageReply,
    StageRequest,
    run_round,
)
from fedshield.simulation.secure_client import InputPlan, SecureSetup, SecureStageIns
from fedshield.simulation.wire import (
    WorkerReady,
    decode_ready,
    decode_reply,
    decode_request,
    encode_ready,
    encode_reply,
    encode_request,
)
from fedshield.strategies import FedAvg

ROOT = Path(__file__).resolve().parents[2]
# Worker processes unpickle this module's client_fn classes by name
# (``tests.simulation.test_wire``); spawned workers inherit this sys.path.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from tests.simulation.fakes import SPEC_PARAMS, MeanClient, NanClient  # noqa: E402

PARAMS = Params({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [0.5, -1.0]})


def _fit_config(**changes: Any) -> FitConfig:
    config = FitConfig(
        round_idx=3,
        epochs=2,
        batch_size=16,
        lr=0.05,
        momentum=0.9,
        weight_decay=1,  # an int where a float is usual: kept an int
        options={"proximal_mu": 0.01, "scaffold": True, "name": "x", "n": 4},
        tensors={"scaffold/c": PARAMS * 2.0},
        state={"scaffold/c_i": PARAMS * 3.0},
    )
    return replace(config, **changes)


def _ddp() -> DdgParameters:
    return DdgParameters(
        dimension=8,
        padded=8,
        modulus_bits=20,
        gamma=0.001,
        noise_std=3.5,
        l2_sensitivity=100.25,
        threshold=2,
        num_clients=3,
    )


def _setup(*, ddp: bool, keys: bool) -> SecureSetup:
    plan = InputPlan(
        kind="distributed" if ddp else "weighted",
        size=8,
        length=14 if not ddp else 8,
        enc_clip=2.0,
        enc_scale=1024.0,
        modulus_bits=20,
        count_unit=3,
        max_examples=100,
        bound=1.5,
        ddp=_ddp() if ddp else None,
        rotation_seed=2**63 + 5,
        secure_rng=False,
    )
    config = SecAggConfig(
        protocol="secagg+" if ddp else "secagg",
        threshold=2,
        modulus_bits=20,
        vector_length=plan.length,
        neighbours=2 if ddp else None,
        malicious=keys,
        expected_dropout=0.25,
        allow_insecure_neighbours=ddp,
    )
    verify_keys = {c: bytes([i]) * 32 for i, c in enumerate("abc")} if keys else {}
    return SecureSetup(
        round_idx=3,
        config=config,
        plan=plan,
        verify_keys=verify_keys,
        replacement=PARAMS if keys else None,
    )


MESSAGES: dict[str, Any] = {
    "fit": FitIns(PARAMS, _fit_config()),
    "fit, plain config": FitIns(PARAMS, FitConfig(round_idx=0)),
    "fit, held": FitIns(PARAMS, _fit_config(), HoldUpdate(True, False, 500)),
    "fit, held leniently": FitIns(PARAMS, _fit_config(), HoldUpdate(False, True)),
    "evaluate": EvaluateIns(PARAMS, EvalConfig(round_idx=2, batch_size=64)),
    "secure stage": SecureStageIns(b"\x89FSA protocol bytes"),
    "secure setup": SecureStageIns(b"r", _setup(ddp=False, keys=False)),
    "secure setup, keys": SecureStageIns(b"r", _setup(ddp=False, keys=True)),
    "secure setup, ddp": SecureStageIns(b"", _setup(ddp=True, keys=False)),
    "secure setup, ddp and keys": SecureStageIns(b"r", _setup(ddp=True, keys=True)),
}

UPDATE = ClientUpdate(
    "a",
    PARAMS,
    12,
    {"loss": 0.25, "accuracy": 1, "nan": float("nan"), "inf": float("-inf")},
    extras={"scaffold/delta_c": PARAMS * 0.5},
    state={"scaffold/c_i": PARAMS * 4.0},
)


def _has(cls: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


if _has(HoldUpdate, "share"):  # the round's newer HoldUpdate
    MESSAGES["fit, held for a colluder"] = FitIns(
        PARAMS, _fit_config(), HoldUpdate(count=False, share=True)
    )

VALUES: dict[str, Any] = {
    "update": UPDATE,
    "update, bare": ClientUpdate("a", PARAMS, 0),
    "update, foreign id": replace(UPDATE, client_id="someone-else"),
    "receipt": FitReceipt("a", 7),
    "receipt, keyed": FitReceipt("a", 7, b"k" * 32),
    "receipt, refused": FitReceipt("a", 0, b"", "NaN in the update"),
    "metrics": {"loss": 0.5, "num_examples": 20, "nan": float("nan")},
    "protocol bytes": b"\x89FSA\x04...",
    "nothing": None,
}
if _has(FitReceipt, "shared"):  # the round's newer FitReceipt
    VALUES["receipt, shared"] = FitReceipt("a", 1, b"", "", UPDATE)  # type: ignore[call-arg]


def _same(a: Any, b: Any) -> bool:
    """Equality that takes NaN as equal to NaN."""
    if isinstance(a, FitReceipt) and isinstance(b, FitReceipt):
        return all(
            _same(getattr(a, f.name), getattr(b, f.name))
            for f in dataclasses.fields(FitReceipt)
        )
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (np.isnan(a) and np.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, ClientUpdate) and isinstance(b, ClientUpdate):
        return (
            a.client_id == b.client_id
            and a.num_examples == b.num_examples
            and a.delta == b.delta
            and _same(dict(a.metrics), dict(b.metrics))
            and dict(a.extras) == dict(b.extras)
            and dict(a.state) == dict(b.state)
        )
    return type(a) is type(b) and a == b


# -- round trips -------------------------------------------------------------


@pytest.mark.parametrize("name", list(MESSAGES))
def test_every_request_message_round_trips(name):
    message = MESSAGES[name]
    request = StageRequest("some_stage", 3, {"a": message, "b": message}, 1.5)
    back, seed = decode_request(encode_request(request, ["b", "a"], 2**64 - 1))
    assert seed == 2**64 - 1
    assert (back.stage, back.round_idx, back.timeout_s) == ("some_stage", 3, 1.5)
    assert list(back.messages) == ["b", "a"]
    assert back.messages["a"] == message and back.messages["b"] == message
    assert back.messages["a"] is back.messages["b"]  # sent once


def test_a_request_keeps_the_types_of_its_numbers():
    request = StageRequest("fit", 0, {"a": MESSAGES["fit"]})
    back, _ = decode_request(encode_request(request, ["a"], 0))
    config = back.messages["a"].config
    assert back.timeout_s is None
    assert type(config.weight_decay) is int and type(config.lr) is float
    assert config.options == {
        "proximal_mu": 0.01,
        "scaffold": True,
        "name": "x",
        "n": 4,
    }
    assert [type(v) for v in config.options.values()] == [float, bool, str, int]


def test_a_share_carries_only_its_clients_and_one_copy_of_a_shared_message():
    message = FitIns(Params({"w": np.zeros(10_000, np.float32)}), FitConfig(0))
    request = StageRequest("fit", 0, {str(i): message for i in range(100)})
    one = encode_request(request, ["0"], 1)
    share = encode_request(request, [str(i) for i in range(0, 100, 2)], 1)
    assert len(one) > 40_000
    assert len(share) < len(one) + 50 * 20
    back, _ = decode_request(share)
    assert list(back.messages) == [str(i) for i in range(0, 100, 2)]
    with pytest.raises(KeyError):
        encode_request(request, ["nobody"], 1)


@pytest.mark.parametrize("name", list(VALUES))
def test_every_reply_value_round_trips(name):
    value = VALUES[name]
    back = decode_reply(encode_reply(StageReply("a", value)), expect_client="a")
    assert back.client_id == "a" and back.failure is None
    assert _same(back.value, value), (back.value, value)


@pytest.mark.parametrize("kind", list(FailureKind))
def test_failures_round_trip(kind):
    failure = ClientFailure("a", "masked_input", kind, "why \u2603\udcff")
    back = decode_reply(encode_reply(StageReply("a", failure=failure)))
    assert back.failure == failure and back.value is None
    assert isinstance(back.failure.kind, FailureKind)


def test_a_message_with_a_field_the_wire_does_not_know_is_refused():
    from fedshield.simulation import wire

    @dataclasses.dataclass(frozen=True)
    class Newer:
        a: int
        b: int = 0

    record = wire._Record("newer", Newer, {"a": wire._INT, "gone": wire._INT})
    with pytest.raises(ProtocolError, match=r"does not know Newer's fields \['b'\]"):
        record.out(Newer(1), "x")
    older = wire._Record(
        "newer", Newer, {"a": wire._INT, "b": wire._INT, "c": wire._INT}
    )
    assert older.out(Newer(1, 2), "x") == {"$": "newer", "a": 1, "b": 2}
    assert older.back({"$": "newer", "a": 1, "b": 2}, "x") == Newer(1, 2)
    with pytest.raises(ProtocolError, match=r"unknown fields \['c'\]"):
        older.back({"$": "newer", "a": 1, "b": 2, "c": 3}, "x")


def test_a_worker_greeting_round_trips():
    for error in (None, "ModuleNotFoundError: no module named 'x'"):
        ready = WorkerReady(3, 1234, "10.0.0.1, node 1a2b3c4d", error)
        assert decode_ready(encode_ready(ready)) == ready


def test_decoded_tensors_own_their_arrays():
    back = decode_reply(encode_reply(StageReply("a", UPDATE)))
    assert back.value.delta.flat.flags.owndata
    assert not back.value.delta.flat.flags.writeable  # Params stay read-only


# -- refusals ----------------------------------------------------------------


def _request_tree() -> dict[str, Any]:
    request = StageRequest("fit", 0, {"a": MESSAGES["fit, held"]}, 2.0)
    tree = decode_tree(encode_request(request, ["a"], 5))
    assert isinstance(tree, dict)
    return tree


def _reply_tree(value: Any = UPDATE) -> dict[str, Any]:
    tree = decode_tree(encode_reply(StageReply("a", value)))
    assert isinstance(tree, dict)
    return tree


def _with(tree: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """``tree`` with the node at ``path`` replaced (or removed if ``...``)."""
    if not path:
        return value
    head, *rest = path
    if isinstance(tree, tuple):
        items = list(tree)
        items[head] = _with(items[head], tuple(rest), value)
        return tuple(items)  # type: ignore[return-value]
    out = dict(tree)
    if not rest and value is ...:
        del out[head]
    elif not rest:
        out[head] = value
    else:
        out[head] = _with(tree[head], tuple(rest), value)
    return out


FIT = ("messages", 0)
CONFIG = (*FIT, "config")


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("$",), "stage_reply", "expected a 'stage_request' message"),
        (("extra",), 1, "unknown fields"),
        (("seed",), ..., "missing fields"),
        (("seed",), True, "seed must be an integer"),
        (("round_idx",), "0", "round_idx must be an integer"),
        (("timeout_s",), float("nan"), "finite"),
        (("timeout_s",), -1.0, "timeout_s must be >= 0"),
        (("clients",), (("a", 1),), "gets message 1 of 1"),
        (("clients",), (("a", 0), ("a", 0)), "asked twice"),
        (("clients",), (), "sent to nobody"),
        (("clients",), (("a",),), "pair"),
        ((*FIT, "$"), "shell", "unknown record type 'shell'"),
        ((*FIT, "params"), b"x", "must be a Params"),
        ((*FIT, "hold", "max_examples"), 2.0, "must be an integer"),
        ((*FIT, "hold", "malicious"), 1, "must be a boolean"),
        ((*FIT, "hold", "$"), "fit_config", "must be a 'hold' record"),
        ((*CONFIG, "lr"), float("nan"), "finite"),
        ((*CONFIG, "lr"), float("inf"), "finite"),
        ((*CONFIG, "lr"), -1.0, "receiver refuses: ValueError: lr must be > 0"),
        ((*CONFIG, "epochs"), 0, "epochs must be >= 1"),
        ((*CONFIG, "options"), {"mu": float("nan")}, "finite"),
        ((*CONFIG, "options"), {"mu": None}, "a number"),
        ((*CONFIG, "tensors"), {"c": 1.0}, "must be a Params"),
        ((*CONFIG, "state"), (), "must be a map"),
        ((*CONFIG, "momentum"), ..., "missing fields"),
    ],
)
def test_malformed_requests_are_refused(path, value, match):
    data = encode_tree(_with(_request_tree(), path, value))
    with pytest.raises(ProtocolError, match=match):
        decode_request(data)


def _secure_tree() -> dict[str, Any]:
    message = MESSAGES["secure setup, ddp and keys"]
    request = StageRequest("advertise_keys", 3, {"a": message})
    return decode_tree(encode_request(request, ["a"], 0))


SETUP = ("messages", 0, "setup")


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ((*SETUP, "config", "protocol"), "secagg++", "one of"),
        ((*SETUP, "config", "threshold"), 1, "refuses: ConfigError"),
        ((*SETUP, "config", "expected_dropout"), float("nan"), "finite"),
        ((*SETUP, "plan", "kind"), "magic", "one of"),
        ((*SETUP, "plan", "ddp", "gamma"), "0.1", "a number"),
        ((*SETUP, "plan", "ddp", "extra"), 1, "unknown fields"),
        ((*SETUP, "verify_keys"), {"a": "key"}, "must be bytes"),
        ((*SETUP, "replacement"), 0, "must be a Params"),
        (("messages", 0, "request"), "bytes", "must be bytes"),
    ],
)
def test_malformed_secure_setups_are_refused(path, value, match):
    data = encode_tree(_with(_secure_tree(), path, value))
    with pytest.raises(ProtocolError, match=match):
        decode_request(data)


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("$",), "stage_request", "expected a 'stage_reply' message"),
        (("client_id",), 7, "client_id must be a string"),
        (("value", "$"), "pickle", "a reply's value must be"),
        (("value", "num_examples"), 1.5, "must be an integer"),
        (("value", "metrics"), {"loss": "low"}, "must be a number"),
        (("value", "metrics"), {"loss": True}, "must be a number"),
        (("value", "delta"), ..., "missing fields"),
        (("value",), (1, 2), "a reply's value must be"),
        (("failure",), {"$": "failure"}, "missing fields"),
        (
            ("failure",),
            {
                "$": "failure",
                "client_id": "a",
                "stage": "fit",
                "kind": "x",
                "message": "",
            },
            "kind must be one of",
        ),
        (
            ("failure",),
            {
                "$": "failure",
                "client_id": "b",
                "stage": "fit",
                "kind": "error",
                "message": "",
            },
            "the failure of 'b'",
        ),
        (
            ("failure",),
            {
                "$": "failure",
                "client_id": "a",
                "stage": "fit",
                "kind": "error",
                "message": "",
            },
            "carries no value",
        ),
    ],
)
def test_malformed_replies_are_refused(path, value, match):
    data = encode_tree(_with(_reply_tree(), path, value))
    with pytest.raises(ProtocolError, match=match):
        decode_reply(data)


def test_a_reply_from_another_client_is_refused():
    data = encode_reply(StageReply("b", {"loss": 1.0}))
    with pytest.raises(ProtocolError, match="from 'b' where 'a'"):
        decode_reply(data, expect_client="a")


def test_oversized_truncated_and_extended_messages_are_refused():
    data = encode_reply(StageReply("a", UPDATE))
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_reply(data, max_bytes=len(data) - 1)
    assert decode_reply(data, max_bytes=len(data)).client_id == "a"
    for bad in (data[:-1], data[:20], data + b"\0", data + data):
        with pytest.raises(ProtocolError, match=r"payload|overruns|magic"):
            decode_reply(bad)
    request = encode_request(StageRequest("fit", 0, {"a": MESSAGES["fit"]}), ["a"], 0)
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_request(request, max_bytes=100)


def test_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for decoder in (decode_reply, decode_request, decode_ready):
        with pytest.raises(ProtocolError, match="not a fedshield message"):
            decoder(pickle.dumps(Boom()))
        with pytest.raises(ProtocolError, match="a message is bytes"):
            decoder(Boom())  # type: ignore[arg-type]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"loss": "low"}, r"metrics\['loss'\] must be a number"),
        ({"ok": True}, "must be a number"),
        ({1: 2.0}, "a key of metrics"),
        (object(), "a reply's value must be"),
        (PARAMS, "must be a number"),  # a Mapping, but not of numbers
        (ClientUpdate("a", PARAMS, 1.5), "num_examples must be an integer"),  # type: ignore[arg-type]
        (ClientUpdate("a", {"w": [1.0]}, 1), "delta must be a Params"),  # type: ignore[arg-type]
        (FitReceipt("a", 1, "key"), "verify_key must be bytes"),  # type: ignore[arg-type]
    ],
)
def test_what_the_wire_cannot_carry_is_refused_when_sent(value, match):
    with pytest.raises(ProtocolError, match=match):
        encode_reply(StageReply("a", value))


def test_a_server_message_the_wire_does_not_know_is_refused_when_sent():
    for message in (
        "text",
        FitIns(PARAMS, _fit_config(weight_decay=float("inf"))),
        FitIns(PARAMS, _fit_config(options={"mu": float("nan")})),
        EvaluateIns(PARAMS, FitConfig(0)),  # type: ignore[arg-type]
    ):
        with pytest.raises(ProtocolError):
            encode_request(StageRequest("fit", 0, {"a": message}), ["a"], 0)
    with pytest.raises(ProtocolError, match="carries no value"):
        failure = ClientFailure("a", "fit", FailureKind.ERROR, "x")
        encode_reply(StageReply("a", 1.0, failure))


# -- fuzzing -----------------------------------------------------------------

DECODERS = (decode_request, decode_reply, decode_ready)
SAMPLES = (
    encode_request(
        StageRequest("fit", 1, {"a": MESSAGES["fit, held"], "b": MESSAGES["fit"]}, 9.0),
        ["a", "b"],
        3,
    ),
    encode_request(
        StageRequest(
            "advertise_keys", 3, {"a": MESSAGES["secure setup, ddp and keys"]}
        ),
        ["a"],
        0,
    ),
    encode_reply(StageReply("a", UPDATE)),
    encode_reply(StageReply("a", VALUES["receipt, keyed"])),
    encode_reply(StageReply("a", VALUES["metrics"])),
    encode_reply(StageReply("a", failure=ClientFailure("a", "fit", "timeout", "slow"))),
    encode_ready(WorkerReady(1, 2, "n", "e")),
)


def _decode_any(data: bytes) -> None:
    """Every decoder either reads ``data`` or raises ProtocolError."""
    for decoder in DECODERS:
        with contextlib.suppress(ProtocolError):
            decoder(data, max_bytes=1 << 16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_protocol_error(data):
    _decode_any(data)
    _decode_any(SAMPLES[0][:9] + data)  # past the magic and version


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(SAMPLES),
    st.integers(min_value=0),
    st.sampled_from(["replace", "insert", "delete", "truncate"]),
    st.binary(min_size=1, max_size=4),
)
def test_changed_bytes_raise_only_protocol_error(sample, position, how, patch):
    raw = bytearray(sample)
    at = position % len(raw)
    if how == "replace":
        raw[at : at + len(patch)] = patch
    elif how == "insert":
        raw[at:at] = patch
    elif how == "delete":
        del raw[at : at + len(patch)]
    else:
        del raw[at:]
    _decode_any(bytes(raw))


_ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.just(PARAMS)
    | st.sampled_from(
        ["fit", "evaluate", "secure", "update", "metrics", "failure", "stage_reply"]
    ),
    lambda inner: (
        st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.sampled_from(["$", "a", "values", "client_id"]), inner)
    ),
    max_leaves=6,
)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*path, key))
    elif isinstance(node, tuple):
        for i, value in enumerate(node):
            out += _paths(value, (*path, i))
    return out


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_changed_trees_raise_only_protocol_error(sample, data):
    # Well-formed envelopes with one node changed: the schema's own checks
    # must refuse them with ProtocolError (never a KeyError, TypeError...).
    tree = decode_tree(sample)
    path = data.draw(st.sampled_from(_paths(tree)))
    changed = _with(tree, path, data.draw(_ANY | st.just(...)) if path else ...)
    if changed is ...:
        changed = data.draw(_ANY)
    with contextlib.suppress(ProtocolError):
        raw = encode_tree(changed)
        _decode_any(raw)


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=8),
    st.dictionaries(st.text(max_size=8), st.floats() | st.integers(-(2**63), 2**63)),
    st.integers(-(2**63), 2**63),
)
def test_reply_round_trip_property(client_id, metrics, count):
    update = ClientUpdate(client_id, PARAMS, count, metrics)
    back = decode_reply(encode_reply(StageReply(client_id, update)))
    assert _same(back.value, update)


# -- the backends ------------------------------------------------------------


class CorruptReplies:
    """A ``client_fn`` whose worker mangles one client's reply bytes.

    Building the victim patches ``wire.encode_reply`` in the worker that
    builds it (never in the test's own process), so that client's reply
    leaves the worker as ``how`` says.
    """

    def __init__(self, clients: dict[str, Any], victim: str, how: str, marker: str):
        self.clients = clients
        self.victim = victim
        self.how = how
        self.marker = marker
        self.parent = os.getpid()

    def __call__(self, client_id: str) -> Any:
        if client_id == self.victim:
            if os.getpid() == self.parent:
                raise RuntimeError("CorruptReplies patches worker processes only")
            _corrupt(self.victim, self.how, self.marker)
        return self.clients[client_id]


class _Boom:
    """Unpickling this creates ``path``: proof that a pickle was run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def _corrupt(victim: str, how: str, marker: str) -> None:
    from fedshield.simulation import wire

    real = getattr(wire.encode_reply, "__wrapped__", wire.encode_reply)

    def encode_reply(reply: StageReply) -> bytes:
        data = real(reply)
        if reply.client_id != victim:
            return data
        if how == "truncated":
            return data[:-5]
        if how == "pickle":
            return pickle.dumps(_Boom(marker))
        if how == "impostor":
            return real(replace(reply, client_id="a"))
        if how == "oversized":
            return data + b"\0" * 5000
        raise AssertionError(how)

    encode_reply.__wrapped__ = real  # type: ignore[attr-defined]
    wire.encode_reply = encode_reply  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("truncated", "payload holds"),
        ("pickle", "not a fedshield message"),
        ("impostor", "a reply from 'a' where 'x'"),
        ("oversized", "over the limit of 4096"),
    ],
)
def test_a_malformed_reply_is_a_rejected_client_and_the_round_goes_on(
    how, needle, tmp_path
):
    marker = tmp_path / "unpickled"
    clients = {
        "a": MeanClient("a", 1.0, 1),
        "x": MeanClient("x", 100.0, 5),
        "b": MeanClient("b", 4.0, 2),
    }
    client_fn = CorruptReplies(clients, "x", how, str(marker))
    strategy = FedAvg()
    with ProcessPoolBackend(1, max_reply_bytes=4096) as backend:
        result = run_round(
            strategy,
            strategy.init(SPEC_PARAMS),
            client_fn=client_fn,
            client_ids=list(clients),
            seed=0,
            backend=backend,
        )
    assert result.completed
    assert_allclose(result.state.params.flat, 3.0, atol=1e-6)  # a and b only
    (failure,) = result.failures
    assert (failure.client_id, failure.stage) == ("x", "fit")
    assert failure.kind == FailureKind.REJECTED
    assert "worker process" in failure.message and needle in failure.message
    assert not marker.exists()


@pytest.mark.ray
def test_a_malformed_reply_through_ray_is_a_rejected_client(tmp_path):
    pytest.importorskip("ray")
    from fedshield.simulation.backends.ray import RayBackend

    marker = tmp_path / "unpickled"
    clients = {"a": MeanClient("a", 1.0, 1), "x": MeanClient("x", 100.0, 5)}
    request = StageRequest(
        "fit", 0, dict.fromkeys(clients, FitIns(SPEC_PARAMS, FitConfig(0)))
    )
    backend = RayBackend(
        num_cpus=1,
        num_workers=1,
        # The actor unpickles CorruptReplies as ``tests.simulation.test_wire``.
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    with backend:
        replies = list(
            backend.run_stage(
                request,
                client_fn=CorruptReplies(clients, "x", "pickle", str(marker)),
                seed=0,
            )
        )
    assert [r.client_id for r in replies] == ["a", "x"]
    assert replies[0].ok and isinstance(replies[0].value, ClientUpdate)
    failure = replies[1].failure
    assert failure is not None and failure.kind == FailureKind.REJECTED
    assert "Ray worker" in failure.message
    assert "not a fedshield message" in failure.message
    assert not marker.exists()


class WordyClient(MeanClient):
    """Reports a metric that is not a number."""

    def evaluate(self, params: Params, config: EvalConfig) -> dict[str, Any]:
        return {"num_examples": 1, "note": "fine"}


def test_a_reply_the_wire_cannot_carry_fails_its_client_in_the_worker():
    clients = {"a": MeanClient("a", 1.0, 1), "w": WordyClient("w", 1.0, 1)}
    request = StageRequest(
        "evaluate", 0, dict.fromkeys(clients, EvaluateIns(SPEC_PARAMS, EvalConfig(0)))
    )
    with ProcessPoolBackend(1) as backend:
        replies = list(
            backend.run_stage(request, client_fn=clients.__getitem__, seed=0)
        )
    assert [r.client_id for r in replies] == ["a", "w"]
    assert replies[0].ok and replies[0].value["num_examples"] == 1
    failure = replies[1].failure
    assert failure is not None and failure.kind == FailureKind.ERROR
    assert "could not be sent from the worker process" in failure.message
    assert "metrics['note'] must be a number" in failure.message


def test_a_nan_update_is_rejected_by_the_round_as_in_one_process():
    clients = {"a": MeanClient("a", 2.0, 1), "x": NanClient("x", 0.0, 1)}
    strategy = FedAvg()
    with ProcessPoolBackend(1) as backend:
        result = run_round(
            strategy,
            strategy.init(SPEC_PARAMS),
            client_fn=clients.__getitem__,
            client_ids=list(clients),
            seed=0,
            backend=backend,
        )
    (failure,) = result.failures
    assert failure.kind == FailureKind.REJECTED and "NaN" in failure.message


# -- no pickle on the paths that carry client data ---------------------------

SIMULATION = ROOT / "src" / "fedshield" / "simulation"
LOADERS = {"loads", "load", "Unpickler"}
PICKLERS = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "_pickle"}


def _calls(path: Path) -> list[tuple[str, int, str]]:
    """``(function, line, text)`` of each unpickling call in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if not isinstance(node, ast.Call):
                continue
            text = ast.unparse(node.func)
            parts = text.split(".")
            unpickles = parts[-1] in LOADERS and any(p in PICKLERS for p in parts)
            # multiprocessing's Connection.recv() unpickles what it reads.
            recv = parts[-1] == "recv" and len(parts) > 1
            if unpickles or recv:
                found.append((func.name, node.lineno, text))
    return found


def test_no_unpickling_is_reachable_from_a_reply():
    found = {
        (str(path.relative_to(SIMULATION)), name, text)
        for path in sorted(SIMULATION.rglob("*.py"))
        for name, _, text in _calls(path)
    }
    # The one allowed: client_fn, the server's own code, unpickled in the
    # worker (it travels from the server to the workers only).
    assert found == {("backends/_pool.py", "_load_client_fn", "pickle.loads")}


def test_the_client_fn_loader_is_called_on_the_worker_side_only():
    callers = set()
    for path in sorted(SIMULATION.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef):
                for node in ast.walk(func):
                    if isinstance(node, ast.Call) and ast.unparse(node.func) == (
                        "_load_client_fn"
                    ):
                        callers.add((path.name, func.name))
    assert callers == {("process.py", "_worker_main"), ("ray.py", "load")}
