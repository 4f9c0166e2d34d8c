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
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest

from fedshield.errors import ConfigError, ProtocolError
from fedshield.secagg import crypto, protocol, shamir
from fedshield.secagg.encoding import add_mod, sub_mod
from fedshield.secagg.graph import NeighbourGraph, build_graph
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


# --------------------------------------------------------------------------
# Second review, finding 1: one round run twice under one session
#
# Malicious-mode SecAgg+ with n = 60, t = 31 and the k fedshield chooses
# (50; secure, no allow_insecure_neighbours). The server runs round 0 twice
# with the SAME session, seed share r_S and client list, as a "retry" after
# an abort: honest devices build a fresh SecAggClient each time and take the
# session from the server's first message. In run 2 it forwards the run-1
# leader's advertisement as the leader (signed over the same round binding,
# so it verifies) and leaves the leader L out. Both runs then have the same
# round binding and graph seed, hence the same view, so every survivor-list
# signature of run 1 verifies in run 2 and each client can be made to sign
# two lists, one per run. The server gets b_T from T's holders under list S1
# (T survives) and the masking keys of T's mask partners P from their holders
# under list S2 (P dropped), and unmasks x_T. Wire version 3 relied on
# counting signatures (t > n / 2) alone, and fell to this (the reviewer's
# run at n = 100, t = 51 recovered x_T); version 4 requires the leader in
# every survivor list and among its signers, and L's one client object of
# that view signs one list.

REPLAY_N = 60
REPLAY = SecAggConfig(
    protocol="secagg+",
    threshold=REPLAY_N // 2 + 1,
    modulus_bits=16,
    vector_length=8,
    malicious=True,
)
REPLAY_IDS = tuple(f"c{i:03d}" for i in range(REPLAY_N))


@dataclasses.dataclass
class Replay:
    """What the replaying server got."""

    errors: dict[str, str]  # each device's first refusal, either run
    signed_lists: int  # distinct survivor lists that t signatures reached
    recovered: np.ndarray | None
    target_input: np.ndarray


def _replay_plan(
    graph: NeighbourGraph, leader: str, t: int
) -> tuple[str, tuple[str, ...], dict[str, set[str]]] | None:
    """Target T, its partners P (t_T - 1 neighbours), and holders of each P's key.

    ``S1`` (everyone but L and T's neighbours outside P) and ``S2`` (everyone
    but L, T and P) must both have ``t`` clients and be connected.
    """
    for target in graph.clients:
        if target == leader:
            continue
        near = [v for v in graph.neighbours_of(target) if v != leader]
        t_target = graph.threshold_of(target, t)
        if len(near) + 1 < t_target:
            continue
        partners = tuple(sorted(near, key=lambda v: -graph.degree(v))[: t_target - 1])
        a = {target, *partners}
        s1, s2 = _replay_lists(graph, leader, target, partners)
        if len(s1) < t or len(s2) < t:
            continue
        if not (graph.is_connected(s1) and graph.is_connected(s2)):
            continue
        holders: dict[str, set[str]] = {}
        for v in partners:
            candidates = [
                h for h in graph.neighbours_of(v) if h not in a and h != leader
            ]
            if len(candidates) < graph.threshold_of(v, t):
                break
            holders[v] = set(candidates[: graph.threshold_of(v, t)])
        else:
            return target, partners, holders
    return None


