"""SecAgg and SecAgg+ as sans-I/O state machines: the server learns only a sum.

:class:`SecAggServer` and :class:`SecAggClient` compute and check protocol
messages; they open no sockets, start no threads and keep no global state.
Whoever runs them (a simulation driver, a gRPC service) carries the bytes:
``server.requests()`` gives one message per client, each client answers with
``client.handle(message)``, and ``server.receive(replies)`` takes the replies
that arrived before the deadline. A client absent from ``replies`` has
dropped. A transport that gets replies one by one hands each to
``server.receive_one(client_id, reply)`` as it arrives and closes the stage
with ``server.end_stage()`` at the deadline. Nothing assumes the parties
share a process.

The protocol (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, Fig. 4 and §6)
----------------------------------------------------------------------------
Let ``t`` be the threshold, ``b`` the modulus bits, ``N(u)`` the neighbours
of client ``u`` (every other client for SecAgg, a random graph for SecAgg+,
see :mod:`fedshield.secagg.graph`) and ``N[u] = N(u) + {u}``.

0. ``advertise_keys``: the server sends the sorted client list, a digest of
   its configuration and a commitment ``H(r_S)`` to a fresh 32-byte share
   ``r_S`` of the graph seed. Each client draws two X25519 key pairs (``c``
   to encrypt shares, ``s`` to agree mask seeds) and its self-mask seed
   ``b_u``, and sends both public keys and a commitment ``H(b_u)``, signed
   with its Ed25519 key when ``malicious``. The signature covers the
   *round binding*: a hash of the wire version, the configuration digest,
   the session, the round, the sorted client list and ``H(r_S)``. ``U1``:
   the clients that answered; at least ``t`` needed.
1. ``share_keys``: the server reveals ``r_S`` and forwards to every client
   the advertisement of the *leader*, the first client of ``U1`` in the
   sorted list; the graph seed is ``H(binding, r_S, leader's
   advertisement)`` (see "Who picks the graph" below), and the server and
   every client derive the graph from it (a client it leaves without
   neighbours is dropped from ``U1``: it could share only with itself). The
   server also forwards to each client the advertisements of its neighbours
   in ``U1``. The client checks
   ``r_S`` against ``H(r_S)``, the leader (no client of ``U1`` may sort
   before it), the keys (all distinct; signatures over its own round binding
   when ``malicious``; at least ``t_u`` holders), Shamir-shares ``b_u`` and
   ``s_sk_u`` among ``N[u] ∩ U1`` with threshold ``t_u`` (``t`` on the
   complete graph; see :func:`~fedshield.secagg.graph.local_threshold`), and
   encrypts each neighbour's pair of shares with AES-GCM under
   ``agree(c_sk_u, c_pk_v)``; the associated data binds session, round,
   sender and recipient. ``U2``: the clients that sent a ciphertext to every
   neighbour in ``U1``.
2. ``masked_input``: the server forwards each client the ciphertexts
   addressed to it. The client decrypts them and sends::

       y_u = x_u + PRG(b_u) + sum_{v in N(u) ∩ U2} ±PRG(agree(s_sk_u, s_pk_v))  mod 2**b

   with ``+`` when ``u < v`` and ``-`` when ``u > v``, so pairwise masks
   cancel between survivors. ``U3``: the clients whose ``y_u`` arrived. The
   server adds each ``y_u`` to a running sum as it arrives and keeps only
   that sum (``d`` words, whatever the number of clients).
   For SecAgg+ the server aborts if ``U3`` is not connected in the graph.
3. ``consistency_check`` (``malicious`` only, §6): the server sends ``U3``
   to its members; each checks it (in particular that it names the leader)
   and signs it together with its *view*: a hash of its round binding and
   the graph seed it derived. ``U4``: the signers. The leader must be among
   them: a round whose leader drops before signing aborts (the server stops
   as soon as it sees the leader missing, at stage 1, 2 or 3).
4. ``unmask``: the server sends ``U3`` (and, when ``malicious``, at least
   ``t`` signatures of it) and asks each client for its share of ``b_v`` for
   every neighbour ``v`` in ``U3`` and of ``s_sk_v`` for every neighbour ``v``
   in ``U2 - U3``. A client answers once, and only if no client is asked for
   under both headings, the survivors are a connected set of at least ``t``
   that matches what it saw (and signed), every signer is in the round's
   client list and signed the same view, and every name is a neighbour that
   shared with it; in malicious mode the leader must be among the signers.
   The server rebuilds ``b_u`` for ``u in U3`` and checks it
   against ``H(b_u)`` (a wrong share cannot corrupt the sum unnoticed: the
   server tries other sets of ``t_u`` shares, then aborts), rebuilds
   ``s_sk_v`` for ``v in U2 - U3`` and checks it against ``s_pk_v``, removes
   the self masks and the masks between survivors and dropped clients, and
   outputs ``sum_{u in U3} x_u mod 2**b``.

At every stage the server needs ``t`` answers, else it raises
:class:`~fedshield.errors.ProtocolError` ("stage X needed t clients, only m
answered"), moves to ``aborted`` and never releases anything.

A client answers a request it has already answered (the same bytes, e.g. a
transport's retransmission after a lost reply) with the same reply, and
changes nothing; any other request out of turn aborts it.

Why the server cannot unmask one client
---------------------------------------
``y_u`` hides ``x_u`` under ``PRG(b_u)`` and under one pairwise mask per
neighbour. To remove all of them the server needs ``b_u`` *and* either
``s_sk_u`` or ``s_sk_v`` for every neighbour ``v``. Honest clients reveal
shares of ``b_u`` only for survivors and of ``s_sk_u`` only for non-survivors,
never both for one client, and ``t_u`` is a strict majority of ``u``'s
holders, so the server reaches the threshold for at most one of the two
secrets of any client. Against a malicious server (``malicious=True``) this
needs every honest client that reveals anything to see the same round: the
same client list, graph and survivor list. Signed advertisements and
survivor lists bind the round as each client saw it (the round binding and
the view above), clients verify them against their own view, and signers
must be in the round's client list, so two groups shown two different
client lists (or seeds) never accept each other's keys or signatures.
(Before wire version 3 the signatures covered neither the client list nor
the seed: with a verification-key table larger than the round, a server
could show two groups two lists, collect ``t`` signatures in each, and get
``b_u`` from one group and the masking keys of ``u``'s neighbours from the
other; ``tests/secagg/test_protocol_attacks.py`` replays that attack.)
Within one view, two rules keep the survivor list unique:

- Counting (Bonawitz §6): an honest client signs one list and reveals only
  for a list ``t`` clients signed, so two lists need two disjoint sets of
  honest signers, impossible while ``t > (n + n_C) / 2`` for ``n_C`` clients
  colluding with the server (:meth:`SecAggConfig.colluders_tolerated`; at
  ``t = n // 2 + 1`` and odd ``n`` that is no colluder at all).
- The leader's signature (wire version 4): the list must name the leader
  and carry its signature. The view hashes the leader's advertisement,
  which one client object made and only that object accepts as its own, and
  that object signs once: at most one list per view can carry it, however
  often the server runs the round. Counting alone fails across runs: in
  version 3 a server could run a round twice under one session (same client
  list and seed share) and, in run 2, forward the leader's run-1
  advertisement as the leader and leave the leader out, so both runs had
  one view; every client object signed one list, so every client signed
  two, and the server unmasked a client (n = 100, t = 51;
  ``tests/secagg/test_protocol_attacks.py`` replays it at n = 60). The
  leader rule only helps while the leader is honest, and the server picks
  the leader among the first ``n - t + 1`` advertisers in sort order, so the
  counting bound is the one to rely on against colluders. A device can also
  refuse a second run of a (round, session) outright: see
  ``SecAggClient(seen_sessions=...)``.

A survivor's pairwise masks with surviving neighbours therefore stay on;
they cancel only in the sum over a connected set of survivors, which clients
check before revealing anything.

Who picks the graph (SecAgg+)
-----------------------------
The graph decides whose shares every client holds, so no single party may
choose it. The seed is ``H(binding, r_S, A_L)`` where ``A_L`` is the
advertisement of the leader ``L``, the first client of ``U1`` in sorted
order (fresh public keys and ``H(b_L)``, unpredictable to anyone else):

- The server commits to ``r_S`` before it sees any advertisement, and every
  client checks the reveal against the commitment, so the server cannot pick
  ``r_S`` after seeing ``A_L``; in malicious mode ``A_L`` is signed by ``L``
  over the round binding, so the server cannot forge it either.
- ``L`` (or any client) sees only ``H(r_S)`` when it advertises, so it
  cannot steer the seed through its keys.
- Residual influence, within one run: the server decides who is in
  ``U1``. To get another leader it must exclude every client that sorts
  before it (each client refuses a leader that sorts after itself or after
  a neighbour whose keys it receives), so excluding ``j`` advertisers gives
  it ``j + 1`` candidate seeds, at most ``n - t + 1`` as ``U1`` needs ``t``
  clients, each exclusion visible as a stage-0 drop.
- Residual influence, across restarts: this is not bounded. Stage 0 is one
  message to each client, and a client cannot tell a restart from a first
  try, so the server can ask the leader alone to advertise again (a fresh
  client object each time, in a fresh session; or in the same session,
  unless the leader keeps ``seen_sessions``), compute each candidate seed at
  once (it knows ``r_S``), stop at a graph it likes, and run the round in
  that session with everyone else, who see one ordinary round. Each restart
  costs one message to one client and gives one more random seed: with
  ``R`` restarts the server chooses among about ``R (n - t + 1)`` graphs, so
  a property that fails with probability ``p`` per seed fails with
  probability up to ``R (n - t + 1) p`` (``log2(R (n - t + 1))`` bits of the
  graph's statistical security, ``R`` limited only by the server's
  patience). Bounding it would take another message round (every client
  committing to its seed contribution before any is revealed) or a public
  randomness beacon; the leader rule does not help (the leader takes part).
  Only the leader sees the restarts (stage-0 requests for one round that go
  nowhere), so a deployment can watch for it, e.g. by counting the sessions
  per round in its ``seen_sessions`` store.
- What a chosen graph buys: against a server alone, no input. Clients check
  that the survivors are connected and, in malicious mode, that one list is
  signed, so a bad graph makes a round abort rather than expose anyone.
  With colluding clients it can: a graph in which a target's neighbourhood
  holds many colluders (or has few holders, hence a low ``t_u``) lets
  their shares reach ``t_u``; the bound of
  :meth:`SecAggConfig.colluders_tolerated` holds per neighbourhood, and the
  server can pick the neighbourhoods among many random graphs, so keep the
  number of colluders well below it.
- A server colluding with the leader controls the seed outright (it tells
  the leader ``r_S`` before it advertises, and the leader draws keys until
  the seed suits them). As the server decides who leads, that is any one
  client among the first ``n - t + 1`` ids in sort order.
- In semi-honest mode nothing is signed: the server is trusted to follow
  the protocol, seed derivation included.

For full-graph SecAgg (``k = n - 1``) the seed is derived the same way but
changes nothing: every client neighbours every other.

Threat model and deployment notes
---------------------------------
- Semi-honest server (default): the server follows the protocol and may try
  to learn more from what it sees; it learns only the sum of at least ``t``
  connected survivors. Nothing authenticates the keys it forwards, so a
  server that *deviates*, for example by substituting its own public keys
  for a client's neighbours' (a man in the middle), decrypts that client's
  shares and removes every mask from its input: semi-honest mode gives no
  protection against an active server.
- Malicious server (``malicious=True``, Bonawitz §6): every advertisement and
  survivor list is signed, so a client refuses substituted keys, a
  different client list or seed, and inconsistent survivor lists. The
  server learns only sums of at least ``t`` clients' inputs as long as
  fewer than ``2t - n`` clients collude with it
  (:meth:`SecAggConfig.colluders_tolerated`: none at ``t = n // 2 + 1``
  for odd ``n``, fewer than ``n / 3`` at ``t > 2n/3``, Bonawitz §6); for
  SecAgg+ per neighbourhood, on a graph the server can re-draw (above).
  The graph seed's leader must survive until it has signed the survivor
  list, or the round aborts.
- A malicious client can abort a round without being identified: with a
  wrong commitment ``H(b_u)`` no set of shares rebuilds a matching seed and
  unmasking fails, and the server cannot tell a lying ``u`` from lying
  holders (a wrong commitment is signed like a right one). Dropping is
  tolerated; such misbehaviour is only detected, never survived.
- With ``malicious=True`` every client holds an Ed25519 signing key and
  knows every client's verification key. The simulation passes them in
  (``verify_keys``); in deployment a PKI provides them (for instance client
  certificates checked by the transport), never the server itself.
- Secrets (X25519 private keys, self-mask seeds, held shares, channel
  keys) live only inside :class:`SecAggClient`; the client drops its
  references to its seed and masking key once its masked input is sent,
  and to every secret of the round once it has answered the unmask
  request or aborted. (Python cannot wipe memory: dropping the references
  is what it can do.)
- A client raises on anything invalid and is then aborted for the round.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, MutableSet, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, TypedDict

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedshield.errors import ConfigError, InvalidUpdateError, ProtocolError
from fedshield.secagg import crypto, shamir
from fedshield.secagg.graph import (
    NeighbourGraph,
    build_graph,
    choose_neighbours,
    connectivity_failure_bound,
    secure_neighbours,
)
from fedshield.secagg.messages import (
    SECRET_BYTES,
    SERVER_ID,
    SESSION_BYTES,
    VERSION,
    Advertisement,
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyReply,
    ConsistencyRequest,
    MaskedInputReply,
    MaskedInputRequest,
    Message,
    Share,
    ShareKeysReply,
    ShareKeysRequest,
    SharePayload,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    check_client_id,
    decode,
)

__all__ = [
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "Stage",
    "check_neighbours",
    "choose_neighbours",
]

_LOG = logging.getLogger(__name__)

_DOMAIN = f"fedshield/secagg/v{VERSION}/".encode("ascii")

_NO_GRAPH_YET = (
    "the neighbour graph is derived from the round's advertisements: it exists "
    "once stage advertise_keys has ended"
)

_MAX_REBUILD_TRIES = 256
"""Sets of ``t_u`` shares the server tries when a rebuilt secret fails its check."""

_REPLY_TYPES: dict[Stage, type[Message]] = {
    Stage.ADVERTISE_KEYS: AdvertiseReply,
    Stage.SHARE_KEYS: ShareKeysReply,
    Stage.MASKED_INPUT: MaskedInputReply,
    Stage.CONSISTENCY_CHECK: ConsistencyReply,
    Stage.UNMASK: UnmaskReply,
}


class _Head(TypedDict):
    session: bytes
    round_idx: int
    sender: str
    recipient: str


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """Parameters of one secure aggregation, shared by the server and every client.

    Attributes
    ----------
    protocol
        ``"secagg"`` (every client pairs with every other, Bonawitz et al.
        2017) or ``"secagg+"`` (each client pairs with about ``neighbours``
        others in a random graph, Bell et al. 2020).
    threshold
        ``t``: the fewest clients that must answer at every stage, and the
        Shamir threshold (per neighbourhood for SecAgg+, see
        :func:`~fedshield.secagg.graph.local_threshold`). ``t >= 2`` and,
        for ``n`` clients, ``n / 2 < t <= n`` (checked when ``n`` is known).
        With ``malicious``, ``t`` also bounds the clients that may collude
        with the server: fewer than ``2 t - n``
        (:meth:`colluders_tolerated`; none at ``t = n // 2 + 1`` for odd
        ``n``). Bonawitz et al. §6 take ``t > 2 n / 3``, which tolerates
        fewer than ``n / 3``.
    modulus_bits
        ``b`` in ``[1, 64]``: inputs and masks are ``uint64`` words mod ``2**b``.
    vector_length
        ``d >= 1``: words per input.
    neighbours
        SecAgg+ only: ``k``, the expected degree of the graph. ``None``
        chooses it with :func:`~fedshield.secagg.graph.choose_neighbours`
        from ``security_parameter``, ``expected_dropout`` and ``t / n``. A
        ``k`` below :func:`~fedshield.secagg.graph.secure_neighbours` (the
        fewest that keep the survivors connected except with probability
        ``2**-security_parameter``) is refused unless
        ``allow_insecure_neighbours``.
    malicious
        Defend against a malicious server (Bonawitz §6): signed key
        advertisements and a consistency-check round. Needs signing keys.
        The graph seed's leader must then survive to the consistency check
        and sign it, or the round aborts (module docstring).
    security_parameter
        σ for the choice of ``k`` (SecAgg+).
    expected_dropout
        δ in ``[0, 1)`` for the choice of ``k`` (SecAgg+).
    allow_insecure_neighbours
        Accept an explicit ``neighbours`` below the secure minimum (tests,
        experiments on the protocol's behaviour); never needed otherwise.

    Raises
    ------
    ConfigError
        If a field is out of range, or ``neighbours`` is given for SecAgg.
    """

    protocol: Literal["secagg", "secagg+"] = "secagg"
    threshold: int
    modulus_bits: int
    vector_length: int
    neighbours: int | None = None
    malicious: bool = False
    security_parameter: int = 40
    expected_dropout: float = 0.1
    allow_insecure_neighbours: bool = False
    context: bytes = b""
    """Bytes every party binds into the round (the config digest that every
    advertisement signs in malicious mode): a digest of whatever else the
    round's parties must agree on, e.g. how each client encodes its input.
    Empty: nothing more (digests as before)."""

    def __post_init__(self) -> None:
        if self.protocol not in ("secagg", "secagg+"):
            raise ConfigError(
                "SecAggConfig.protocol must be 'secagg' or 'secagg+', got "
                f"{self.protocol!r}"
            )
        _require_int("threshold", self.threshold, low=2)
        _require_int("modulus_bits", self.modulus_bits, low=1, high=64)
        _require_int("vector_length", self.vector_length, low=1)
        _require_int("security_parameter", self.security_parameter, low=1)
        if self.neighbours is not None:
            if self.protocol == "secagg":
                raise ConfigError(
                    "SecAggConfig.neighbours applies to protocol='secagg+' only: "
                    "secagg pairs every client with every other"
                )
            _require_int("neighbours", self.neighbours, low=1)
        for flag in ("malicious", "allow_insecure_neighbours"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(
                    f"SecAggConfig.{flag} must be a bool, got {getattr(self, flag)!r}"
                )
        dropout = self.expected_dropout
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0 <= dropout < 1
        ):
            raise ConfigError(
                f"SecAggConfig.expected_dropout must be in [0, 1), got {dropout!r}"
            )

    def check_clients(self, num_clients: int) -> None:
        """Check that ``n / 2 < threshold <= n``.

        Raises
        ------
        ConfigError
            If not: a threshold at or below half would let two disjoint
            halves of the clients each reach it, so a malicious server could
            get the self-mask shares of a client from one half and its
            masking-key shares from the other and unmask it (Bonawitz et al.
            §4 and §6).
        """
        n, t = num_clients, self.threshold
        if n < 2:
            raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
        if t > n:
            raise ConfigError(
                f"threshold={t} exceeds the number of clients n={n}: the protocol "
                "could never complete"
            )
        if 2 * t <= n:
            raise ConfigError(
                f"threshold={t} is not above half of n={n}: two disjoint halves of "
                "the clients could each reach it, so a server could collect one "
                "client's self-mask shares from one half and its masking-key shares "
                f"from the other and unmask it (Bonawitz et al. §4, §6); use "
                f"threshold >= {n // 2 + 1}"
            )

    def colluders_tolerated(self, num_clients: int) -> int:
        """How many clients may collude with a malicious server: ``max(0, 2t - n - 1)``.

        Against a malicious server one survivor list is enforced by counting
        signatures: an honest client reveals shares only for a list that
        ``t`` clients signed, and signs one list. ``n_C`` colluding clients
        sign every list, so two lists each reach ``t`` signatures once
        ``(n - n_C) / 2 + n_C >= t``: the server then gets a client's
        self-mask shares under one list and its masking-key shares under the
        other, and unmasks it. Safe needs ``t > (n + n_C) / 2`` (Bonawitz et
        al. §6), i.e. ``n_C < 2t - n``; ``t > 2n/3`` tolerates fewer than
        ``n / 3``. (The leader's required signature also keeps the list
        unique while the leader is honest, but the server chooses the leader
        among the first ``n - t + 1`` advertisers in sort order, so this
        bound is the one to count on.) For SecAgg+ the same holds in each
        neighbourhood, ``n_C(u) < 2 t_u - m_u`` with ``m_u = deg(u) + 1``;
        the graph spreads colluders at random, and the server can re-draw it
        ("Who picks the graph"), so leave a margin. Whatever ``n_C``, the
        sum itself tells the colluders the total of the honest survivors.

        Raises
        ------
        ConfigError
            If :meth:`check_clients` fails.
        """
        self.check_clients(num_clients)
        return max(0, 2 * self.threshold - num_clients - 1)

    def neighbour_count(self, num_clients: int) -> int:
        """``k`` for ``n`` clients: ``n - 1`` for SecAgg; chosen or given for SecAgg+.

        Raises
        ------
        ConfigError
            If :meth:`check_clients` fails, ``neighbours > n - 1``,
            ``neighbours`` is below the secure minimum without
            ``allow_insecure_neighbours``, or no ``k`` meets the bounds of
            :func:`~fedshield.secagg.graph.choose_neighbours`.
        """
        self.check_clients(num_clients)
        n = num_clients
        if self.protocol == "secagg":
            return n - 1
        if self.neighbours is not None:
            if self.neighbours > n - 1:
                raise ConfigError(
                    f"neighbours={self.neighbours} exceeds n - 1 = {n - 1} for "
                    f"n={n} clients"
                )
            if not self.allow_insecure_neighbours:
                check_neighbours(
                    self.neighbours,
                    n,
                    security_parameter=self.security_parameter,
                    expected_dropout=float(self.expected_dropout),
                )
            return self.neighbours
        if self.threshold >= n:
            # Every client must survive (malicious mode's t > 2n/3 at small
            # n): no sparser graph is correct, the complete graph is SecAgg.
            return n - 1
        return choose_neighbours(
            n,
            security_parameter=self.security_parameter,
            expected_dropout=float(self.expected_dropout),
            threshold_fraction=self.threshold / n,
        )


def check_neighbours(
    neighbours: int,
    num_clients: int,
    *,
    security_parameter: int = 40,
    expected_dropout: float = 0.1,
) -> None:
    """Refuse an explicit SecAgg+ ``k`` below the secure minimum ``k_sec``.

    ``k_sec`` is :func:`~fedshield.secagg.graph.secure_neighbours`: with
    fewer neighbours the survivors of a round are disconnected with
    probability above ``2**-security_parameter`` (the server then learns
    sums of parts of them, or, with the clients' connectivity check, the
    round aborts), and a sparser graph puts fewer honest holders around each
    client.

    Raises
    ------
    ConfigError
        If ``neighbours < k_sec``; the message gives ``k_sec``, the bound at
        ``neighbours`` and the option that accepts it
        (``[secagg] allow_insecure_neighbours = true``,
        ``SecAggConfig(allow_insecure_neighbours=True)``).
    """
    n = num_clients
    safe = secure_neighbours(
        n, security_parameter=security_parameter, expected_dropout=expected_dropout
    )
    if neighbours >= safe:
        return
    survivors = max(2, math.floor((1.0 - expected_dropout) * n))
    log2_bound = connectivity_failure_bound(
        survivors, neighbours / (n - 1), log=True
    ) / math.log(2)
    at_k = f"2^{log2_bound:.1f}" if log2_bound < 0 else "no better than 1 (vacuous)"
    raise ConfigError(
        f"secagg+ neighbours={neighbours} is below {safe}, the fewest with which "
        f"the surviving clients of a round of n={n} (expected_dropout="
        f"{expected_dropout:g}) stay connected except with probability "
        f"2^-{security_parameter} (security_parameter); with {neighbours} the bound "
        f"is {at_k}. Set neighbours >= {safe}, leave it unset to let fedshield "
        "choose, or, to accept the risk, set [secagg] allow_insecure_neighbours = "
        "true (SecAggConfig(allow_insecure_neighbours=True))"
    )


# --------------------------------------------------------------------------
# Context strings: every key, mask, ciphertext and signature is bound to its
# protocol, purpose, session, round and the ids involved.


def _context(purpose: str, session: bytes, round_idx: int, *ids: str) -> bytes:
    return _context_prefix(purpose, session, round_idx) + b"".join(map(_id_field, ids))


@lru_cache(maxsize=64)
def _context_prefix(purpose: str, session: bytes, round_idx: int) -> bytes:
    return b"".join(
        [
            _DOMAIN,
            purpose.encode("ascii"),
            b"\x00",
            session,
            round_idx.to_bytes(8, "big"),
        ]
    )


@lru_cache(maxsize=1 << 14)
def _id_field(cid: str) -> bytes:
    data = cid.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def _pair(purpose: str, session: bytes, round_idx: int, u: str, v: str) -> bytes:
    """Context of a symmetric pair key: the two ids in canonical order."""
    if v < u:
        u, v = v, u
    return _context_prefix(purpose, session, round_idx) + _id_field(u) + _id_field(v)


def _round_binding(
    session: bytes,
    round_idx: int,
    digest: bytes,
    clients: Sequence[str],
    seed_commitment: bytes,
) -> bytes:
    """What a signed advertisement binds besides the keys: the round as sent.

    A hash of the wire version, the session and round, the configuration
    digest, the sorted client list and the server's graph-seed commitment.
    Two clients shown different lists (or commitments) compute different
    bindings, so neither accepts the other's advertisement.
    """
    h = hashlib.sha256(_context_prefix("round", session, round_idx))
    h.update(bytes([VERSION]))
    h.update(digest)
    h.update(len(clients).to_bytes(8, "big"))
    for cid in clients:
        h.update(_id_field(cid))
    h.update(seed_commitment)
    return h.digest()


def _seed_commitment(session: bytes, round_idx: int, seed_share: bytes) -> bytes:
    """``H(r_S)``: the server's commitment to its share of the graph seed."""
    return hashlib.sha256(
        _context_prefix("graph-seed-share", session, round_idx) + seed_share
    ).digest()


def _graph_seed(binding: bytes, seed_share: bytes, leader: Advertisement) -> bytes:
    """``H(binding, r_S, A_L)``: the round's graph seed (module docstring)."""
    return hashlib.sha256(
        b"".join(
            [
                _DOMAIN,
                b"graph-seed\x00",
                binding,
                seed_share,
                _id_field(leader.client_id),
                leader.encryption_key,
                leader.masking_key,
                leader.self_mask_commitment,
            ]
        )
    ).digest()


def _view_binding(binding: bytes, graph_seed: bytes) -> bytes:
    """A client's view of the round: its round binding and the seed it derived."""
    return hashlib.sha256(_DOMAIN + b"view\x00" + binding + graph_seed).digest()


def _self_mask_commitment(
    session: bytes, round_idx: int, client_id: str, seed: bytes
) -> bytes:
    """``H(b_u)`` (with the context): checked against the rebuilt seed."""
    return hashlib.sha256(
        _context("self-mask", session, round_idx, client_id) + seed
    ).digest()


def _advertisement_message(
    session: bytes,
    round_idx: int,
    client_id: str,
    binding: bytes,
    c_pk: bytes,
    s_pk: bytes,
    self_mask_commitment: bytes,
) -> bytes:
    return b"".join(
        [
            _context("advertise", session, round_idx, client_id),
            binding,
            c_pk,
            s_pk,
            self_mask_commitment,
        ]
    )


def _consistency_message(
    session: bytes, round_idx: int, view: bytes, survivors: Sequence[str]
) -> bytes:
    return b"".join(
        [
            _context_prefix("consistency", session, round_idx),
            view,
            *map(_id_field, survivors),
        ]
    )


def _config_digest(config: SecAggConfig, num_clients: int, neighbours: int) -> bytes:
    document: dict[str, object] = {
        "version": VERSION,
        "protocol": config.protocol,
        "threshold": config.threshold,
        "modulus_bits": config.modulus_bits,
        "vector_length": config.vector_length,
        "malicious": config.malicious,
        "num_clients": num_clients,
        "neighbours": neighbours,
    }
    if config.context:
        document["context"] = config.context.hex()
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode("utf-8")).digest()


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _pairwise_seed(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    session: bytes,
    round_idx: int,
    u: str,
    v: str,
) -> bytes:
    """``agree(s_sk, s_pk)`` for the pair ``{u, v}``: the seed of their mask."""
    return crypto.agree(
        private, peer_public, info=_pair("mask", session, round_idx, u, v)
    )


