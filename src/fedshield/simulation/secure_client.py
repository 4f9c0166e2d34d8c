"""The client's half of a secure round: what runs where the client's data is.

Under secure aggregation a client never sends its update. Stage ``fit``
trains it and keeps it (:func:`hold_update`, replying a
:class:`~fedshield.simulation.protocol.FitReceipt`); the protocol's first
stage brings the round's public :class:`SecureSetup`, from which the client
turns its update into the protocol's input (:func:`encode_input`: FedAvg's
weighting, norm bounding, central DP's clipping, or distributed DP's
clipping, rotation, rounding and noise), masks it and answers the
protocol's stages (:class:`~fedshield.secagg.protocol.SecAggClient`). The
plaintext update is dropped once encoded. Whichever process holds the client
(this one, a worker process, a Ray actor, later a remote site) runs this
code; the server's side sees only the protocol's bytes.

Every client's input is ``[w_k Δ_k, w_k, o_k, w_k ℓ_k, w_k, w_k a_k, w_k]``
(see :mod:`fedshield.simulation.secure`): its update weighted by ``w_k =
n_k / max_examples``, the weight itself, the count ``o_k`` of its values
that fell outside the encoding's range, and its training loss and accuracy
weighted likewise, each extra word scaled into the range by a public bound.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedshield.core import ClientUpdate, Params, validate_update
from fedshield.errors import InvalidUpdateError, ProtocolError

if TYPE_CHECKING:
    from fedshield.privacy.distributed import DdgParameters
    from fedshield.secagg.protocol import SecAggConfig
    from fedshield.simulation.protocol import ClientSession, FitReceipt, HoldUpdate
    from fedshield.strategies.secure_inputs import SecureInput

__all__ = [
    "EXTRA_WORDS",
    "REJECTED_OWN_CHECK",
    "LOSS_BOUND",
    "SECURE_STAGES",
    "ClientTrust",
    "HandedHalf",
    "InputPlan",
    "KeyDirectory",
    "SecureSetup",
    "SecureStageIns",
    "encode_input",
    "hand_over",
    "hold_update",
    "plan_digest",
    "run_secure_stage",
]

logger = logging.getLogger(__name__)

SECURE_STAGES = (
    "advertise_keys",
    "share_keys",
    "masked_input",
    "consistency_check",
    "unmask",
)
"""The protocol's stages, in order (``consistency_check`` in malicious mode)."""

EXTRA_WORDS = 6
"""Words each client appends to its update in the secure sum: the weight, the
out-of-range count, and the training loss and accuracy with their weights."""

LOSS_BOUND = 1.0e4
"""Largest training loss a client's ``w * loss`` word carries (a larger or
non-finite one is left out of ``train_loss``)."""

METRIC_WORDS = ((2, "loss", LOSS_BOUND), (4, "accuracy", 1.0))
"""``(offset after the update, metric, public bound)`` of the metric words."""


@dataclass(frozen=True, slots=True)
class InputPlan:
    """How every client of a round turns its update into the protocol's input.

    Public: the server announces it with the round, and every client of the
    round gets the same plan.

    Parameters
    ----------
    kind
        ``"weighted"``: FedAvg's weighted update (optionally norm-bounded);
        ``"clipped"``: central DP, each client clips to ``bound`` and weighs
        1; ``"distributed"``: distributed DP's noised, rotated integers.
    size
        The model's parameter count.
    length
        Words per input.
    enc_clip, enc_scale, modulus_bits
        The fixed-point encoding (:class:`~fedshield.secagg.encoding.Encoding`).
    count_unit
        Out-of-range values per unit of the count word.
    max_examples
        FedAvg's weight is ``num_examples / max_examples`` (at most 1).
    bound
        ``"weighted"``: norm bounding's ``max_norm`` (0: none);
        ``"clipped"`` and ``"distributed"``: the clip norm.
    ddp
        Distributed DP's parameters for the round.
    rotation_seed
        Distributed DP's public rotation seed for the round.
    secure_rng
        Distributed DP: draw the noise from the operating system's CSPRNG.
    """

    kind: Literal["weighted", "clipped", "distributed"]
    size: int
    length: int
    enc_clip: float = 1.0
    enc_scale: float = 1.0
    modulus_bits: int = 32
    count_unit: int = 1
    max_examples: int = 1
    bound: float = 0.0
    ddp: DdgParameters | None = None
    rotation_seed: int = 0
    secure_rng: bool = True


