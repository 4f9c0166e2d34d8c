"""fedshield.secagg.messages: the binary envelope and b-bit packing of vectors.

Reference packings are computed with Python integers (bit ``i b`` of one
little-endian integer), never with the module's own helpers.
"""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedshield.errors import ProtocolError
from fedshield.secagg import messages
from fedshield.secagg.messages import (
    FIELD_BYTES,
    MAGIC,
    PREFIX_BYTES,
    SERVER_ID,
    SHARE_WORDS,
    VERSION,
    Advertisement,
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyReply,
    ConsistencyRequest,
    MaskedInputReply,
    MaskedInputRequest,
    Message,
    ShareKeysReply,
    ShareKeysRequest,
    SharePayload,
    UnmaskReply,
    UnmaskRequest,
    decode,
    pack_words,
    packed_size,
    unpack_words,
)
from fedshield.secagg.shamir import PRIME

SETTINGS = settings(max_examples=150, deadline=None)
SESSION = bytes(range(16))
D, B = 10, 13  # vector length and modulus bits of the small messages below


def _reference_pack(values: list[int], bits: int) -> bytes:
    total = 0
    for i, value in enumerate(values):
        total |= value << (i * bits)
    return total.to_bytes(-(-len(values) * bits // 8), "little")


@st.composite
def vectors(draw: st.DrawFn) -> tuple[int, list[int]]:
    bits = draw(st.integers(1, 64))
    values = draw(st.lists(st.integers(0, 2**bits - 1), max_size=300))
    return bits, values


def _reply(vector: np.ndarray, bits: int = B) -> MaskedInputReply:
    return MaskedInputReply(
        session=SESSION,
        round_idx=3,
        sender="alice",
        recipient=SERVER_ID,
        modulus_bits=bits,
        masked_input=vector,
    )


def _vector(d: int = D, bits: int = B, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**bits, size=d, dtype=np.uint64)


def _split(data: bytes) -> tuple[int, dict, bytes]:
    """Version, header and payload bytes of an envelope (parsed by hand)."""
    assert data[: len(MAGIC)] == MAGIC
    size = int.from_bytes(data[len(MAGIC) + 1 : PREFIX_BYTES], "big")
    header = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + size])
    return data[len(MAGIC)], header, data[PREFIX_BYTES + size :]


def _join(header: dict, payload: bytes, version: int = VERSION) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + bytes([version]) + len(text).to_bytes(4, "big") + text + payload


def _decode(data: bytes, d: int = D, bits: int = B) -> Message:
    return decode(data, vector_length=d, modulus_bits=bits)


# -- packing ---------------------------------------------------------------------------


