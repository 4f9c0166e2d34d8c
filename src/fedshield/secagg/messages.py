"""Wire messages of the SecAgg / SecAgg+ protocol: typed, versioned, validated.

Every message a party sends is one frozen dataclass below, serialised by
:meth:`Message.to_bytes` to UTF-8 JSON and parsed back by :func:`decode`.
Binary fields (keys, signatures, ciphertexts, the session id) travel as
base64; a masked vector travels as the base64 of its little-endian ``uint64``
words; Shamir shares as JSON integers (arbitrary precision).

Every message carries the same envelope:

``version``
    :data:`VERSION` (1). A message of another version is refused.
``type`` and ``stage``
    Which message it is and the protocol stage it belongs to; they must agree.
``round_idx``
    The training round (0-based).
``session``
    16 random bytes the server draws for one run of the protocol. A reply
    from an earlier attempt at the same round carries another session and is
    refused, so replays across attempts are caught as well as across rounds.
``sender`` and ``recipient``
    Client ids, or :data:`SERVER_ID` for the server.

:func:`decode` refuses (with :class:`~fedshield.errors.ProtocolError`)
anything that is not exactly one of these messages: unknown or missing keys,
wrong JSON types, booleans where integers belong, keys that are not 32 bytes,
signatures that are not 64, a vector that is not ``vector_length`` words or
has a word ``>= 2**modulus_bits``, a share outside ``[0, PRIME)``. The
protocol layer then checks what only it can know (the right sender, stage,
round, session, and whom a message may name).

Example
-------
>>> msg = ConsistencyRequest(session=bytes(16), round_idx=0, sender=SERVER_ID,
...                          recipient="a", survivors=("a", "b"))
>>> decode(msg.to_bytes(), vector_length=4, modulus_bits=16) == msg
True
"""

from __future__ import annotations

import base64
import binascii
import json
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
    "MAX_CIPHERTEXT_BYTES",
    "MAX_CLIENT_ID_CHARS",
    "MAX_MESSAGE_BYTES",
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
]

VERSION = 1
"""Wire format version; :func:`decode` refuses any other."""

SERVER_ID = "server"
"""The ``sender`` of every request and ``recipient`` of every reply.

No client may use this id.
"""

SESSION_BYTES = 16
"""Length of the random session id the server draws per protocol run."""

SIGNATURE_BYTES = 64
"""Length of an Ed25519 signature."""

SECRET_BYTES = 32
"""Length of each shared secret: the self-mask seed and the X25519 masking key."""