def _pairwise_mask(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    session: bytes,
    round_idx: int,
    u: str,
    v: str,
    config: SecAggConfig,
    out: npt.NDArray[np.uint64] | None = None,
) -> npt.NDArray[np.uint64]:
    """``PRG(agree(s_sk, s_pk))`` for the pair ``{u, v}`` (same from both sides)."""
    seed = _pairwise_seed(
        private, peer_public, session=session, round_idx=round_idx, u=u, v=v
    )
    return crypto.expand_mask(seed, config.vector_length, config.modulus_bits, out=out)


# --------------------------------------------------------------------------
# Client


class SecAggClient:
    """One client's side of a SecAgg / SecAgg+ round.

    Parameters
    ----------
    config
        The round's configuration (the same as the server's: the advertise
        request carries a digest that is checked).
    round_idx
        The training round, 0-based; requests of other rounds are refused.
    client_id
        This client's id, as the server lists it.
    signing_key
        Ed25519 key that signs this client's key advertisement and the
        survivor list (``malicious`` only).
    verify_keys
        Every client's raw 32-byte Ed25519 verification key, by id
        (``malicious`` only; a PKI provides them in deployment). It may list
        more clients than the round has: only those in the round's client
        list are accepted as signers.
    idempotent
        Answer a repeated request (the same bytes as the last one answered,
        e.g. a retransmission after a lost reply) with the same reply. The
        client then keeps its last request and reply until the next request
        (a masked-input reply is ``ceil(d b / 8)`` bytes). An in-process
        driver that never retransmits may pass ``False`` to free them at
        once; a repeated request is then refused as out of order.
    seen_sessions
        Optional set of ``(round_idx, session)`` pairs this device has
        already taken part in, which the deployment keeps (and persists
        across restarts) and passes to every client object it builds. The
        client refuses a round whose pair is in it and adds the pair when it
        answers its first request. A server that runs one round twice under
        one session could otherwise show a fresh client object the same
        round again and reuse what the first one signed ("Why the server
        cannot unmask one client" in the module docstring); the leader rule
        already stops that while the leader is honest, this stops it for
        every client that keeps the set. It does not stop a server from
        asking in *fresh* sessions ("Who picks the graph").

    Raises
    ------
    ConfigError
        If an argument is invalid, or ``malicious`` lacks the keys.

    Notes
    -----
    All secrets of the round (private keys, the self-mask seed, the shares
    this client holds, channel keys, the peers' advertisements) stay inside
    this object, and it drops them when the round ends: after its unmask
    reply, or on any error (the client is then ``aborted`` and answers
    nothing more). Only the last request and reply are kept (``idempotent``)
    so that a retransmitted unmask request gets the same reply: they hold
    what was sent to the server, nothing more.
    """

    def __init__(
        self,
        config: SecAggConfig,
        round_idx: int,
        client_id: str,
        *,
        signing_key: crypto.SigningKey | None = None,
        verify_keys: Mapping[str, bytes] | None = None,
        idempotent: bool = True,
        seen_sessions: MutableSet[tuple[int, bytes]] | None = None,
    ) -> None:
        _require_int("round_idx", round_idx, low=0)
        _check_participant_id(client_id)
        if config.malicious and (signing_key is None or verify_keys is None):
            raise ConfigError(
                "malicious=True needs signing_key and verify_keys: the client signs "
                "its keys and checks everyone's signatures (a PKI provides them)"
            )
        if config.malicious and signing_key is not None and verify_keys is not None:
            own = verify_keys.get(client_id)
            if own is not None and own != signing_key.public:
                raise ConfigError(
                    f"verify_keys[{client_id!r}] is not the public half of signing_key"
                )
        self.config = config
        self.round_idx = round_idx
        self.client_id = client_id
        self._signing_key = signing_key
        self._verify_keys = dict(verify_keys or {})
        self._idempotent = bool(idempotent)
        self._seen_sessions = seen_sessions
        self._last: tuple[bytes, bytes] | None = None
        self._stage = Stage.ADVERTISE_KEYS
        self._session: bytes | None = None
        # The round as this client sees it (stage 0 on): client list, k,
        # round binding and the server's seed commitment; from stage 1 on the
        # graph, its leader and the view (binding + graph seed) it signs.
        self._clients: tuple[str, ...] = ()
        self._roster: frozenset[str] = frozenset()
        self._neighbour_count = 0
        self._binding = b""
        self._seed_commitment = b""
        self._graph: NeighbourGraph | None = None
        self._leader = ""
        self._view = b""
        self._local_threshold = 0
        self._encryption: crypto.KeyPair | None = None
        self._masking: crypto.KeyPair | None = None
        self._self_seed: bytes | None = None
        self._self_commitment = b""
        self._input: npt.NDArray[np.uint64] | None = None
        self._peers: dict[str, Advertisement] = {}
        self._channel_keys: dict[str, bytes] = {}
        self._held: dict[str, tuple[Share, Share]] = {}
        self._share_senders: frozenset[str] = frozenset()
        self._signed_survivors: tuple[str, ...] | None = None

    @property
    def stage(self) -> Stage:
        """The stage of the next request this client accepts, or done/aborted."""
        return self._stage

    def set_input(self, vector: npt.NDArray[np.uint64]) -> None:
        """Set this round's input ``x_u``: ``d`` ``uint64`` words, each ``< 2**b``.

        Raises
        ------
        InvalidUpdateError
            If the vector has the wrong dtype, shape or an unreduced word.
        ProtocolError
            If the masked input has already been sent (or the client aborted).
        """
        if self._stage not in (
            Stage.ADVERTISE_KEYS,
            Stage.SHARE_KEYS,
            Stage.MASKED_INPUT,
        ):
            raise ProtocolError(
                f"client {self.client_id!r} is in stage {self._stage}: the input must "
                "be set before the masked-input stage"
            )
        array = np.asarray(vector)
        d, b = self.config.vector_length, self.config.modulus_bits
        if array.dtype != np.uint64 or array.shape != (d,):
            raise InvalidUpdateError(
                f"input must be a uint64 vector of length {d}, got dtype {array.dtype} "
                f"and shape {array.shape}"
            )
        if b < 64 and array.size and int(array.max()) >> b:
            raise InvalidUpdateError(f"input has a word that is not reduced mod 2**{b}")
        self._input = array.copy()

    def handle(self, message: bytes) -> bytes:
        """Answer one server request.

        A request equal to the last one answered (a retransmission) gets the
        same reply again and changes nothing (unless ``idempotent=False``).

        Parameters
        ----------
        message
            A serialised request of the stage this client expects.

        Returns
        -------
        bytes
            The serialised reply.

        Raises
        ------
        ProtocolError
            If the request is malformed, of another round, session or stage
            (replayed or out of order), not addressed to this client, or asks
            for something an honest client must refuse: shares of both
            secrets of one client, a survivor list that is too small,
            disconnected, inconsistent with what this client saw or signed,
            too few signatures or signers outside the round, forged key
            advertisements, a graph-seed share that breaks the server's
            commitment. The client is then aborted.
        """
        last = self._last
        if (
            last is not None
            and self._stage is not Stage.ABORTED
            and len(message) == len(last[0])
            and message == last[0]
        ):
            return last[1]
        if self._stage in (Stage.DONE, Stage.ABORTED):
            raise ProtocolError(
                f"client {self.client_id!r} is {self._stage}; it answers no more "
                "requests"
            )
        self._last = None
        try:
            reply = self._dispatch(message).to_bytes()
        except Exception:
            self._abort()
            raise
        if self._idempotent:
            self._last = (bytes(message), reply)
        return reply

    # -- dispatch -----------------------------------------------------------

    def _dispatch(self, data: bytes) -> Message:
        msg = decode(
            data,
            vector_length=self.config.vector_length,
            modulus_bits=self.config.modulus_bits,
        )
        if msg.sender != SERVER_ID or msg.recipient != self.client_id:
            raise ProtocolError(
                f"a message from {msg.sender!r} to {msg.recipient!r} is not a server "
                f"request for client {self.client_id!r}"
            )
        if msg.round_idx != self.round_idx:
            raise ProtocolError(
                f"request of round {msg.round_idx} refused: this client is in round "
                f"{self.round_idx}"
            )
        if msg.stage != self._stage:
            raise ProtocolError(
                f"expected a {self._stage} request, got a {msg.stage} one (replayed or "
                "out of order)"
            )
        if self._session is None:
            self._enter_session(msg.session)
        elif msg.session != self._session:
            raise ProtocolError(
                "request of another protocol session (replayed) refused"
            )
        reply: Message
        if isinstance(msg, AdvertiseRequest):
            reply = self._advertise(msg)
            self._stage = Stage.SHARE_KEYS
        elif isinstance(msg, ShareKeysRequest):
            reply = self._share_keys(msg)
            self._stage = Stage.MASKED_INPUT
        elif isinstance(msg, MaskedInputRequest):
            reply = self._masked_input(msg)
            self._stage = (
                Stage.CONSISTENCY_CHECK if self.config.malicious else Stage.UNMASK
            )
        elif isinstance(msg, ConsistencyRequest):
            reply = self._consistency(msg)
            self._stage = Stage.UNMASK
        elif isinstance(msg, UnmaskRequest):
            reply = self._unmask(msg)
            self._stage = Stage.DONE
            self._forget()
        else:
            raise ProtocolError(f"a {msg.TYPE} is not a request")
        return reply

    def _enter_session(self, session: bytes) -> None:
        """Take the session of the first request, unless this device saw it."""
        seen = self._seen_sessions
        if seen is not None:
            key = (self.round_idx, bytes(session))
            if key in seen:
                raise ProtocolError(
                    f"client {self.client_id!r} already took part in round "
                    f"{self.round_idx} under this session: a round run again under "
                    "the same session is refused (seen_sessions)"
                )
            seen.add(key)
        self._session = session

    def _forget(self) -> None:
        """Drop every secret of the round (at its end, or on abort)."""
        self._encryption = self._masking = None
        self._self_seed = None
        self._input = None
        self._held = {}
        self._channel_keys = {}
        self._peers = {}

    def _abort(self) -> None:
        self._stage = Stage.ABORTED
        self._last = None
        self._forget()

    def _reply_head(self) -> _Head:
        assert self._session is not None
        return {
            "session": self._session,
            "round_idx": self.round_idx,
            "sender": self.client_id,
            "recipient": SERVER_ID,
        }

    # -- stage 0 --------------------------------------------------------------

    def _advertise(self, msg: AdvertiseRequest) -> AdvertiseReply:
        clients = msg.clients
        if list(clients) != sorted(clients):
            raise ProtocolError("the client list is not sorted")
        if self.client_id not in clients:
            raise ProtocolError(f"client {self.client_id!r} is not in the client list")
        if SERVER_ID in clients:
            raise ProtocolError(f"the client list names the reserved id {SERVER_ID!r}")
        n = len(clients)
        try:
            k = self.config.neighbour_count(n)
        except ConfigError as exc:
            raise ProtocolError(
                f"the server's client list does not fit: {exc}"
            ) from exc
        digest = _config_digest(self.config, n, k)
        if msg.config_digest != digest:
            raise ProtocolError(
                "the server runs a different SecAgg configuration (the config "
                "digest differs)"
            )
        assert self._session is not None
        self._clients = clients
        self._roster = frozenset(clients)
        self._neighbour_count = k
        self._seed_commitment = msg.seed_commitment
        self._binding = _round_binding(
            self._session, self.round_idx, digest, clients, msg.seed_commitment
        )
        self._encryption = crypto.generate_keypair()
        self._masking = crypto.generate_keypair()
        # b_u is drawn now so that the advertisement can commit to it.
        self._self_seed = crypto.random_seed()
        self._self_commitment = _self_mask_commitment(
            self._session, self.round_idx, self.client_id, self._self_seed
        )
        signature = None
        if self.config.malicious:
            assert self._signing_key is not None
            signature = crypto.sign(
                self._signing_key,
                _advertisement_message(
                    self._session,
                    self.round_idx,
                    self.client_id,
                    self._binding,
                    self._encryption.public,
                    self._masking.public,
                    self._self_commitment,
                ),
            )
        return AdvertiseReply(
            **self._reply_head(),
            encryption_key=self._encryption.public,
            masking_key=self._masking.public,
            self_mask_commitment=self._self_commitment,
            signature=signature,
        )

    # -- stage 1 --------------------------------------------------------------

    def _derive_graph(self, msg: ShareKeysRequest) -> NeighbourGraph:
        """Check the seed's inputs, derive the graph; remembers leader and view."""
        assert self._session is not None
        me = self.client_id
        if (
            _seed_commitment(self._session, self.round_idx, msg.seed_reveal)
            != self._seed_commitment
        ):
            raise ProtocolError(
                "the server's graph-seed share does not match the commitment it "
                "sent in stage advertise_keys (it would choose the graph after "
                "seeing the advertisements)"
            )
        leader = msg.leader
        name = leader.client_id
        if name not in self._roster:
            raise ProtocolError(
                f"the graph seed's leader {name!r} is not in the round's client list"
            )
        if me < name:
            raise ProtocolError(
                f"the graph seed's leader {name!r} sorts after {me!r}, which "
                "advertised: the leader must be the first client that advertised"
            )
        if name == me:
            assert self._encryption is not None and self._masking is not None
            if (
                leader.encryption_key,
                leader.masking_key,
                leader.self_mask_commitment,
            ) != (
                self._encryption.public,
                self._masking.public,
                self._self_commitment,
            ):
                raise ProtocolError(
                    f"the leader advertisement under {me!r}'s id is not the one it sent"
                )
        elif self.config.malicious:
            self._check_advertisement(leader)
        seed = _graph_seed(self._binding, msg.seed_reveal, leader)
        graph = build_graph(self._clients, self._neighbour_count, seed)
        if graph.degree(me) == 0:
            raise ProtocolError(f"client {me!r} has no neighbour in the graph")
        self._graph = graph
        self._leader = name
        self._view = _view_binding(self._binding, seed)
        self._local_threshold = graph.threshold_of(me, self.config.threshold)
        return graph

    def _share_keys(self, msg: ShareKeysRequest) -> ShareKeysReply:
        graph, me = self._derive_graph(msg), self.client_id
        assert self._encryption is not None and self._masking is not None
        assert self._session is not None and self._self_seed is not None
        neighbours = set(graph.neighbours_of(me))
        leader = msg.leader
        seen = {self._encryption.public, self._masking.public}
        peers: dict[str, Advertisement] = {}
        for ad in msg.advertisements:
            v = ad.client_id
            if v not in neighbours:
                raise ProtocolError(
                    f"the server forwarded the keys of {v!r}, which is not a neighbour "
                    f"of {me!r}"
                )
            if v < self._leader:
                raise ProtocolError(
                    f"the server forwarded the keys of {v!r}, which sorts before the "
                    f"graph seed's leader {self._leader!r}: the leader must be the "
                    "first client that advertised"
                )
            if v == self._leader and ad != leader:
                raise ProtocolError(
                    f"the server forwarded two different advertisements of {v!r}"
                )
            if (
                ad.encryption_key in seen
                or ad.masking_key in seen
                or (ad.encryption_key == ad.masking_key)
            ):
                raise ProtocolError(
                    f"the public keys of {v!r} repeat keys already seen"
                )
            seen.update((ad.encryption_key, ad.masking_key))
            if self.config.malicious:
                self._check_advertisement(ad)
            peers[v] = ad
        holders = sorted([me, *peers])
        t_u = self._local_threshold
        if len(holders) < t_u:
            raise ProtocolError(
                f"stage share_keys needed {t_u} clients in the neighbourhood of "
                f"{me!r}, only {len(holders)} answered"
            )
        self._peers = peers
        positions = {h: graph.index(h) + 1 for h in holders}
        seed_shares, key_shares = shamir.share_bytes_many(
            [self._self_seed, crypto.export_private(self._masking.private)],
            t_u,
            list(positions.values()),
        )
        mine = positions[me]
        self._held[me] = (tuple(seed_shares[mine]), tuple(key_shares[mine]))
        ciphertexts: dict[str, bytes] = {}
        for v in sorted(peers):
            payload = SharePayload(
                sender=me,
                recipient=v,
                self_mask_share=tuple(seed_shares[positions[v]]),
                key_share=tuple(key_shares[positions[v]]),
            )
            ciphertexts[v] = crypto.encrypt(
                self._channel_key(v),
                payload.to_bytes(),
                associated_data=_context("share", self._session, self.round_idx, me, v),
            )
        return ShareKeysReply(**self._reply_head(), ciphertexts=ciphertexts)

    def _check_advertisement(self, ad: Advertisement) -> None:
        assert self._session is not None
        if ad.client_id not in self._roster:
            raise ProtocolError(
                f"an advertisement of {ad.client_id!r}, which is not in the round's "
                "client list"
            )
        key = self._verify_keys.get(ad.client_id)
        if key is None:
            raise ProtocolError(f"no verification key for client {ad.client_id!r}")
        if ad.signature is None:
            raise ProtocolError(
                f"the key advertisement of {ad.client_id!r} is not signed"
            )
        message = _advertisement_message(
            self._session,
            self.round_idx,
            ad.client_id,
            self._binding,
            ad.encryption_key,
            ad.masking_key,
            ad.self_mask_commitment,
        )
        try:
            crypto.verify(key, message, ad.signature)
        except ProtocolError as exc:
            raise ProtocolError(
                f"the key advertisement of {ad.client_id!r} has a bad signature "
                "(forged, or signed for another client list or seed commitment)"
            ) from exc

    def _channel_key(self, peer: str) -> bytes:
        key = self._channel_keys.get(peer)
        if key is None:
            assert self._encryption is not None and self._session is not None
            key = crypto.agree(
                self._encryption.private,
                self._peers[peer].encryption_key,
                info=_pair(
                    "channel", self._session, self.round_idx, self.client_id, peer
                ),
            )
            self._channel_keys[peer] = key
        return key

    # -- stage 2 --------------------------------------------------------------

    def _masked_input(self, msg: MaskedInputRequest) -> MaskedInputReply:
        me = self.client_id
        assert self._session is not None and self._masking is not None
        assert self._self_seed is not None
        for v, ciphertext in msg.ciphertexts.items():
            if v not in self._peers:
                raise ProtocolError(
                    f"a ciphertext from {v!r}, which did not advertise as a "
                    f"neighbour of {me!r}"
                )
            plaintext = crypto.decrypt(
                self._channel_key(v),
                ciphertext,
                associated_data=_context("share", self._session, self.round_idx, v, me),
            )
            payload = SharePayload.from_bytes(plaintext)
            if payload.sender != v or payload.recipient != me:
                raise ProtocolError(f"the share payload from {v!r} names other parties")
            self._held[v] = (payload.self_mask_share, payload.key_share)
        senders = frozenset(msg.ciphertexts)
        t_u = self._local_threshold
        if len(senders) + 1 < t_u:
            raise ProtocolError(
                f"stage masked_input needed {t_u} clients in the neighbourhood of "
                f"{me!r} to hold its shares, only {len(senders) + 1} answered"
            )
        if self._input is None:
            raise ProtocolError(f"client {me!r} has no input: call set_input() first")
        b = self.config.modulus_bits
        # Accumulate the masks' full 64-bit words in place mod 2^64 (uint64
        # wraps) and reduce mod 2^b once at the end: 2^b divides 2^64, so the
        # result is the sum of the b-bit masks mod 2^b (crypto.add_mask). One
        # reused keystream buffer serves every mask (no fresh pages per
        # neighbour).
        masked = np.array(self._input, dtype=np.uint64, copy=True)
        crypto.add_mask(self._self_seed, masked)
        for v in sorted(senders):
            seed = _pairwise_seed(
                self._masking.private,
                self._peers[v].masking_key,
                session=self._session,
                round_idx=self.round_idx,
                u=me,
                v=v,
            )
            crypto.add_mask(seed, masked, subtract=me > v)
        if b < 64:
            masked &= np.uint64((1 << b) - 1)
        self._share_senders = senders
        # The seed and the masking key are shared; this object needs them no more.
        self._self_seed = None
        self._masking = None
        self._input = None
        return MaskedInputReply(
            **self._reply_head(), modulus_bits=b, masked_input=masked
        )

    # -- stage 3 --------------------------------------------------------------

    def _check_survivors(self, survivors: tuple[str, ...]) -> None:
        graph, me = self._require_graph(), self.client_id
        if list(survivors) != sorted(survivors):
            raise ProtocolError("the survivor list is not sorted")
        if me not in survivors:
            raise ProtocolError(
                f"the survivor list leaves out {me!r}, which sent its input"
            )
        everyone = set(graph.clients)
        unknown = [c for c in survivors if c not in everyone]
        if unknown:
            raise ProtocolError(
                f"the survivor list names unknown clients {unknown[:5]}"
            )
        if survivors[0] < self._leader:
            raise ProtocolError(
                f"the survivor list names {survivors[0]!r}, which sorts before the "
                f"graph seed's leader {self._leader!r}"
            )
        if self.config.malicious:
            self._leader_rule(survivors, None)
        t = self.config.threshold
        if len(survivors) < t:
            raise ProtocolError(
                f"the survivor list has {len(survivors)} clients, fewer than the "
                f"threshold {t}"
            )
        strangers = sorted(
            (set(survivors) & set(graph.neighbours_of(me))) - self._share_senders
        )
        if strangers:
            raise ProtocolError(
                f"the survivor list names neighbours {strangers[:5]} that never shared "
                f"keys with {me!r}"
            )
        if not graph.is_connected(survivors):
            raise ProtocolError(
                "the survivors are not connected in the neighbour graph: unmasking "
                "would reveal the sum of a subset of them"
            )

    def _consistency(self, msg: ConsistencyRequest) -> ConsistencyReply:
        assert self._signing_key is not None and self._session is not None
        self._check_survivors(msg.survivors)
        self._signed_survivors = msg.survivors
        signature = crypto.sign(
            self._signing_key,
            _consistency_message(
                self._session, self.round_idx, self._view, msg.survivors
            ),
        )
        return ConsistencyReply(**self._reply_head(), signature=signature)

    # -- stage 4 --------------------------------------------------------------

    def _unmask(self, msg: UnmaskRequest) -> UnmaskReply:
        me = self.client_id
        assert self._session is not None
        survivors = msg.survivors
        if self.config.malicious:
            if survivors != self._signed_survivors:
                raise ProtocolError(
                    "the survivor list differs from the one this client signed in the "
                    "consistency check"
                )
            self._check_signatures(msg)
        else:
            if msg.signatures:
                raise ProtocolError("survivor signatures sent without malicious=True")
            self._check_survivors(survivors)
        both = sorted(set(msg.self_mask_requests) & set(msg.key_requests))
        if both:
            raise ProtocolError(
                f"the server asked for both the self-mask share and the masking-key "
                f"share of client {both[0]!r}: together they would expose its input"
            )
        members = set(survivors)
        held = self._share_senders | {me}
        for v in msg.self_mask_requests:
            if v not in members:
                raise ProtocolError(
                    f"asked for the self-mask share of {v!r}, which is not a survivor"
                )
            if v not in held:
                raise ProtocolError(
                    f"asked for the self-mask share of {v!r}; {me!r} holds none"
                )
        for v in msg.key_requests:
            if v in members:
                raise ProtocolError(
                    f"asked for the masking-key share of survivor {v!r}: with its "
                    "self-mask share that would expose its input"
                )
            if v not in self._share_senders:
                raise ProtocolError(
                    f"asked for the masking-key share of {v!r}; {me!r} holds none"
                )
        return UnmaskReply(
            **self._reply_head(),
            self_mask_shares={v: self._held[v][0] for v in msg.self_mask_requests},
            key_shares={v: self._held[v][1] for v in msg.key_requests},
        )

    def _check_signatures(self, msg: UnmaskRequest) -> None:
        assert self._session is not None
        t = self.config.threshold
        signers = msg.signatures
        strangers = sorted(set(signers) - self._roster)
        if strangers:
            raise ProtocolError(
                f"survivor signatures from {strangers[:5]}, which are not in the "
                "round's client list"
            )
        outsiders = sorted(set(signers) - set(msg.survivors))
        if outsiders:
            raise ProtocolError(
                f"survivor signatures from non-survivors {outsiders[:5]}"
            )
        if len(signers) < t:
            raise ProtocolError(
                f"the consistency check needed {t} signatures of the survivor list, "
                f"got {len(signers)}"
            )
        self._leader_rule(msg.survivors, signers)
        # Signed over this client's own view (client list, seed): a signature
        # made for another list or graph does not verify.
        message = _consistency_message(
            self._session, self.round_idx, self._view, msg.survivors
        )
        for v, signature in signers.items():
            key = self._verify_keys.get(v)
            if key is None:
                raise ProtocolError(f"no verification key for client {v!r}")
            try:
                crypto.verify(key, message, signature)
            except ProtocolError as exc:
                raise ProtocolError(
                    f"the signature of {v!r} on the survivor list does not verify "
                    "(forged, or made for another client list or graph)"
                ) from exc

    def _leader_rule(
        self, survivors: Sequence[str], signers: Mapping[str, bytes] | None
    ) -> None:
        """Malicious mode: the leader survives and signed (``signers``, if given).

        The graph seed hashes the leader's advertisement, and only the client
        object that made it accepts it as its own, so only that object holds
        this view as leader, and it signs one survivor list: with its
        signature required, at most one survivor list per view can ever be
        accepted, even across runs of a round under one session (module
        docstring, "Why the server cannot unmask one client").
        """
        leader = self._leader
        if leader not in survivors:
            raise ProtocolError(
                f"the survivor list leaves out the graph seed's leader {leader!r}: "
                "in malicious mode every survivor list must carry the leader's "
                "signature, so a round whose leader dropped stops"
            )
        if signers is not None and leader not in signers:
            raise ProtocolError(
                f"the survivor list is not signed by the graph seed's leader "
                f"{leader!r}: in malicious mode the leader's signature is required "
                "(it signs one survivor list per round)"
            )

    def _require_graph(self) -> NeighbourGraph:
        assert self._graph is not None
        return self._graph