@dataclass(frozen=True, slots=True)
class SecureSetup:
    """What a client needs to join a round's secure aggregation (public).

    Parameters
    ----------
    round_idx
        The round (bound into every protocol message).
    config
        The protocol's parameters for the round.
    plan
        How the client encodes its update.
    verify_keys
        Malicious mode: every client's verification key (the simulation's
        public-key directory).
    replacement
        Simulated colluding attackers only: the update the coalition
        rewrote for this client, sent instead of its own.
    attestations
        Malicious mode over a network: each client's attestation of its
        key (from its receipt), relayed for the clients to check.
    """

    round_idx: int
    config: SecAggConfig
    plan: InputPlan
    verify_keys: Mapping[str, bytes]
    replacement: Params | None = None
    attestations: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SecureStageIns:
    """A protocol stage's message to one client: the protocol's bytes.

    The first stage (``advertise_keys``) also carries the round's
    :class:`SecureSetup`.
    """

    request: bytes
    setup: SecureSetup | None = None


@dataclass(frozen=True, slots=True)
class HandedHalf:
    """A client's half of a secure round, handed to another of its processes.

    The simulation spreads the clients' halves of a large secure round over
    cores (:class:`~fedshield.simulation.backends.offload.SecureOffload`):
    the process that trained the client checks the round's setup against
    the client's trust, then hands over what the half needs. It travels
    between two processes of the clients' side, never to the server.

    Parameters
    ----------
    held
        The client's update (a simulated colluder's: the coalition's rewrite).
    signing_key
        Malicious mode: the raw private seed of the client's signing key
        (empty otherwise).
    ins
        The protocol's first stage for the client, its setup checked.
    """

    held: ClientUpdate
    signing_key: bytes
    ins: SecureStageIns


def hand_over(session: ClientSession, message: SecureStageIns) -> HandedHalf:
    """Check ``message``'s setup for the client; what another process needs.

    The client's plaintext update leaves ``session`` (it is now the other
    process's to encode).

    Raises
    ------
    ProtocolError
        As :func:`run_secure_stage` would for the same setup.
    """
    setup = message.setup
    held = session.held
    if setup is None or held is None:
        raise ProtocolError("only a client that holds an update joins the round")
    _check_setup(session, setup)
    if setup.replacement is not None:  # a simulated colluder
        held = replace(held, delta=setup.replacement)
        message = replace(message, setup=replace(setup, replacement=None))
    key = b""
    if session.signing_key is not None:
        from fedshield.secagg import crypto

        key = crypto.export_signing_key(session.signing_key)
    # Checked numbers (validate_update), as plain floats for the wire.
    held = replace(held, metrics={k: float(v) for k, v in held.metrics.items()})
    session.held = None
    return HandedHalf(held, key, message)