@SETTINGS
@given(vectors())
def test_pack_matches_the_integer_reference_and_round_trips(case):
    bits, values = case
    vector = np.array(values, dtype=np.uint64)
    data = pack_words(vector, bits)
    assert data == _reference_pack(values, bits)
    assert len(data) == packed_size(len(values), bits) == -(-len(values) * bits // 8)
    back = unpack_words(data, len(values), bits)
    assert back.dtype == np.uint64
    assert back.tolist() == values


@SETTINGS
@given(vectors())
def test_both_packing_paths_match_the_reference(case):
    """Short vectors pack whole groups at once, long ones a position at a time."""
    bits, values = case
    vector = np.array(values, dtype=np.uint64)
    reference = _reference_pack(values, bits)
    for limit in (0, 1 << 30):  # force the per-position path, then the other
        original = messages._GATHER_GROUPS
        messages._GATHER_GROUPS = limit
        try:
            data = pack_words(vector, bits)
            back = unpack_words(data, len(values), bits)
        finally:
            messages._GATHER_GROUPS = original
        assert data == reference
        assert back.tolist() == values


@SETTINGS
@given(vectors())
def test_masked_input_reply_round_trips_for_any_b_and_d(case):
    bits, values = case
    reply = _reply(np.array(values, dtype=np.uint64), bits)
    data = reply.to_bytes()
    assert _decode(data, len(values), bits) == reply
    _, header, payload = _split(data)
    assert header["payloads"] == [packed_size(len(values), bits)]
    assert payload == _reference_pack(values, bits)


@SETTINGS
@given(bits=st.integers(1, 64), d=st.integers(0, 200), data=st.data())
def test_every_payload_of_the_right_size_and_zero_padding_is_one_vector(bits, d, data):
    """Packing is a bijection: no byte string can express a word >= 2**b."""
    size = packed_size(d, bits)
    raw = bytearray(data.draw(st.binary(min_size=size, max_size=size)))
    spare = d * bits % 8
    if spare:
        raw[-1] &= (1 << spare) - 1
    vector = unpack_words(bytes(raw), d, bits)
    if bits < 64:
        assert all(int(v) < 2**bits for v in vector)
    assert pack_words(vector, bits) == bytes(raw)


@pytest.mark.parametrize("bits", [1, 7, 13, 30, 33, 36, 63, 64])
def test_truncated_or_extended_payloads_are_refused(bits):
    d = 21
    rng = np.random.default_rng(bits)
    vector = rng.integers(0, 2**bits - 1, size=d, dtype=np.uint64, endpoint=True)
    data = pack_words(vector, bits)
    for wrong in (data[:-1], data + b"\x00", data + data[-1:], b""):
        with pytest.raises(ProtocolError, match=f"expected {len(data)} bytes"):
            unpack_words(wrong, d, bits)


@pytest.mark.parametrize(("d", "bits"), [(1, 1), (3, 5), (10, 13), (7, 33), (5, 63)])
def test_nonzero_padding_bits_are_refused(d, bits):
    spare = d * bits % 8
    assert spare
    data = bytearray(pack_words(np.zeros(d, dtype=np.uint64), bits))
    for bit in range(spare, 8):
        tampered = bytearray(data)
        tampered[-1] |= 1 << bit
        with pytest.raises(ProtocolError, match="padding"):
            unpack_words(bytes(tampered), d, bits)
    tampered = bytearray(data)
    tampered[-1] |= 1 << (spare - 1)  # the last value's top bit: fine
    assert int(unpack_words(bytes(tampered), d, bits)[-1]) == 1 << (bits - 1)


@pytest.mark.parametrize("bits", [1, 13, 36, 63])
def test_a_word_of_more_than_b_bits_cannot_be_packed(bits):
    vector = np.zeros(5, dtype=np.uint64)
    vector[2] = 2**bits
    with pytest.raises(ValueError, match=f"not below 2\\*\\*{bits}"):
        pack_words(vector, bits)
    with pytest.raises(ValueError, match="not below"):
        _reply(vector, bits).to_bytes()


@pytest.mark.parametrize(
    ("values", "bits", "match"),
    [
        (np.array([-1, 2]), 8, "negative"),
        (np.array([0.5]), 8, "integer array"),
        (np.zeros((2, 2), dtype=np.uint64), 8, "one-dimensional"),
        (np.zeros(2, dtype=np.uint64), 0, "bits"),
        (np.zeros(2, dtype=np.uint64), 65, "bits"),
        (np.zeros(2, dtype=np.uint64), True, "bits"),
    ],
)
def test_pack_refuses_what_it_cannot_express(values, bits, match):
    with pytest.raises(ValueError, match=match):
        pack_words(values, bits)


def test_signed_inputs_pack_like_unsigned_ones():
    signed = np.array([0, 5, 255], dtype=np.int64)
    assert pack_words(signed, 8) == bytes([0, 5, 255])


@pytest.mark.bench
def test_pack_and_unpack_of_a_million_words_are_fast():
    vector = _vector(10**6, 36)
    pack_s, unpack_s = [], []
    for _ in range(5):
        start = time.perf_counter()
        data = pack_words(vector, 36)
        pack_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        back = unpack_words(data, 10**6, 36)
        unpack_s.append(time.perf_counter() - start)
    np.testing.assert_array_equal(back, vector)
    print(
        f"d=1e6 b=36: pack {min(pack_s) * 1e3:.1f} ms, "
        f"unpack {min(unpack_s) * 1e3:.1f} ms"
    )
    assert min(pack_s) < 0.05 and min(unpack_s) < 0.05


# -- the envelope ----------------------------------------------------------------------


def _every_message() -> list[Message]:
    ad = Advertisement(
        "bob", bytes(32), bytes(range(32)), b"\x05" * 32, signature=bytes(64)
    )
    leader = Advertisement("alice", b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)
    share = tuple(range(1, SHARE_WORDS + 1))
    return [
        AdvertiseRequest(
            session=SESSION,
            round_idx=0,
            sender=SERVER_ID,
            recipient="alice",
            clients=("alice", "bob"),
            seed_commitment=b"\x09" * 32,
            config_digest=bytes(32),
        ),
        AdvertiseReply(
            session=SESSION,
            round_idx=0,
            sender="alice",
            recipient=SERVER_ID,
            encryption_key=bytes(32),
            masking_key=bytes(32),
            self_mask_commitment=b"\x04" * 32,
        ),
        ShareKeysRequest(
            session=SESSION,
            round_idx=0,
            sender=SERVER_ID,
            recipient="alice",
            advertisements=(ad,),
            seed_reveal=b"\x06" * 32,
            leader=leader,
        ),
        ShareKeysReply(
            session=SESSION,
            round_idx=0,
            sender="alice",
            recipient=SERVER_ID,
            ciphertexts={"bob": bytes(100), "carol": b"\x01" * 129},
        ),
        MaskedInputRequest(
            session=SESSION,
            round_idx=0,
            sender=SERVER_ID,
            recipient="alice",
            ciphertexts={"bob": bytes(90)},
        ),
        _reply(_vector()),
        ConsistencyRequest(
            session=SESSION,
            round_idx=0,
            sender=SERVER_ID,
            recipient="alice",
            survivors=("alice", "bob"),
        ),
        ConsistencyReply(
            session=SESSION,
            round_idx=0,
            sender="alice",
            recipient=SERVER_ID,
            signature=bytes(64),
        ),
        UnmaskRequest(
            session=SESSION,
            round_idx=0,
            sender=SERVER_ID,
            recipient="alice",
            survivors=("alice", "bob"),
            signatures={"bob": bytes(64)},
            self_mask_requests=("bob",),
            key_requests=("carol",),
        ),
        UnmaskReply(
            session=SESSION,
            round_idx=0,
            sender="alice",
            recipient=SERVER_ID,
            self_mask_shares={"bob": share, "alice": (PRIME - 1,) * SHARE_WORDS},
            key_shares={"carol": share},
        ),
    ]


@pytest.mark.parametrize("msg", _every_message(), ids=lambda m: m.TYPE)
def test_every_message_round_trips_and_refuses_any_change_of_length(msg):
    data = msg.to_bytes()
    assert data.startswith(MAGIC + bytes([VERSION]))
    assert _decode(data) == msg
    assert _decode(bytearray(data)) == msg
    assert _decode(memoryview(data)) == msg
    with pytest.raises(ProtocolError, match=r"trailing|overruns|shorter"):
        _decode(data + b"\x00")
    for cut in (1, len(data) - PREFIX_BYTES, len(data) - 3):
        with pytest.raises(ProtocolError):
            _decode(data[:-cut])


def test_masked_input_reply_is_b_bits_a_word_plus_a_small_header():
    d, bits = 10**4, 36
    data = _reply(_vector(d, bits), bits).to_bytes()
    assert packed_size(d, bits) == 45_000
    assert 45_000 < len(data) < 45_000 + 250


def test_unmask_reply_and_share_payload_carry_shares_as_field_bytes():
    msg = _every_message()[-1]
    _, header, _ = _split(msg.to_bytes())
    assert header["payloads"] == [
        2 * SHARE_WORDS * FIELD_BYTES,
        SHARE_WORDS * FIELD_BYTES,
    ]
    assert header["body"] == {
        "self_mask_shares": ["bob", "alice"],
        "key_shares": ["carol"],
    }
    assert FIELD_BYTES == 17


def test_header_and_payload_lengths_must_agree():
    data = _reply(_vector()).to_bytes()
    _, header, payload = _split(data)
    size = packed_size(D, B)
    for lengths in ([size + 1], [size - 1], [size, 0, 1], [0]):
        with pytest.raises(ProtocolError, match="declares"):
            _decode(_join(dict(header, payloads=lengths), payload))
    # lengths that add up but split the payload differently
    with pytest.raises(ProtocolError, match=f"expected {size} bytes"):
        _decode(_join(dict(header, payloads=[size - 3, 3]), payload))
    with pytest.raises(ProtocolError, match=r"1 payload\(s\) too many"):
        _decode(_join(dict(header, payloads=[size, 0]), payload))
    with pytest.raises(ProtocolError, match="missing payload"):
        _decode(_join(dict(header, payloads=[]), b""))
    for bad in ([True], [-1], "17", [1.5], None):
        with pytest.raises(ProtocolError, match="payloads"):
            _decode(_join(dict(header, payloads=bad), payload))
    assert _decode(_join(header, payload)) == _decode(data)


def test_header_length_must_fit_the_message():
    data = _reply(_vector()).to_bytes()
    size = int.from_bytes(data[len(MAGIC) + 1 : PREFIX_BYTES], "big")
    too_long = (
        data[: len(MAGIC) + 1] + (len(data)).to_bytes(4, "big") + data[PREFIX_BYTES:]
    )
    with pytest.raises(ProtocolError, match="overruns"):
        _decode(too_long)
    shorter = (
        data[: len(MAGIC) + 1] + (size - 1).to_bytes(4, "big") + data[PREFIX_BYTES:]
    )
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        _decode(shorter)
    with pytest.raises(ProtocolError, match="shorter than its prefix"):
        _decode(data[: PREFIX_BYTES - 1])


def test_a_message_of_the_old_json_format_is_refused_clearly():
    old = {
        "version": 1,
        "type": "masked_input_reply",
        "stage": "masked_input",
        "round_idx": 3,
        "session": base64.b64encode(SESSION).decode(),
        "sender": "alice",
        "recipient": SERVER_ID,
        "body": {"masked_input": base64.b64encode(_vector().tobytes()).decode()},
    }
    for data in (json.dumps(old).encode(), b"  \n" + json.dumps(old).encode()):
        with pytest.raises(
            ProtocolError, match=r"JSON .*version 1.*no longer accepted"
        ):
            _decode(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "does not start with"),
        (b"\x00not json", "does not start with"),
        (b"PK\x03\x04" + bytes(20), "does not start with"),
        (MAGIC, "shorter than its prefix"),
    ],
)
def test_other_bytes_are_refused(data, match):
    with pytest.raises(ProtocolError, match=match):
        _decode(data)