# --------------------------------------------------------------------------
# Server


def _expand(entropy: bytes, label: bytes, size: int) -> bytes:
    """``size`` bytes for ``label`` from a secret (BLAKE2b keyed by it)."""
    return hashlib.blake2b(label, key=entropy[:64], digest_size=size).digest()


class SecAggServer:
    """The server's side of a SecAgg / SecAgg+ round.

    Parameters
    ----------
    config
        The round's configuration.
    round_idx
        The training round, 0-based.
    clients
        The ids of the clients asked to take part (distinct; any order).
    verify_keys
        Every client's Ed25519 verification key (required when
        ``malicious``): the server refuses unsigned or forged advertisements
        and survivor-list signatures early; the clients check them again.

    Raises
    ------
    ConfigError
        If the clients do not fit the configuration (``n / 2 < t <= n``, a
        secure ``k``), an id is invalid or repeated, or keys are missing.

    Attributes
    ----------
    config, round_idx
        As given.

    Notes
    -----
    The server draws its share ``r_S`` of the graph seed here and commits to
    it in stage 0; the graph itself is derived once the advertisements are in
    (module docstring, "Who picks the graph"). A client the graph leaves
    without neighbours is then refused (it could only share with itself).
    """

    def __init__(
        self,
        config: SecAggConfig,
        round_idx: int,
        clients: Sequence[str],
        *,
        verify_keys: Mapping[str, bytes] | None = None,
        entropy: bytes | None = None,
    ) -> None:
        _require_int("round_idx", round_idx, low=0)
        if entropy is not None and len(entropy) < 32:
            raise ConfigError("entropy must be at least 32 secret random bytes")
        ids = tuple(clients)
        for cid in ids:
            _check_participant_id(cid)
        if len(set(ids)) != len(ids):
            raise ConfigError("client ids must be distinct")
        self.config = config
        self.round_idx = round_idx
        self._clients = tuple(sorted(ids))
        n = len(ids)
        self._neighbours = config.neighbour_count(n)
        if config.malicious:
            missing = [c for c in self._clients if c not in (verify_keys or {})]
            if missing:
                raise ConfigError(
                    f"malicious=True needs a verification key for every client; "
                    f"missing {missing[:5]}"
                )
        self._verify_keys = dict(verify_keys or {})
        # A server that must replay a round after a crash (fedshield serve)
        # derives its randomness from a secret it keeps, so that it sends
        # byte-identical requests and never asks a question twice with
        # different words; otherwise from the operating system.
        self._session = (
            os.urandom(SESSION_BYTES)
            if entropy is None
            else _expand(entropy, b"session", SESSION_BYTES)
        )
        self._digest = _config_digest(config, n, self._neighbours)
        # r_S, its commitment, and the round binding every advertisement signs.
        self._seed_share = (
            crypto.random_seed()
            if entropy is None
            else _expand(entropy, b"seed-share", len(crypto.random_seed()))
        )
        self._seed_commitment = _seed_commitment(
            self._session, round_idx, self._seed_share
        )
        self._binding = _round_binding(
            self._session, round_idx, self._digest, self._clients, self._seed_commitment
        )
        # Derived once the advertisements are in (stage share_keys on).
        self._graph: NeighbourGraph | None = None
        self._graph_seed: bytes | None = None
        self._view = b""
        self._leader: Advertisement | None = None
        self._stage = Stage.ADVERTISE_KEYS
        self._active: tuple[str, ...] = self._clients
        self._outbox: dict[str, bytes] | None = None
        self._dropped: dict[str, str] = {}
        self._refused: dict[str, str] = {}
        self._ads: dict[str, AdvertiseReply] = {}
        self._forwarded: dict[str, Advertisement] = {}
        self._ciphertexts: dict[str, Mapping[str, bytes]] = {}
        # Sum mod 2^64 of the masked inputs accepted so far (O(d), never one
        # vector per client), and the replies accepted in the current stage
        # (None: a masked input, already in the sum).
        self._sum: npt.NDArray[np.uint64] | None = None
        self._pending: dict[str, Message | None] = {}
        self._asked: frozenset[str] = frozenset(self._clients)
        self._answered: set[str] = set()
        self._survivors: tuple[str, ...] | None = None
        self._signatures: dict[str, bytes] = {}
        self._requested: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._result: npt.NDArray[np.uint64] | None = None
        self._failure: str | None = None

    # -- public state -------------------------------------------------------

    @property
    def stage(self) -> Stage:
        """Current stage: ``advertise_keys`` ... ``unmask``, ``done`` or ``aborted``."""
        return self._stage

    @property
    def survivors(self) -> tuple[str, ...]:
        """Clients still in the protocol; from unmasking on, those summed (``U3``).

        Once the masked inputs are in, this is ``U3`` and stays so: a survivor
        that stops answering during unmasking is still summed (and also
        appears in :attr:`dropped`).
        """
        return self._survivors if self._survivors is not None else self._active

    @property
    def dropped(self) -> dict[str, str]:
        """Client -> the stage at which it stopped answering (or was refused)."""
        return dict(self._dropped)

    @property
    def refused(self) -> dict[str, str]:
        """Client -> why its reply was refused (it also appears in :attr:`dropped`)."""
        return dict(self._refused)

    @property
    def neighbours(self) -> int:
        """``k``: the graph's expected degree (``n - 1`` for SecAgg)."""
        return self._neighbours

    @property
    def graph(self) -> NeighbourGraph:
        """The round's neighbour graph (public: every client derives it too).

        Raises
        ------
        ProtocolError
            Before the advertisements are in: the graph is derived from them.
        """
        if self._graph is None:
            raise ProtocolError(_NO_GRAPH_YET)
        return self._graph

    @property
    def graph_seed(self) -> bytes:
        """The round's graph seed (module docstring); as :attr:`graph`, once derived.

        Raises
        ------
        ProtocolError
            Before the advertisements are in.
        """
        if self._graph_seed is None:
            raise ProtocolError(_NO_GRAPH_YET)
        return self._graph_seed

    # -- driving --------------------------------------------------------------

    def requests(self) -> dict[str, bytes]:
        """The serialised request of the current stage for each client still in.

        Returns
        -------
        dict[str, bytes]
            Client id -> message; empty once ``done`` or ``aborted``.
        """
        if self._stage in (Stage.DONE, Stage.ABORTED):
            return {}
        if self._outbox is None:
            self._outbox = {c: self._request(c).to_bytes() for c in self._active}
        return dict(self._outbox)

    def receive(self, replies: Mapping[str, bytes]) -> None:
        """Take the replies of the current stage and move on.

        A client asked in this stage but absent from ``replies`` has dropped.
        A reply that is malformed, of another round, session or stage
        (replayed), sent under another client's id, badly signed, or names the
        wrong parties is refused (logged, recorded in :attr:`refused`) and its
        sender counted as dropped.

        The same as :meth:`receive_one` for each reply, then :meth:`end_stage`.
        A transport that gets the replies one by one should pass each to
        :meth:`receive_one` as it arrives instead: in the masked-input stage
        the server then never holds more than one client's vector (see there).

        Raises
        ------
        ProtocolError
            If fewer than ``threshold`` clients remain ("stage X needed t
            clients, only m answered"), the survivors are disconnected
            (SecAgg+), or unmasking lacks shares; the server is then
            ``aborted`` and :meth:`result` stays unavailable. Also if called
            once the protocol is over.
        """
        self._check_open("receive")
        for cid, data in replies.items():
            self.receive_one(cid, data)
        self.end_stage()

    def receive_one(self, client_id: str, data: bytes) -> None:
        """Take one reply of the current stage, as it arrives.

        The reply is checked at once, as :meth:`receive` checks it: a reply
        that fails is refused (logged, recorded in :attr:`refused`) and its
        sender counted as dropped. A reply from a client not asked in this
        stage, or a second reply from a client that already answered in it,
        is ignored (logged). Nothing moves on until :meth:`end_stage`.

        In the masked-input stage an accepted vector is added to a running sum
        mod ``2**b`` right away and dropped: the server holds ``O(d)`` words
        of masked input however many clients answer (plus one reply while it
        is being checked). Only the sum over all the survivors is ever
        released, once unmasking completes.

        Raises
        ------
        ProtocolError
            If the protocol is over (``done`` or ``aborted``).
        """
        self._check_open("receive_one")
        stage = self._stage
        if client_id not in self._asked:
            _LOG.warning(
                "secagg round %d, stage %s: ignored a reply from %r, which was not "
                "asked in this stage",
                self.round_idx,
                stage,
                client_id,
            )
            return
        if client_id in self._answered:
            _LOG.warning(
                "secagg round %d, stage %s: ignored a second reply from %r",
                self.round_idx,
                stage,
                client_id,
            )
            return
        self._answered.add(client_id)
        try:
            msg = self._validate(client_id, data)
        except ProtocolError as exc:
            self._refuse(client_id, str(exc))
            return
        if isinstance(msg, MaskedInputReply):
            if self._sum is None:
                self._sum = np.zeros(self.config.vector_length, dtype=np.uint64)
            # Mod 2^64 (uint64 wraps); reduced mod 2^b once unmasked. 2^b
            # divides 2^64, so this is the sum mod 2^b.
            np.add(self._sum, msg.masked_input, out=self._sum)
            self._pending[client_id] = None  # the vector is in the sum
        else:
            self._pending[client_id] = msg

    def end_stage(self) -> None:
        """Close the current stage: who has not answered has dropped; move on.

        Raises
        ------
        ProtocolError
            As :meth:`receive`.
        """
        self._check_open("end_stage")
        stage = self._stage
        accepted = self._pending
        if stage is Stage.ADVERTISE_KEYS:
            self._refuse_repeated_keys(accepted)
        for cid in self._active:
            if cid not in accepted:
                self._dropped.setdefault(cid, str(stage))
        try:
            self._require(len(accepted), f"stage {stage}")
            self._advance(stage, accepted)
        except ProtocolError as exc:
            self._abort(str(exc))
            raise

    def result(self) -> npt.NDArray[np.uint64]:
        """``sum_{u in survivors} x_u mod 2**b`` (a copy), once the stage is ``done``.

        Raises
        ------
        ProtocolError
            If the protocol has not completed (or aborted): no partial sum
            is ever released.
        """
        if self._stage is not Stage.DONE or self._result is None:
            why = f" ({self._failure})" if self._failure else ""
            raise ProtocolError(
                f"no result: the protocol is in stage {self._stage}{why}"
            )
        return self._result.copy()

    # -- internals ------------------------------------------------------------

    def _check_open(self, method: str) -> None:
        if self._stage in (Stage.DONE, Stage.ABORTED):
            raise ProtocolError(
                f"{method}() called in stage {self._stage}: the round is over"
            )

    def _require(self, answered: int, what: str) -> None:
        t = self.config.threshold
        if answered < t:
            raise ProtocolError(f"{what} needed {t} clients, only {answered} answered")

    def _abort(self, reason: str) -> None:
        self._stage = Stage.ABORTED
        self._failure = reason
        self._outbox = None
        self._sum = None
        self._pending = {}
        _LOG.warning("secagg round %d aborted: %s", self.round_idx, reason)

    def _refuse(self, cid: str, reason: str) -> None:
        _LOG.warning(
            "secagg round %d, stage %s: refused the reply of %r: %s",
            self.round_idx,
            self._stage,
            cid,
            reason,
        )
        self._refused[cid] = reason
        self._dropped[cid] = str(self._stage)

    def _head(self, recipient: str) -> _Head:
        return {
            "session": self._session,
            "round_idx": self.round_idx,
            "sender": SERVER_ID,
            "recipient": recipient,
        }

    def _request(self, cid: str) -> Message:
        head = self._head(cid)
        stage = self._stage
        if stage is Stage.ADVERTISE_KEYS:
            return AdvertiseRequest(
                **head,
                clients=self._clients,
                seed_commitment=self._seed_commitment,
                config_digest=self._digest,
            )
        neighbours = self.graph.neighbours_of(cid)
        if stage is Stage.SHARE_KEYS:
            known = self._forwarded
            ads = tuple(known[v] for v in neighbours if v in known)
            assert self._leader is not None
            return ShareKeysRequest(
                **head,
                advertisements=ads,
                seed_reveal=self._seed_share,
                leader=self._leader,
            )
        if stage is Stage.MASKED_INPUT:
            forwarded = {
                v: self._ciphertexts[v][cid]
                for v in neighbours
                if v in self._ciphertexts
            }
            return MaskedInputRequest(**head, ciphertexts=forwarded)
        survivors = self._survivors
        assert survivors is not None
        if stage is Stage.CONSISTENCY_CHECK:
            return ConsistencyRequest(**head, survivors=survivors)
        self_masks, keys = self._requested[cid]
        return UnmaskRequest(
            **head,
            survivors=survivors,
            signatures=dict(self._signatures),
            self_mask_requests=tuple(sorted(self_masks)),
            key_requests=tuple(sorted(keys)),
        )

    def _validate(self, cid: str, data: bytes) -> Message:
        stage = self._stage
        msg = decode(
            data,
            vector_length=self.config.vector_length,
            modulus_bits=self.config.modulus_bits,
        )
        if msg.stage != stage:
            raise ProtocolError(
                f"a {msg.stage} message in stage {stage} (replayed or out of order)"
            )
        if not isinstance(msg, _REPLY_TYPES[stage]):
            raise ProtocolError(
                f"expected a {_REPLY_TYPES[stage].TYPE}, got a {msg.TYPE}"
            )
        if msg.round_idx != self.round_idx:
            raise ProtocolError(
                f"a reply of round {msg.round_idx} in round {self.round_idx} (replayed)"
            )
        if msg.session != self._session:
            raise ProtocolError("a reply of another protocol session (replayed)")
        if msg.sender != cid or msg.recipient != SERVER_ID:
            raise ProtocolError(
                f"a reply from {msg.sender!r} to {msg.recipient!r} arrived as {cid!r}'s"
            )
        if isinstance(msg, AdvertiseReply) and self.config.malicious:
            signature = msg.signature
            if signature is None:
                raise ProtocolError("unsigned key advertisement (malicious=True)")
            crypto.verify(
                self._verify_keys[cid],
                _advertisement_message(
                    self._session,
                    self.round_idx,
                    cid,
                    self._binding,
                    msg.encryption_key,
                    msg.masking_key,
                    msg.self_mask_commitment,
                ),
                signature,
            )
        elif isinstance(msg, ShareKeysReply):
            wanted = {v for v in self.graph.neighbours_of(cid) if v in self._ads}
            if set(msg.ciphertexts) != wanted:
                raise ProtocolError(
                    "the ciphertexts are not addressed to exactly the client's "
                    "neighbours that advertised keys"
                )
        elif isinstance(msg, ConsistencyReply):
            assert self._survivors is not None
            crypto.verify(
                self._verify_keys[cid],
                _consistency_message(
                    self._session, self.round_idx, self._view, self._survivors
                ),
                msg.signature,
            )
        elif isinstance(msg, UnmaskReply):
            self_masks, keys = self._requested[cid]
            if set(msg.self_mask_shares) != self_masks or set(msg.key_shares) != keys:
                raise ProtocolError("the shares returned are not the ones asked for")
        return msg

    def _refuse_repeated_keys(self, accepted: dict[str, Message | None]) -> None:
        # Every client whose key appears twice is refused: copying another
        # client's public key is never honest, and which copy came first is
        # not knowable.
        count: dict[bytes, int] = {}
        for msg in accepted.values():
            assert isinstance(msg, AdvertiseReply)
            for key in (msg.encryption_key, msg.masking_key):
                count[key] = count.get(key, 0) + 1
        for cid in sorted(accepted):
            msg = accepted[cid]
            assert isinstance(msg, AdvertiseReply)
            if count[msg.encryption_key] > 1 or count[msg.masking_key] > 1:
                del accepted[cid]
                self._refuse(
                    cid, "its public keys repeat keys another client advertised"
                )

    def _advance(self, stage: Stage, accepted: Mapping[str, Message | None]) -> None:
        members = tuple(sorted(accepted))
        self._outbox = None
        if stage is Stage.ADVERTISE_KEYS:
            self._ads = {
                c: m for c, m in accepted.items() if isinstance(m, AdvertiseReply)
            }
            # One Advertisement per client, forwarded to each of its neighbours
            # (and serialised once).
            self._forwarded = {
                c: Advertisement(
                    client_id=c,
                    encryption_key=m.encryption_key,
                    masking_key=m.masking_key,
                    self_mask_commitment=m.self_mask_commitment,
                    signature=m.signature,
                )
                for c, m in self._ads.items()
            }
            members = self._derive_graph(members)
            self._require(len(members), f"stage {stage}")
            self._set_stage(Stage.SHARE_KEYS, members)
        elif stage is Stage.SHARE_KEYS:
            self._require_leader(members, stage)
            self._ciphertexts = {
                c: m.ciphertexts
                for c, m in accepted.items()
                if isinstance(m, ShareKeysReply)
            }
            self._set_stage(Stage.MASKED_INPUT, members)
        elif stage is Stage.MASKED_INPUT:
            # Their vectors are in self._sum already (receive_one).
            self._survivors = members
            self._require_leader(members, stage)
            if not self.graph.is_connected(members):
                raise ProtocolError(
                    "the survivors are not connected in the neighbour graph: unmasking "
                    "would reveal partial sums, so the round stops"
                )
            if self.config.malicious:
                self._set_stage(Stage.CONSISTENCY_CHECK, members)
            else:
                self._enter_unmask(members)
        elif stage is Stage.CONSISTENCY_CHECK:
            self._require_leader(members, stage)
            self._signatures = {
                c: m.signature
                for c, m in accepted.items()
                if isinstance(m, ConsistencyReply)
            }
            self._enter_unmask(members)
        else:
            replies = {c: m for c, m in accepted.items() if isinstance(m, UnmaskReply)}
            self._result = self._unmask(replies)
            self._set_stage(Stage.DONE, members)

    def _derive_graph(self, members: tuple[str, ...]) -> tuple[str, ...]:
        """Fix the graph seed and the graph; refuse clients left without neighbours.

        The leader is the first client that advertised (``members`` is
        sorted); see the module docstring. Returns the members kept.
        """
        leader = self._forwarded[members[0]]
        seed = _graph_seed(self._binding, self._seed_share, leader)
        graph = build_graph(self._clients, self._neighbours, seed)
        self._leader, self._graph_seed, self._graph = leader, seed, graph
        self._view = _view_binding(self._binding, seed)
        kept = []
        for cid in members:
            if graph.degree(cid) == 0:
                del self._ads[cid], self._forwarded[cid]
                self._refuse(cid, "the round's graph leaves it without neighbours")
            else:
                kept.append(cid)
        return tuple(kept)

    def _require_leader(self, members: Sequence[str], stage: Stage) -> None:
        """Malicious mode: stop once the leader is out (clients would refuse).

        Every client requires the leader in the survivor list and among its
        signers (:meth:`SecAggClient._leader_rule`), so a round whose leader
        did not answer ``stage`` cannot complete; stop now, saying why.
        """
        if not self.config.malicious:
            return
        assert self._leader is not None
        leader = self._leader.client_id
        if leader not in members:
            raise ProtocolError(
                f"stage {stage}: the graph seed's leader {leader!r} did not answer; "
                "in malicious mode every client needs the leader in the survivor "
                "list and its signature on it, so the round stops"
            )

    def _set_stage(self, stage: Stage, active: tuple[str, ...]) -> None:
        self._stage = stage
        self._active = active
        self._asked = frozenset(active)
        self._answered = set()
        self._pending = {}

    def _enter_unmask(self, active: tuple[str, ...]) -> None:
        survivors = set(self._survivors or ())
        shared = set(self._ciphertexts)
        self._requested = {}
        for cid in active:
            neighbours = self.graph.neighbours_of(cid)
            self_masks = frozenset([cid, *(v for v in neighbours if v in survivors)])
            keys = frozenset(
                v for v in neighbours if v in shared and v not in survivors
            )
            self._requested[cid] = (self_masks, keys)
        self._set_stage(Stage.UNMASK, active)

    def _unmask(self, replies: Mapping[str, UnmaskReply]) -> npt.NDArray[np.uint64]:
        config, graph = self.config, self.graph
        b, d = config.modulus_bits, config.vector_length
        survivors = self._survivors
        assert survivors is not None
        # Every share that came back, by owner and share position (holders in
        # graph order, so positions ascend).
        seed_shares: dict[str, dict[int, Share]] = {}
        key_shares: dict[str, dict[int, Share]] = {}
        for holder in sorted(replies, key=graph.index):
            x = graph.index(holder) + 1
            reply = replies[holder]
            for owner, share in reply.self_mask_shares.items():
                seed_shares.setdefault(owner, {})[x] = share
            for owner, share in reply.key_shares.items():
                key_shares.setdefault(owner, {})[x] = share
        session, round_idx = self._session, self.round_idx

        def seed_of(owner: str) -> bytes:
            committed = self._ads[owner].self_mask_commitment
            return _rebuild_checked(
                seed_shares.get(owner, {}),
                graph.threshold_of(owner, config.threshold),
                lambda seed: (
                    _self_mask_commitment(session, round_idx, owner, seed) == committed
                ),
                what=f"self-mask seed of {owner!r}",
                promise="its advertised commitment H(b_u)",
            )

        def key_of(owner: str) -> X25519PrivateKey:
            public = self._ads[owner].masking_key
            private = _rebuild_checked(
                key_shares.get(owner, {}),
                graph.threshold_of(owner, config.threshold),
                lambda key: _public_bytes(crypto.import_private(key)) == public,
                what=f"masking key of {owner!r}",
                promise="its advertised public key",
            )
            return crypto.import_private(private)

        # The running sum of the survivors' masked inputs (mod 2^64): remove
        # the masks from it in place, reduce mod 2^b at the end.
        total, self._sum = self._sum, None
        if total is None:  # pragma: no cover - U3 has at least t >= 2 members
            total = np.zeros(d, dtype=np.uint64)
        for u in survivors:
            crypto.add_mask(seed_of(u), total, subtract=True)
        members = set(survivors)
        for v in sorted(set(self._ciphertexts) - members):
            partners = [u for u in graph.neighbours_of(v) if u in members]
            if not partners:
                continue
            private = key_of(v)
            for u in partners:
                seed = _pairwise_seed(
                    private,
                    self._ads[u].masking_key,
                    session=self._session,
                    round_idx=self.round_idx,
                    u=u,
                    v=v,
                )
                # y_u carries +mask if u < v and -mask if u > v: take it off.
                crypto.add_mask(seed, total, subtract=u < v)
        if b < 64:
            np.bitwise_and(total, np.uint64((1 << b) - 1), out=total)
        return total