class KeyDirectory:
    """The simulation's public-key directory: each client's long-term key.

    It stands for the certificates of a deployment: each enrolled client's
    Ed25519 signing key is issued from ``secret``
    (:func:`~fedshield.secagg.crypto.derive_signing_key`), and every client
    checks the server's table of verification keys against it, so a server
    can neither substitute a client's key nor enrol identities of its own.
    It lives with the clients (attached to them by whoever runs them), never
    with the server's code, which gets :meth:`public_table` only. All
    simulated clients share the directory, so it defends against the
    server, not against clients impersonating each other.
    """

    __slots__ = ("_clients", "_keys", "_secret")

    def __init__(self, clients: Iterable[str], secret: bytes | None = None) -> None:
        self._clients = frozenset(clients)
        self._secret = secret if secret is not None else os.urandom(32)
        self._keys: dict[str, Any] = {}

    def __getstate__(self) -> tuple[frozenset[str], bytes]:
        return self._clients, self._secret

    def __setstate__(self, state: tuple[frozenset[str], bytes]) -> None:
        self._clients, self._secret = state
        self._keys = {}

    def signing_key(self, client_id: str) -> Any:
        """The client's own signing key (its session asks for it)."""
        if client_id not in self._clients:
            raise ProtocolError(f"{client_id!r} is not enrolled in the key directory")
        key = self._keys.get(client_id)
        if key is None:
            from fedshield.secagg import crypto

            key = crypto.derive_signing_key(self._secret, client_id.encode("utf-8"))
            self._keys[client_id] = key
        return key

    def public_table(self, clients: Iterable[str]) -> dict[str, bytes]:
        """The verification keys of ``clients`` (public)."""
        return {cid: self.signing_key(cid).public for cid in clients}

    def announce(self, client_id: str) -> tuple[bytes, bytes]:
        """What the client's receipt says of its key: nothing.

        The server has the directory's public table.
        """
        del client_id
        return b"", b""

    def check_table(
        self,
        table: Mapping[str, bytes],
        attestations: Mapping[str, bytes] | None = None,
    ) -> None:
        """Refuse a key table that is not the directory's.

        Raises
        ------
        ProtocolError
            If the table names a client that is not enrolled, or gives any
            client a key other than its own.
        """
        for cid, key in table.items():
            if cid not in self._clients:
                raise ProtocolError(
                    f"the server's key table names {cid!r}, which is not enrolled"
                )
            if key != self.signing_key(cid).public:
                raise ProtocolError(
                    f"the server's key table gives {cid!r} a key that is not its own"
                )


@dataclass(frozen=True)
class ClientTrust:
    """What a client knows for itself and checks the server's word against.

    Attached to the client by whoever runs it (the simulation, later a
    site's own configuration), never sent by the server.

    Parameters
    ----------
    keys
        The key directory (malicious mode): the client signs with its own
        long-term key, refuses a key table that is not the directory's, and
        refuses a round that is not in malicious mode.
    transform
        What the client itself expects to do to its update. The client
        refuses a plan of another kind and, under distributed DP, a plan
        whose noise or randomness differs from what its own mechanism
        gives for the announced round; it also decides, not the server,
        whether its receipt carries its example count.
    max_examples
        The client's own bound on ``num_examples`` (FedAvg's weight
        ``n / max_examples``); None: the server's word.
    min_clients
        Malicious mode: the fewest clients in a round's roster (the key
        table) the client takes part with; a server that runs the protocol
        with the victim and few others (one of them its own) learns little
        less than the victim's update.
    threshold_for
        Malicious mode: the threshold the client's own configuration gives
        for a roster of ``n`` (``SecureAggregation.threshold_for``); a
        lower one is refused.
    started
        The rounds each client of this process has joined a secure sum in:
        a client joins a round's secure aggregation once (a server that ran
        it twice over the same update could subtract two sums). Kept per
        process, as a site keeps it on its own disk.
    """

    keys: KeyDirectory | None = None
    transform: SecureInput | None = None
    max_examples: int | None = None
    started: set[tuple[str, int]] = field(default_factory=set, compare=False)
    min_clients: int | None = None
    threshold_for: Any = None


def plan_digest(plan: InputPlan) -> bytes:
    """SHA-256 of every field of ``plan``: what the round binds (``context``)."""
    import hashlib
    import json

    ddp = plan.ddp
    fields = {
        name: getattr(plan, name)
        for name in InputPlan.__dataclass_fields__
        if name != "ddp"
    }
    if ddp is not None:
        fields["ddp"] = {name: getattr(ddp, name) for name in ddp.__dataclass_fields__}
    text = json.dumps(fields, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).digest()