@pytest.mark.parametrize("version", [0, 1, 2, 3, VERSION + 1, 255])
def test_other_versions_are_refused(version):
    # Version 3 too: its clients accept survivor lists without the leader's
    # signature (second security review, finding 1).
    assert VERSION == 4
    data = _reply(_vector()).to_bytes()
    _, header, payload = _split(data)
    with pytest.raises(ProtocolError, match=f"version {version} is not {VERSION}"):
        _decode(_join(header, payload, version=version))


def test_a_non_bytes_message_is_refused():
    with pytest.raises(ProtocolError, match="is bytes"):
        _decode("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h.update(extra=1), "unknown field"),
        (lambda h: h.pop("payloads"), "missing field 'payloads'"),
        (lambda h: h.pop("stage"), "missing field 'stage'"),
        (lambda h: h.update(stage="unmask"), "belongs to stage"),
        (lambda h: h.update(type="nope"), "unknown message type"),
        (lambda h: h.update(round_idx=True), "expected an integer"),
        (lambda h: h.update(round_idx=-1), "outside"),
        (lambda h: h.update(session="AAAA"), "expected 16 bytes"),
        (lambda h: h.update(sender=""), "client id"),
        (lambda h: h.update(body=[]), "body is not a JSON object"),
        (lambda h: h["body"].update(extra=1), "unknown field"),
        (lambda h: h["body"].update(words=D + 1), f"{D + 1} words, expected {D}"),
        (lambda h: h["body"].update(words=True), "expected an integer"),
        (lambda h: h["body"].update(modulus_bits=B + 1), "not reduced"),
        (lambda h: h["body"].update(modulus_bits=B - 1), f"expected {B}"),
        (lambda h: h["body"].pop("modulus_bits"), "missing field"),
    ],
)
def test_malformed_headers_are_refused(edit, match):
    _, header, payload = _split(_reply(_vector()).to_bytes())
    edit(header)
    with pytest.raises(ProtocolError, match=match):
        _decode(_join(header, payload))


