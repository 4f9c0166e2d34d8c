"""Active attacks by the server on SecAgg / SecAgg+, replayed end to end.

Each test plays a malicious server message by message against real
:class:`~fedshield.secagg.protocol.SecAggClient` objects and checks what it
learns. The two-list attack (security review, item 11) and the key
substitution (item 12) come with a positive control: with the protection
removed the same attacker recovers an input exactly, so a refusal is the
protection at work, not a broken attack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping

import numpy as np
import pytest

from fedshield.errors import ProtocolError
from fedshield.secagg import crypto, protocol, shamir
from fedshield.secagg.encoding import add_mod, sub_mod
from fedshield.secagg.graph import build_graph
from fedshield.secagg.messages import (
    SERVER_ID,
    Advertisement,
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyReply,
    ConsistencyRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    SharePayload,
    UnmaskReply,
    UnmaskRequest,
    decode,
)
from fedshield.secagg.protocol import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    _config_digest,
    _context,
    _pair,
    _pairwise_mask,
    _seed_commitment,
)

# --------------------------------------------------------------------------
# Item 11: two groups shown two client lists (malicious mode, SecAgg+)
#
# The federation's key table lists 18 clients; the round has n = 10, t = 6,
# k = 3. The server shows view A (list LIST_A, graph seed SEED_A) to the
# clients of GROUP_A and view B (LIST_B, SEED_B) to GROUP_B, forwards keys
# between the views wherever both sides' graphs make the two neighbours, and
# runs a consistency check in each view (6 signers each). In view A the
# target T and its only mask partner W survive, so T and W reveal their
# shares of b_T; in view B, W "dropped", so W's three holders in GROUP_B
# reveal their shares of W's masking key. y_T minus PRG(b_T) minus the T-W
# mask is x_T. The lists and seeds were found by a search over random graphs
# (seconds); before wire version 3 (commit b7a7434) the server chose the
# graph seed and signatures bound neither list nor seed, and this exact run
# recovered x_T.

KEY_TABLE = [f"c{i:02d}" for i in range(18)]
LIST_A = ("c00", "c03", "c05", "c08", "c10", "c11", "c12", "c13", "c14", "c16")
SEED_A = bytes.fromhex(
    "a35a8a67298a868322f9045811e7d4f31834f3d84e5cea93fa2c705a2ba88975"
)
LIST_B = ("c01", "c02", "c03", "c08", "c10", "c11", "c12", "c13", "c15", "c17")
SEED_B = bytes.fromhex(
    "de1b665b55a325cbf4b6ae30161d10bd0668968cb386ffbe83feb411bc821739"
)
GROUP_A = ("c00", "c05", "c08", "c10", "c12", "c14")
GROUP_B = ("c01", "c02", "c03", "c11", "c13", "c15", "c17")
SURVIVORS_A = ("c00", "c03", "c05", "c08", "c10", "c11", "c12", "c13", "c14")
SURVIVORS_B = GROUP_B
TARGET, PARTNER = "c00", "c12"
TWO_LISTS = SecAggConfig(
    protocol="secagg+",
    threshold=6,
    modulus_bits=16,
    vector_length=8,
    neighbours=3,
    malicious=True,
    allow_insecure_neighbours=True,  # k = 3 at n = 10, as in the review
)


@dataclasses.dataclass
class Outcome:
    """What the two-list server got."""

    errors: dict[str, str]
    self_mask_shares: dict[int, tuple[int, ...]]  # of b_T, by position
    key_shares: dict[int, tuple[int, ...]]  # of PARTNER's masking key
    recovered: np.ndarray | None
    target_input: np.ndarray


def two_list_attack() -> Outcome:
    """Run the malicious server of the block comment above; see :class:`Outcome`."""
    d, b = TWO_LISTS.vector_length, TWO_LISTS.modulus_bits
    signing = {c: crypto.generate_signing_key() for c in KEY_TABLE}
    table = {c: key.public for c, key in signing.items()}
    clients = {
        c: SecAggClient(TWO_LISTS, 0, c, signing_key=signing[c], verify_keys=table)
        for c in GROUP_A + GROUP_B
    }
    rng = np.random.default_rng(11)
    inputs = {c: rng.integers(0, 1 << b, d, dtype=np.uint64) for c in clients}
    for cid, client in clients.items():
        client.set_input(inputs[cid])
    graph_a, graph_b = build_graph(LIST_A, 3, SEED_A), build_graph(LIST_B, 3, SEED_B)
    view = {c: "A" for c in GROUP_A} | {c: "B" for c in GROUP_B}
    graph = {"A": graph_a, "B": graph_b}
    listed = {"A": LIST_A, "B": LIST_B}
    # The graph seed the server wants is sent as its seed share (the tests
    # below make the seed derivation return the share, as the old code let
    # the server pick the seed).
    share = {"A": SEED_A, "B": SEED_B}
    session = os.urandom(16)
    digest = _config_digest(TWO_LISTS, 10, 3)
    errors: dict[str, str] = {}

    def head(c: str) -> dict[str, object]:
        return {"session": session, "round_idx": 0, "sender": SERVER_ID, "recipient": c}

    def ask(c: str, request: object) -> object | None:
        if c in errors:
            return None
        try:
            reply = clients[c].handle(request.to_bytes())  # type: ignore[attr-defined]
        except ProtocolError as exc:
            errors[c] = str(exc)
            return None
        return decode(reply, vector_length=d, modulus_bits=b)

    def alive() -> list[str]:
        return [c for c in clients if c not in errors]

    def neighbours_of(c: str) -> list[str]:
        return list(graph[view[c]].neighbours_of(c))

    def mutual(c: str, among: Mapping[str, object]) -> list[str]:
        return [v for v in neighbours_of(c) if v in among and c in neighbours_of(v)]

    ads: dict[str, Advertisement] = {}
    for c in clients:
        v = view[c]
        reply = ask(
            c,
            AdvertiseRequest(
                **head(c),
                clients=listed[v],
                seed_commitment=_seed_commitment(session, 0, share[v]),
                config_digest=digest,
            ),
        )
        if isinstance(reply, AdvertiseReply):
            ads[c] = Advertisement(
                c,
                reply.encryption_key,
                reply.masking_key,
                reply.self_mask_commitment,
                reply.signature,
            )
    leader = {v: ads[min(c for c in ads if view[c] == v)] for v in ("A", "B")}
    ciphertexts: dict[str, Mapping[str, bytes]] = {}
    for c in alive():
        reply = ask(
            c,
            ShareKeysRequest(
                **head(c),
                advertisements=tuple(ads[v] for v in mutual(c, ads)),
                seed_reveal=share[view[c]],
                leader=leader[view[c]],
            ),
        )
        if isinstance(reply, ShareKeysReply):
            ciphertexts[c] = reply.ciphertexts
    masked: dict[str, np.ndarray] = {}
    for c in alive():
        forwarded = {
            v: ciphertexts[v][c]
            for v in mutual(c, ciphertexts)
            if c in ciphertexts[v] and v in ciphertexts.get(c, {})
        }
        reply = ask(c, MaskedInputRequest(**head(c), ciphertexts=forwarded))
        if isinstance(reply, MaskedInputReply):
            masked[c] = reply.masked_input
    survivors = {"A": SURVIVORS_A, "B": SURVIVORS_B}
    signatures: dict[str, dict[str, bytes]] = {"A": {}, "B": {}}
    for c in alive():
        reply = ask(c, ConsistencyRequest(**head(c), survivors=survivors[view[c]]))
        if isinstance(reply, ConsistencyReply):
            signatures[view[c]][c] = reply.signature
    self_mask_shares: dict[int, tuple[int, ...]] = {}
    key_shares: dict[int, tuple[int, ...]] = {}
    for c in alive():
        v = view[c]
        holds_target = c == TARGET or TARGET in mutual(c, clients)
        holds_partner = PARTNER in mutual(c, clients)
        reply = ask(
            c,
            UnmaskRequest(
                **head(c),
                survivors=survivors[v],
                signatures=signatures[v],
                self_mask_requests=(TARGET,) if v == "A" and holds_target else (),
                key_requests=(PARTNER,) if v == "B" and holds_partner else (),
            ),
        )
        if isinstance(reply, UnmaskReply):
            # T and W shared in view A: positions are indices in LIST_A.
            for owner, s in reply.self_mask_shares.items():
                if owner == TARGET:
                    self_mask_shares[graph_a.index(c) + 1] = s
            for owner, s in reply.key_shares.items():
                if owner == PARTNER:
                    key_shares[graph_a.index(c) + 1] = s
    recovered = None
    t_target = graph_a.threshold_of(TARGET, 6)
    t_partner = graph_a.threshold_of(PARTNER, 6)
    if (
        TARGET in masked
        and len(self_mask_shares) >= t_target
        and len(key_shares) >= t_partner
    ):
        b_target = shamir.reconstruct_bytes(self_mask_shares, t_target, 32)
        s_partner = crypto.import_private(
            shamir.reconstruct_bytes(key_shares, t_partner, 32)
        )
        x = sub_mod(masked[TARGET], crypto.expand_mask(b_target, d, b), b)
        mask = _pairwise_mask(
            s_partner,
            ads[TARGET].masking_key,
            session=session,
            round_idx=0,
            u=TARGET,
            v=PARTNER,
            config=TWO_LISTS,
        )
        recovered = sub_mod(x, mask, b)  # TARGET < PARTNER: y_T carries +mask
    return Outcome(
        errors, self_mask_shares, key_shares, recovered, inputs[TARGET].copy()
    )


def _server_picks_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph seed is the server's share: the server chooses the graph."""
    monkeypatch.setattr(protocol, "_graph_seed", lambda binding, share, leader: share)