REJECTED_OWN_CHECK = (
    "the update failed the client's own check (shape, finite values, example "
    "count or metrics); the details are in the client's log"
)
"""What a receipt says of a refused update: no values leave the client."""


def hold_update(
    session: ClientSession, update: object, hold: HoldUpdate, spec: Any
) -> FitReceipt:
    """Keep the client's update for the protocol; the receipt the server gets.

    The client checks its own update as the server would have on receipt;
    a refused update is dropped, logged here, and the receipt says only
    that it was refused.
    """
    from fedshield.simulation.protocol import FitReceipt

    session.held = None
    session.signing_key = None
    client_id = session.client_id
    hold = _own_hold(session, hold)
    try:
        if hold.lenient and isinstance(update, ClientUpdate):
            update = _lenient(update, spec)
        checked = validate_update(update, spec, max_examples=hold.max_examples)
        if checked.client_id != client_id:
            raise InvalidUpdateError(
                f"update claims to come from {checked.client_id!r} but was "
                f"made by {client_id!r}"
            )
        if checked.extras or checked.state:
            raise InvalidUpdateError(
                "secure aggregation sums the update only; extras and client "
                "state cannot be sent"
            )
    except InvalidUpdateError as err:
        logger.warning("client %s: its update is not sent: %s", client_id, err)
        return FitReceipt(client_id, 1, b"", REJECTED_OWN_CHECK)
    session.held = checked
    verify_key = attestation = b""
    if hold.malicious:
        keys = session.trust.keys if session.trust is not None else None
        if keys is not None:  # its key from the directory (or its certificate)
            session.signing_key = keys.signing_key(client_id)
            verify_key, attestation = keys.announce(client_id)
        else:  # no directory: a key for the round, announced in the receipt
            from fedshield.secagg import crypto

            session.signing_key = crypto.generate_signing_key()
            verify_key = session.signing_key.public
    count = checked.num_examples if hold.count else 1
    shared = checked if hold.share and session.colluding else None
    return FitReceipt(client_id, count, verify_key, "", shared, attestation)


def _own_hold(session: ClientSession, hold: HoldUpdate) -> HoldUpdate:
    """``hold`` with what the client's own trust decides in place of the server's."""
    trust = session.trust
    if trust is None:
        return hold
    kind = trust.transform.kind if trust.transform is not None else None
    return replace(
        hold,
        malicious=hold.malicious or trust.keys is not None,
        lenient=hold.lenient if kind is None else kind == "distributed",
        count=hold.count if kind is None else kind == "weighted",
        max_examples=trust.max_examples
        if trust.max_examples is not None
        else hold.max_examples,
    )


def _lenient(update: ClientUpdate, spec: Any) -> ClientUpdate:
    """Distributed DP: a non-finite update counts as zero; no metric leaves."""
    delta = update.delta
    if isinstance(delta, Params) and delta.spec == spec and not delta.is_finite():
        delta = Params.zeros(delta.spec)
    return replace(update, delta=delta, metrics={})


