r"""A strict binary codec for what crosses a process boundary: no pickle.

:class:`~fedshield.core.Params` and :class:`~fedshield.core.ClientUpdate`
are written by :func:`encode` into one binary envelope and read back by
:func:`decode`, which refuses anything malformed with
:class:`~fedshield.errors.ProtocolError`. Decoding runs no code of the
sender's (unpickling a client's reply would run the client's code on the
server: harmless in one process, remote code execution over a network).
Any other message is a *tree* (:func:`encode_tree`, :func:`decode_tree`):
nested lists and string-keyed maps of ``None``, booleans, integers, floats,
strings, bytes and :class:`~fedshield.core.Params`, in the same envelope;
:mod:`fedshield.simulation.wire` writes the stage messages as trees.

The envelope (format :data:`VERSION` 1)
---------------------------------------
========  =========  ==========================================================
offset    size       content
========  =========  ==========================================================
0         4          :data:`MAGIC`, ``b"\x89FSU"``
4         1          :data:`VERSION`
5         4          ``h``: length of the header, big-endian
9         ``h``      the header: a UTF-8 JSON object
9 + h     the rest   the tensors, little-endian ``float32``, one after another;
                     then (trees only) the byte strings, one after another
========  =========  ==========================================================

The header names the message's ``type`` (``"params"``, ``"update"`` or
``"tree"``), its small fields, the layout (:class:`~fedshield.core.ParamSpec`
JSON) of every tensor in payload order, and nothing else. :func:`decode`
refuses: another magic or version; a message over ``max_bytes``; a header
that overruns the message, is not UTF-8 JSON, repeats a key, holds NaN or
infinity (or a number that overflows to it), or has unknown or missing keys
or wrong types (booleans are not integers); a layout with repeated names,
negative sizes or more words than the payload; payload bytes that are not
exactly the layouts' words (truncated, extended). Whether the values are
sensible (finite, the right spec) is the round's check
(:func:`~fedshield.core.validate_update`), not the codec's.

Trees
-----
A tree's header is ``{"type": "tree", "body": ..., "tensors": [layout, ...],
"blobs": [length, ...]}``. In ``body``, JSON ``null``, ``true``/``false``,
strings and finite numbers stand for themselves (integers within 64 bits);
every other value is an object with exactly one key:

=====================  ======================================================
``{"l": [v, ...]}``    a list (read back as a tuple)
``{"m": [[k, v], ...]}`` a map with string keys, in order, none repeated
``{"p": i}``           the ``i``-th tensor (a :class:`Params`)
``{"b": i}``           the ``i``-th byte string
``{"f": "nan"}``       a float that is not finite (``"inf"``, ``"-inf"``)
=====================  ======================================================

A bare JSON array or any other object is refused, as are trees nested
deeper than :data:`MAX_DEPTH`, indices out of range, and tensors or byte
strings that no index names. One object sent twice (the same model to every
client of a stage) travels once.

Examples
--------
>>> import numpy as np
>>> from fedshield.core import ClientUpdate, Params
>>> delta = Params({"w": np.ones((2, 2), np.float32)})
>>> update = ClientUpdate("a", delta, 10, {"loss": 0.5})
>>> back = decode(encode(update))
>>> back.client_id, back.num_examples, dict(back.metrics)
('a', 10, {'loss': 0.5})
>>> decode_tree(encode_tree({"key": b"\x00\x01", "n": [1, 2.5, None]}))
{'key': b'\x00\x01', 'n': (1, 2.5, None)}
>>> decode(b"\x80\x04junk")  # a pickle, say
Traceback (most recent call last):
...
fedshield.errors.ProtocolError: not a fedshield message (magic ...
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from fedshield.core.params import Params, ParamSpec
from fedshield.core.update import ClientUpdate
from fedshield.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAGIC",
    "MAX_DEPTH",
    "VERSION",
    "Tree",
    "decode",
    "decode_tree",
    "encode",
    "encode_tree",
]

MAGIC: Final = b"\x89FSU"
"""The first four bytes of every message."""
VERSION: Final = 1
"""The envelope's format version."""
DEFAULT_MAX_BYTES: Final = 1 << 31
"""The largest message :func:`decode` reads unless told otherwise (2 GiB)."""
MAX_DEPTH: Final = 32
"""How deeply a tree's lists and maps may nest."""