def test_two_list_attack_recovers_the_target_when_signatures_skip_the_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Positive control: the old protocol (commit b7a7434) in both respects.

    Its signatures bound session, round and configuration, not the client
    list or the seed, and the server chose the seed.
    """
    _server_picks_the_seed(monkeypatch)
    monkeypatch.setattr(
        protocol,
        "_round_binding",
        lambda session, round_idx, digest, clients, commitment: hashlib.sha256(
            session + round_idx.to_bytes(8, "big") + digest
        ).digest(),
    )
    outcome = two_list_attack()
    assert outcome.errors == {}
    assert outcome.recovered is not None
    np.testing.assert_array_equal(outcome.recovered, outcome.target_input)


def test_two_list_attack_is_refused_by_the_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Item 11: even a server that could pick the graph gets nothing.

    The seed derivation is patched so that the server gets the graphs the
    attack needs (item 13 alone would deny it them); what stops it here is
    the round binding: every advertisement is signed over its sender's
    client list, so the clients of one view refuse the keys of the other.
    """
    _server_picks_the_seed(monkeypatch)
    outcome = two_list_attack()
    # The cross-view holders of W's shares refuse W's advertisement ...
    for holder in ("c03", "c11", "c13"):
        assert "bad signature" in outcome.errors[holder]
        assert "another client list" in outcome.errors[holder]
    # ... W refuses theirs, and T, left without its partner, stops too.
    assert "bad signature" in outcome.errors[PARTNER]
    assert TARGET in outcome.errors
    # The server never holds both kinds of shares, nor the input.
    assert outcome.key_shares == {}
    assert len(outcome.self_mask_shares) < 2
    assert outcome.recovered is None