SHARE_WORDS = -(-SECRET_BYTES // CHUNK_BYTES)
"""Field elements in one share of a 32-byte secret (one per 16-byte chunk)."""

MAX_CLIENT_ID_CHARS = 256
"""Longest client id accepted."""

MAX_CIPHERTEXT_BYTES = 4096
"""Largest encrypted share pair accepted (an honest one is about 400 bytes)."""

MAX_MESSAGE_BYTES = 1 << 30
"""Largest serialised message :func:`decode` parses."""

_MIN_CIPHERTEXT_BYTES = NONCE_BYTES + TAG_BYTES + 1

_Json: TypeAlias = dict[str, Any]
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
        ids = tuple(check_client_id(item, where) for item in value)
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


def check_client_id(value: object, where: str = "client id") -> str:
    """Return ``value`` if it is a valid client id, else raise ProtocolError.

    A client id is a non-empty string of at most :data:`MAX_CLIENT_ID_CHARS`
    characters.
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CLIENT_ID_CHARS:
        raise ProtocolError(
            f"{where}: a client id is a string of 1 to {MAX_CLIENT_ID_CHARS} "
            f"characters, got {value!r:.80}"
        )
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
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProtocolError(f"{where}: invalid base64") from exc
    if size is not None and len(data) != size:
        raise ProtocolError(f"{where}: expected {size} bytes, got {len(data)}")
    return data


def _ciphertext(value: object, where: str) -> bytes:
    data = _bytes(value, where)
    if not _MIN_CIPHERTEXT_BYTES <= len(data) <= MAX_CIPHERTEXT_BYTES:
        raise ProtocolError(
            f"{where}: a ciphertext is {_MIN_CIPHERTEXT_BYTES} to "
            f"{MAX_CIPHERTEXT_BYTES} bytes, got {len(data)}"
        )
    return data


def _signature(value: object, where: str) -> bytes:
    return _bytes(value, where, size=SIGNATURE_BYTES)


def _share(value: object, where: str) -> Share:
    if not isinstance(value, list) or len(value) != SHARE_WORDS:
        raise ProtocolError(
            f"{where}: a share is a list of {SHARE_WORDS} field elements"
        )
    return tuple(_integer(item, where, low=0, high=PRIME) for item in value)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
        """Serialise to UTF-8 JSON (see the module docstring)."""
        envelope: _Json = {
            "version": VERSION,
            "type": self.TYPE,
            "stage": str(self.STAGE),
            "round_idx": self.round_idx,
            "session": _b64(self.session),
            "sender": self.sender,
            "recipient": self.recipient,
        }
        envelope["body"] = self._body()
        return json.dumps(envelope, separators=(",", ":")).encode("utf-8")

    def _body(self) -> _Json:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
    ) -> Message:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class AdvertiseRequest(Message):
    """Stage 0, server -> client: who takes part, and the graph seed.

    Attributes
    ----------
    clients
        Every client of the round, sorted, each once. A client's index in it
        plus one is its Shamir share position.
    graph_seed
        32 bytes from which everyone derives the SecAgg+ neighbour graph
        (unused by full-graph SecAgg).
    config_digest
        SHA-256 of the server's configuration and number of neighbours; the
        client refuses a run whose digest differs from its own.
    """

    TYPE: ClassVar[str] = "advertise_request"
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS

    clients: tuple[str, ...]
    graph_seed: bytes
    config_digest: bytes

    def _body(self) -> _Json:
        return {
            "clients": list(self.clients),
            "graph_seed": _b64(self.graph_seed),
            "config_digest": _b64(self.config_digest),
        }

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
    ) -> Message:
        return cls(
            **head,
            clients=fields.client_ids("clients"),
            graph_seed=fields.bytes_("graph_seed", size=32),
            config_digest=fields.bytes_("config_digest", size=32),
        )


@dataclass(frozen=True, kw_only=True)
class AdvertiseReply(Message):
    """Stage 0, client -> server: the client's two fresh X25519 public keys.

    Attributes
    ----------
    encryption_key
        ``c_pk``: agrees the keys that encrypt shares between two clients.
    masking_key
        ``s_pk``: agrees the pairwise mask seeds.
    signature
        Ed25519 signature of both keys and the context (malicious-server
        variant only; ``None`` otherwise).
    """

    TYPE: ClassVar[str] = "advertise_reply"
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS

    encryption_key: bytes
    masking_key: bytes
    signature: bytes | None = None

    def _body(self) -> _Json:
        return {
            "encryption_key": _b64(self.encryption_key),
            "masking_key": _b64(self.masking_key),
            "signature": None if self.signature is None else _b64(self.signature),
        }

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
    ) -> Message:
        return cls(
            **head,
            encryption_key=fields.bytes_("encryption_key", size=KEY_BYTES),
            masking_key=fields.bytes_("masking_key", size=KEY_BYTES),
            signature=fields.optional_bytes("signature", size=SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class Advertisement:
    """One client's public keys, as the server forwards them in stage 1.

    Attributes
    ----------
    client_id
        Whose keys these are.
    encryption_key, masking_key, signature
        As in :class:`AdvertiseReply`.
    """

    client_id: str
    encryption_key: bytes
    masking_key: bytes
    signature: bytes | None = None

    def _to_json(self) -> _Json:
        return {
            "client_id": self.client_id,
            "encryption_key": _b64(self.encryption_key),
            "masking_key": _b64(self.masking_key),
            "signature": None if self.signature is None else _b64(self.signature),
        }

    @classmethod
    def _from_json(cls, value: object, where: str) -> Advertisement:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an advertisement object")
        fields = _Fields(value, where)
        out = cls(
            client_id=fields.client_id("client_id"),
            encryption_key=fields.bytes_("encryption_key", size=KEY_BYTES),
            masking_key=fields.bytes_("masking_key", size=KEY_BYTES),
            signature=fields.optional_bytes("signature", size=SIGNATURE_BYTES),
        )
        fields.finish()
        return out


@dataclass(frozen=True, kw_only=True)
class ShareKeysRequest(Message):
    """Stage 1, server -> client: the public keys of the client's neighbours.

    Attributes
    ----------
    advertisements
        One per neighbour that advertised in stage 0 (every other such client
        for full-graph SecAgg), never the recipient's own.
    """

    TYPE: ClassVar[str] = "share_keys_request"
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS

    advertisements: tuple[Advertisement, ...]

    def _body(self) -> _Json:
        return {"advertisements": [ad._to_json() for ad in self.advertisements]}

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
    ) -> Message:
        value = fields.raw("advertisements")
        if not isinstance(value, list):
            raise ProtocolError("share_keys_request.advertisements: expected a list")
        ads = tuple(
            Advertisement._from_json(item, f"share_keys_request.advertisements[{i}]")
            for i, item in enumerate(value)
        )
        if len({ad.client_id for ad in ads}) != len(ads):
            raise ProtocolError("share_keys_request: a client is advertised twice")
        return cls(**head, advertisements=ads)


@dataclass(frozen=True, kw_only=True)
class ShareKeysReply(Message):
    """Stage 1, client -> server: encrypted share pairs, one per neighbour.

    Attributes
    ----------
    ciphertexts
        Recipient id -> AES-GCM encryption of a :class:`SharePayload`.
    """

    TYPE: ClassVar[str] = "share_keys_reply"
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS

    ciphertexts: Mapping[str, bytes]

    def _body(self) -> _Json:
        return {"ciphertexts": {k: _b64(v) for k, v in self.ciphertexts.items()}}

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
    ) -> Message:
        return cls(**head, ciphertexts=fields.mapping("ciphertexts", _ciphertext))


@dataclass(frozen=True, kw_only=True)
class MaskedInputRequest(Message):
    """Stage 2, server -> client: the share pairs other clients encrypted for it.

    Attributes
    ----------
    ciphertexts
        Sender id -> the ciphertext that sender addressed to the recipient.
    """

    TYPE: ClassVar[str] = "masked_input_request"
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT

    ciphertexts: Mapping[str, bytes]

    def _body(self) -> _Json:
        return {"ciphertexts": {k: _b64(v) for k, v in self.ciphertexts.items()}}

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
    ) -> Message:
        return cls(**head, ciphertexts=fields.mapping("ciphertexts", _ciphertext))


@dataclass(frozen=True, kw_only=True, eq=False)
class MaskedInputReply(Message):
    """Stage 2, client -> server: the masked input ``y_u``.

    Attributes
    ----------
    masked_input
        ``uint64`` vector of ``vector_length`` words, each ``< 2**modulus_bits``.
    """

    TYPE: ClassVar[str] = "masked_input_reply"
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT

    masked_input: npt.NDArray[np.uint64]

    def _body(self) -> _Json:
        words = np.ascontiguousarray(self.masked_input, dtype="<u8")
        return {"masked_input": _b64(words.tobytes())}

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
    ) -> Message:
        data = fields.bytes_("masked_input", size=8 * vector_length)
        vector = np.frombuffer(data, dtype="<u8").astype(np.uint64)
        if modulus_bits < 64 and vector.size and int(vector.max()) >> modulus_bits:
            raise ProtocolError(
                f"masked_input_reply: a word is not reduced mod 2**{modulus_bits}"
            )
        return cls(**head, masked_input=vector)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskedInputReply):
            return NotImplemented
        return (self.session, self.round_idx, self.sender, self.recipient) == (
            other.session,
            other.round_idx,
            other.sender,
            other.recipient,
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

    def _body(self) -> _Json:
        return {"survivors": list(self.survivors)}

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
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

    def _body(self) -> _Json:
        return {"signature": _b64(self.signature)}

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
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

    def _body(self) -> _Json:
        return {
            "survivors": list(self.survivors),
            "signatures": {k: _b64(v) for k, v in self.signatures.items()},
            "self_mask_requests": list(self.self_mask_requests),
            "key_requests": list(self.key_requests),
        }

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
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

    def _body(self) -> _Json:
        return {
            "self_mask_shares": {k: list(v) for k, v in self.self_mask_shares.items()},
            "key_shares": {k: list(v) for k, v in self.key_shares.items()},
        }

    @classmethod
    def _parse(
        cls, fields: _Fields, head: _Json, *, vector_length: int, modulus_bits: int
    ) -> Message:
        return cls(
            **head,
            self_mask_shares=fields.mapping("self_mask_shares", _share),
            key_shares=fields.mapping("key_shares", _share),
        )


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


def decode(data: bytes, *, vector_length: int, modulus_bits: int) -> Message:
    """Parse and validate a serialised message.

    Parameters
    ----------
    data
        What :meth:`Message.to_bytes` produced (or anything else: it is checked).
    vector_length
        ``d``: a masked input must have exactly this many words.
    modulus_bits
        ``b``: every word of a masked input must be below ``2**b``.

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
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        envelope = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"message is not UTF-8 JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise ProtocolError("message is not a JSON object")
    fields = _Fields(envelope, "message")
    version = fields.raw("version")
    if isinstance(version, bool) or version != VERSION:
        raise ProtocolError(f"message version {version!r} is not {VERSION}")
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
    fields.finish()
    if not isinstance(body, dict):
        raise ProtocolError(f"{type_name}: body is not a JSON object")
    body_fields = _Fields(body, type_name)
    message = cls._parse(
        body_fields, head, vector_length=vector_length, modulus_bits=modulus_bits
    )
    body_fields.finish()
    return message


# --------------------------------------------------------------------------
# The encrypted share pair (inside ShareKeysReply / MaskedInputRequest)


@dataclass(frozen=True)
class SharePayload:
    """The plaintext a client encrypts for one neighbour in stage 1.

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
        """Serialise to UTF-8 JSON."""
        return json.dumps(
            {
                "version": VERSION,
                "sender": self.sender,
                "recipient": self.recipient,
                "self_mask_share": list(self.self_mask_share),
                "key_share": list(self.key_share),
            },
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> SharePayload:
        """Parse and validate; raises ProtocolError if malformed."""
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError("share payload is not UTF-8 JSON") from exc
        if not isinstance(value, dict):
            raise ProtocolError("share payload is not a JSON object")
        fields = _Fields(value, "share_payload")
        version = fields.raw("version")
        if isinstance(version, bool) or version != VERSION:
            raise ProtocolError(f"share payload version {version!r} is not {VERSION}")
        out = cls(
            sender=fields.client_id("sender"),
            recipient=fields.client_id("recipient"),
            self_mask_share=_share(fields.raw("self_mask_share"), "share_payload"),
            key_share=_share(fields.raw("key_share"), "share_payload"),
        )
        fields.finish()
        return out
