r"""Stage messages on the wire: what crosses a process boundary, as bytes.

The pool backends (:mod:`~fedshield.simulation.backends.process`,
:mod:`~fedshield.simulation.backends.ray`) hand a worker its share of a
stage with :func:`encode_request` and get each client's reply back with
:func:`encode_reply`; the other side reads them with :func:`decode_request`
and :func:`decode_reply`. Both are trees of :mod:`fedshield.core.codec`
(one binary envelope: magic ``b"\x89FSU"``, format version, a strict JSON
header, the tensors as little-endian ``float32`` and the byte strings raw),
so decoding runs no code of the sender's: nothing here is a pickle.

Every record is a map whose ``"$"`` names its type, followed by exactly its
fields (no more, no fewer):

==================  ===========================================================
``"$"``             fields
==================  ===========================================================
``stage_request``   ``stage``, ``round_idx``, ``timeout_s``, ``seed``;
                    ``clients`` (``[client_id, k]`` pairs) and ``messages``
                    (client ``client_id`` gets ``messages[k]``: one message
                    sent to many clients travels once)
``fit``             ``params`` (tensor), ``config`` (``fit_config``),
                    ``hold`` (``hold`` or null)
``evaluate``        ``params``, ``config`` (``eval_config``)
``secure``          ``request`` (bytes), ``setup`` (``secure_setup`` or null)
``fit_config``      :class:`~fedshield.core.FitConfig`'s fields; ``options``
                    map to finite numbers, booleans or strings, ``tensors``
                    and ``state`` to tensors
``eval_config``     :class:`~fedshield.core.EvalConfig`'s fields
``hold``            :class:`~fedshield.simulation.protocol.HoldUpdate`'s
``secure_setup``    ``round_idx``, ``config`` (``secagg_config``), ``plan``
                    (``input_plan``), ``verify_keys`` (map to bytes),
                    ``replacement`` (tensor or null)
``secagg_config``   :class:`~fedshield.secagg.protocol.SecAggConfig`'s fields
``input_plan``      :class:`~fedshield.simulation.secure_client.InputPlan`'s;
                    ``ddp`` is ``ddg`` or null
``ddg``             :class:`~fedshield.privacy.distributed.DdgParameters`'s
``stage_reply``     ``client_id``, ``value``, ``failure`` (``failure`` or
                    null; with a failure the value is null)
``update``          :class:`~fedshield.core.ClientUpdate`'s fields
``receipt``         :class:`~fedshield.simulation.protocol.FitReceipt`'s
                    (``shared``, an ``update`` or null)
``metrics``         ``values``: a map to numbers (an evaluation's metrics)
``failure``         ``client_id``, ``stage``, ``kind`` (a
                    :class:`~fedshield.simulation.protocol.FailureKind`
                    value), ``message``
``worker_ready``    ``generation``, ``pid``, ``node``, ``error`` (a worker
                    that loaded ``client_fn``, or says why it could not)
==================  ===========================================================

A reply's ``value`` is null, bytes (a secure stage's protocol message), or
an ``update``, ``receipt`` or ``metrics`` record. Integers are integers
(booleans are not), numbers are integers or floats; NaN and infinity are
refused everywhere except in what a client reports (its metrics, its
tensors), which the round checks and refuses itself
(:func:`~fedshield.core.validate_update`), as it would in one process.

Decoding raises :class:`~fedshield.errors.ProtocolError`, naming what is
wrong, for anything else: a message over ``max_bytes`` (checked first), a
broken envelope, trailing or missing bytes, an unknown ``"$"``, missing or
unknown fields, wrong types, values a record's own checks refuse, a reply
from another client than expected. Encoding raises it for a value the wire
cannot carry (a metric that is not a number, an object of another type): the
worker then sends its client's failure instead.

Examples
--------
>>> import numpy as np
>>> from fedshield.core import EvalConfig, Params
>>> from fedshield.simulation.protocol import EvaluateIns, StageReply
>>> ins = EvaluateIns(Params({"w": np.ones(2, np.float32)}), EvalConfig(0))
>>> request = StageRequest("evaluate", 0, {"a": ins, "b": ins})
>>> back, seed = decode_request(encode_request(request, ["b"], 7))
>>> list(back.messages), seed
(['b'], 7)
>>> decode_reply(encode_reply(StageReply("b", {"loss": 0.5})), expect_client="b")
StageReply(client_id='b', value={'loss': 0.5}, failure=None)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import numpy as np

from fedshield.core import ClientId, ClientUpdate, EvalConfig, FitConfig, Params
from fedshield.core.codec import DEFAULT_MAX_BYTES as _CODEC_MAX_BYTES
from fedshield.core.codec import decode_tree, encode_tree
from fedshield.errors import ProtocolError
from fedshield.simulation.protocol import (
    ClientFailure,
    EvaluateIns,
    FailureKind,
    FitIns,
    FitReceipt,
    HoldUpdate,
    StageReply,
    StageRequest,
)
from fedshield.simulation.secure_client import (
    HandedHalf,
    InputPlan,
    SecureSetup,
    SecureStageIns,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "WorkerReady",
    "decode_ready",
    "decode_reply",
    "decode_request",
    "encode_ready",
    "encode_reply",
    "encode_request",
]

DEFAULT_MAX_BYTES: Final = _CODEC_MAX_BYTES
"""The largest message read unless told otherwise (2 GiB)."""

Buffer = bytes | bytearray | memoryview
"""What the decoders read (anything else is refused with ProtocolError)."""


# ---------------------------------------------------------------------------
# Fields: each checks a value on the way out and a tree node on the way in
# ---------------------------------------------------------------------------


class _Field:
    """One field's type: ``out`` checks a value, ``back`` a decoded node.

    For a plain value both are the same check.
    """

    def out(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def back(self, node: Any, where: str) -> Any:
        return self.out(node, where)


def _refuse(where: str, what: str, value: Any) -> ProtocolError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return ProtocolError(f"{where} must be {what}; got {type(value).__name__} {text}")


class _Int(_Field):
    def out(self, value: Any, where: str) -> int:
        if isinstance(value, bool | np.bool_) or not isinstance(
            value, int | np.integer
        ):
            raise _refuse(where, "an integer", value)
        return int(value)


class _Number(_Field):
    """An integer or a float (kept as it is); finite unless ``finite=False``."""

    def __init__(self, *, finite: bool = True, nan: bool = True) -> None:
        self.finite = finite
        self.nan = nan

    def out(self, value: Any, where: str) -> int | float:
        if isinstance(value, bool | np.bool_) or not isinstance(
            value, int | float | np.integer | np.floating
        ):
            raise _refuse(where, "a number", value)
        number = int(value) if isinstance(value, int | np.integer) else float(value)
        if (
            isinstance(number, float)
            and not math.isfinite(number)
            and (self.finite or (math.isnan(number) and not self.nan))
        ):
            raise _refuse(where, "a finite number", value)
        return number


class _Bool(_Field):
    def out(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool | np.bool_):
            raise _refuse(where, "a boolean", value)
        return bool(value)


class _Str(_Field):
    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def out(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise _refuse(where, "a string", value)
        if self.choices and value not in self.choices:
            raise _refuse(where, f"one of {list(self.choices)}", value)
        return str(value)


class _Bytes(_Field):
    def out(self, value: Any, where: str) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise _refuse(where, "bytes", value)
        return value if isinstance(value, bytes) else bytes(value)


class _Tensor(_Field):
    def out(self, value: Any, where: str) -> Params:
        if not isinstance(value, Params):
            raise _refuse(where, "a Params", value)
        return value


class _Scalar(_Field):
    """A strategy option: a finite number, a boolean or a string."""

    def out(self, value: Any, where: str) -> Any:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        if isinstance(value, str):
            return str(value)
        return _Number().out(value, where)


class _Optional(_Field):
    def __init__(self, inner: _Field) -> None:
        self.inner = inner

    def out(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.out(value, where)

    def back(self, node: Any, where: str) -> Any:
        return None if node is None else self.inner.back(node, where)


class _MapOf(_Field):
    """A map with string keys and values of one type."""

    def __init__(self, inner: _Field) -> None:
        self.inner = inner

    def out(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise _refuse(where, "a mapping", value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _refuse(f"a key of {where}", "a string", key)
            out[str(key)] = self.inner.out(item, f"{where}[{key!r}]")
        return out

    def back(self, node: Any, where: str) -> dict[str, Any]:
        if not isinstance(node, dict):
            raise _refuse(where, "a map", node)
        return {
            key: self.inner.back(item, f"{where}[{key!r}]")
            for key, item in node.items()
        }


class _Record(_Field):
    """A dataclass sent field by field, tagged ``"$": tag``.

    ``fields`` may name fields that the dataclass does not have (yet, or
    any more): they are left out of the record, on both sides, so the table
    serves either version of the class. A dataclass field that the table
    does not name is refused when sent: dropping it silently would send
    another message than the one built.
    """

    def __init__(
        self,
        tag: str,
        cls: Callable[[], type] | type,
        fields: Mapping[str, _Field],
    ) -> None:
        self.tag = tag
        self._cls = cls
        self.table = dict(fields)
        self._fields: dict[str, _Field] | None = None

    @property
    def cls(self) -> type:
        # Classes of the lower layers that a worker seldom needs are named
        # lazily, so that importing this module does not import them.
        cls = self._cls
        if not isinstance(cls, type):
            cls = self._cls = cls()
        return cls

    @property
    def fields(self) -> dict[str, _Field]:
        """The fields sent: the table's, as far as the dataclass has them."""
        if self._fields is None:
            names = [f.name for f in dataclasses.fields(self.cls) if f.init]
            unknown = [name for name in names if name not in self.table]
            if unknown:
                raise ProtocolError(
                    f"the wire does not know {self.cls.__name__}'s fields {unknown}"
                )
            self._fields = {n: f for n, f in self.table.items() if n in names}
        return self._fields

    def out(self, value: Any, where: str) -> dict[str, Any]:
        cls = self.cls
        if type(value) is not cls:
            raise _refuse(where, f"a {cls.__name__}", value)
        out: dict[str, Any] = {"$": self.tag}
        for name, field in self.fields.items():
            out[name] = field.out(getattr(value, name), f"{where}.{name}")
        return out

    def back(self, node: Any, where: str) -> Any:
        kwargs = self.read(node, where)
        try:
            return self.cls(**kwargs)
        except ProtocolError:
            raise
        except Exception as err:  # the record's own checks
            raise ProtocolError(
                f"{where}: a {self.tag} the receiver refuses: "
                f"{type(err).__name__}: {err}"
            ) from None

    def read(self, node: Any, where: str) -> dict[str, Any]:
        """The fields of a ``self.tag`` record, checked."""
        if not isinstance(node, dict) or node.get("$") != self.tag:
            tag = node.get("$") if isinstance(node, dict) else None
            raise ProtocolError(
                f"{where} must be a {self.tag!r} record; got "
                + (f"a {tag!r} record" if tag is not None else type(node).__name__)
            )
        fields = self.fields
        keys = set(node) - {"$"}
        if keys != set(fields):
            raise ProtocolError(
                f"{where} ({self.tag}): missing fields "
                f"{sorted(set(fields) - keys)}, unknown fields "
                f"{sorted(keys - set(fields))}"
            )
        return {
            name: field.back(node[name], f"{where}.{name}")
            for name, field in fields.items()
        }