def test_survivor_signatures_from_outside_the_round_are_refused() -> None:
    """Signers must be in the round's client list, not merely in the key table."""
    config = SecAggConfig(threshold=3, modulus_bits=16, vector_length=4, malicious=True)
    ids = ["c0", "c1", "c2", "c3"]
    outsider = "c9"
    signing = {c: crypto.generate_signing_key() for c in [*ids, outsider]}
    table = {c: k.public for c, k in signing.items()}
    server = SecAggServer(config, 0, ids, verify_keys={c: table[c] for c in ids})
    clients = {
        c: SecAggClient(config, 0, c, signing_key=signing[c], verify_keys=table)
        for c in ids
    }
    for c in ids:
        clients[c].set_input(np.zeros(4, dtype=np.uint64))
    while server.stage != "unmask":
        server.receive({c: clients[c].handle(m) for c, m in server.requests().items()})
    request = decode(server.requests()["c0"], vector_length=4, modulus_bits=16)
    assert isinstance(request, UnmaskRequest)
    forged = dataclasses.replace(
        request,
        signatures={**dict(list(request.signatures.items())[:2]), outsider: bytes(64)},
    )
    with pytest.raises(ProtocolError, match=r"\['c9'\], which are not in the round"):
        clients["c0"].handle(forged.to_bytes())


