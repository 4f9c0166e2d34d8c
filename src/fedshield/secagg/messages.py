r"""Wire messages of the SecAgg / SecAgg+ protocol: typed, versioned, validated.

Every message a party sends is one frozen dataclass below, serialised by
:meth:`Message.to_bytes` to a binary envelope and parsed back by
:func:`decode`.

The envelope (wire format :data:`VERSION` 4)
--------------------------------------------
========  =================  ===================================================
offset    size               content
========  =================  ===================================================
0         4                  :data:`MAGIC`, ``b"\x89FSA"``
4         1                  :data:`VERSION`
5         4                  ``h``: length of the header, big-endian
9         ``h``              the header: a UTF-8 JSON object
9 + h     the rest           the payloads, raw bytes, one after the other
========  =================  ===================================================

The header holds the small typed fields:

``type`` and ``stage``
    Which message it is and the protocol stage it belongs to; they must agree.
``round_idx``
    The training round (0-based).
``session``
    16 random bytes (base64) the server draws for one run of the protocol. A
    reply from an earlier attempt at the same round carries another session
    and is refused, so replays across attempts are caught as well as across
    rounds.
``sender`` and ``recipient``
    Client ids, or :data:`SERVER_ID` for the server.
``body``
    The message's own small fields (keys and signatures as base64).
``payloads``
    The length of each payload in bytes; together they must account for
    exactly the bytes after the header.

The large fields travel as payloads: a masked vector as its ``d`` words
packed to exactly ``b`` bits each (:func:`pack_words`, ``ceil(d b / 8)``
bytes), each AES-GCM ciphertext of a share pair as its raw bytes, and Shamir
shares as :data:`FIELD_BYTES`-byte big-endian field elements. The encrypted
share pair itself (:class:`SharePayload`) is binary too.

:func:`decode` refuses (with :class:`~fedshield.errors.ProtocolError`)
anything that is not exactly one of these messages: another magic (a message
of the JSON wire format of version 1 is named as such), another version, a
header that overruns the message or is not a JSON object, payload lengths
that do not add up to what follows the header (truncated or extended
messages, trailing bytes), unknown or missing keys, repeated JSON keys, wrong
JSON types, booleans where integers belong, keys that are not 32 bytes,
signatures that are not 64, a vector whose word count or bit width is not the
configured ``d`` and ``b``, whose payload is not ``ceil(d b / 8)`` bytes or
whose padding bits are not zero, a share outside ``[0, PRIME)``, a payload
too many or too few. The protocol layer then checks what only it can know
(the right sender, stage, round, session, and whom a message may name).

Example
-------
>>> msg = ConsistencyRequest(session=bytes(16), round_idx=0, sender=SERVER_ID,
...                          recipient="a", survivors=("a", "b"))
>>> data = msg.to_bytes()
>>> data[:5] == MAGIC + bytes([VERSION])
True
>>> decode(data, vector_length=4, modulus_bits=16) == msg
True
>>> reply = MaskedInputReply(session=bytes(16), round_idx=0, sender="a",
...                          recipient=SERVER_ID, modulus_bits=12,
...                          masked_input=np.arange(4, dtype=np.uint64))
>>> len(pack_words(reply.masked_input, 12))  # 4 words of 12 bits
6
>>> decode(reply.to_bytes(), vector_length=4, modulus_bits=12) == reply
True
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from fedshield.errors import ProtocolError
from fedshield.secagg.crypto import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from fedshield.secagg.shamir import CHUNK_BYTES, PRIME

__all__ = [
    "DIGEST_BYTES",
    "FIELD_BYTES",
    "MAGIC",
    "MAX_CIPHERTEXT_BYTES",
    "MAX_CLIENT_ID_CHARS",
    "MAX_MESSAGE_BYTES",
    "PREFIX_BYTES",
    "SECRET_BYTES",
    "SERVER_ID",
    "SESSION_BYTES",
    "SHARE_WORDS",
    "SIGNATURE_BYTES",
    "VERSION",
    "AdvertiseReply",
    "AdvertiseRequest",
    "Advertisement",
    "ConsistencyReply",
    "ConsistencyRequest",
    "MaskedInputReply",
    "MaskedInputRequest",
    "Message",
    "ShareKeysReply",
    "ShareKeysRequest",
    "SharePayload",
    "Stage",
    "UnmaskReply",
    "UnmaskRequest",
    "check_client_id",
    "decode",
    "pack_words",
    "packed_size",
    "unpack_words",
]

VERSION = 4
"""Wire format version; :func:`decode` refuses any other.

Version 1 was UTF-8 JSON throughout (base64 ``uint64`` words for a masked
vector); version 2 is the binary envelope of the module docstring. Version 3
keeps the envelope and changes what stages 0 and 1 carry: the server commits
to its share of the graph seed (``seed_commitment``) instead of sending the
seed, an advertisement carries a commitment to the client's self-mask seed
(``self_mask_commitment``) and, when signed, signs the round's client list
too, and the share-keys request reveals the server's seed share and forwards
the advertisement that completes the seed (``seed_reveal``, ``leader``); see
:mod:`fedshield.secagg.protocol`. Version 4 keeps the messages of version 3
and changes what a client accepts in malicious mode: the survivor list must
name the graph seed's leader and carry its signature (a version-3 client
accepts lists without it, which a server re-running a round under one
session can exploit), so version-3 parties are refused. The version is part
of every key-derivation, signature and hash context, so nothing signed or
derived under version 3 verifies under version 4.
"""

MAGIC = b"\x89FSA"
"""First four bytes of every message (not UTF-8, so never mistaken for text)."""

PREFIX_BYTES = len(MAGIC) + 1 + 4
"""Bytes before the header: magic, version byte, header length."""

SERVER_ID = "server"
"""The ``sender`` of every request and ``recipient`` of every reply.