class _OneOf(_Field):
    """One of several records, told apart by their tags."""

    def __init__(self, *records: _Record) -> None:
        self.records = records

    def out(self, value: Any, where: str) -> Any:
        for record in self.records:
            if type(value) is record.cls:
                return record.out(value, where)
        names = [r.cls.__name__ for r in self.records]
        raise _refuse(where, f"one of {names}", value)

    def back(self, node: Any, where: str) -> Any:
        tag = node.get("$") if isinstance(node, dict) else None
        for record in self.records:
            if record.tag == tag:
                return record.back(node, where)
        raise ProtocolError(
            f"{where}: unknown record type {tag!r}; expected one of "
            f"{[r.tag for r in self.records]}"
        )


def _secagg_config() -> type:
    from fedshield.secagg.protocol import SecAggConfig

    return SecAggConfig


def _ddg() -> type:
    from fedshield.privacy.distributed import DdgParameters

    return DdgParameters


_INT = _Int()
_NUM = _Number()
_BOOL = _Bool()
_STR = _Str()

_FIT_CONFIG = _Record(
    "fit_config",
    FitConfig,
    {
        "round_idx": _INT,
        "epochs": _INT,
        "batch_size": _INT,
        "lr": _NUM,
        "momentum": _NUM,
        "weight_decay": _NUM,
        "options": _MapOf(_Scalar()),
        "tensors": _MapOf(_Tensor()),
        "state": _MapOf(_Tensor()),
    },
)
_EVAL_CONFIG = _Record(
    "eval_config", EvalConfig, {"round_idx": _INT, "batch_size": _INT}
)
_HOLD = _Record(
    "hold",
    HoldUpdate,
    {
        "malicious": _BOOL,
        "lenient": _BOOL,
        "max_examples": _Optional(_INT),
        "count": _BOOL,
        "share": _BOOL,
    },
)
_SECAGG_CONFIG = _Record(
    "secagg_config",
    _secagg_config,
    {
        "protocol": _Str("secagg", "secagg+"),
        "threshold": _INT,
        "modulus_bits": _INT,
        "vector_length": _INT,
        "neighbours": _Optional(_INT),
        "malicious": _BOOL,
        "security_parameter": _INT,
        "expected_dropout": _NUM,
        "allow_insecure_neighbours": _BOOL,
        "context": _Bytes(),
    },
)
_DDG = _Record(
    "ddg",
    _ddg,
    {
        "dimension": _INT,
        "padded": _INT,
        "modulus_bits": _INT,
        "gamma": _NUM,
        "noise_std": _NUM,
        "l2_sensitivity": _NUM,
        "threshold": _INT,
        "num_clients": _INT,
    },
)
_INPUT_PLAN = _Record(
    "input_plan",
    InputPlan,
    {
        "kind": _Str("weighted", "clipped", "distributed"),
        "size": _INT,
        "length": _INT,
        "enc_clip": _NUM,
        "enc_scale": _NUM,
        "modulus_bits": _INT,
        "count_unit": _INT,
        "max_examples": _INT,
        "bound": _NUM,
        "ddp": _Optional(_DDG),
        "rotation_seed": _INT,
        "secure_rng": _BOOL,
    },
)
_SECURE_SETUP = _Record(
    "secure_setup",
    SecureSetup,
    {
        "round_idx": _INT,
        "config": _SECAGG_CONFIG,
        "plan": _INPUT_PLAN,
        "verify_keys": _MapOf(_Bytes()),
        "replacement": _Optional(_Tensor()),
        "attestations": _MapOf(_Bytes()),
    },
)
_SECURE = _Record(
    "secure",
    SecureStageIns,
    {"request": _Bytes(), "setup": _Optional(_SECURE_SETUP)},
)