def _replay_lists(
    graph: NeighbourGraph,
    leader: str,
    target: str,
    partners: tuple[str, ...],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    others = set(graph.neighbours_of(target)) - set(partners)
    s1 = tuple(c for c in graph.clients if c != leader and c not in others)
    s2 = tuple(c for c in graph.clients if c not in {leader, target, *partners})
    return s1, s2


def session_replay_attack(*, seen_sessions: bool = False) -> Replay:
    """Run the replaying server of the block comment above; see :class:`Replay`.

    With ``seen_sessions`` every device keeps one set of the (round, session)
    pairs it took part in and gives it to each client object it builds.
    """
    config, ids, t = REPLAY, REPLAY_IDS, REPLAY.threshold
    d, b, n = config.vector_length, config.modulus_bits, len(REPLAY_IDS)
    k = config.neighbour_count(n)
    signing = {c: crypto.generate_signing_key() for c in ids}
    table = {c: key.public for c, key in signing.items()}
    memory: dict[str, set[tuple[int, bytes]]] = {c: set() for c in ids}
    rng = np.random.default_rng(2)
    inputs = {c: rng.integers(0, 1 << b, d, dtype=np.uint64) for c in ids}
    digest = _config_digest(config, n, k)
    seed_share = os.urandom(32)
    errors: dict[str, str] = {}

    class Run:
        def __init__(self, members: Sequence[str], session: bytes) -> None:
            self.session = session
            self.clients: dict[str, SecAggClient] = {}
            self.failed: set[str] = set()
            for c in members:
                # (seen_sessions only when asked: the attack runs unchanged
                # against code that predates it.)
                guard = {"seen_sessions": memory[c]} if seen_sessions else {}
                client = SecAggClient(
                    config, 0, c, signing_key=signing[c], verify_keys=table, **guard
                )
                client.set_input(inputs[c])
                self.clients[c] = client
            self.ads: dict[str, Advertisement] = {}
            self.ciphertexts: dict[str, Mapping[str, bytes]] = {}
            self.masked: dict[str, np.ndarray] = {}

        def head(self, c: str) -> dict[str, object]:
            return {
                "session": self.session,
                "round_idx": 0,
                "sender": SERVER_ID,
                "recipient": c,
            }

        def ask(self, c: str, request: object) -> object | None:
            if c in self.failed:
                return None
            try:
                reply = self.clients[c].handle(request.to_bytes())  # type: ignore[attr-defined]
            except ProtocolError as exc:
                self.failed.add(c)
                errors.setdefault(c, str(exc))
                return None
            return decode(reply, vector_length=d, modulus_bits=b)

        def advertise(self) -> None:
            commitment = _seed_commitment(self.session, 0, seed_share)
            for c in self.clients:
                reply = self.ask(
                    c,
                    AdvertiseRequest(
                        **self.head(c),
                        clients=ids,
                        seed_commitment=commitment,
                        config_digest=digest,
                    ),
                )
                if isinstance(reply, AdvertiseReply):
                    self.ads[c] = Advertisement(
                        c,
                        reply.encryption_key,
                        reply.masking_key,
                        reply.self_mask_commitment,
                        reply.signature,
                    )

        def share_keys(self, graph: NeighbourGraph, leader: Advertisement):
            for c in list(self.ads):
                ads = tuple(
                    self.ads[v] for v in graph.neighbours_of(c) if v in self.ads
                )
                reply = self.ask(
                    c,
                    ShareKeysRequest(
                        **self.head(c),
                        advertisements=ads,
                        seed_reveal=seed_share,
                        leader=leader,
                    ),
                )
                if isinstance(reply, ShareKeysReply):
                    self.ciphertexts[c] = reply.ciphertexts

        def masked_input(
            self, graph: NeighbourGraph, withhold: Mapping[str, set[str]]
        ) -> None:
            for c in list(self.ciphertexts):
                forwarded = {
                    v: self.ciphertexts[v][c]
                    for v in graph.neighbours_of(c)
                    if v in self.ciphertexts and v not in withhold.get(c, set())
                }
                reply = self.ask(
                    c, MaskedInputRequest(**self.head(c), ciphertexts=forwarded)
                )
                if isinstance(reply, MaskedInputReply):
                    self.masked[c] = reply.masked_input

        def consistency(
            self, list_for: Callable[[str], tuple[str, ...] | None]
        ) -> dict[str, tuple[tuple[str, ...], bytes]]:
            signatures = {}
            for c in list(self.masked):
                survivors = list_for(c)
                if survivors is None:
                    continue
                reply = self.ask(
                    c, ConsistencyRequest(**self.head(c), survivors=survivors)
                )
                if isinstance(reply, ConsistencyReply):
                    signatures[c] = (survivors, reply.signature)
            return signatures

    leader = ids[0]
    for _ in range(20):  # a graph that suits the plan (nearly every one does)
        session = os.urandom(16)
        run1 = Run(ids, session)
        run1.advertise()
        binding = protocol._round_binding(
            session, 0, digest, ids, _seed_commitment(session, 0, seed_share)
        )
        seed = protocol._graph_seed(binding, seed_share, run1.ads[leader])
        graph = build_graph(ids, k, seed)
        plan = _replay_plan(graph, leader, t)
        if plan is not None:
            break
    else:  # pragma: no cover - 20 unsuitable random graphs in a row
        pytest.fail("no graph suited the replay plan")
    target, partners, holders = plan
    s1, s2 = _replay_lists(graph, leader, target, partners)
    group_a = {target, *partners}
    # Run 1: honest up to stage 2; the clients of S1 sign S1, the others S2.
    run1.share_keys(graph, run1.ads[leader])
    run1.masked_input(graph, {})
    signed1 = run1.consistency(lambda c: s1 if c in s1 else (s2 if c in s2 else None))
    # Run 2: the same session, L left out, its run-1 advertisement as leader;
    # T gets no ciphertext from its neighbours outside P.
    run2 = Run([c for c in ids if c != leader], session)
    run2.advertise()
    run2.share_keys(graph, run1.ads[leader])
    withhold = {target: set(graph.neighbours_of(target)) - set(partners)}
    run2.masked_input(graph, withhold)
    signed2 = run2.consistency(
        lambda c: s1 if c in group_a else (s2 if c in s2 else None)
    )
    on: dict[tuple[str, ...], dict[str, bytes]] = {s1: {}, s2: {}}
    for signed in (signed1, signed2):
        for c, (survivors, signature) in signed.items():
            on[survivors][c] = signature
    signed_lists = sum(len(signatures) >= t for signatures in on.values())
    # Unmask, in run 2: b_T from group A under S1, P's keys from B under S2.
    seed_shares: dict[int, tuple[int, ...]] = {}
    key_shares: dict[str, dict[int, tuple[int, ...]]] = {v: {} for v in partners}
    all_holders = set().union(*holders.values())
    for c in list(run2.masked):
        if c in group_a:
            survivors, masks, keys = s1, (target,), ()
        elif c in all_holders:
            survivors, masks = s2, ()
            keys = tuple(sorted(v for v in partners if c in holders[v]))
        else:
            continue
        reply = run2.ask(
            c,
            UnmaskRequest(
                **run2.head(c),
                survivors=survivors,
                signatures=on[survivors],
                self_mask_requests=masks,
                key_requests=keys,
            ),
        )
        if isinstance(reply, UnmaskReply):
            x = graph.index(c) + 1
            for share in reply.self_mask_shares.values():
                seed_shares[x] = share
            for owner, share in reply.key_shares.items():
                key_shares[owner][x] = share
    recovered = None
    t_target = graph.threshold_of(target, t)
    enough = len(seed_shares) >= t_target and all(
        len(key_shares[v]) >= graph.threshold_of(v, t) for v in partners
    )
    if target in run2.masked and enough:
        b_target = shamir.reconstruct_bytes(seed_shares, t_target, 32)
        x = sub_mod(run2.masked[target], crypto.expand_mask(b_target, d, b), b)
        for v in partners:
            private = crypto.import_private(
                shamir.reconstruct_bytes(key_shares[v], graph.threshold_of(v, t), 32)
            )
            mask = _pairwise_mask(
                private,
                run2.ads[target].masking_key,
                session=session,
                round_idx=0,
                u=target,
                v=v,
                config=config,
            )
            x = sub_mod(x, mask, b) if target < v else add_mod(x, mask, b)
        recovered = x
    return Replay(errors, signed_lists, recovered, inputs[target].copy())


def _no_leader_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wire version 3's clients: survivor lists need no leader signature."""
    monkeypatch.setattr(SecAggClient, "_leader_rule", lambda self, *args: None)


def test_session_replay_recovers_an_input_without_the_leader_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Positive control: the attack of the review, against version-3 rules."""
    _no_leader_rule(monkeypatch)
    outcome = session_replay_attack()
    assert outcome.errors == {}
    assert outcome.signed_lists == 2  # every client signed both lists
    assert outcome.recovered is not None
    np.testing.assert_array_equal(outcome.recovered, outcome.target_input)


def test_session_replay_is_refused_by_the_leader_rule() -> None:
    outcome = session_replay_attack()
    assert outcome.recovered is None
    assert outcome.signed_lists == 0
    # Every client was asked to sign a list without the leader (in run 1,
    # and again in run 2) and refused.
    assert len(outcome.errors) == REPLAY_N - 1
    assert all(
        "leaves out the graph seed's leader 'c000'" in e
        for e in outcome.errors.values()
    )


def test_session_replay_is_refused_by_devices_that_keep_seen_sessions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The optional guard alone (leader rule off) stops the second run."""
    _no_leader_rule(monkeypatch)
    outcome = session_replay_attack(seen_sessions=True)
    assert outcome.recovered is None
    assert outcome.signed_lists <= 1  # run 1's own list, at most
    refused = [e for e in outcome.errors.values() if "already took part" in e]
    assert len(refused) == REPLAY_N - 1  # every device of run 2, at stage 0


# The leader rule, stage by stage (full graph, n = 5, t = 3; the leader is c0).

RULE = SecAggConfig(threshold=3, modulus_bits=16, vector_length=4, malicious=True)
RULE_IDS = [f"c{i}" for i in range(5)]


def _malicious_round(
    config: SecAggConfig, ids: Sequence[str]
) -> tuple[SecAggServer, dict[str, SecAggClient], dict[str, crypto.SigningKey]]:
    signing = {c: crypto.generate_signing_key() for c in ids}
    table = {c: key.public for c, key in signing.items()}
    server = SecAggServer(config, 0, ids, verify_keys=table)
    clients = {
        c: SecAggClient(config, 0, c, signing_key=signing[c], verify_keys=table)
        for c in ids
    }
    for c in ids:
        clients[c].set_input(np.full(config.vector_length, 1, dtype=np.uint64))
    return server, clients, signing


def _play_until(
    server: SecAggServer,
    clients: Mapping[str, SecAggClient],
    stage: str,
    *,
    silent: Mapping[str, str] | None = None,
) -> None:
    """Run honestly until ``stage``; ``silent``: client -> stage it drops at."""
    silent = silent or {}
    while server.stage != stage:
        now = str(server.stage)
        server.receive(
            {
                c: clients[c].handle(m)
                for c, m in server.requests().items()
                if silent.get(c) != now
            }
        )


def test_a_survivor_list_without_the_leader_is_not_signed() -> None:
    server, clients, _ = _malicious_round(RULE, RULE_IDS)
    _play_until(server, clients, "consistency_check")
    request = decode(server.requests()["c2"], vector_length=4, modulus_bits=16)
    assert isinstance(request, ConsistencyRequest)
    assert request.survivors[0] == "c0"
    without = dataclasses.replace(request, survivors=request.survivors[1:])
    with pytest.raises(ProtocolError, match="leaves out the graph seed's leader 'c0'"):
        clients["c2"].handle(without.to_bytes())


def test_a_survivor_list_the_leader_did_not_sign_is_refused() -> None:
    server, clients, _ = _malicious_round(RULE, RULE_IDS)
    _play_until(server, clients, "unmask")
    request = decode(server.requests()["c2"], vector_length=4, modulus_bits=16)
    assert isinstance(request, UnmaskRequest)
    assert "c0" in request.signatures
    # t = 3 valid signatures of the list c2 signed, but not the leader's.
    others = {c: s for c, s in request.signatures.items() if c != "c0"}
    assert len(others) >= RULE.threshold
    forged = dataclasses.replace(request, signatures=others)
    with pytest.raises(ProtocolError, match="not signed by the graph seed's leader"):
        clients["c2"].handle(forged.to_bytes())


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "consistency_check"])
def test_the_server_stops_a_malicious_round_once_the_leader_is_out(stage) -> None:
    server, clients, _ = _malicious_round(RULE, RULE_IDS)
    with pytest.raises(ProtocolError, match=f"stage {stage}: the graph seed's leader"):
        _play_until(server, clients, "done", silent={"c0": stage})
    assert server.stage == "aborted"