def run_secure_stage(
    session: ClientSession, stage: str, message: Any, rng: np.random.Generator | None
) -> bytes:
    """Answer one protocol stage for the client held by ``session``."""
    from fedshield.secagg.protocol import SecAggClient

    handed = isinstance(message, HandedHalf)
    if handed and not getattr(session.client, "takes_handed_halves", False):
        raise ProtocolError(
            "a handed-over half reached a client that trains its own update; "
            "only the clients' own worker processes take one"
        )
    if isinstance(message, HandedHalf):  # checked by the process that handed it
        from fedshield.secagg import crypto

        session.held = message.held
        key = message.signing_key
        session.signing_key = crypto.import_signing_key(key) if key else None
        message = message.ins
    if not isinstance(message, SecureStageIns):
        raise ProtocolError(
            f"stage {stage!r} expects SecureStageIns; got {type(message).__name__}"
        )
    setup = message.setup
    if setup is not None:
        if stage != SECURE_STAGES[0] or rng is None:
            raise ProtocolError(
                f"the round's setup came with stage {stage!r}; it belongs to "
                f"{SECURE_STAGES[0]!r}"
            )
        held = session.held
        if held is None:
            raise ProtocolError(
                "secure aggregation's first stage reached a client that holds "
                "no update (it did not train in this round)"
            )
        if not handed:
            _check_setup(session, setup)
        if setup.replacement is not None:  # a simulated colluder
            held = replace(held, delta=setup.replacement)
        half = SecAggClient(
            setup.config,
            setup.round_idx,
            session.client_id,
            signing_key=session.signing_key,
            verify_keys=setup.verify_keys or None,
            # Each request is handed over once: no retransmissions, so no
            # client keeps its last reply.
            idempotent=False,
        )
        half.set_input(encode_input(held, setup.plan, rng))
        session.held = None  # the plaintext is gone once encoded
        session.secagg = half
    half = session.secagg
    if half is None:
        raise ProtocolError(
            f"stage {stage!r} reached a client that has not joined the round's "
            "secure aggregation"
        )
    reply: bytes = half.handle(message.request)
    return reply


def _check_setup(session: ClientSession, setup: SecureSetup) -> None:
    """Refuse a round's setup that the client's own knowledge contradicts.

    Raises
    ------
    ProtocolError
        If the setup replaces the update of a client that is not a simulated
        colluder, names keys the directory did not issue, or asks for a kind
        of input, or distributed-DP noise, other than the client's own.
    """
    if setup.replacement is not None and not session.colluding:
        raise ProtocolError(
            "the server sent an update to send in place of this client's own; "
            "an honest client sends only what it trained"
        )
    _check_plan_fits(setup, session.held)
    trust = session.trust
    if trust is None:
        return
    if trust.keys is not None:
        if not setup.config.malicious:
            raise ProtocolError(
                "this client takes part in malicious-mode rounds only (it holds "
                "a key from the directory); the server asked for another mode"
            )
        trust.keys.check_table(setup.verify_keys, setup.attestations)
        _check_roster(trust, setup)
    joined = (session.client_id, setup.round_idx)
    if joined in trust.started:
        raise ProtocolError(
            f"this client already joined round {setup.round_idx + 1}'s secure "
            "aggregation; it sends an update to one protocol per round"
        )
    trust.started.add(joined)
    expected = trust.transform
    plan = setup.plan
    if expected is None:
        return
    if plan.kind != expected.kind:
        raise ProtocolError(
            f"the server asks for a {plan.kind!r} input; this client's "
            f"configuration says {expected.kind!r}"
        )
    if expected.distributed is not None:
        own = expected.distributed
        ddp = plan.ddp
        if ddp is None or ddp.threshold != setup.config.threshold:
            raise ProtocolError("the server's distributed-DP plan is incomplete")
        if setup.verify_keys and ddp.num_clients != len(setup.verify_keys):
            raise ProtocolError(
                "the server's distributed-DP plan counts another number of "
                "clients than the round's roster"
            )
        mine = own.parameters(
            dimension=plan.size, num_clients=ddp.num_clients, threshold=ddp.threshold
        )
        if (
            ddp != mine
            or plan.bound != own.clip_norm
            or plan.secure_rng != own.secure_rng
        ):
            raise ProtocolError(
                "the server's distributed-DP plan differs from this client's own "
                f"mechanism (noise std {ddp.noise_std:g}, expected "
                f"{mine.noise_std:g}); refused"
            )


def _check_roster(trust: ClientTrust, setup: SecureSetup) -> None:
    """Refuse a round with too few clients, or a threshold below the client's own."""
    n = len(setup.verify_keys)
    if trust.min_clients is not None and n < trust.min_clients:
        raise ProtocolError(
            f"the round's roster has {n} clients; this client takes part in "
            f"rounds of at least {trust.min_clients}"
        )
    if trust.threshold_for is not None:
        need = int(trust.threshold_for(n))
        if setup.config.threshold < need:
            raise ProtocolError(
                f"the round's threshold is {setup.config.threshold} of {n}; this "
                f"client's configuration gives {need}"
            )