# --------------------------------------------------------------------------
# Item 12: a server that substitutes its own keys (man in the middle)

MITM = SecAggConfig(threshold=3, modulus_bits=16, vector_length=8)
MITM_IDS = ["c0", "c1", "c2", "c3", "c4"]


def key_substitution(
    config: SecAggConfig, target: str
) -> tuple[np.ndarray, np.ndarray]:
    """Run a key-substituting server against ``target``.

    The server runs stage 0 honestly, then forwards to ``target`` its own
    public keys in place of every neighbour's. ``target`` encrypts its shares
    of ``b_u`` to the server (which decrypts them and rebuilds ``b_u``) and
    masks pairwise with the server's keys (which it can compute), so its
    masked input unmasks without any other client's help.

    Returns
    -------
    (recovered, input)
        What the server computes from ``y_target``, and ``x_target``.

    Raises
    ------
    ProtocolError
        From ``target``, if it refuses the substituted keys.
    """
    d, b = config.vector_length, config.modulus_bits
    signing = (
        {c: crypto.generate_signing_key() for c in MITM_IDS} if config.malicious else {}
    )
    table = {c: k.public for c, k in signing.items()} or None
    server = SecAggServer(config, 0, MITM_IDS, verify_keys=table)
    clients = {
        c: SecAggClient(config, 0, c, signing_key=signing.get(c), verify_keys=table)
        for c in MITM_IDS
    }
    x = np.random.default_rng(12).integers(0, 1 << b, d, dtype=np.uint64)
    clients[target].set_input(x)
    replies = {c: clients[c].handle(m) for c, m in server.requests().items()}
    own = decode(replies[target], vector_length=d, modulus_bits=b)
    assert isinstance(own, AdvertiseReply)
    server.receive(replies)
    honest = decode(server.requests()[target], vector_length=d, modulus_bits=b)
    assert isinstance(honest, ShareKeysRequest)
    session = honest.session
    fake = {
        ad.client_id: (crypto.generate_keypair(), crypto.generate_keypair())
        for ad in honest.advertisements
    }

    def swap(ad: Advertisement) -> Advertisement:
        if ad.client_id not in fake:
            return ad
        encryption, masking = fake[ad.client_id]
        return dataclasses.replace(
            ad, encryption_key=encryption.public, masking_key=masking.public
        )

    substituted = dataclasses.replace(
        honest,
        advertisements=tuple(map(swap, honest.advertisements)),
        leader=swap(honest.leader),
    )
    reply = decode(
        clients[target].handle(substituted.to_bytes()), vector_length=d, modulus_bits=b
    )
    assert isinstance(reply, ShareKeysReply)
    channel = {
        v: crypto.agree(
            fake[v][0].private,
            own.encryption_key,
            info=_pair("channel", session, 0, target, v),
        )
        for v in fake
    }
    shares: dict[int, tuple[int, ...]] = {}
    for v, ciphertext in reply.ciphertexts.items():
        payload = SharePayload.from_bytes(
            crypto.decrypt(
                channel[v],
                ciphertext,
                associated_data=_context("share", session, 0, target, v),
            )
        )
        shares[MITM_IDS.index(v) + 1] = payload.self_mask_share
    b_target = shamir.reconstruct_bytes(shares, config.threshold, 32)
    # Stage 2: the server hands the target ciphertexts it made itself.
    forged = {
        v: crypto.encrypt(
            channel[v],
            SharePayload(v, target, (1, 1), (1, 1)).to_bytes(),
            associated_data=_context("share", session, 0, v, target),
        )
        for v in fake
    }
    request = MaskedInputRequest(
        session=session,
        round_idx=0,
        sender=SERVER_ID,
        recipient=target,
        ciphertexts=forged,
    )
    masked = decode(
        clients[target].handle(request.to_bytes()), vector_length=d, modulus_bits=b
    )
    assert isinstance(masked, MaskedInputReply)
    out = sub_mod(masked.masked_input, crypto.expand_mask(b_target, d, b), b)
    for v in fake:
        mask = _pairwise_mask(
            fake[v][1].private,
            own.masking_key,
            session=session,
            round_idx=0,
            u=target,
            v=v,
            config=config,
        )
        out = sub_mod(out, mask, b) if target < v else add_mod(out, mask, b)
    return out, x


