"""SecAgg / SecAgg+ under attack: refused messages, a cheating server, its view."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Collection, Mapping

import numpy as np
import pytest
from scipy import stats

from fedshield.errors import ConfigError, ProtocolError
from fedshield.secagg import crypto, shamir
from fedshield.secagg.encoding import add_mod, sub_mod
from fedshield.secagg.messages import (
    MAGIC,
    PREFIX_BYTES,
    SERVER_ID,
    VERSION,
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
    check_client_id,
    decode,
)
from fedshield.secagg.protocol import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    Stage,
    _pairwise_mask,
    _public_bytes,
)

Tamper = Callable[[str, str, bytes], bytes]


def setup(
    config: SecAggConfig,
    ids: list[str],
    *,
    client_cls: type[SecAggClient] = SecAggClient,
    round_idx: int = 0,
):
    signing = {}
    verify_keys = None
    if config.malicious:
        signing = {c: crypto.generate_signing_key() for c in ids}
        verify_keys = {c: k.public for c, k in signing.items()}
    server = SecAggServer(config, round_idx, ids, verify_keys=verify_keys)
    clients = {
        c: client_cls(
            config, round_idx, c, signing_key=signing.get(c), verify_keys=verify_keys
        )
        for c in ids
    }
    rng = np.random.default_rng(0)
    inputs = {
        c: rng.integers(
            0, 1 << config.modulus_bits, config.vector_length, dtype=np.uint64
        )
        for c in ids
    }
    for c in ids:
        clients[c].set_input(inputs[c])
    return server, clients, inputs, signing


def drive(
    server: SecAggServer,
    clients: Mapping[str, SecAggClient],
    *,
    drop: Mapping[str, Collection[str]] | None = None,
    tamper_request: Tamper | None = None,
    tamper_reply: Tamper | None = None,
    view: list[tuple[str, str, str, bytes]] | None = None,
    errors: dict[str, str] | None = None,
) -> None:
    """Play the network; ``view`` records every byte the server sent and got."""
    drop = drop or {}
    gone: set[str] = set()
    while server.stage not in (Stage.DONE, Stage.ABORTED):
        stage = str(server.stage)
        gone |= set(drop.get(stage, ()))
        replies = {}
        for cid, message in sorted(server.requests().items()):
            if tamper_request is not None:
                message = tamper_request(stage, cid, message)
            if view is not None:
                view.append(("request", stage, cid, message))
            if cid in gone:
                continue
            try:
                reply = clients[cid].handle(message)
            except ProtocolError as exc:
                gone.add(cid)
                if errors is not None:
                    errors[cid] = str(exc)
                continue
            if tamper_reply is not None:
                reply = tamper_reply(stage, cid, reply)
            if view is not None:
                view.append(("reply", stage, cid, reply))
            replies[cid] = reply
        server.receive(replies)


def parse(data: bytes, config: SecAggConfig):
    return decode(
        data, vector_length=config.vector_length, modulus_bits=config.modulus_bits
    )


def modify(config: SecAggConfig, data: bytes, **changes) -> bytes:
    return dataclasses.replace(parse(data, config), **changes).to_bytes()


def plain_sum(inputs, members, bits) -> np.ndarray:
    length = len(next(iter(inputs.values())))
    totals = [
        sum(int(inputs[c][i]) for c in members) % (1 << bits) for i in range(length)
    ]
    return np.array(totals, dtype=np.uint64)


CONFIG = SecAggConfig(threshold=4, modulus_bits=16, vector_length=8)
MALICIOUS_CONFIG = SecAggConfig(
    threshold=3, modulus_bits=16, vector_length=8, malicious=True
)
IDS = [f"c{i}" for i in range(6)]


# --------------------------------------------------------------------------
# What one masked input reveals


def test_a_masked_input_alone_looks_uniform():
    config = SecAggConfig(threshold=3, modulus_bits=32, vector_length=1 << 14)
    ids = ["a", "b", "c", "d"]
    server, clients, _, _ = setup(config, ids)
    structured = np.arange(config.vector_length, dtype=np.uint64)  # top bits all 0
    clients["a"].set_input(structured)
    view: list = []
    drive(server, clients, view=view)
    masked = [
        parse(data, config)
        for kind, _, cid, data in view
        if kind == "reply"
        and cid == "a"
        and isinstance(parse(data, config), MaskedInputReply)
    ]
    (reply,) = masked
    y = reply.masked_input

    def top_bits_p_value(vector: np.ndarray) -> float:
        counts = np.bincount((vector >> np.uint64(28)).astype(np.int64), minlength=16)
        return float(stats.chisquare(counts).pvalue)

    assert top_bits_p_value(structured) < 1e-10  # the test can see structure ...
    assert top_bits_p_value(y) > 1e-4  # ... and sees none in y_a
    assert np.count_nonzero(y == structured) < 5
    # and the mask was not trivial: the difference y - x is itself uniform
    assert top_bits_p_value(sub_mod(y, structured, 32)) > 1e-4


# --------------------------------------------------------------------------
# The server refuses bad replies and counts their senders as dropped


def _replace_json(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """Edit the JSON header of a binary envelope, keeping its payloads."""
    size = int.from_bytes(data[len(MAGIC) + 1 : PREFIX_BYTES], "big")
    document = json.loads(data[PREFIX_BYTES : PREFIX_BYTES + size])
    edit(document)
    header = json.dumps(document).encode()
    return (
        data[: len(MAGIC) + 1]
        + len(header).to_bytes(4, "big")
        + header
        + data[PREFIX_BYTES + size :]
    )


def _with_version(data: bytes, version: int) -> bytes:
    return data[: len(MAGIC)] + bytes([version]) + data[len(MAGIC) + 1 :]


def _longer_vector(data: bytes) -> bytes:
    msg = parse(data, CONFIG)
    longer = np.zeros(CONFIG.vector_length + 1, dtype=np.uint64)
    return dataclasses.replace(msg, masked_input=longer).to_bytes()


def _unreduced(data: bytes) -> bytes:
    # A word >= 2**b cannot be packed to b bits: a client must claim b + 1.
    msg = parse(data, CONFIG)
    vector = msg.masked_input.copy()
    vector[3] = 1 << CONFIG.modulus_bits
    with pytest.raises(ValueError, match="not below"):
        dataclasses.replace(msg, masked_input=vector).to_bytes()
    bits = CONFIG.modulus_bits + 1
    return dataclasses.replace(msg, masked_input=vector, modulus_bits=bits).to_bytes()


def _missing_share(data: bytes) -> bytes:
    msg = parse(data, CONFIG)
    shares = dict(msg.self_mask_shares)
    shares.pop(min(shares))
    return dataclasses.replace(msg, self_mask_shares=shares).to_bytes()


BAD_REPLIES: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
    "garbage": ("advertise_keys", lambda d: b"\x00not json", "does not start with"),
    "unknown field": (
        "advertise_keys",
        lambda d: _replace_json(d, lambda j: j.update(extra=1)),
        "unknown field",
    ),
    "future version": (
        "share_keys",
        lambda d: _with_version(d, VERSION + 1),
        "version",
    ),
    "short key": (
        "advertise_keys",
        lambda d: _replace_json(d, lambda j: j["body"].update(masking_key="AAAA")),
        "expected 32 bytes",
    ),
    "wrong round": (
        "masked_input",
        lambda d: modify(CONFIG, d, round_idx=1),
        "round 1",
    ),
    "other session": (
        "masked_input",
        lambda d: modify(CONFIG, d, session=os.urandom(16)),
        "session",
    ),
    "vector too long": ("masked_input", _longer_vector, "9 words, expected 8"),
    "unreduced word": ("masked_input", _unreduced, "not reduced"),
    "truncated vector": ("masked_input", lambda d: d[:-1], "truncated"),
    "trailing bytes": ("share_keys", lambda d: d + b"\x00", "trailing"),
    "version 1 json": (
        "advertise_keys",
        lambda d: b'{"version":1,"type":"advertise_reply"}',
        "no longer accepted",
    ),
    "missing share": ("unmask", _missing_share, "not the ones asked for"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_server_refuses_bad_reply_and_counts_the_sender_as_dropped(case, caplog):
    stage, corrupt, reason = BAD_REPLIES[case]
    server, clients, inputs, _ = setup(CONFIG, IDS)

    def tamper(current: str, cid: str, reply: bytes) -> bytes:
        return corrupt(reply) if (current, cid) == (stage, "c2") else reply

    with caplog.at_level(logging.WARNING, logger="fedshield.secagg.protocol"):
        drive(server, clients, tamper_reply=tamper)
    assert server.dropped == {"c2": stage}
    assert reason in server.refused["c2"]
    assert any(
        "refused" in r.getMessage() and "'c2'" in r.getMessage() for r in caplog.records
    )
    summed = IDS if stage == "unmask" else [c for c in IDS if c != "c2"]
    assert list(server.survivors) == summed
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, summed, 16))


def test_server_refuses_replayed_earlier_stage_reply():
    server, clients, inputs, _ = setup(CONFIG, IDS)
    earlier: dict[tuple[str, str], bytes] = {}

    def tamper(stage: str, cid: str, reply: bytes) -> bytes:
        earlier[stage, cid] = reply
        if (stage, cid) == ("share_keys", "c4"):
            return earlier["advertise_keys", "c4"]
        return reply

    drive(server, clients, tamper_reply=tamper)
    assert server.dropped == {"c4": "share_keys"}
    assert "advertise_keys message in stage share_keys" in server.refused["c4"]
    summed = [c for c in IDS if c != "c4"]
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, summed, 16))


def test_server_refuses_reply_sent_under_another_clients_id():
    server, clients, inputs, _ = setup(CONFIG, IDS)
    latest: dict[str, bytes] = {}

    def tamper(stage: str, cid: str, reply: bytes) -> bytes:
        latest[cid] = reply
        return latest["c0"] if (stage, cid) == ("masked_input", "c5") else reply

    drive(server, clients, tamper_reply=tamper)
    assert server.dropped == {"c5": "masked_input"}
    assert "arrived as 'c5'" in server.refused["c5"]
    summed = IDS[:5]
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, summed, 16))


def test_server_refuses_a_reply_from_a_previous_round():
    """Same clients, same keys of the run: only the round number differs."""
    old_server, old_clients, _, _ = setup(CONFIG, IDS, round_idx=3)
    server, clients, _, _ = setup(CONFIG, IDS, round_idx=4)
    old = old_clients["c1"].handle(old_server.requests()["c1"])
    replies = {c: clients[c].handle(m) for c, m in server.requests().items()}
    replies["c1"] = old
    server.receive(replies)
    assert server.dropped == {"c1": "advertise_keys"}
    assert "round 3 in round 4" in server.refused["c1"]


def test_server_ignores_replies_from_clients_it_did_not_ask(caplog):
    server, clients, _, _ = setup(CONFIG, IDS)
    replies = {c: clients[c].handle(m) for c, m in server.requests().items()}
    replies["stranger"] = replies["c0"]
    with caplog.at_level(logging.WARNING, logger="fedshield.secagg.protocol"):
        server.receive(replies)
    assert server.stage == "share_keys"
    assert server.dropped == {}
    assert any("'stranger'" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------
# The client refuses bad requests, then stays aborted


def test_client_refuses_a_request_of_another_round():
    server, _, _, _ = setup(CONFIG, IDS, round_idx=2)
    client = SecAggClient(CONFIG, 3, "c0")
    with pytest.raises(ProtocolError, match="round 2"):
        client.handle(server.requests()["c0"])
    assert client.stage == "aborted"
    with pytest.raises(ProtocolError, match="aborted"):
        client.handle(server.requests()["c0"])


@pytest.mark.parametrize("config", [CONFIG, MALICIOUS_CONFIG], ids=["semi", "mal"])
def test_a_retransmitted_request_gets_the_same_reply_at_every_stage(config):
    """Review item 15: a transport may resend a request whose reply it lost."""
    ids = IDS if config is CONFIG else [f"c{i}" for i in range(5)]
    server, clients, inputs, _ = setup(config, ids)
    stages = []
    while server.stage != "done":
        stages.append(str(server.stage))
        replies = {}
        for cid, message in server.requests().items():
            first = clients[cid].handle(message)
            stage_after = clients[cid].stage
            assert clients[cid].handle(message) == first  # the same bytes back
            assert clients[cid].stage == stage_after  # and nothing else changed
            replies[cid] = first
        server.receive(replies)
    assert len(stages) == (5 if config.malicious else 4)
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, ids, 16))


def test_without_idempotence_a_retransmitted_request_is_refused():
    server, _, _, _ = setup(CONFIG, IDS)
    client = SecAggClient(CONFIG, 0, "c0", idempotent=False)
    request = server.requests()["c0"]
    client.handle(request)
    with pytest.raises(ProtocolError, match="expected a share_keys request"):
        client.handle(request)


def test_a_different_request_for_an_answered_stage_is_refused():
    """Only the same bytes get the same reply: a changed request is equivocation."""
    server, clients, _, _ = setup(CONFIG, IDS)
    request = server.requests()["c0"]
    clients["c0"].handle(request)
    changed = modify(CONFIG, request, clients=("c0", "c1", "c2", "c3", "c4"))
    with pytest.raises(ProtocolError, match="expected a share_keys request"):
        clients["c0"].handle(changed)
    assert clients["c0"].stage == "aborted"


def test_client_refuses_a_replayed_request_of_an_earlier_stage():
    server, clients, _, _ = setup(CONFIG, IDS)
    first = server.requests()
    server.receive({c: clients[c].handle(m) for c, m in first.items()})
    clients["c0"].handle(server.requests()["c0"])  # now at masked_input
    with pytest.raises(ProtocolError, match="expected a masked_input request"):
        clients["c0"].handle(first["c0"])
    assert clients["c0"].stage == "aborted"


def test_client_refuses_a_request_for_someone_else_or_out_of_stage():
    server, clients, _, _ = setup(CONFIG, IDS)
    requests = server.requests()
    with pytest.raises(ProtocolError, match="not a server request for client 'c1'"):
        clients["c1"].handle(requests["c0"])
    server.receive({c: clients[c].handle(m) for c, m in requests.items() if c != "c1"})
    # c2 is at share_keys; an unmask-stage request is out of order
    forged = UnmaskRequest(
        session=parse(server.requests()["c2"], CONFIG).session,
        round_idx=0,
        sender=SERVER_ID,
        recipient="c2",
        survivors=tuple(IDS),
        signatures={},
        self_mask_requests=(),
        key_requests=(),
    )
    with pytest.raises(
        ProtocolError, match="expected a share_keys request, got a unmask"
    ):
        clients["c2"].handle(forged.to_bytes())


@pytest.mark.parametrize(
    "data", [b"", b"{}", b"[1, 2]", b"\xff\xfe", b'{"version": true}']
)
def test_client_refuses_malformed_bytes(data):
    client = SecAggClient(CONFIG, 0, "c0")
    with pytest.raises(ProtocolError):
        client.handle(data)
    assert client.stage == "aborted"


def test_client_refuses_a_server_with_another_configuration():
    server, _, _, _ = setup(CONFIG, IDS)
    other = dataclasses.replace(CONFIG, modulus_bits=17)
    with pytest.raises(ProtocolError, match="different SecAgg configuration"):
        SecAggClient(other, 0, "c0").handle(server.requests()["c0"])


# --------------------------------------------------------------------------
# A server that asks for both shares of one client


def _edit_unmask(config: SecAggConfig, target: str, edit) -> Tamper:
    def tamper(stage: str, cid: str, message: bytes) -> bytes:
        if stage != "unmask" or cid != target:
            return message
        msg = parse(message, config)
        return dataclasses.replace(msg, **edit(msg)).to_bytes()

    return tamper


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda m: {"key_requests": (*m.key_requests, "c1")},
            "both the self-mask share and the masking-key share of client 'c1'",
        ),
        (
            lambda m: {
                "self_mask_requests": tuple(
                    v for v in m.self_mask_requests if v != "c1"
                ),
                "key_requests": (*m.key_requests, "c1"),
            },
            "masking-key share of survivor 'c1'",
        ),
        (
            lambda m: {
                "self_mask_requests": (*m.self_mask_requests, "c5"),
                "key_requests": tuple(v for v in m.key_requests if v != "c5"),
            },
            "self-mask share of 'c5', which is not a survivor",
        ),
    ],
)
def test_client_refuses_a_server_asking_for_both_secrets_of_a_client(edit, reason):
    server, clients, inputs, _ = setup(CONFIG, IDS)
    errors: dict[str, str] = {}
    drive(
        server,
        clients,
        drop={"masked_input": ["c5"]},
        tamper_request=_edit_unmask(CONFIG, "c0", edit),
        errors=errors,
    )
    assert reason in errors["c0"]
    assert clients["c0"].stage == "aborted"
    # the other four still finish the (honest part of the) round
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, IDS[:5], 16))


def test_client_refuses_a_disconnected_survivor_list():
    config = SecAggConfig(
        protocol="secagg+",
        threshold=6,
        modulus_bits=16,
        vector_length=4,
        neighbours=3,
        allow_insecure_neighbours=True,
    )
    ids = [f"c{i}" for i in range(10)]
    # The graph is derived from the advertisements: run stage 0 until one
    # has what the test needs.
    for attempt in range(200):
        server, clients, _, _ = setup(config, ids)
        server.receive({c: clients[c].handle(m) for c, m in server.requests().items()})
        graph = server.graph
        if server.dropped or not graph.is_connected(ids):
            continue
        # look for a disconnected 6-set containing c0
        rng = np.random.default_rng(attempt)
        for _ in range(300):
            others = rng.choice(ids[1:], size=5, replace=False)
            subset = tuple(sorted(["c0", *others]))
            if not graph.is_connected(subset):
                break
        else:
            continue
        break
    else:
        pytest.fail("no graph with a disconnected subset found")

    def tamper(stage: str, cid: str, message: bytes) -> bytes:
        if (stage, cid) != ("unmask", "c0"):
            return message
        msg = parse(message, config)
        return dataclasses.replace(
            msg,
            survivors=subset,
            self_mask_requests=(),
            key_requests=(),
        ).to_bytes()

    errors: dict[str, str] = {}
    # the rest may or may not finish; c0's refusal is what matters
    with contextlib.suppress(ProtocolError):
        drive(server, clients, tamper_request=tamper, errors=errors)
    assert "not connected" in errors["c0"]


# --------------------------------------------------------------------------
# Malicious-server variant (Bonawitz §6)

MALICIOUS = SecAggConfig(threshold=3, modulus_bits=16, vector_length=4, malicious=True)
M_IDS = [f"c{i}" for i in range(5)]


def test_malicious_run_completes_with_consistency_check():
    server, clients, inputs, _ = setup(MALICIOUS, M_IDS)
    stages = []
    while server.stage != "done":
        stages.append(str(server.stage))
        server.receive({c: clients[c].handle(m) for c, m in server.requests().items()})
    assert stages == [
        "advertise_keys",
        "share_keys",
        "masked_input",
        "consistency_check",
        "unmask",
    ]
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, M_IDS, 16))


@pytest.mark.parametrize("forgery", ["bad signature", "no signature", "other signer"])
def test_server_refuses_a_forged_advertisement(forgery):
    server, clients, inputs, signing = setup(MALICIOUS, M_IDS)

    def tamper(stage: str, cid: str, reply: bytes) -> bytes:
        if (stage, cid) != ("advertise_keys", "c2"):
            return reply
        msg = parse(reply, MALICIOUS)
        if forgery == "bad signature":
            signature = bytes([msg.signature[0] ^ 1]) + msg.signature[1:]
        elif forgery == "no signature":
            signature = None
        else:  # c3 signs keys it claims are c2's
            signature = crypto.sign(signing["c3"], b"anything")
        return dataclasses.replace(msg, signature=signature).to_bytes()

    drive(server, clients, tamper_reply=tamper)
    assert server.dropped == {"c2": "advertise_keys"}
    assert "sign" in server.refused["c2"]
    summed = [c for c in M_IDS if c != "c2"]
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, summed, 16))


def test_client_refuses_a_forged_advertisement_forwarded_by_the_server():
    server, clients, _, _ = setup(MALICIOUS, M_IDS)
    impostor = crypto.generate_keypair()

    # (Sent to c2, not to the leader c0: a leader that refuses stops a
    # malicious-mode round.)
    def tamper(stage: str, cid: str, message: bytes) -> bytes:
        if (stage, cid) != ("share_keys", "c2"):
            return message
        msg = parse(message, MALICIOUS)
        assert isinstance(msg, ShareKeysRequest)
        ads = tuple(
            dataclasses.replace(ad, masking_key=impostor.public)
            if ad.client_id == "c1"
            else ad
            for ad in msg.advertisements
        )
        return dataclasses.replace(msg, advertisements=ads).to_bytes()

    errors: dict[str, str] = {}
    drive(server, clients, tamper_request=tamper, errors=errors)
    assert "bad signature (forged" in errors["c2"]


def _malicious_unmask_edit(edit) -> Tamper:
    def tamper(stage: str, cid: str, message: bytes) -> bytes:
        if (stage, cid) != ("unmask", "c0"):
            return message
        msg = parse(message, MALICIOUS)
        assert isinstance(msg, UnmaskRequest)
        return dataclasses.replace(msg, **edit(msg)).to_bytes()

    return tamper


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda m: {"survivors": m.survivors[:-1]},
            "differs from the one this client signed",
        ),
        (
            lambda m: {
                "signatures": {
                    **m.signatures,
                    "c1": os.urandom(64),
                }
            },
            "signature of 'c1' on the survivor list does not verify",
        ),
        (
            lambda m: {"signatures": dict(list(m.signatures.items())[:2])},
            "needed 3 signatures",
        ),
    ],
)
def test_client_refuses_an_inconsistent_survivor_list(edit, reason):
    server, clients, _, _ = setup(MALICIOUS, M_IDS)
    errors: dict[str, str] = {}
    drive(server, clients, tamper_request=_malicious_unmask_edit(edit), errors=errors)
    assert reason in errors["c0"]


def test_client_refuses_to_sign_a_survivor_list_naming_a_client_that_never_shared():
    server, clients, _, _ = setup(MALICIOUS, M_IDS)

    def tamper(stage: str, cid: str, message: bytes) -> bytes:
        # (c1, not the leader c0: without the leader's signature a
        # malicious-mode round stops at the consistency check.)
        if (stage, cid) != ("consistency_check", "c1"):
            return message
        msg = parse(message, MALICIOUS)
        assert isinstance(msg, ConsistencyRequest)
        return dataclasses.replace(msg, survivors=tuple(sorted(M_IDS))).to_bytes()

    errors: dict[str, str] = {}
    drive(
        server,
        clients,
        drop={"share_keys": ["c4"]},
        tamper_request=tamper,
        errors=errors,
    )
    assert "['c4'] that never shared keys" in errors["c1"]


def test_server_refuses_a_bad_survivor_list_signature():
    server, clients, inputs, _ = setup(MALICIOUS, M_IDS)

    def tamper(stage: str, cid: str, reply: bytes) -> bytes:
        if (stage, cid) != ("consistency_check", "c3"):
            return reply
        return modify(MALICIOUS, reply, signature=os.urandom(64))

    drive(server, clients, tamper_reply=tamper)
    assert server.dropped == {"c3": "consistency_check"}
    # c3's masked input is in: it is still summed (its self mask is rebuilt)
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, M_IDS, 16))


# --------------------------------------------------------------------------
# The server's view does not unmask any single client


def recover_inputs(
    view: list[tuple[str, str, str, bytes]], config: SecAggConfig, server: SecAggServer
) -> dict[str, np.ndarray]:
    """Everything an attacker holding the server's transcript can unmask.

    Rebuilds every secret with enough shares in the transcript, then removes
    the masks of each masked input whose self mask and every pairwise mask
    it can compute. Uses only public data (graph, thresholds) and the view.
    """
    graph, b, d = server.graph, config.modulus_bits, config.vector_length
    messages = [(kind, cid, parse(data, config)) for kind, _, cid, data in view]
    first = messages[0][2]
    session, round_idx = first.session, first.round_idx
    ads = {c: m for k, c, m in messages if isinstance(m, AdvertiseReply)}
    masked = {
        c: m.masked_input for k, c, m in messages if isinstance(m, MaskedInputReply)
    }
    sent_to = {
        c: set(m.ciphertexts) for k, c, m in messages if isinstance(m, ShareKeysReply)
    }
    seed_shares: dict[str, dict[int, tuple[int, ...]]] = {}
    key_shares: dict[str, dict[int, tuple[int, ...]]] = {}
    for _, holder, m in messages:
        if isinstance(m, UnmaskReply):
            x = graph.index(holder) + 1
            for owner, share in m.self_mask_shares.items():
                seed_shares.setdefault(owner, {})[x] = share
            for owner, share in m.key_shares.items():
                key_shares.setdefault(owner, {})[x] = share

    def rebuild(shares: Mapping[str, dict[int, tuple[int, ...]]]) -> dict[str, bytes]:
        out = {}
        for owner, held in shares.items():
            if len(held) >= graph.threshold_of(owner, config.threshold):
                out[owner] = shamir.reconstruct_bytes(
                    held, graph.threshold_of(owner, config.threshold), 32
                )
        return out

    seeds = rebuild(seed_shares)
    keys = {o: crypto.import_private(k) for o, k in rebuild(key_shares).items()}
    for owner, private in keys.items():
        assert _public_bytes(private) == ads[owner].masking_key
    recovered = {}
    for u, y in masked.items():
        if u not in seeds:
            continue
        x = sub_mod(y, crypto.expand_mask(seeds[u], d, b), b)
        for v in graph.neighbours_of(u):
            if u not in sent_to.get(v, ()):
                continue  # v did not share with u: u added no mask for v
            if u in keys:
                private, peer = keys[u], ads[v].masking_key
            elif v in keys:
                private, peer = keys[v], ads[u].masking_key
            else:
                break
            mask = _pairwise_mask(
                private,
                peer,
                session=session,
                round_idx=round_idx,
                u=u,
                v=v,
                config=config,
            )
            x = sub_mod(x, mask, b) if u < v else add_mod(x, mask, b)
        else:
            recovered[u] = x
    return recovered


ATTACK = SecAggConfig(threshold=5, modulus_bits=16, vector_length=16)
A_IDS = [f"c{i}" for i in range(8)]


@pytest.mark.parametrize(
    ("config", "num_clients"),
    [
        (ATTACK, 8),
        (dataclasses.replace(ATTACK, malicious=True), 8),
        (
            dataclasses.replace(
                ATTACK,
                threshold=11,
                protocol="secagg+",
                neighbours=10,
                allow_insecure_neighbours=True,
            ),
            20,
        ),
    ],
    ids=["secagg", "malicious", "secagg+"],
)
def test_an_honest_run_unmasks_no_single_client(config, num_clients):
    ids = [f"c{i:02d}" for i in range(num_clients)]
    drop = {"share_keys": ["c07"], "masked_input": ["c06"], "unmask": ["c05"]}
    # The sparse graph is random (no party picks it); with three dropouts a
    # small neighbourhood can lack shares (about 1 run in 300): run again.
    for _ in range(10):
        server, clients, inputs, _ = setup(config, ids)
        view: list = []
        with contextlib.suppress(ProtocolError):
            drive(server, clients, drop=drop, view=view)
        if server.stage == "done":
            break
    assert server.graph.is_complete == (config.protocol == "secagg")
    assert server.dropped == {
        "c07": "share_keys",
        "c06": "masked_input",
        "c05": "unmask",
    }
    assert recover_inputs(view, config, server) == {}
    summed = [c for c in ids if c not in ("c06", "c07")]
    np.testing.assert_array_equal(server.result(), plain_sum(inputs, summed, 16))


def _claim_dropped(config: SecAggConfig, target: str) -> Tamper:
    """A lying server: after receiving y_target it tells everyone target dropped."""

    def tamper(stage: str, cid: str, message: bytes) -> bytes:
        if stage != "unmask":
            return message
        msg = parse(message, config)
        assert isinstance(msg, UnmaskRequest)
        return dataclasses.replace(
            msg,
            survivors=tuple(c for c in msg.survivors if c != target),
            self_mask_requests=tuple(c for c in msg.self_mask_requests if c != target),
            key_requests=tuple(sorted({*msg.key_requests, target})),
        ).to_bytes()

    return tamper


def test_a_server_lying_about_a_dropout_still_cannot_unmask_it():
    """Double masking: y_u and s_sk_u together still hide x_u behind PRG(b_u)."""
    server, clients, _, _ = setup(ATTACK, A_IDS)
    view: list = []
    with pytest.raises(ProtocolError):  # the server refuses its own forged replies
        drive(server, clients, view=view, tamper_request=_claim_dropped(ATTACK, "c3"))
    key_shares = [
        parse(d, ATTACK)
        for kind, _, _, d in view
        if kind == "reply" and isinstance(parse(d, ATTACK), UnmaskReply)
    ]
    assert sum("c3" in m.key_shares for m in key_shares) >= ATTACK.threshold
    assert "c3" not in recover_inputs(view, ATTACK, server)


class RuleBreakingClient(SecAggClient):
    """Answers any unmask request: no check that both secrets are never revealed."""

    def _unmask(self, msg: UnmaskRequest) -> UnmaskReply:
        return UnmaskReply(
            **self._reply_head(),
            self_mask_shares={v: self._held[v][0] for v in msg.self_mask_requests},
            key_shares={v: self._held[v][1] for v in msg.key_requests},
        )


def test_the_attack_works_once_the_rule_is_broken():
    """The same attack unmasks a client whose holders reveal both of its secrets."""
    server, clients, inputs, _ = setup(ATTACK, A_IDS, client_cls=RuleBreakingClient)

    def both(stage: str, cid: str, message: bytes) -> bytes:
        if stage != "unmask":
            return message
        msg = parse(message, ATTACK)
        return dataclasses.replace(
            msg, key_requests=tuple(sorted({*msg.key_requests, "c3"}))
        ).to_bytes()

    view: list = []
    with pytest.raises(ProtocolError):
        drive(server, clients, view=view, tamper_request=both)
    recovered = recover_inputs(view, ATTACK, server)
    assert set(recovered) == {"c3"}
    np.testing.assert_array_equal(recovered["c3"], inputs["c3"])


def test_honest_clients_refuse_the_same_attack():
    server, clients, _, _ = setup(ATTACK, A_IDS)

    def both(stage: str, cid: str, message: bytes) -> bytes:
        if stage != "unmask":
            return message
        msg = parse(message, ATTACK)
        return dataclasses.replace(
            msg, key_requests=tuple(sorted({*msg.key_requests, "c3"}))
        ).to_bytes()

    view: list = []
    errors: dict[str, str] = {}
    with pytest.raises(ProtocolError, match="stage unmask needed 5 clients, only 0"):
        drive(server, clients, view=view, tamper_request=both, errors=errors)
    assert set(errors) == set(A_IDS)
    assert recover_inputs(view, ATTACK, server) == {}


def test_requests_carry_the_expected_types():
    """Guard for the tamper helpers above: each stage's request type."""
    server, clients, _, _ = setup(MALICIOUS, M_IDS)
    seen = []
    while server.stage != "done":
        requests = server.requests()
        seen.append(type(parse(requests["c0"], MALICIOUS)))
        server.receive({c: clients[c].handle(m) for c, m in requests.items()})
    assert seen == [
        AdvertiseRequest,
        ShareKeysRequest,
        MaskedInputRequest,
        ConsistencyRequest,
        UnmaskRequest,
    ]