def _rebuild_checked(
    shares: Mapping[int, Share],
    threshold: int,
    check: Callable[[bytes], bool],
    *,
    what: str,
    promise: str,
) -> bytes:
    """Rebuild a secret from ``threshold`` shares and check it against a promise.

    The first ``threshold`` shares (by position) are tried first; if the
    secret they give fails ``check`` (a holder sent a wrong share), sets that
    leave out one share, then two, ... are tried, up to
    :data:`_MAX_REBUILD_TRIES` sets. With ``m`` shares of which at most
    ``m - threshold`` are wrong, leaving out the wrong ones finds the secret.

    Raises
    ------
    ProtocolError
        If fewer than ``threshold`` shares came back, or no set tried gives
        a secret that passes ``check``: the round stops rather than release
        a wrong sum.
    """
    positions = list(shares)
    if len(positions) < threshold:
        raise ProtocolError(
            f"stage unmask needed {threshold} shares of the {what}, only "
            f"{len(positions)} answered"
        )
    tried = 0
    for subset in _share_subsets(positions, threshold):
        if tried == _MAX_REBUILD_TRIES:
            break
        tried += 1
        try:
            secret = shamir.reconstruct_bytes(
                {x: shares[x] for x in subset},
                threshold,
                SECRET_BYTES,
                shamir.lagrange_at_zero(subset),
            )
            valid = check(secret)
        except (ProtocolError, ValueError):
            continue
        if valid:
            if tried > 1:
                left_out = sorted(set(positions[: len(subset)]) - set(subset))
                _LOG.warning(
                    "secagg unmask: the %s was rebuilt only after leaving out the "
                    "shares at positions %s (wrong shares)",
                    what,
                    left_out,
                )
            return secret
    raise ProtocolError(
        f"stage unmask: no set of {threshold} of the {len(positions)} shares of the "
        f"{what} rebuilds a secret that matches {promise} ({tried} sets tried): "
        "some shares are wrong, so the round stops rather than release a wrong sum"
    )


def _share_subsets(
    positions: Sequence[int], threshold: int
) -> Iterator[tuple[int, ...]]:
    """Sets of ``threshold`` positions, most likely to be right first.

    The first ``threshold`` positions, then the first ``threshold`` of those
    left when one, two, ... positions are left out (each set once).
    """
    seen: set[tuple[int, ...]] = set()
    for dropped in range(len(positions) - threshold + 1):
        for left_out in itertools.combinations(positions, dropped):
            skip = set(left_out)
            subset = tuple(x for x in positions if x not in skip)[:threshold]
            if subset not in seen:
                seen.add(subset)
                yield subset


def _require_int(
    name: str, value: object, *, low: int, high: int | None = None
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_participant_id(client_id: object) -> None:
    try:
        check_client_id(client_id)
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from exc
    if client_id == SERVER_ID:
        raise ConfigError(f"client id {SERVER_ID!r} is reserved for the server")
