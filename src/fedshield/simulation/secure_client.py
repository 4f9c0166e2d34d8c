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

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedshield.core import ClientUpdate, Params, validate_update
from fedshield.errors import InvalidUpdateError, ProtocolError

if TYPE_CHECKING:
    from fedshield.privacy.distributed import DdgParameters
    from fedshield.secagg.protocol import SecAggConfig
    from fedshield.simulation.protocol import ClientSession, FitReceipt, HoldUpdate

__all__ = [
    "EXTRA_WORDS",
    "LOSS_BOUND",
    "SECURE_STAGES",
    "InputPlan",
    "SecureSetup",
    "SecureStageIns",
    "encode_input",
    "hold_update",
    "run_secure_stage",
]

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
    """

    round_idx: int
    config: SecAggConfig
    plan: InputPlan
    verify_keys: Mapping[str, bytes]
    replacement: Params | None = None


@dataclass(frozen=True, slots=True)
class SecureStageIns:
    """A protocol stage's message to one client: the protocol's bytes.

    The first stage (``advertise_keys``) also carries the round's
    :class:`SecureSetup`.
    """

    request: bytes
    setup: SecureSetup | None = None


def hold_update(
    session: ClientSession, update: object, hold: HoldUpdate, spec: Any
) -> FitReceipt:
    """Keep the client's update for the protocol; the receipt the server gets.

    The client checks its own update as the server would have on receipt;
    a refused update is dropped and the receipt says why.
    """
    from fedshield.simulation.protocol import FitReceipt

    session.held = None
    session.signing_key = None
    client_id = session.client_id
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
        num = getattr(update, "num_examples", 0)
        return FitReceipt(
            client_id, int(num) if isinstance(num, int) else 0, b"", str(err)
        )
    session.held = checked
    verify_key = b""
    if hold.malicious:
        from fedshield.secagg import crypto

        session.signing_key = crypto.generate_signing_key()
        verify_key = session.signing_key.public
    return FitReceipt(client_id, checked.num_examples, verify_key)


def _lenient(update: ClientUpdate, spec: Any) -> ClientUpdate:
    """Distributed DP: a non-finite update counts as zero; no metric leaves."""
    delta = update.delta
    if isinstance(delta, Params) and delta.spec == spec and not delta.is_finite():
        delta = Params.zeros(delta.spec)
    return replace(update, delta=delta, metrics={})


def run_secure_stage(
    session: ClientSession, stage: str, message: Any, rng: np.random.Generator
) -> bytes:
    """Answer one protocol stage for the client held by ``session``."""
    from fedshield.secagg.protocol import SecAggClient

    if not isinstance(message, SecureStageIns):
        raise ProtocolError(
            f"stage {stage!r} expects SecureStageIns; got {type(message).__name__}"
        )
    setup = message.setup
    if setup is not None:
        held = session.held
        if held is None:
            raise ProtocolError(
                "secure aggregation's first stage reached a client that holds "
                "no update (it did not train in this round)"
            )
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
        values[:size] = delta * min(1.0, plan.bound / max(norm, 1e-300))
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