# --------------------------------------------------------------------------
# Second review, findings 5 and 6: secrets after the round; odd client ids


def _secrets(client: SecAggClient) -> dict[str, object]:
    return {
        "held shares": client._held,
        "channel keys": client._channel_keys,
        "encryption key pair": client._encryption,
        "masking key pair": client._masking,
        "self-mask seed": client._self_seed,
        "input": client._input,
        "peers": client._peers,
    }


@pytest.mark.parametrize("config", [CONFIG, MALICIOUS])
def test_clients_hold_no_secret_once_the_round_is_over(config):
    server, clients, _, _ = setup(config, IDS[:5])
    drive(server, clients)
    assert server.stage == "done"
    for client in clients.values():
        assert client.stage == "done"
        assert not any(_secrets(client).values()), _secrets(client)


def test_an_aborted_client_holds_no_secret():
    server, clients, _, _ = setup(CONFIG, IDS)
    # Up to the masked-input stage: every client holds shares and keys.
    for _ in range(2):
        server.receive({c: clients[c].handle(m) for c, m in server.requests().items()})
    client = clients["c1"]
    assert client._held and client._channel_keys and client._peers
    with pytest.raises(ProtocolError):
        client.handle(b"not a request")
    assert client.stage == "aborted"
    assert not any(_secrets(client).values()), _secrets(client)


def test_a_client_id_that_utf8_cannot_encode_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="cannot be encoded as UTF-8"):
        check_client_id("\ud800")
    check_client_id("clïent-ü")  # non-ASCII is fine
    with pytest.raises(ConfigError, match="cannot be encoded as UTF-8"):
        SecAggClient(CONFIG, 0, "a\udfff")
    # A lone surrogate in the client list (JSON carries it as \ud800).
    server = SecAggServer(CONFIG, 0, ["a", "zzzzzz", *IDS[:2]])
    message = server.requests()["a"]
    assert message.count(b'"zzzzzz"') == 1
    forged = message.replace(b'"zzzzzz"', b'"\\ud800"')  # same length
    assert len(forged) == len(message)
    client = SecAggClient(CONFIG, 0, "a")
    with pytest.raises(ProtocolError, match="cannot be encoded as UTF-8"):
        client.handle(forged)
    assert client.stage == "aborted"