# What a client reports may hold NaN or infinity: the round refuses it (as
# "rejected", with its reason), exactly as it would in one process.
_REPORTED = _Number(finite=False)
_UPDATE = _Record(
    "update",
    ClientUpdate,
    {
        "client_id": _STR,
        "delta": _Tensor(),
        "num_examples": _INT,
        "metrics": _MapOf(_REPORTED),
        "extras": _MapOf(_Tensor()),
        "state": _MapOf(_Tensor()),
    },
)
_RECEIPT = _Record(
    "receipt",
    FitReceipt,
    {
        "client_id": _STR,
        "num_examples": _INT,
        "verify_key": _Bytes(),
        "rejected": _STR,
        "shared": _Optional(_UPDATE),  # simulated colluders only
        "attestation": _Bytes(),
    },
)
_METRICS = _MapOf(_REPORTED)
_MESSAGE = _OneOf(
    _Record(
        "fit",
        FitIns,
        {"params": _Tensor(), "config": _FIT_CONFIG, "hold": _Optional(_HOLD)},
    ),
    _Record("evaluate", EvaluateIns, {"params": _Tensor(), "config": _EVAL_CONFIG}),
    _SECURE,
    # Between two processes of the clients' side (SecureOffload), never from
    # the server: a client's half of a secure round, its setup checked.
    _Record(
        "handed",
        HandedHalf,
        {"held": _UPDATE, "signing_key": _Bytes(), "ins": _SECURE},
    ),
)
_FAILURE = _Record(
    "failure",
    ClientFailure,
    {
        "client_id": _STR,
        "stage": _STR,
        "kind": _Str(*(kind.value for kind in FailureKind)),
        "message": _STR,
    },
)