Tree = Any
"""What a tree holds: ``None``, ``bool``, ``int``, ``float``, ``str``,
``bytes``, :class:`Params`, and lists (tuples) and ``str``-keyed maps of
these (see the module docstring)."""

_PREFIX = len(MAGIC) + 1 + 4
_WORD = np.dtype("<f4")
_MAX_NAME = 1024
_MAX_DIMS = 16

_MIN_INT: Final = -(2**63)
_MAX_INT: Final = 2**64 - 1
_NON_FINITE: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "params": frozenset({"type", "spec"}),
    "tree": frozenset({"type", "body", "tensors", "blobs"}),
    "update": frozenset(
        {
            "type",
            "client_id",
            "num_examples",
            "metrics",
            "spec",
            "extras",
            "state",
        }
    ),
}


def encode(message: Params | ClientUpdate) -> bytes:
    """Serialise ``message`` to the binary envelope (see the module docstring).

    Raises
    ------
    ProtocolError
        If a metric is not a finite number or a field has the wrong type.
    """
    tensors: list[Params]
    if isinstance(message, Params):
        header: dict[str, Any] = {"type": "params", "spec": message.spec.to_json()}
        tensors = [message]
    elif isinstance(message, ClientUpdate):
        metrics = {}
        for key, value in message.metrics.items():
            number = float(value)
            if isinstance(value, bool) or not math.isfinite(number):
                raise ProtocolError(
                    f"metric {key!r} must be a finite number to be sent; got {value!r}"
                )
            metrics[str(key)] = number
        extras = sorted(message.extras)
        state = sorted(message.state)
        header = {
            "type": "update",
            "client_id": str(message.client_id),
            "num_examples": int(message.num_examples),
            "metrics": metrics,
            "spec": message.delta.spec.to_json(),
            "extras": [[k, message.extras[k].spec.to_json()] for k in extras],
            "state": [[k, message.state[k].spec.to_json()] for k in state],
        }
        tensors = [
            message.delta,
            *(message.extras[k] for k in extras),
            *(message.state[k] for k in state),
        ]
    else:
        raise ProtocolError(
            f"encode takes Params or ClientUpdate; got {type(message).__name__}"
        )
    text = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    parts = [MAGIC, bytes([VERSION]), len(text).to_bytes(4, "big"), text]
    parts += [np.ascontiguousarray(t.flat, dtype=_WORD).tobytes() for t in tensors]
    return b"".join(parts)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Params | ClientUpdate:
    """Parse a message written by :func:`encode`; refuse anything else.

    Parameters
    ----------
    data
        The message.
    max_bytes
        The largest message accepted (checked before anything is parsed).

    Raises
    ------
    ProtocolError
        Naming what is wrong (see the module docstring).
    """
    kind, header, payload = _open(data, max_bytes)
    if kind == "tree":
        raise ProtocolError("a tree message; read it with decode_tree")
    if kind == "params":
        (params,) = _tensors(payload, [_spec(header["spec"], "spec")])
        return params
    client_id = header["client_id"]
    if not isinstance(client_id, str) or not 0 < len(client_id) <= _MAX_NAME:
        raise ProtocolError(f"client_id must be a non-empty string; got {client_id!r}")
    count = header["num_examples"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ProtocolError(f"num_examples must be an integer >= 0; got {count!r}")
    metrics = header["metrics"]
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise ProtocolError(f"metrics must map names to numbers; got {metrics!r}")
    named = {"extras": _named(header["extras"]), "state": _named(header["state"])}
    specs = [
        _spec(header["spec"], "spec"),
        *(spec for _, spec in named["extras"]),
        *(spec for _, spec in named["state"]),
    ]
    delta, *rest = _tensors(payload, specs)
    extras = dict(
        zip((n for n, _ in named["extras"]), rest[: len(named["extras"])], strict=True)
    )
    state = dict(
        zip((n for n, _ in named["state"]), rest[len(named["extras"]) :], strict=True)
    )
    return ClientUpdate(
        client_id,
        delta,
        count,
        {str(k): float(v) for k, v in metrics.items()},
        extras,
        state,
    )


def _open(data: object, max_bytes: int) -> tuple[str, dict[str, Any], memoryview]:
    """Check the envelope; the message's type, header and payload."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"a message is bytes; got {type(data).__name__}")
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise ProtocolError(
            f"message of {len(view)} bytes is over the limit of {max_bytes}"
        )
    if len(view) < _PREFIX or bytes(view[:4]) != MAGIC:
        raise ProtocolError(
            f"not a fedshield message (magic {bytes(view[:4])!r}, expected {MAGIC!r})"
        )
    if view[4] != VERSION:
        raise ProtocolError(
            f"message format version {view[4]}; this fedshield reads {VERSION}"
        )
    size = int.from_bytes(view[5:9], "big")
    if _PREFIX + size > len(view):
        raise ProtocolError(
            f"header of {size} bytes overruns the message of {len(view)} bytes"
        )
    header = _header(bytes(view[_PREFIX : _PREFIX + size]))
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise ProtocolError(f"unknown message type {kind!r}")
    keys = set(header)
    if keys != _KEYS[kind]:
        missing = sorted(_KEYS[kind] - keys)
        extra = sorted(keys - _KEYS[kind])
        raise ProtocolError(
            f"{kind} message: missing keys {missing}, unknown keys {extra}"
        )
    return kind, header, view[_PREFIX + size :]


def encode_tree(value: Tree) -> bytes:
    """Serialise a tree (see the module docstring) to the binary envelope.

    Numpy scalars are written as the Python numbers they equal; one
    :class:`Params` or ``bytes`` object met twice is written once.

    Raises
    ------
    ProtocolError
        Naming the first value (and where) that a tree cannot hold: another
        type, a map key that is not a string, an integer beyond 64 bits, or
        nesting deeper than :data:`MAX_DEPTH`.
    """
    writer = _TreeWriter()
    body = writer.node(value, "the message", 0)
    header = {
        "type": "tree",
        "body": body,
        "tensors": [t.spec.to_json() for t in writer.tensors],
        "blobs": [len(b) for b in writer.blobs],
    }
    text = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    parts: list[bytes | memoryview] = [
        MAGIC,
        bytes([VERSION]),
        len(text).to_bytes(4, "big"),
        text,
    ]
    # Views of the arrays (no copy of their own): the join copies once.
    parts += [
        memoryview(np.ascontiguousarray(t.flat, dtype=_WORD)).cast("B")  # type: ignore[arg-type]
        for t in writer.tensors
    ]
    parts += writer.blobs
    return b"".join(parts)


def decode_tree(
    data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Tree:
    """Parse a tree written by :func:`encode_tree`; refuse anything else.

    Lists come back as tuples, maps as dicts, tensors as :class:`Params`
    owning their arrays, byte strings as ``bytes``.

    Raises
    ------
    ProtocolError
        Naming what is wrong (see the module docstring).
    """
    kind, header, payload = _open(data, max_bytes)
    if kind != "tree":
        raise ProtocolError(f"expected a tree message; got a {kind} message")
    tensors = header["tensors"]
    blobs = header["blobs"]
    if not isinstance(tensors, list):
        raise ProtocolError(f"tensors must be a list of layouts; got {tensors!r}")
    if not isinstance(blobs, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in blobs
    ):
        raise ProtocolError(f"blobs must be a list of lengths >= 0; got {blobs!r}")
    specs = [_spec(spec, f"tensor {i}") for i, spec in enumerate(tensors)]
    words = sum(spec.size for spec in specs) * _WORD.itemsize
    if words + sum(blobs) != len(payload):
        raise ProtocolError(
            f"payload holds {len(payload)} bytes; the layouts and byte strings "
            f"need {words + sum(blobs)}"
        )
    reader = _TreeReader(_tensors(payload[:words], specs), [], len(blobs))
    offset = words
    for length in blobs:
        reader.blobs.append(bytes(payload[offset : offset + length]))
        offset += length
    value = reader.node(header["body"], 0)
    unused = [i for i in range(len(specs)) if i not in reader.used_tensors]
    unused_blobs = [i for i in range(len(blobs)) if i not in reader.used_blobs]
    if unused or unused_blobs:
        raise ProtocolError(
            f"tree never refers to tensors {unused} or byte strings {unused_blobs}"
        )
    return value


class _TreeWriter:
    """Turns a tree into its JSON body, collecting tensors and byte strings."""

    def __init__(self) -> None:
        self.tensors: list[Params] = []
        self.blobs: list[bytes] = []
        self._tensor_index: dict[int, int] = {}
        self._blob_index: dict[int, int] = {}

    def node(self, value: object, where: str, depth: int) -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, int | np.integer):
            integer = int(value)
            if not _MIN_INT <= integer <= _MAX_INT:
                raise ProtocolError(f"{where}: integer {integer} is beyond 64 bits")
            return integer
        if isinstance(value, float | np.floating):
            number = float(value)
            if math.isfinite(number):
                return number
            return {"f": "nan" if math.isnan(number) else repr(number)}
        if isinstance(value, Params):
            return {"p": self._index(value, self.tensors, self._tensor_index)}
        if isinstance(value, bytes | bytearray | memoryview):
            blob = bytes(value) if not isinstance(value, bytes) else value
            return {"b": self._index(blob, self.blobs, self._blob_index)}
        if depth >= MAX_DEPTH:
            raise ProtocolError(f"{where}: nested deeper than {MAX_DEPTH}")
        if isinstance(value, list | tuple):
            return {
                "l": [
                    self.node(item, f"{where}[{i}]", depth + 1)
                    for i, item in enumerate(value)
                ]
            }
        if isinstance(value, Mapping):
            pairs = []
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ProtocolError(f"{where}: map key {key!r} is not a string")
                pairs.append([key, self.node(item, f"{where}[{key!r}]", depth + 1)])
            return {"m": pairs}
        raise ProtocolError(f"{where}: cannot send a {type(value).__name__}")

    @staticmethod
    def _index(value: Any, table: list[Any], index: dict[int, int]) -> int:
        found = index.get(id(value))
        if found is None:
            found = index[id(value)] = len(table)
            table.append(value)
        return found


class _TreeReader:
    """Rebuilds a tree from its JSON body, strictly."""

    def __init__(self, tensors: list[Params], blobs: list[bytes], num_blobs: int):
        self.tensors = tensors
        self.blobs = blobs
        self.num_blobs = num_blobs
        self.used_tensors: set[int] = set()
        self.used_blobs: set[int] = set()

    def node(self, node: object, depth: int) -> Any:
        if node is None or isinstance(node, bool | str | float):
            return node
        if isinstance(node, int):
            if not _MIN_INT <= node <= _MAX_INT:
                raise ProtocolError(f"integer {node} is beyond 64 bits")
            return node
        if isinstance(node, list):
            raise ProtocolError("a bare JSON array in a tree (lists are {'l': [...]})")
        if not isinstance(node, dict) or len(node) != 1:
            raise ProtocolError(f"malformed tree node {_short(node)}")
        ((tag, content),) = node.items()
        if tag == "f":
            if not isinstance(content, str) or content not in _NON_FINITE:
                raise ProtocolError(f"malformed non-finite float {_short(node)}")
            return _NON_FINITE[content]
        if tag in ("p", "b"):
            size = len(self.tensors) if tag == "p" else self.num_blobs
            if (
                isinstance(content, bool)
                or not isinstance(content, int)
                or not 0 <= content < size
            ):
                raise ProtocolError(f"tree node {_short(node)} refers to nothing")
            if tag == "p":
                self.used_tensors.add(content)
                return self.tensors[content]
            self.used_blobs.add(content)
            return self.blobs[content]
        if depth >= MAX_DEPTH:
            raise ProtocolError(f"tree nested deeper than {MAX_DEPTH}")
        if tag == "l":
            if not isinstance(content, list):
                raise ProtocolError(f"malformed list {_short(node)}")
            return tuple(self.node(item, depth + 1) for item in content)
        if tag == "m":
            if not isinstance(content, list):
                raise ProtocolError(f"malformed map {_short(node)}")
            out: dict[str, Any] = {}
            for pair in content:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ProtocolError(f"malformed map entry {_short(pair)}")
                key, item = pair
                if not isinstance(key, str):
                    raise ProtocolError(f"map key {_short(key)} is not a string")
                if key in out:
                    raise ProtocolError(f"map repeats the key {key!r}")
                out[key] = self.node(item, depth + 1)
            return out
        raise ProtocolError(f"unknown tree node tag {tag!r}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_constant(name: str) -> None:
    raise ProtocolError(f"header holds {name}, which is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ProtocolError(f"header holds {text}, which overflows a float")
    return number


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"header repeats the key {key!r}")
        out[key] = value
    return out


def _header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # ValueError: JSON's, and an integer of over 4300 digits.
        raise ProtocolError(f"header is not UTF-8 JSON: {err}") from None
    if not isinstance(header, dict):
        raise ProtocolError(
            f"header must be a JSON object; got {type(header).__name__}"
        )
    return header


def _spec(value: object, where: str) -> ParamSpec:
    if not isinstance(value, list):
        raise ProtocolError(f"{where} must be a list of [name, shape]; got {value!r}")
    entries = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not 0 < len(item[0]) <= _MAX_NAME
            or not isinstance(item[1], list)
            or len(item[1]) > _MAX_DIMS
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                for d in item[1]
            )
        ):
            raise ProtocolError(f"{where}: malformed entry {item!r}")
        entries.append((item[0], tuple(item[1])))
    try:
        return ParamSpec(tuple(entries))
    except Exception as err:  # e.g. repeated names
        raise ProtocolError(f"{where}: {err}") from None


def _named(value: object) -> list[tuple[str, ParamSpec]]:
    if not isinstance(value, list):
        raise ProtocolError(f"expected a list of [name, spec]; got {value!r}")
    out: list[tuple[str, ParamSpec]] = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise ProtocolError(f"malformed [name, spec] entry {item!r}")
        out.append((item[0], _spec(item[1], f"tensor {item[0]!r}")))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ProtocolError(f"repeated tensor names {names}")
    return out


def _tensors(payload: memoryview, specs: list[ParamSpec]) -> list[Params]:
    sizes = [spec.size for spec in specs]
    needed = sum(sizes) * _WORD.itemsize
    if needed != len(payload):
        raise ProtocolError(
            f"payload holds {len(payload)} bytes; the layouts need {needed} "
            f"({sum(sizes)} float32 words)"
        )
    out, offset = [], 0
    for spec, size in zip(specs, sizes, strict=True):
        words = np.frombuffer(
            payload, dtype=_WORD, count=size, offset=offset * _WORD.itemsize
        ).astype(np.float32)
        out.append(Params.from_flat(words, spec, copy=False))
        offset += size
    return out