def test_header_must_be_one_json_object_without_repeated_keys():
    data = _reply(_vector()).to_bytes()
    _, header, payload = _split(data)
    text = json.dumps(header, separators=(",", ":"))
    repeated = text[:-1] + ',"round_idx":4}'
    for raw, match in (
        (repeated.encode(), "repeats the key"),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe", "not UTF-8 JSON"),
    ):
        framed = MAGIC + bytes([VERSION]) + len(raw).to_bytes(4, "big") + raw + payload
        with pytest.raises(ProtocolError, match=match):
            _decode(framed)


def test_a_vector_of_the_wrong_word_count_or_width_is_refused():
    longer = _reply(_vector(D + 1)).to_bytes()
    with pytest.raises(ProtocolError, match=f"{D + 1} words, expected {D}"):
        _decode(longer)
    wider = _reply(_vector(D, B + 1), B + 1).to_bytes()
    with pytest.raises(ProtocolError, match="not reduced"):
        _decode(wider)
    # the header claims the right d, but the payload carries one more word
    _, header, _ = _split(longer)
    payload = pack_words(_vector(D + 1), B)
    header = dict(header, body={"modulus_bits": B, "words": D}, payloads=[len(payload)])
    with pytest.raises(ProtocolError, match=f"expected {packed_size(D, B)} bytes"):
        _decode(_join(header, payload))