def test_semi_honest_mode_gives_no_protection_against_key_substitution():
    """Item 12, as the README says: semi-honest mode trusts the server."""
    recovered, x = key_substitution(MITM, "c2")
    np.testing.assert_array_equal(recovered, x)


def test_malicious_mode_refuses_substituted_keys():
    config = dataclasses.replace(MITM, malicious=True)
    with pytest.raises(ProtocolError, match="bad signature"):
        key_substitution(config, "c2")


# --------------------------------------------------------------------------
# Item 13: nobody picks the graph seed alone

SEEDED = SecAggConfig(
    protocol="secagg+",
    threshold=9,
    modulus_bits=16,
    vector_length=4,
    neighbours=6,
    allow_insecure_neighbours=True,
)
SEEDED_IDS = [f"c{i:02d}" for i in range(16)]
SUM = SecAggConfig(threshold=4, modulus_bits=16, vector_length=6)
SUM_IDS = [f"c{i}" for i in range(6)]


def _start(config: SecAggConfig, ids: list[str]):
    server = SecAggServer(config, 0, ids)
    clients = {c: SecAggClient(config, 0, c) for c in ids}
    server.receive({c: clients[c].handle(m) for c, m in server.requests().items()})
    return server, clients


def _share_keys_request(server: SecAggServer, cid: str) -> ShareKeysRequest:
    msg = decode(server.requests()[cid], vector_length=4, modulus_bits=16)
    assert isinstance(msg, ShareKeysRequest)
    return msg


def test_the_server_cannot_pick_the_graph_seed():
    """The seed follows from the server's committed share and the leader's keys."""
    server, clients = _start(SEEDED, SEEDED_IDS)
    # (A client the random graph leaves without neighbours gets no request.)
    first, second = sorted(server.requests())[1:3]
    request = _share_keys_request(server, first)
    assert request.leader.client_id == "c00"  # the first client that advertised
    # Every client derives the server's graph from the request alone ...
    clients[first].handle(request.to_bytes())
    derived = clients[first]._graph
    assert derived is not None
    for i in range(len(SEEDED_IDS)):
        np.testing.assert_array_equal(
            derived.neighbour_indices(i), server.graph.neighbour_indices(i)
        )
    # ... and refuses a seed share other than the one committed to in stage 0,
    # which is what a server that grinds graphs after the advertisements needs.
    ground = dataclasses.replace(request, seed_reveal=os.urandom(32))
    with pytest.raises(ProtocolError, match="does not match the commitment"):
        clients[second].handle(dataclasses.replace(ground, recipient=second).to_bytes())
    # Before the advertisements are in there is no graph, and there is no
    # parameter to set the seed any more.
    with pytest.raises(ProtocolError, match="derived from the round's adv"):
        SecAggServer(SEEDED, 0, SEEDED_IDS).graph  # noqa: B018
    with pytest.raises(TypeError, match="graph_seed"):
        SecAggServer(SEEDED, 0, SEEDED_IDS, graph_seed=bytes(32))  # type: ignore[call-arg]