_REQUEST_FIELDS: Final = frozenset(
    {"$", "stage", "round_idx", "timeout_s", "seed", "clients", "messages"}
)
_REPLY_FIELDS: Final = frozenset({"$", "client_id", "value", "failure"})


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


def encode_request(
    request: StageRequest, client_ids: Iterable[ClientId], seed: int
) -> bytes:
    """A worker's share of a stage: ``request`` for ``client_ids``, and the seed.

    Raises
    ------
    ProtocolError
        If a message (or a field of one) is not of a type the wire carries,
        or holds NaN or infinity where a finite number belongs.
    KeyError
        If a client of ``client_ids`` is not in ``request.messages``.
    """
    ids = list(client_ids)
    distinct: list[tuple[ClientId, Any]] = []  # (first client, message)
    index: dict[int, int] = {}
    clients = []
    for client_id in ids:
        message = request.messages[client_id]
        k = index.get(id(message))
        if k is None:
            k = index[id(message)] = len(distinct)
            distinct.append((client_id, message))
        clients.append((_STR.out(client_id, "a client id"), k))
    timeout = request.timeout_s
    tree = {
        "$": "stage_request",
        "stage": _STR.out(request.stage, "stage"),
        "round_idx": _INT.out(request.round_idx, "round_idx"),
        "timeout_s": None if timeout is None else _timeout(timeout),
        "seed": _INT.out(seed, "seed"),
        "clients": clients,
        "messages": [
            _MESSAGE.out(message, f"the message to {client_id!r}")
            for client_id, message in distinct
        ],
    }
    return encode_tree(tree)