def test_a_semi_honest_round_survives_its_leader_dropping() -> None:
    config = dataclasses.replace(RULE, malicious=False)
    server = SecAggServer(config, 0, RULE_IDS)
    clients = {c: SecAggClient(config, 0, c) for c in RULE_IDS}
    for c in RULE_IDS:
        clients[c].set_input(np.full(4, 1, dtype=np.uint64))
    _play_until(server, clients, "done", silent={"c0": "masked_input"})
    np.testing.assert_array_equal(server.result(), np.full(4, 4, dtype=np.uint64))


# --------------------------------------------------------------------------
# Second review, finding 2: what is left of the server's choice of graph
#
# Documented in the module docstring ("Who picks the graph"): the server can
# restart stage 0 with the leader alone, in a fresh session each time (one
# message to one client per restart), and run the round with everyone else
# in the session whose seed suits it. The leader rule does not prevent it
# (the leader takes part); seen_sessions stops restarts under one session only.


def test_stage_zero_restarts_with_the_leader_alone_give_the_server_a_choice() -> None:
    config = dataclasses.replace(SEEDED, malicious=True)
    ids, n, k = SEEDED_IDS, len(SEEDED_IDS), 6
    digest = _config_digest(config, n, k)
    signing = {c: crypto.generate_signing_key() for c in ids}
    table = {c: key.public for c, key in signing.items()}
    seen: dict[str, set[tuple[int, bytes]]] = {c: set() for c in ids}

    def device(c: str) -> SecAggClient:
        client = SecAggClient(
            config,
            0,
            c,
            signing_key=signing[c],
            verify_keys=table,
            seen_sessions=seen[c],
        )
        client.set_input(np.zeros(4, dtype=np.uint64))
        return client

    def advertise(client: SecAggClient, session: bytes, share: bytes) -> Advertisement:
        request = AdvertiseRequest(
            session=session,
            round_idx=0,
            sender=SERVER_ID,
            recipient=client.client_id,
            clients=tuple(ids),
            seed_commitment=_seed_commitment(session, 0, share),
            config_digest=digest,
        )
        reply = decode(
            client.handle(request.to_bytes()), vector_length=4, modulus_bits=16
        )
        assert isinstance(reply, AdvertiseReply)
        return Advertisement(
            client.client_id,
            reply.encryption_key,
            reply.masking_key,
            reply.self_mask_commitment,
            reply.signature,
        )

    target = "c07"
    candidates = []
    for _ in range(12):  # 12 fresh sessions, the leader alone
        session, share = os.urandom(16), os.urandom(32)
        leader = device("c00")
        ad = advertise(leader, session, share)
        binding = protocol._round_binding(
            session, 0, digest, tuple(ids), _seed_commitment(session, 0, share)
        )
        graph = build_graph(ids, k, protocol._graph_seed(binding, share, ad))
        candidates.append((graph.degree(target), session, share, leader, ad, graph))
    degree, session, share, leader, leader_ad, chosen = min(
        candidates, key=lambda c: c[0]
    )
    # The round, in the chosen session: everyone else advertises once.
    clients = {"c00": leader, **{c: device(c) for c in ids[1:]}}
    ads = {
        "c00": leader_ad,
        **{c: advertise(clients[c], session, share) for c in ids[1:]},
    }
    for c in ids:
        near = tuple(ads[v] for v in chosen.neighbours_of(c))
        if not near:
            continue
        request = ShareKeysRequest(
            session=session,
            round_idx=0,
            sender=SERVER_ID,
            recipient=c,
            advertisements=near,
            seed_reveal=share,
            leader=leader_ad,
        )
        clients[c].handle(request.to_bytes())  # accepted: nobody can tell
    derived = clients[target]._graph
    assert derived is not None and derived.degree(target) == degree
    assert degree == min(c[0] for c in candidates)
    # A restart under the SAME session is refused by a leader that keeps
    # seen_sessions (it already advertised in it).
    with pytest.raises(ProtocolError, match="already took part in round 0"):
        advertise(device("c00"), session, share)