def _check_plan_fits(setup: SecureSetup, held: Any) -> None:
    """Refuse a plan that does not fit the update or the protocol's config.

    The encoding's modulus and length must be the protocol's, the plan
    must be for this model's size, and the config must bind the plan
    (``context``), so that in malicious mode clients shown different plans
    cannot agree on a round.
    """
    plan, config = setup.plan, setup.config
    size = held.delta.spec.size if isinstance(held, ClientUpdate) else plan.size
    extra = 0 if plan.kind == "distributed" else EXTRA_WORDS
    ddp_bits = plan.ddp.modulus_bits if plan.ddp is not None else plan.modulus_bits
    if (
        plan.size != size
        or config.vector_length != plan.length
        or (extra and plan.length != size + extra)
        or config.modulus_bits != plan.modulus_bits
        or ddp_bits != plan.modulus_bits
    ):
        raise ProtocolError(
            "the server's input plan does not fit this client's update or the "
            "protocol's modulus and length; refused"
        )
    if config.context != plan_digest(plan):
        raise ProtocolError(
            "the round's configuration does not bind the input plan the server "
            "announced; refused"
        )


def encode_input(
    update: ClientUpdate, plan: InputPlan, rng: np.random.Generator
) -> np.ndarray:
    """The client's protocol input: its update as integers mod ``2^b``."""
    delta = np.asarray(update.delta.flat, dtype=np.float64)
    if plan.kind == "distributed":
        from fedshield.privacy import distributed as ddg

        assert plan.ddp is not None
        encoded, _ = ddg.encode(
            delta,
            plan.ddp,
            clip_norm=plan.bound,
            rotation_seed=plan.rotation_seed,
            random_bytes=os.urandom if plan.secure_rng else rng.bytes,
        )
        return encoded
    from fedshield.secagg.encoding import Encoding, encode

    enc = Encoding(plan.enc_clip, plan.enc_scale, plan.modulus_bits)
    values = np.zeros(plan.length, dtype=np.float64)
    size = plan.size
    if plan.kind == "weighted":
        weight = update.num_examples / max(1, plan.max_examples)
        if plan.bound > 0:  # norm bounding: the client bounds its own update
            norm = float(np.linalg.norm(delta))
            delta = delta * min(1.0, plan.bound / max(norm, 1e-300))
        values[:size] = delta * weight
        metric_weight = weight
    else:  # central DP: the client clips its own update
        norm = float(np.linalg.norm(delta))
        # The word carries the centred indicator 1[‖Δ‖ ≤ C] − ½.
        weight = (1.0 if norm <= plan.bound else 0.0) - 0.5
        # Stochastic rounding moves each value by less than one step, so the
        # encoded update's norm can exceed the clip norm by √d steps: clip
        # that much lower, so that what is summed has norm ≤ C, the
        # sensitivity the accountant assumes.
        bound = plan.bound - math.sqrt(size) / enc.scale
        if bound <= 0:
            raise ProtocolError(
                "the encoding is too coarse for the clip norm: raise [secagg] "
                "precision_bits"
            )
        values[:size] = delta * min(1.0, bound / max(norm, 1e-300))
        metric_weight = 1.0
    r = enc.clip
    values[size] = weight * r
    for offset, key, bound in METRIC_WORDS:
        value = update.metrics.get(key)
        if value is not None and math.isfinite(value) and abs(value) <= bound:
            values[size + offset] = metric_weight * value / bound * r
            values[size + offset + 1] = metric_weight * r
    encoded, count = encode(values, enc, rng)
    # The count rides along in the secure sum, scaled by its public bound (the
    # vector's length) as the other extra words are, so that it is never
    # clipped: one unit per `count_unit` values.
    encoded_count, _ = encode(np.array([count / plan.count_unit / enc.scale]), enc, rng)
    encoded[size + 1] = encoded_count[0]
    return encoded