No client may use this id.
"""

SESSION_BYTES = 16
"""Length of the random session id the server draws per protocol run."""

SIGNATURE_BYTES = 64
"""Length of an Ed25519 signature."""

DIGEST_BYTES = 32
"""Length of a SHA-256 digest: commitments, the config digest, the seed share."""

SECRET_BYTES = 32
"""Length of each shared secret: the self-mask seed and the X25519 masking key."""

SHARE_WORDS = -(-SECRET_BYTES // CHUNK_BYTES)
"""Field elements in one share of a 32-byte secret (one per 16-byte chunk)."""

FIELD_BYTES = -(-PRIME.bit_length() // 8)
"""Bytes of one field element on the wire (big-endian): 17 for ``2**130 - 5``."""

MAX_CLIENT_ID_CHARS = 256
"""Longest client id accepted."""

MAX_CIPHERTEXT_BYTES = 4096
"""Largest encrypted share pair accepted (an honest one is about 120 bytes)."""

MAX_MESSAGE_BYTES = 1 << 30
"""Largest serialised message :func:`decode` parses."""

_MIN_CIPHERTEXT_BYTES = NONCE_BYTES + TAG_BYTES + 1
_SHARE_BYTES = SHARE_WORDS * FIELD_BYTES
_MAX_ID_BYTES = 4 * MAX_CLIENT_ID_CHARS  # UTF-8 needs at most 4 bytes a character

_Json: TypeAlias = dict[str, Any]
_ADVERTISEMENT_KEYS = frozenset(
    {
        "client_id",
        "encryption_key",
        "masking_key",
        "self_mask_commitment",
        "signature",
    }
)
Share: TypeAlias = tuple[int, ...]
"""One share of a 32-byte secret: :data:`SHARE_WORDS` field elements."""


class Stage(StrEnum):
    """Protocol stages (Bonawitz et al. 2017, Fig. 4, rounds 0-4).

    A :class:`StrEnum`: ``Stage.SHARE_KEYS == "share_keys"``.
    """

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


# --------------------------------------------------------------------------
# Bit packing of uint64 vectors


@functools.lru_cache(maxsize=64)
def _layout(bits: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """How ``bits``-bit values tile 64-bit words.

    Returns ``(values, words, plan)``: every ``values`` consecutive values
    fill exactly ``words`` little-endian 64-bit words, and value ``j`` of such
    a group starts in word ``plan[j][0]`` at bit ``plan[j][1]`` (and spills
    into the next word when that bit plus ``bits`` exceeds 64).
    """
    common = math.gcd(bits, 64)
    values = 64 // common
    return values, bits // common, tuple(divmod(j * bits, 64) for j in range(values))


@functools.lru_cache(maxsize=64)
def _gather_plan(
    bits: int,
) -> tuple[
    npt.NDArray[np.intp],
    npt.NDArray[np.uint64],
    npt.NDArray[np.intp],
    npt.NDArray[np.intp],
    npt.NDArray[np.intp],
    npt.NDArray[np.uint64],
]:
    """:func:`_layout`'s plan as index arrays, for whole-group numpy operations.

    Returns ``(word, offset, starts, spill, spill_word, spill_shift)``: value
    ``j`` of a group starts in word ``word[j]`` at bit ``offset[j]``;
    ``starts`` are the first values of each word (every word holds the start
    of at least one value, as ``bits <= 64``); the values ``spill`` run over
    into word ``spill_word``, which holds their top bits from bit 0 (they are
    shifted by ``spill_shift = 64 - offset``).
    """
    _, _, plan = _layout(bits)
    word = np.array([w for w, _ in plan], dtype=np.intp)
    offset = np.array([o for _, o in plan], dtype=np.uint64)
    starts = np.flatnonzero(np.diff(word, prepend=-1)).astype(np.intp)
    spill = np.array(
        [j for j, (_, o) in enumerate(plan) if o + bits > 64], dtype=np.intp
    )
    spill_word = (word[spill] + 1).astype(np.intp)
    spill_shift = np.uint64(64) - offset[spill]
    return word, offset, starts, spill, spill_word, spill_shift


_GATHER_GROUPS = 1 << 12
"""Up to this many groups of values, pack and unpack whole groups at once
(a handful of numpy calls, however many values a group holds); above it, one
value position at a time (less memory traffic for long vectors)."""


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"bits must be an integer in [1, 64], got {bits!r}")


def packed_size(count: int, bits: int) -> int:
    """Bytes :func:`pack_words` makes of ``count`` values of ``bits`` bits.

    Parameters
    ----------
    count
        Number of values ``d``.
    bits
        Bits per value ``b``, 1 to 64.

    Returns
    -------
    int
        ``ceil(d b / 8)``.
    """
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    return -(-count * bits // 8)


def pack_words(values: npt.ArrayLike, bits: int) -> bytes:
    """Pack non-negative integers below ``2**bits`` to exactly ``bits`` bits each.

    Value ``i`` occupies bits ``[i bits, (i + 1) bits)`` of the output, read
    as one little-endian integer (least significant bit first); the bits
    after the last value, up to the byte boundary, are zero. Vectorised: one
    numpy operation per value position in a group of ``64 / gcd(bits, 64)``
    values, never a Python loop over the values.

    Parameters
    ----------
    values
        A one-dimensional array of unsigned (or non-negative signed) integers.
    bits
        Bits per value, 1 to 64.

    Returns
    -------
    bytes
        :func:`packed_size` ``(len(values), bits)`` bytes.

    Raises
    ------
    ValueError
        If ``bits`` is not in ``[1, 64]``, ``values`` is not a one-dimensional
        integer array, or a value is negative or not below ``2**bits`` (it
        cannot be expressed in ``bits`` bits).

    Examples
    --------
    >>> pack_words(np.array([1, 2, 3], dtype=np.uint64), 4).hex()
    '2103'
    """
    _check_bits(bits)
    array = np.asarray(values)
    if array.ndim != 1 or array.dtype.kind not in "ui":
        raise ValueError(
            f"expected a one-dimensional integer array, got {array.dtype} of "
            f"shape {array.shape}"
        )
    if array.dtype.kind == "i" and array.size and int(array.min()) < 0:
        raise ValueError("a value is negative")
    words = array.astype(np.uint64, copy=False)
    count = int(words.size)
    if bits < 64 and count and int(words.max()) >> bits:
        raise ValueError(f"a value is not below 2**{bits}: it cannot be packed")
    per_group, width, plan = _layout(bits)
    groups = -(-count // per_group)
    if count == groups * per_group:
        grid = words.reshape(groups, per_group)
    else:
        grid = np.zeros((groups, per_group), dtype=np.uint64)
        grid.reshape(-1)[:count] = words
    if groups <= _GATHER_GROUPS:
        _, offsets, starts, spill, spill_word, spill_shift = _gather_plan(bits)
        # The values of a word occupy disjoint bits: OR them together.
        out = np.bitwise_or.reduceat(grid << offsets, starts, axis=1)
        if spill.size:
            out[:, spill_word] |= grid[:, spill] >> spill_shift
    else:
        out = np.zeros((groups, width), dtype=np.uint64)
        for j, (word_j, offset) in enumerate(plan):
            column = grid[:, j]
            out[:, word_j] |= column << np.uint64(offset)
            if offset + bits > 64:
                out[:, word_j + 1] |= column >> np.uint64(64 - offset)
    return out.astype("<u8", copy=False).tobytes()[: packed_size(count, bits)]


def unpack_words(
    data: bytes | memoryview, count: int, bits: int, *, where: str = "packed vector"
) -> npt.NDArray[np.uint64]:
    """Inverse of :func:`pack_words`, validating strictly.

    Parameters
    ----------
    data
        The packed bytes.
    count
        Number of values ``d`` expected.
    bits
        Bits per value ``b``, 1 to 64.
    where
        Names the field in error messages.

    Returns
    -------
    numpy.ndarray
        ``count`` ``uint64`` values, each below ``2**bits`` (by construction:
        a value of more bits cannot be expressed).

    Raises
    ------
    ProtocolError
        If ``data`` is not exactly :func:`packed_size` ``(count, bits)`` bytes
        or the padding bits after the last value are not zero.
    ValueError
        If ``bits`` is not in ``[1, 64]`` or ``count`` is negative.
    """
    expected = packed_size(count, bits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != expected:
        raise ProtocolError(
            f"{where}: expected {expected} bytes ({count} words of {bits} bits), "
            f"got {raw.size}"
        )
    spare = count * bits % 8
    if spare and int(raw[-1]) >> spare:
        raise ProtocolError(f"{where}: the padding bits after the last word are not 0")
    per_group, width, plan = _layout(bits)
    groups = -(-count // per_group)
    buffer = np.zeros(groups * width * 8, dtype=np.uint8)
    buffer[:expected] = raw
    words = buffer.view("<u8").reshape(groups, width)
    mask = np.uint64((1 << bits) - 1)
    if groups <= _GATHER_GROUPS:
        columns, offsets, _, spill, spill_word, spill_shift = _gather_plan(bits)
        out = words[:, columns] >> offsets
        if spill.size:
            out[:, spill] |= words[:, spill_word] << spill_shift
        if bits < 64:
            out &= mask
        return out.reshape(-1)[:count]
    out = np.empty((groups, per_group), dtype=np.uint64)
    for j, (word, offset) in enumerate(plan):
        column = words[:, word] >> np.uint64(offset)
        if offset + bits > 64:
            column |= words[:, word + 1] << np.uint64(64 - offset)
        if bits < 64:
            column &= mask
        out[:, j] = column
    return out.reshape(-1)[:count]


# --------------------------------------------------------------------------
# Field readers: each checks one JSON value and raises ProtocolError.


class _Fields:
    """The body of a parsed message; each read removes a key and checks its type."""

    def __init__(self, body: _Json, where: str) -> None:
        self._body = dict(body)
        self._where = where

    def _take(self, key: str) -> Any:
        if key not in self._body:
            raise ProtocolError(f"{self._where}: missing field {key!r}")
        return self._body.pop(key)

    def finish(self) -> None:
        if self._body:
            raise ProtocolError(f"{self._where}: unknown field(s) {sorted(self._body)}")

    def integer(self, key: str, *, low: int = 0) -> int:
        value = self._take(key)
        return _integer(value, f"{self._where}.{key}", low=low)

    def client_id(self, key: str) -> str:
        return check_client_id(self._take(key), f"{self._where}.{key}")

    def bytes_(self, key: str, *, size: int | None = None) -> bytes:
        return _bytes(self._take(key), f"{self._where}.{key}", size=size)

    def optional_bytes(self, key: str, *, size: int) -> bytes | None:
        value = self._take(key)
        if value is None:
            return None
        return _bytes(value, f"{self._where}.{key}", size=size)

    def client_ids(self, key: str) -> tuple[str, ...]:
        value = self._take(key)
        where = f"{self._where}.{key}"
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list of client ids")
        ids = tuple(value)
        if not all(
            type(item) is str
            and 0 < len(item) <= MAX_CLIENT_ID_CHARS
            and item.isascii()
            for item in ids
        ):
            for item in ids:
                check_client_id(item, where)  # raises, naming the bad id
        if len(set(ids)) != len(ids):
            raise ProtocolError(f"{where}: a client id is repeated")
        return ids

    def mapping(self, key: str, parse: Callable[[Any, str], Any]) -> dict[str, Any]:
        value = self._take(key)
        where = f"{self._where}.{key}"
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object keyed by client id")
        return {
            check_client_id(name, where): parse(item, f"{where}[{name!r}]")
            for name, item in value.items()
        }

    def raw(self, key: str) -> Any:
        return self._take(key)


class _Payloads:
    """The payloads of a parsed message, taken in order."""

    def __init__(self, chunks: list[memoryview], where: str) -> None:
        self._chunks = chunks
        self._next = 0
        self._where = where

    def take(self, name: str) -> memoryview:
        if self._next >= len(self._chunks):
            raise ProtocolError(
                f"{self._where}: missing payload for {name} (the header lists "
                f"{len(self._chunks)})"
            )
        chunk = self._chunks[self._next]
        self._next += 1
        return chunk

    def finish(self) -> None:
        if self._next != len(self._chunks):
            raise ProtocolError(
                f"{self._where}: {len(self._chunks) - self._next} payload(s) too many"
            )


def check_client_id(value: object, where: str = "client id") -> str:
    """Return ``value`` if it is a valid client id, else raise ProtocolError.

    A client id is a non-empty string of at most :data:`MAX_CLIENT_ID_CHARS`
    characters that UTF-8 can encode (every id is hashed and signed as
    UTF-8: a lone surrogate such as U+D800, which a JSON escape can carry,
    is refused here rather than failing later with a ``UnicodeEncodeError``).
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CLIENT_ID_CHARS:
        raise ProtocolError(
            f"{where}: a client id is a string of 1 to {MAX_CLIENT_ID_CHARS} "
            f"characters, got {value!r:.80}"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(
                f"{where}: client id {value!r:.80} cannot be encoded as UTF-8 "
                f"({exc.reason} at position {exc.start})"
            ) from None
    return value


def _integer(
    value: object, where: str, *, low: int = 0, high: int | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where}: expected an integer, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        raise ProtocolError(f"{where}: {value} is outside [{low}, {high})")
    return value


def _bytes(value: object, where: str, *, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(
            f"{where}: expected base64 text, got {type(value).__name__}"
        )
    try:
        # What base64.b64decode(value, validate=True) does, minus its wrapping.
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: not ASCII
        raise ProtocolError(f"{where}: invalid base64") from exc
    if size is not None and len(data) != size:
        raise ProtocolError(f"{where}: expected {size} bytes, got {len(data)}")
    return data


def _ciphertext(value: bytes | memoryview, where: str) -> bytes:
    if not _MIN_CIPHERTEXT_BYTES <= len(value) <= MAX_CIPHERTEXT_BYTES:
        raise ProtocolError(
            f"{where}: a ciphertext is {_MIN_CIPHERTEXT_BYTES} to "
            f"{MAX_CIPHERTEXT_BYTES} bytes, got {len(value)}"
        )
    return bytes(value)


def _signature(value: object, where: str) -> bytes:
    return _bytes(value, where, size=SIGNATURE_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _share_bytes(shares: list[Share]) -> bytes:
    """Shares as consecutive :data:`FIELD_BYTES`-byte big-endian elements."""
    for share in shares:
        if len(share) != SHARE_WORDS:
            raise ValueError(f"a share has {SHARE_WORDS} field elements")
    elements = [element for share in shares for element in share]
    if not all(0 <= element < PRIME for element in elements):
        raise ValueError("a share element is outside [0, PRIME)")
    return b"".join([element.to_bytes(FIELD_BYTES, "big") for element in elements])


def _shares_from(data: bytes | memoryview, count: int, where: str) -> list[Share]:
    """Parse ``count`` shares written by :func:`_share_bytes`."""
    if len(data) != count * _SHARE_BYTES:
        raise ProtocolError(
            f"{where}: expected {count * _SHARE_BYTES} bytes ({count} shares of "
            f"{SHARE_WORDS} {FIELD_BYTES}-byte field elements), got {len(data)}"
        )
    raw = bytes(data)
    elements = [
        int.from_bytes(raw[i : i + FIELD_BYTES], "big")
        for i in range(0, len(raw), FIELD_BYTES)
    ]
    if elements and max(elements) >= PRIME:
        raise ProtocolError(f"{where}: a share element is outside [0, PRIME)")
    # SHARE_WORDS consecutive elements per share (the length was checked).
    return list(zip(*[iter(elements)] * SHARE_WORDS, strict=True))


def _ciphertexts_out(ciphertexts: Mapping[str, bytes]) -> tuple[_Json, list[bytes]]:
    """Ids in the header, one payload per ciphertext in the same order."""
    ids = list(ciphertexts)
    return {"ciphertexts": ids}, [bytes(ciphertexts[cid]) for cid in ids]


def _ciphertexts_in(
    fields: _Fields, payloads: _Payloads, where: str
) -> dict[str, bytes]:
    ids = fields.client_ids("ciphertexts")
    out: dict[str, bytes] = {}
    for cid in ids:
        name = f"{where}.ciphertexts[{cid!r}]"
        out[cid] = _ciphertext(payloads.take(name), name)
    return out


# --------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, kw_only=True)
class Message:
    """Fields every message carries (see the module docstring).

    Attributes
    ----------
    session
        The server's :data:`SESSION_BYTES`-byte id of this protocol run.
    round_idx
        The training round, 0-based.
    sender, recipient
        Client ids, or :data:`SERVER_ID`.
    """

    TYPE: ClassVar[str] = ""
    STAGE: ClassVar[Stage] = Stage.ABORTED

    session: bytes
    round_idx: int
    sender: str
    recipient: str

    @property
    def stage(self) -> Stage:
        """The protocol stage this message belongs to."""
        return self.STAGE

    def to_bytes(self) -> bytes:
        """Serialise to the binary envelope (see the module docstring).

        Raises
        ------
        ValueError
            If a field cannot be expressed on the wire (a vector word not
            below ``2**modulus_bits``, a share element outside the field).
        """
        body, payloads = self._encode()
        header = json.dumps(
            {
                "type": self.TYPE,
                "stage": str(self.STAGE),
                "round_idx": self.round_idx,
                "session": _b64(self.session),
                "sender": self.sender,
                "recipient": self.recipient,
                "body": body,
                "payloads": [len(p) for p in payloads],
            },
            separators=(",", ":"),
        ).encode("utf-8")
        prefix = MAGIC + bytes([VERSION]) + len(header).to_bytes(4, "big")
        return b"".join([prefix, header, *payloads])

    def _encode(self) -> tuple[_Json, list[bytes]]:  # pragma: no cover - overridden
        """The header's ``body`` and the payloads."""
        raise NotImplementedError

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class AdvertiseRequest(Message):
    """Stage 0, server -> client: who takes part, and the server's seed commitment.

    Attributes
    ----------
    clients
        Every client of the round, sorted, each once. A client's index in it
        plus one is its Shamir share position.
    seed_commitment
        SHA-256 commitment to the server's 32-byte share of the graph seed,
        revealed in stage 1 (:class:`ShareKeysRequest`); the seed itself
        also depends on a client's advertisement (see
        :mod:`fedshield.secagg.protocol`).
    config_digest
        SHA-256 of the server's configuration and number of neighbours; the
        client refuses a run whose digest differs from its own.
    """

    TYPE: ClassVar[str] = "advertise_request"
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS

    clients: tuple[str, ...]
    seed_commitment: bytes
    config_digest: bytes

    def _encode(self) -> tuple[_Json, list[bytes]]:
        return {
            "clients": list(self.clients),
            "seed_commitment": _b64(self.seed_commitment),
            "config_digest": _b64(self.config_digest),
        }, []

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        return cls(
            **head,
            clients=fields.client_ids("clients"),
            seed_commitment=fields.bytes_("seed_commitment", size=DIGEST_BYTES),
            config_digest=fields.bytes_("config_digest", size=DIGEST_BYTES),
        )


@dataclass(frozen=True, kw_only=True)
class AdvertiseReply(Message):
    """Stage 0, client -> server: two fresh X25519 public keys and a commitment.

    Attributes
    ----------
    encryption_key
        ``c_pk``: agrees the keys that encrypt shares between two clients.
    masking_key
        ``s_pk``: agrees the pairwise mask seeds.
    self_mask_commitment
        SHA-256 commitment to the self-mask seed ``b_u`` (and the context):
        the server checks the seed it rebuilds from shares against it.
    signature
        Ed25519 signature of the keys, the commitment, the round's client
        list and the server's seed commitment (malicious-server variant
        only; ``None`` otherwise).
    """

    TYPE: ClassVar[str] = "advertise_reply"
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS

    encryption_key: bytes
    masking_key: bytes
    self_mask_commitment: bytes
    signature: bytes | None = None

    def _encode(self) -> tuple[_Json, list[bytes]]:
        return {
            "encryption_key": _b64(self.encryption_key),
            "masking_key": _b64(self.masking_key),
            "self_mask_commitment": _b64(self.self_mask_commitment),
            "signature": None if self.signature is None else _b64(self.signature),
        }, []

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        return cls(
            **head,
            encryption_key=fields.bytes_("encryption_key", size=KEY_BYTES),
            masking_key=fields.bytes_("masking_key", size=KEY_BYTES),
            self_mask_commitment=fields.bytes_(
                "self_mask_commitment", size=DIGEST_BYTES
            ),
            signature=fields.optional_bytes("signature", size=SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class Advertisement:
    """One client's advertisement, as the server forwards it in stage 1.

    Attributes
    ----------
    client_id
        Whose keys these are.
    encryption_key, masking_key, self_mask_commitment, signature
        As in :class:`AdvertiseReply`.
    """

    client_id: str
    encryption_key: bytes
    masking_key: bytes
    self_mask_commitment: bytes
    signature: bytes | None = None

    @functools.cached_property
    def _json(self) -> _Json:
        # Computed once: a server forwards each advertisement to every
        # neighbour of its sender (the object is frozen, so it never goes stale).
        return {
            "client_id": self.client_id,
            "encryption_key": _b64(self.encryption_key),
            "masking_key": _b64(self.masking_key),
            "self_mask_commitment": _b64(self.self_mask_commitment),
            "signature": None if self.signature is None else _b64(self.signature),
        }

    def _to_json(self) -> _Json:
        return dict(self._json)

    @classmethod
    def _from_json_fast(cls, value: object) -> Advertisement | None:
        """The common well-formed case, or None (then :meth:`_from_json` says why)."""
        if type(value) is not dict or value.keys() != _ADVERTISEMENT_KEYS:
            return None
        client_id = value["client_id"]
        encryption_key = value["encryption_key"]
        masking_key = value["masking_key"]
        commitment = value["self_mask_commitment"]
        signature = value["signature"]
        if (
            type(client_id) is not str
            or not 0 < len(client_id) <= MAX_CLIENT_ID_CHARS
            or type(encryption_key) is not str
            or type(masking_key) is not str
            or type(commitment) is not str
            or not (signature is None or type(signature) is str)
        ):
            return None
        try:
            encryption = binascii.a2b_base64(encryption_key, strict_mode=True)
            masking = binascii.a2b_base64(masking_key, strict_mode=True)
            committed = binascii.a2b_base64(commitment, strict_mode=True)
            signed = (
                None
                if signature is None
                else binascii.a2b_base64(signature, strict_mode=True)
            )
        except (binascii.Error, ValueError):
            return None
        if (
            len(encryption) != KEY_BYTES
            or len(masking) != KEY_BYTES
            or len(committed) != DIGEST_BYTES
            or (signed is not None and len(signed) != SIGNATURE_BYTES)
        ):
            return None
        return cls(
            client_id=client_id,
            encryption_key=encryption,
            masking_key=masking,
            self_mask_commitment=committed,
            signature=signed,
        )

    @classmethod
    def _from_json(cls, value: object, where: str) -> Advertisement:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an advertisement object")
        fields = _Fields(value, where)
        out = cls(
            client_id=fields.client_id("client_id"),
            encryption_key=fields.bytes_("encryption_key", size=KEY_BYTES),
            masking_key=fields.bytes_("masking_key", size=KEY_BYTES),
            self_mask_commitment=fields.bytes_(
                "self_mask_commitment", size=DIGEST_BYTES
            ),
            signature=fields.optional_bytes("signature", size=SIGNATURE_BYTES),
        )
        fields.finish()
        return out

    @classmethod
    def _parse_one(cls, value: object, where: str) -> Advertisement:
        return cls._from_json_fast(value) or cls._from_json(value, where)


@dataclass(frozen=True, kw_only=True)
class ShareKeysRequest(Message):
    """Stage 1, server -> client: the graph seed's inputs and the neighbours' keys.

    Attributes
    ----------
    advertisements
        One per neighbour that advertised in stage 0 (every other such client
        for full-graph SecAgg), never the recipient's own.
    seed_reveal
        The server's 32-byte share of the graph seed, committed to in stage 0.
    leader
        The advertisement of the first client (in the sorted client list)
        that advertised in stage 0: with ``seed_reveal`` it fixes the graph
        seed (see :mod:`fedshield.secagg.protocol`).
    """

    TYPE: ClassVar[str] = "share_keys_request"
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS

    advertisements: tuple[Advertisement, ...]
    seed_reveal: bytes
    leader: Advertisement

    def _encode(self) -> tuple[_Json, list[bytes]]:
        return {
            "advertisements": [ad._to_json() for ad in self.advertisements],
            "seed_reveal": _b64(self.seed_reveal),
            "leader": self.leader._to_json(),
        }, []

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        value = fields.raw("advertisements")
        if not isinstance(value, list):
            raise ProtocolError("share_keys_request.advertisements: expected a list")
        ads = tuple(
            Advertisement._parse_one(item, f"share_keys_request.advertisements[{i}]")
            for i, item in enumerate(value)
        )
        if len({ad.client_id for ad in ads}) != len(ads):
            raise ProtocolError("share_keys_request: a client is advertised twice")
        return cls(
            **head,
            advertisements=ads,
            seed_reveal=fields.bytes_("seed_reveal", size=DIGEST_BYTES),
            leader=Advertisement._parse_one(
                fields.raw("leader"), "share_keys_request.leader"
            ),
        )


@dataclass(frozen=True, kw_only=True)
class _CiphertextsMessage(Message):
    """A message that carries ciphertexts by client id.

    On the wire the header lists the ids and each ciphertext is one payload,
    in the same order.
    """

    ciphertexts: Mapping[str, bytes]

    def _encode(self) -> tuple[_Json, list[bytes]]:
        return _ciphertexts_out(self.ciphertexts)

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        return cls(**head, ciphertexts=_ciphertexts_in(fields, payloads, cls.TYPE))


@dataclass(frozen=True, kw_only=True)
class ShareKeysReply(_CiphertextsMessage):
    """Stage 1, client -> server: encrypted share pairs, one per neighbour.

    On the wire the header lists the recipient ids and each ciphertext is one
    payload, in the same order.

    Attributes
    ----------
    ciphertexts
        Recipient id -> AES-GCM encryption of a :class:`SharePayload`.
    """

    TYPE: ClassVar[str] = "share_keys_reply"
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS


@dataclass(frozen=True, kw_only=True)
class MaskedInputRequest(_CiphertextsMessage):
    """Stage 2, server -> client: the share pairs other clients encrypted for it.

    On the wire as :class:`ShareKeysReply`: ids in the header, one payload per
    ciphertext.

    Attributes
    ----------
    ciphertexts
        Sender id -> the ciphertext that sender addressed to the recipient.
    """

    TYPE: ClassVar[str] = "masked_input_request"
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT


@dataclass(frozen=True, kw_only=True, eq=False)
class MaskedInputReply(Message):
    """Stage 2, client -> server: the masked input ``y_u``.

    On the wire the header's body gives ``modulus_bits`` and ``words`` (they
    must equal the configured ``b`` and ``d``) and the one payload is the
    vector packed by :func:`pack_words`: ``ceil(d b / 8)`` bytes.

    Attributes
    ----------
    modulus_bits
        ``b``: the bits each word is packed to.
    masked_input
        ``uint64`` vector of ``vector_length`` words, each ``< 2**modulus_bits``.
    """

    TYPE: ClassVar[str] = "masked_input_reply"
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT

    modulus_bits: int
    masked_input: npt.NDArray[np.uint64]

    def _encode(self) -> tuple[_Json, list[bytes]]:
        vector = np.asarray(self.masked_input)
        body = {"modulus_bits": self.modulus_bits, "words": int(vector.size)}
        return body, [pack_words(vector, self.modulus_bits)]

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        bits = fields.integer("modulus_bits", low=1)
        if bits != modulus_bits:
            raise ProtocolError(
                f"{cls.TYPE}: words packed to {bits} bits, expected {modulus_bits} "
                f"(a word is not reduced mod 2**{modulus_bits})"
                if bits > modulus_bits
                else f"{cls.TYPE}: words packed to {bits} bits, expected {modulus_bits}"
            )
        words = fields.integer("words")
        if words != vector_length:
            raise ProtocolError(
                f"{cls.TYPE}: a vector of {words} words, expected {vector_length}"
            )
        vector = unpack_words(
            payloads.take("masked_input"),
            vector_length,
            modulus_bits,
            where=f"{cls.TYPE}.masked_input",
        )
        return cls(**head, modulus_bits=bits, masked_input=vector)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskedInputReply):
            return NotImplemented
        return (
            self.session,
            self.round_idx,
            self.sender,
            self.recipient,
            self.modulus_bits,
        ) == (
            other.session,
            other.round_idx,
            other.sender,
            other.recipient,
            other.modulus_bits,
        ) and np.array_equal(self.masked_input, other.masked_input)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, kw_only=True)
class ConsistencyRequest(Message):
    """Stage 3 (malicious variant), server -> client: the survivor list ``U3``.

    Attributes
    ----------
    survivors
        Sorted ids of the clients whose masked inputs the server holds.
    """

    TYPE: ClassVar[str] = "consistency_request"
    STAGE: ClassVar[Stage] = Stage.CONSISTENCY_CHECK

    survivors: tuple[str, ...]

    def _encode(self) -> tuple[_Json, list[bytes]]:
        return {"survivors": list(self.survivors)}, []

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        return cls(**head, survivors=fields.client_ids("survivors"))


@dataclass(frozen=True, kw_only=True)
class ConsistencyReply(Message):
    """Stage 3 (malicious variant), client -> server: its signature of ``U3``.

    Attributes
    ----------
    signature
        Ed25519 signature of the survivor list and the context.
    """

    TYPE: ClassVar[str] = "consistency_reply"
    STAGE: ClassVar[Stage] = Stage.CONSISTENCY_CHECK

    signature: bytes

    def _encode(self) -> tuple[_Json, list[bytes]]:
        return {"signature": _b64(self.signature)}, []

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        return cls(**head, signature=fields.bytes_("signature", size=SIGNATURE_BYTES))


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest(Message):
    """Stage 4, server -> client: which shares to reveal.

    Attributes
    ----------
    survivors
        The survivor list ``U3`` (the one signed in stage 3, when malicious).
    signatures
        Signer id -> its stage-3 signature of ``survivors`` (malicious
        variant; empty otherwise).
    self_mask_requests
        Clients whose self-mask seed ``b_v`` share is asked for: survivors.
    key_requests
        Clients whose masking-key ``s_sk_v`` share is asked for: dropped after
        sharing their keys. Never overlaps ``self_mask_requests``.
    """

    TYPE: ClassVar[str] = "unmask_request"
    STAGE: ClassVar[Stage] = Stage.UNMASK

    survivors: tuple[str, ...]
    signatures: Mapping[str, bytes]
    self_mask_requests: tuple[str, ...]
    key_requests: tuple[str, ...]

    def _encode(self) -> tuple[_Json, list[bytes]]:
        return {
            "survivors": list(self.survivors),
            "signatures": {k: _b64(v) for k, v in self.signatures.items()},
            "self_mask_requests": list(self.self_mask_requests),
            "key_requests": list(self.key_requests),
        }, []

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        return cls(
            **head,
            survivors=fields.client_ids("survivors"),
            signatures=fields.mapping("signatures", _signature),
            self_mask_requests=fields.client_ids("self_mask_requests"),
            key_requests=fields.client_ids("key_requests"),
        )


@dataclass(frozen=True, kw_only=True)
class UnmaskReply(Message):
    """Stage 4, client -> server: the shares asked for.

    On the wire the header lists the ids of each mapping and two payloads
    hold the shares in the same order, :data:`FIELD_BYTES` bytes per field
    element.

    Attributes
    ----------
    self_mask_shares
        Client id -> this client's share of that client's self-mask seed.
    key_shares
        Client id -> this client's share of that client's masking key.
    """

    TYPE: ClassVar[str] = "unmask_reply"
    STAGE: ClassVar[Stage] = Stage.UNMASK

    self_mask_shares: Mapping[str, Share]
    key_shares: Mapping[str, Share]

    def _encode(self) -> tuple[_Json, list[bytes]]:
        body = {
            "self_mask_shares": list(self.self_mask_shares),
            "key_shares": list(self.key_shares),
        }
        return body, [
            _share_bytes(list(self.self_mask_shares.values())),
            _share_bytes(list(self.key_shares.values())),
        ]

    @classmethod
    def _parse(
        cls,
        fields: _Fields,
        payloads: _Payloads,
        head: _Json,
        *,
        vector_length: int,
        modulus_bits: int,
    ) -> Message:
        parsed: list[dict[str, Share]] = []
        for key in ("self_mask_shares", "key_shares"):
            ids = fields.client_ids(key)
            shares = _shares_from(payloads.take(key), len(ids), f"{cls.TYPE}.{key}")
            parsed.append(dict(zip(ids, shares, strict=True)))
        return cls(**head, self_mask_shares=parsed[0], key_shares=parsed[1])


_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        AdvertiseRequest,
        AdvertiseReply,
        ShareKeysRequest,
        ShareKeysReply,
        MaskedInputRequest,
        MaskedInputReply,
        ConsistencyRequest,
        ConsistencyReply,
        UnmaskRequest,
        UnmaskReply,
    )
}


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> _Json:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise ProtocolError(f"message header repeats the key(s) {repeated}")
    return out


def _looks_like_json(data: bytes | bytearray | memoryview) -> bool:
    start = bytes(data[:64]).lstrip(b" \t\r\n")
    return start.startswith(b"{")


def decode(
    data: bytes | bytearray | memoryview, *, vector_length: int, modulus_bits: int
) -> Message:
    """Parse and validate a serialised message.

    Parameters
    ----------
    data
        What :meth:`Message.to_bytes` produced (or anything else: it is checked).
    vector_length
        ``d``: a masked input must have exactly this many words.
    modulus_bits
        ``b``: a masked input must be packed to exactly this many bits a word.

    Returns
    -------
    Message
        One of the message classes of this module.

    Raises
    ------
    ProtocolError
        If ``data`` is not a well-formed message of :data:`VERSION`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"a message is bytes, got {type(data).__name__}")
    try:
        view = memoryview(data).cast("B")
    except TypeError:  # a non-contiguous or multi-dimensional view
        view = memoryview(bytes(data))
    size = len(view)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
    if bytes(view[: len(MAGIC)]) != MAGIC:
        if _looks_like_json(view):
            raise ProtocolError(
                "message is JSON (the wire format of version 1), which is no longer "
                f"accepted: version {VERSION} messages are binary and start with "
                f"{MAGIC!r}"
            )
        raise ProtocolError(
            f"not a secure aggregation message: it does not start with {MAGIC!r}"
        )
    if size < PREFIX_BYTES:
        raise ProtocolError(f"message of {size} bytes is shorter than its prefix")
    version = view[len(MAGIC)]
    if version != VERSION:
        raise ProtocolError(f"message version {version} is not {VERSION}")
    header_size = int.from_bytes(view[len(MAGIC) + 1 : PREFIX_BYTES], "big")
    payload_start = PREFIX_BYTES + header_size
    if payload_start > size:
        raise ProtocolError(
            f"message header of {header_size} bytes overruns the {size}-byte message"
        )
    try:
        header = json.loads(
            bytes(view[PREFIX_BYTES:payload_start]).decode("utf-8"),
            object_pairs_hook=_no_repeated_keys,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"message header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object")
    fields = _Fields(header, "message")
    type_name = fields.raw("type")
    if not isinstance(type_name, str) or type_name not in _TYPES:
        raise ProtocolError(f"unknown message type {type_name!r:.80}")
    cls = _TYPES[type_name]
    stage = fields.raw("stage")
    if stage != str(cls.STAGE):
        raise ProtocolError(
            f"{type_name} belongs to stage {cls.STAGE}, not {stage!r:.80}"
        )
    head: _Json = {
        "round_idx": fields.integer("round_idx"),
        "session": fields.bytes_("session", size=SESSION_BYTES),
        "sender": fields.client_id("sender"),
        "recipient": fields.client_id("recipient"),
    }
    body = fields.raw("body")
    lengths = fields.raw("payloads")
    fields.finish()
    if not isinstance(body, dict):
        raise ProtocolError(f"{type_name}: body is not a JSON object")
    if not isinstance(lengths, list):
        raise ProtocolError(f"{type_name}: payloads is not a list of lengths")
    lengths = [_integer(n, f"{type_name}.payloads") for n in lengths]
    if sum(lengths) != size - payload_start:
        raise ProtocolError(
            f"{type_name}: the header declares {sum(lengths)} payload bytes, "
            f"{size - payload_start} follow it (truncated, extended or trailing "
            "bytes)"
        )
    chunks: list[memoryview] = []
    offset = payload_start
    for n in lengths:
        chunks.append(view[offset : offset + n])
        offset += n
    body_fields = _Fields(body, type_name)
    payloads = _Payloads(chunks, type_name)
    message = cls._parse(
        body_fields,
        payloads,
        head,
        vector_length=vector_length,
        modulus_bits=modulus_bits,
    )
    body_fields.finish()
    payloads.finish()
    return message


# --------------------------------------------------------------------------
# The encrypted share pair (inside ShareKeysReply / MaskedInputRequest)


def _id_bytes(client_id: str) -> bytes:
    data = client_id.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def _read_id(data: bytes, offset: int, where: str) -> tuple[str, int]:
    if offset + 2 > len(data):
        raise ProtocolError(f"{where}: truncated")
    length = int.from_bytes(data[offset : offset + 2], "big")
    offset += 2
    if length > _MAX_ID_BYTES or offset + length > len(data):
        raise ProtocolError(f"{where}: a client id of {length} bytes does not fit")
    try:
        text = data[offset : offset + length].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{where}: a client id is not UTF-8") from exc
    if not 0 < len(text) <= MAX_CLIENT_ID_CHARS:
        check_client_id(text, where)  # raises
    return text, offset + length


@dataclass(frozen=True)
class SharePayload:
    """The plaintext a client encrypts for one neighbour in stage 1.

    Binary: the :data:`VERSION` byte, the sender and recipient ids (each a
    2-byte big-endian length and UTF-8), then the two shares, :data:`FIELD_BYTES`
    bytes per field element.

    Attributes
    ----------
    sender, recipient
        Whose secrets these are shares of, and who holds them (also bound by
        the AES-GCM associated data).
    self_mask_share
        The recipient's share of the sender's self-mask seed ``b_u``.
    key_share
        The recipient's share of the sender's masking private key ``s_sk_u``.
    """

    sender: str
    recipient: str
    self_mask_share: Share
    key_share: Share

    def to_bytes(self) -> bytes:
        """Serialise to the binary layout above.

        Raises
        ------
        ValueError
            If a share is not :data:`SHARE_WORDS` elements of ``[0, PRIME)``.
        """
        return b"".join(
            [
                bytes([VERSION]),
                _id_bytes(self.sender),
                _id_bytes(self.recipient),
                _share_bytes([self.self_mask_share, self.key_share]),
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SharePayload:
        """Parse and validate; raises ProtocolError if malformed."""
        where = "share_payload"
        raw = bytes(data)
        if not raw:
            raise ProtocolError(f"{where}: empty")
        if raw[0] != VERSION:
            if raw[:1] == b"{":
                raise ProtocolError(
                    f"{where}: JSON (the format of version 1) is no longer accepted"
                )
            raise ProtocolError(f"{where}: version {raw[0]} is not {VERSION}")
        sender, offset = _read_id(raw, 1, "share_payload.sender")
        recipient, offset = _read_id(raw, offset, "share_payload.recipient")
        self_mask_share, key_share = _shares_from(
            raw[offset:], 2, "share_payload.shares"
        )
        return cls(
            sender=sender,
            recipient=recipient,
            self_mask_share=self_mask_share,
            key_share=key_share,
        )