# --------------------------------------------------------------------------
# Second review, finding 3: colluding clients (n_C < 2t - n)
#
# n = 7, t = 4, so 2t - n = 1: no colluder is tolerated. The server colludes
# with one client (it holds its signing key and reads the shares it holds)
# and shows S1 = {C, c1, c2, c3} (target c1 survives) to c1..c3 and
# S2 = {C, c4, c5, c6} (c1 dropped) to c4..c6: each list gets t = 4
# signatures, three honest and the colluder's; b_c1 comes from group 1 plus
# the colluder's share, s_sk_c1 from group 2 plus the colluder's. With the
# leader rule both lists must carry the leader's signature, so this works if
# the colluder is the leader (here c0, the first id) and not otherwise.

COLLUDE = SecAggConfig(threshold=4, modulus_bits=16, vector_length=6, malicious=True)
COLLUDE_IDS = [f"c{i}" for i in range(7)]


def one_colluder(colluder: str) -> tuple[np.ndarray | None, dict[str, str]]:
    """Run the attack above; returns (what the server computes, refusals)."""
    server, clients, signing = _malicious_round(COLLUDE, COLLUDE_IDS)
    rng = np.random.default_rng(5)
    x = {c: rng.integers(0, 1 << 16, 6, dtype=np.uint64) for c in COLLUDE_IDS}
    for c in COLLUDE_IDS:
        clients[c].set_input(x[c])
    masked: dict[str, np.ndarray] = {}
    while server.stage != "consistency_check":
        replies = {c: clients[c].handle(m) for c, m in server.requests().items()}
        for c, reply in replies.items():
            msg = decode(reply, vector_length=6, modulus_bits=16)
            if isinstance(msg, MaskedInputReply):
                masked[c] = msg.masked_input
        server.receive(replies)
    session, view, target = server._session, server._view, "c1"
    honest = [c for c in COLLUDE_IDS if c not in (colluder, target)]
    group1, group2 = [target, *honest[:2]], honest[2:]
    s1 = tuple(sorted([colluder, *group1]))
    s2 = tuple(sorted([colluder, *group2]))
    errors: dict[str, str] = {}

    def ask(c: str, request: object) -> object | None:
        try:
            data = clients[c].handle(request.to_bytes())  # type: ignore[attr-defined]
        except ProtocolError as exc:
            errors.setdefault(c, str(exc))
            return None
        return decode(data, vector_length=6, modulus_bits=16)

    def head(c: str) -> dict[str, object]:
        return {"session": session, "round_idx": 0, "sender": SERVER_ID, "recipient": c}

    signatures: dict[tuple[str, ...], dict[str, bytes]] = {s1: {}, s2: {}}
    for group, survivors in ((group1, s1), (group2, s2)):
        for c in group:
            reply = ask(c, ConsistencyRequest(**head(c), survivors=survivors))
            if isinstance(reply, ConsistencyReply):
                signatures[survivors][c] = reply.signature
    for survivors in (s1, s2):  # the colluder signs both
        signatures[survivors][colluder] = crypto.sign(
            signing[colluder],
            protocol._consistency_message(session, 0, view, survivors),
        )
    position = {c: COLLUDE_IDS.index(c) + 1 for c in COLLUDE_IDS}
    own_b, own_key = clients[colluder]._held[target]
    b_shares, key_shares = {position[colluder]: own_b}, {position[colluder]: own_key}
    for group, survivors in ((group1, s1), (group2, s2)):
        for c in group:
            reply = ask(
                c,
                UnmaskRequest(
                    **head(c),
                    survivors=survivors,
                    signatures=signatures[survivors],
                    self_mask_requests=(target,) if survivors == s1 else (),
                    key_requests=(target,) if survivors == s2 else (),
                ),
            )
            if isinstance(reply, UnmaskReply):
                for share in reply.self_mask_shares.values():
                    b_shares[position[c]] = share
                for share in reply.key_shares.values():
                    key_shares[position[c]] = share
    if len(b_shares) < 4 or len(key_shares) < 4:
        return None, errors
    b_target = shamir.reconstruct_bytes(b_shares, 4, 32)
    s_target = crypto.import_private(shamir.reconstruct_bytes(key_shares, 4, 32))
    out = sub_mod(masked[target], crypto.expand_mask(b_target, 6, 16), 16)
    for v in COLLUDE_IDS:
        if v != target:
            mask = _pairwise_mask(
                s_target,
                server._ads[v].masking_key,
                session=session,
                round_idx=0,
                u=target,
                v=v,
                config=COLLUDE,
            )
            out = sub_mod(out, mask, 16) if target < v else add_mod(out, mask, 16)
    np.testing.assert_array_equal(out, x[target])
    return out, errors


def test_one_colluder_at_2t_minus_n_equal_1_unmasks_a_client_if_it_leads() -> None:
    """The documented bound is tight: 2t - n = 1 tolerates no colluder."""
    recovered, errors = one_colluder("c0")
    assert errors == {}
    assert recovered is not None


def test_one_colluder_that_is_not_the_leader_is_stopped_by_the_leader_rule() -> None:
    recovered, errors = one_colluder("c6")
    assert recovered is None
    # The group shown the list without c0 refuses to sign it.
    assert all("leaves out the graph seed's leader 'c0'" in errors[c] for c in errors)
    assert len(errors) == 3


def test_colluders_tolerated_is_below_2t_minus_n() -> None:
    assert COLLUDE.colluders_tolerated(7) == 0  # 2t - n = 1
    assert dataclasses.replace(COLLUDE, threshold=5).colluders_tolerated(7) == 2
    assert dataclasses.replace(COLLUDE, threshold=7).colluders_tolerated(9) == 4
    with pytest.raises(ConfigError, match="not above half"):
        COLLUDE.colluders_tolerated(8)