def decode_request(
    data: Buffer, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[StageRequest, int]:
    """The stage request and seed written by :func:`encode_request`.

    Raises
    ------
    ProtocolError
        Naming what is wrong (see the module docstring).
    """
    node = _top(
        decode_tree(data, max_bytes=max_bytes), "stage_request", _REQUEST_FIELDS
    )
    stage = _STR.back(node["stage"], "stage")
    round_idx = _INT.back(node["round_idx"], "round_idx")
    timeout = node["timeout_s"]
    timeout_s = None if timeout is None else _timeout(timeout)
    seed = _INT.back(node["seed"], "seed")
    raw_messages = node["messages"]
    if not isinstance(raw_messages, tuple):
        raise _refuse("messages", "a list", raw_messages)
    messages = [_MESSAGE.back(m, f"messages[{i}]") for i, m in enumerate(raw_messages)]
    pairs = node["clients"]
    if not isinstance(pairs, tuple):
        raise _refuse("clients", "a list", pairs)
    by_client: dict[ClientId, Any] = {}
    used: set[int] = set()
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise _refuse("an entry of clients", "a [client_id, index] pair", pair)
        client_id = _STR.back(pair[0], "a client id")
        k = _INT.back(pair[1], f"the message index of {client_id!r}")
        if not 0 <= k < len(messages):
            raise ProtocolError(
                f"client {client_id!r} gets message {k} of {len(messages)}"
            )
        if client_id in by_client:
            raise ProtocolError(f"client {client_id!r} is asked twice")
        by_client[client_id] = messages[k]
        used.add(k)
    if len(used) != len(messages):
        raise ProtocolError(
            f"messages {sorted(set(range(len(messages))) - used)} are sent to nobody"
        )
    return StageRequest(stage, round_idx, by_client, timeout_s), seed


def _timeout(value: Any) -> float | int:
    number = _Number(finite=False, nan=False).out(value, "timeout_s")
    if number < 0:
        raise ProtocolError(f"timeout_s must be >= 0 or null; got {number}")
    return number


# ---------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------


def encode_reply(reply: StageReply) -> bytes:
    """One client's reply to a stage.

    Raises
    ------
    ProtocolError
        If the value is not one the wire carries (see the module docstring),
        or a field has the wrong type (a metric that is not a number, say).
    """
    client_id = _STR.out(reply.client_id, "client_id")
    failure = reply.failure
    if failure is not None:
        if reply.value is not None:
            raise ProtocolError("a failed reply carries no value")
        if failure.client_id != client_id:
            raise ProtocolError(
                f"the failure of {failure.client_id!r} is in {client_id!r}'s reply"
            )
    tree = {
        "$": "stage_reply",
        "client_id": client_id,
        "value": _value_out(reply.value),
        "failure": None if failure is None else _FAILURE.out(failure, "failure"),
    }
    return encode_tree(tree)


def decode_reply(
    data: Buffer,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expect_client: ClientId | None = None,
) -> StageReply:
    """A reply written by :func:`encode_reply`, from ``expect_client`` if given.

    Raises
    ------
    ProtocolError
        Naming what is wrong (see the module docstring), or if the reply is
        another client's.
    """
    node = _top(decode_tree(data, max_bytes=max_bytes), "stage_reply", _REPLY_FIELDS)
    client_id = _STR.back(node["client_id"], "client_id")
    if expect_client is not None and client_id != expect_client:
        raise ProtocolError(
            f"a reply from {client_id!r} where {expect_client!r}'s was expected"
        )
    failure = None
    if node["failure"] is not None:
        failure = _failure_back(node["failure"])
        if failure.client_id != client_id:
            raise ProtocolError(
                f"the failure of {failure.client_id!r} is in {client_id!r}'s reply"
            )
        if node["value"] is not None:
            raise ProtocolError("a failed reply carries no value")
    return StageReply(client_id, _value_back(node["value"]), failure)


def _value_out(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return _Bytes().out(value, "value")
    if isinstance(value, ClientUpdate):
        return _UPDATE.out(value, "the update")
    if isinstance(value, FitReceipt):
        return _RECEIPT.out(value, "the receipt")
    if isinstance(value, Mapping):
        return {"$": "metrics", "values": _METRICS.out(value, "metrics")}
    raise ProtocolError(
        f"a reply's value must be a ClientUpdate, a FitReceipt, metrics (a "
        f"mapping), bytes or None; got {type(value).__name__}"
    )


def _value_back(node: Any) -> Any:
    if node is None or isinstance(node, bytes):
        return node
    tag = node.get("$") if isinstance(node, dict) else None
    if tag == "update":
        return _UPDATE.back(node, "the update")
    if tag == "receipt":
        return _RECEIPT.back(node, "the receipt")
    if tag == "metrics":
        fields = _top(node, "metrics", frozenset({"$", "values"}))
        return _METRICS.back(fields["values"], "metrics")
    raise ProtocolError(
        "a reply's value must be null, bytes or an update, receipt or metrics "
        f"record; got {_what(node)}"
    )


def _failure_back(node: Any) -> ClientFailure:
    fields = _FAILURE.read(node, "failure")
    return ClientFailure(
        fields["client_id"],
        fields["stage"],
        FailureKind(fields["kind"]),
        fields["message"],
    )


# ---------------------------------------------------------------------------
# A worker's greeting
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerReady:
    """What a worker says once it has loaded ``client_fn`` (or failed to)."""

    generation: int
    """Which ``client_fn`` (the backend counts them)."""
    pid: int
    node: str
    """Where the worker runs (for messages)."""
    error: str | None = None
    """Why ``client_fn`` could not be loaded (its clients will fail)."""


_READY = _Record(
    "worker_ready",
    WorkerReady,
    {"generation": _INT, "pid": _INT, "node": _STR, "error": _Optional(_STR)},
)


def encode_ready(ready: WorkerReady) -> bytes:
    """A worker's :class:`WorkerReady`, as bytes."""
    return encode_tree(_READY.out(ready, "ready"))


def decode_ready(data: Buffer, *, max_bytes: int = 1 << 20) -> WorkerReady:
    """A :class:`WorkerReady` written by :func:`encode_ready`.

    Raises
    ------
    ProtocolError
        If ``data`` is anything else.
    """
    ready: WorkerReady = _READY.back(decode_tree(data, max_bytes=max_bytes), "ready")
    return ready


# ---------------------------------------------------------------------------


def _top(node: Any, tag: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(node, dict) or node.get("$") != tag:
        raise ProtocolError(f"expected a {tag!r} message; got {_what(node)}")
    if set(node) != keys:
        raise ProtocolError(
            f"{tag}: missing fields {sorted(keys - set(node))}, unknown fields "
            f"{sorted(set(node) - keys)}"
        )
    return node


def _what(node: Any) -> str:
    if isinstance(node, dict):
        return f"a {node.get('$')!r} record"
    return type(node).__name__