def test_a_later_leader_is_refused_by_every_client_that_sorts_before_it():
    """To get another leader the server must leave out every earlier client."""
    server, clients = _start(SEEDED, SEEDED_IDS)
    honest = _share_keys_request(server, "c00")
    later = _share_keys_request(server, "c00").advertisements[0]
    assert later.client_id > "c00"
    request = dataclasses.replace(honest, leader=later)
    with pytest.raises(ProtocolError, match="sorts after 'c00'"):
        clients["c00"].handle(request.to_bytes())


def test_keys_of_a_client_before_the_leader_are_refused():
    # Full graph: every client neighbours every other, whatever the seed.
    config = SecAggConfig(threshold=4, modulus_bits=16, vector_length=4)
    server, clients = _start(config, SUM_IDS)
    request = _share_keys_request(server, "c2")
    by_id = {ad.client_id: ad for ad in request.advertisements}
    # The server names c1 the leader but keeps c0 (which sorts before it).
    forged = dataclasses.replace(request, leader=by_id["c1"])
    with pytest.raises(ProtocolError, match="'c0', which sorts before the graph"):
        clients["c2"].handle(forged.to_bytes())


# --------------------------------------------------------------------------
# Item 17: a wrong share of a self-mask seed


def _run_with_wrong_shares(wrong: Mapping[str, str]) -> tuple[SecAggServer, dict]:
    """An honest round in which holder -> owner sends a wrong share of b_owner."""
    server = SecAggServer(SUM, 0, SUM_IDS)
    clients = {c: SecAggClient(SUM, 0, c) for c in SUM_IDS}
    rng = np.random.default_rng(17)
    inputs = {c: rng.integers(0, 1 << 16, 6, dtype=np.uint64) for c in SUM_IDS}
    for c in SUM_IDS:
        clients[c].set_input(inputs[c])
    while server.stage not in ("done", "aborted"):
        replies = {}
        for c, message in server.requests().items():
            reply = clients[c].handle(message)
            msg = decode(reply, vector_length=6, modulus_bits=16)
            if isinstance(msg, UnmaskReply) and c in wrong:
                shares = dict(msg.self_mask_shares)
                owner = wrong[c]
                share = shares[owner]
                # A random error: equal errors at several positions can cancel
                # in the interpolation (and rebuild the right seed).
                error = int(rng.integers(1, 2**62))
                shares[owner] = ((share[0] + error) % shamir.PRIME, *share[1:])
                reply = dataclasses.replace(msg, self_mask_shares=shares).to_bytes()
            replies[c] = reply
        server.receive(replies)
    return server, inputs


def test_a_wrong_self_mask_share_is_caught_and_left_out(caplog):
    # c0's share is among the first t = 4 used to rebuild b_c3.
    server, inputs = _run_with_wrong_shares({"c0": "c3"})
    expected = sum(inputs[c].astype(object) for c in SUM_IDS) % (1 << 16)
    np.testing.assert_array_equal(server.result(), expected.astype(np.uint64))
    logged = [r.getMessage() for r in caplog.records]
    assert any("leaving out the shares at positions [1]" in m for m in logged)


def test_wrong_shares_beyond_repair_abort_the_round():
    # Three of the six shares of b_c3 are wrong: no 4 good ones are left.
    with pytest.raises(ProtocolError, match=r"self-mask seed of 'c3'.*commitment"):
        _run_with_wrong_shares({"c0": "c3", "c1": "c3", "c2": "c3"})
