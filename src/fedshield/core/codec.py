r"""A strict binary codec for what crosses a process boundary: no pickle.

:class:`~fedshield.core.Params` and :class:`~fedshield.core.ClientUpdate`
are written by :func:`encode` into one binary envelope and read back by
:func:`decode`, which refuses anything malformed with
:class:`~fedshield.errors.ProtocolError`. Decoding runs no code of the
sender's (unpickling a client's reply would run the client's code on the
server: harmless in one process, remote code execution over a network).

The envelope (format :data:`VERSION` 1)
---------------------------------------
========  =========  ==========================================================
offset    size       content
========  =========  ==========================================================
0         4          :data:`MAGIC`, ``b"\x89FSU"``
4         1          :data:`VERSION`
5         4          ``h``: length of the header, big-endian
9         ``h``      the header: a UTF-8 JSON object
9 + h     the rest   the tensors, little-endian ``float32``, one after another
========  =========  ==========================================================

The header names the message's ``type`` (``"params"`` or ``"update"``), its
small fields, the layout (:class:`~fedshield.core.ParamSpec` JSON) of every
tensor in payload order, and nothing else. :func:`decode` refuses: another
magic or version; a message over ``max_bytes``; a header that overruns the
message, is not UTF-8 JSON, repeats a key, holds NaN or infinity, or has
unknown or missing keys or wrong types (booleans are not integers); a layout
with repeated names, negative sizes or more words than the payload; payload
bytes that are not exactly the layouts' words (truncated, extended).
Whether the values are sensible (finite, the right spec) is the round's
check (:func:`~fedshield.core.validate_update`), not the codec's.

Examples
--------
>>> import numpy as np
>>> from fedshield.core import ClientUpdate, Params
>>> delta = Params({"w": np.ones((2, 2), np.float32)})
>>> update = ClientUpdate("a", delta, 10, {"loss": 0.5})
>>> back = decode(encode(update))
>>> back.client_id, back.num_examples, dict(back.metrics)
('a', 10, {'loss': 0.5})
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

__all__ = ["DEFAULT_MAX_BYTES", "MAGIC", "VERSION", "decode", "encode"]

MAGIC: Final = b"\x89FSU"
"""The first four bytes of every message."""
VERSION: Final = 1
"""The envelope's format version."""
DEFAULT_MAX_BYTES: Final = 1 << 31
"""The largest message :func:`decode` reads unless told otherwise (2 GiB)."""

_PREFIX = len(MAGIC) + 1 + 4
_WORD = np.dtype("<f4")
_MAX_NAME = 1024
_MAX_DIMS = 16

_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "params": frozenset({"type", "spec"}),
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
    payload = view[_PREFIX + size :]
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


def _refuse_constant(name: str) -> None:
    raise ProtocolError(f"header holds {name}, which is not JSON")


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
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
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