def test_nonzero_padding_in_a_message_is_refused():
    data = bytearray(_reply(_vector()).to_bytes())
    assert D * B % 8
    data[-1] |= 0x80
    with pytest.raises(ProtocolError, match="padding"):
        _decode(bytes(data))


def test_ciphertext_payloads_are_checked():
    msg = _every_message()[3]
    _, header, payload = _split(msg.to_bytes())
    assert header["body"] == {"ciphertexts": ["bob", "carol"]}
    assert header["payloads"] == [100, 129]
    short = dict(header, payloads=[10, 219])
    with pytest.raises(ProtocolError, match="a ciphertext is"):
        _decode(_join(short, payload))
    one_more = dict(header, payloads=[100, 129, 0])
    with pytest.raises(ProtocolError, match="too many"):
        _decode(_join(one_more, payload))
    repeated = dict(header, body={"ciphertexts": ["bob", "bob"]})
    with pytest.raises(ProtocolError, match="repeated"):
        _decode(_join(repeated, payload))
    three = dict(header, body={"ciphertexts": ["bob", "carol", "dave"]})
    with pytest.raises(ProtocolError, match="missing payload"):
        _decode(_join(three, payload))


def test_shares_outside_the_field_or_of_the_wrong_size_are_refused():
    msg = _every_message()[-1]
    _, header, payload = _split(msg.to_bytes())
    over = bytearray(payload)
    over[:FIELD_BYTES] = PRIME.to_bytes(FIELD_BYTES, "big")
    with pytest.raises(ProtocolError, match="outside"):
        _decode(_join(header, bytes(over)))
    fewer = dict(header, body={"self_mask_shares": ["bob"], "key_shares": ["carol"]})
    with pytest.raises(ProtocolError, match="expected"):
        _decode(_join(fewer, payload))
    with pytest.raises(ValueError, match="outside"):
        UnmaskReply(
            session=SESSION,
            round_idx=0,
            sender="alice",
            recipient=SERVER_ID,
            self_mask_shares={"bob": (PRIME,) * SHARE_WORDS},
            key_shares={},
        ).to_bytes()


# -- the share payload -----------------------------------------------------------------


def _payload() -> SharePayload:
    return SharePayload(
        sender="alice",
        recipient="bøb",
        self_mask_share=(1, PRIME - 1),
        key_share=(0, 2**128),
    )


def test_share_payload_round_trips_compactly():
    payload = _payload()
    data = payload.to_bytes()
    assert SharePayload.from_bytes(data) == payload
    ids = len("alice") + len("bøb".encode())
    assert len(data) == 1 + 2 + 2 + ids + 2 * SHARE_WORDS * FIELD_BYTES


def test_share_payload_refuses_malformed_bytes():
    data = _payload().to_bytes()
    cases = [
        (b"", "empty"),
        (data[:-1], "expected"),
        (data + b"\x00", "expected"),
        (bytes([VERSION + 1]) + data[1:], "version"),
        (b'{"version":1}', "JSON"),
        (data[:3], "does not fit|truncated"),
        (data[:1], "truncated"),
        (data[:1] + b"\x00\x00" + data[1:], "client id"),
        (data[:1] + b"\x00\x02\xff\xfe" + data[8:], "not UTF-8"),
        (data[:1] + b"\xff\xff" + data[3:], "does not fit"),
    ]
    for raw, match in cases:
        with pytest.raises(ProtocolError, match=match):
            SharePayload.from_bytes(raw)
    over = bytearray(data)
    over[-FIELD_BYTES:] = PRIME.to_bytes(FIELD_BYTES, "big")
    with pytest.raises(ProtocolError, match="outside"):
        SharePayload.from_bytes(bytes(over))


# -- advertisements: the fast path and the checked path agree ----------------------


def _ads_request(ads: list[object]) -> bytes:
    msg = ShareKeysRequest(
        session=SESSION,
        round_idx=0,
        sender=SERVER_ID,
        recipient="alice",
        advertisements=(),
        seed_reveal=bytes(32),
        leader=Advertisement("alice", bytes(32), bytes(32), bytes(32)),
    )
    _, header, payload = _split(msg.to_bytes())
    header["body"]["advertisements"] = ads
    return _join(header, payload)


def _ad_json(**edits: object) -> dict[str, object]:
    ad: dict[str, object] = {
        "client_id": "bob",
        "encryption_key": base64.b64encode(bytes(range(32))).decode(),
        "masking_key": base64.b64encode(bytes(range(1, 33))).decode(),
        "self_mask_commitment": base64.b64encode(bytes(range(2, 34))).decode(),
        "signature": None,
    }
    ad.update(edits)
    return ad


def test_well_formed_advertisements_parse_with_and_without_signatures():
    signature = base64.b64encode(b"\x07" * 64).decode()
    msg = _decode(
        _ads_request([_ad_json(), _ad_json(client_id="é", signature=signature)])
    )
    assert isinstance(msg, ShareKeysRequest)
    first, second = msg.advertisements
    assert first == Advertisement(
        "bob", bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34)), None
    )
    assert second.client_id == "é" and second.signature == b"\x07" * 64


@pytest.mark.parametrize(
    "edits, match",
    [
        ({"encryption_key": base64.b64encode(bytes(31)).decode()}, "expected 32 bytes"),
        ({"masking_key": "not base64!"}, "invalid base64"),
        ({"masking_key": "AAAA\u00e9"}, "invalid base64"),
        ({"masking_key": 7}, "expected base64 text"),
        (
            {"self_mask_commitment": base64.b64encode(bytes(31)).decode()},
            "expected 32 bytes",
        ),
        ({"signature": base64.b64encode(bytes(63)).decode()}, "expected 64 bytes"),
        ({"signature": True}, "expected base64 text"),
        ({"client_id": ""}, "client id"),
        ({"client_id": 5}, "client id"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_malformed_advertisements_are_refused_naming_the_field(edits, match):
    with pytest.raises(ProtocolError, match=match) as caught:
        _decode(_ads_request([_ad_json(), _ad_json(**edits)]))
    assert "advertisements[1]" in str(caught.value)


def test_an_advertisement_without_a_field_or_twice_is_refused():
    missing = _ad_json()
    del missing["signature"]
    with pytest.raises(ProtocolError, match="missing field 'signature'"):
        _decode(_ads_request([missing]))
    with pytest.raises(ProtocolError, match="advertised twice"):
        _decode(_ads_request([_ad_json(), _ad_json()]))
    with pytest.raises(ProtocolError, match="advertisement object"):
        _decode(_ads_request([["bob"]]))


def test_share_keys_request_checks_the_seed_reveal_and_the_leader():
    # Since wire version 3: the request reveals the server's seed share and forwards
    # the leader's advertisement; both are checked like any other field.
    msg = ShareKeysRequest(
        session=SESSION,
        round_idx=0,
        sender=SERVER_ID,
        recipient="alice",
        advertisements=(),
        seed_reveal=bytes(range(32)),
        leader=Advertisement("bob", bytes(32), b"\x01" * 32, b"\x02" * 32),
    )
    assert _decode(msg.to_bytes()) == msg
    _, header, payload = _split(msg.to_bytes())
    header["body"]["seed_reveal"] = base64.b64encode(bytes(31)).decode()
    with pytest.raises(ProtocolError, match="seed_reveal: expected 32 bytes"):
        _decode(_join(header, payload))
    _, header, payload = _split(msg.to_bytes())
    del header["body"]["leader"]["self_mask_commitment"]
    with pytest.raises(ProtocolError, match=r"leader: missing field"):
        _decode(_join(header, payload))
