"""Protocol stages: the messages a round exchanges, independent of transport.

A round is a sequence of *stages*. In each, the server sends one message to
each of a set of clients and collects the replies that arrive before the
stage's deadline; a missing reply is a dropout (a :class:`ClientFailure`),
never an exception. The server side of a round is a sans-I/O
:class:`RoundProtocol`: it produces :class:`StageRequest` values and consumes
:class:`StageReply` values, and whatever carries them (the in-process
backends, Ray, gRPC) stays out of it.

The client side of a stage is :func:`execute_stage`: it dispatches a message
to the matching :class:`~fedshield.core.Client` method.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedshield.core import Client, ClientId, ClientUpdate, EvalConfig, FitConfig, Params
from fedshield.errors import ProtocolError
from fedshield.simulation.secure_client import (
    SECURE_STAGES,
    hold_update,
    run_secure_stage,
)

__all__ = [
    "ClientFailure",
    "ClientSession",
    "EvaluateIns",
    "FailureKind",
    "FitIns",
    "FitReceipt",
    "HoldUpdate",
    "STAGES_WITH_RANDOMNESS",
    "RoundProtocol",
    "StageReply",
    "StageRequest",
    "execute_stage",
    "fit_reply",
]


class FailureKind(enum.StrEnum):
    """Why a client contributed nothing to a stage."""

    ERROR = "error"
    """The client raised."""
    TIMEOUT = "timeout"
    """The reply arrived after the stage's deadline."""
    DROPPED = "dropped"
    """No reply at all (disconnect, injected fault)."""
    REJECTED = "rejected"
    """The reply was malformed and refused by validation."""


@dataclass(frozen=True, slots=True)
class HoldUpdate:
    """Under secure aggregation: keep the update at the client, reply a receipt.

    Parameters
    ----------
    malicious
        The protocol defends against a malicious server: the client makes a
        signing key for the round and its receipt carries the public half
        (the simulation's stand-in for a key bound to the client's
        certificate).
    lenient
        Distributed DP: a NaN or infinite update is encoded as zero by the
        client's own encoder and no training metric leaves the client, so
        the client's check refuses nothing (whether local training diverged
        depends on the client's data).
    max_examples
        Largest ``num_examples`` the server accepts (None: unbounded).
    count
        The receipt carries the client's example count (FedAvg's weight);
        otherwise 1 (central and distributed DP weigh every client 1).
    share
        Simulated colluding attackers only: the receipt also carries the
        client's update, for the coalition to rewrite.
    """

    malicious: bool = False
    lenient: bool = False
    max_examples: int | None = None
    count: bool = True
    share: bool = False


@dataclass(frozen=True, slots=True)
class FitIns:
    """Stage ``"fit"``: train from ``params`` as ``config`` says.

    With ``hold`` (secure aggregation) the client keeps its update for the
    protocol's stages and replies a :class:`FitReceipt`.
    """

    params: Params
    config: FitConfig
    hold: HoldUpdate | None = None


@dataclass(frozen=True, slots=True)
class FitReceipt:
    """A secure round's reply to ``fit``: the update stays at the client.

    Parameters
    ----------
    client_id
        Who trained.
    num_examples
        Its training examples (FedAvg's weight; what the server learns of
        the client besides the sum).
    verify_key
        Malicious mode: the public half of the client's signing key.
    rejected
        Why the client's own check refused its update (empty: accepted), as
        a fixed phrase without values (the details stay in the client's
        log); the server records a rejected update.
    shared
        Simulated colluders only (``HoldUpdate.share``): their update.
    attestation
        Malicious mode over a network: the client's certificate and its
        signature binding ``verify_key`` to its identity and the run
        (:class:`fedshield.transport.secagg_keys.SiteKeys`), which the
        server relays so every client can check every key.
    """

    client_id: ClientId
    num_examples: int
    verify_key: bytes = b""
    rejected: str = ""
    shared: ClientUpdate | None = None
    attestation: bytes = b""


@dataclass(frozen=True, slots=True)
class EvaluateIns:
    """Stage ``"evaluate"``: evaluate ``params`` on local test data."""

    params: Params
    config: EvalConfig


@dataclass(frozen=True, slots=True)
class StageRequest:
    """One stage of a round, as the server sends it.

    Parameters
    ----------
    stage
        Stage name (``"fit"``, ``"evaluate"``; SecAgg adds its own).
    round_idx
        The round (0-based).
    messages
        The message for each client asked.
    timeout_s
        Seconds after the stage starts beyond which a reply counts as a
        timeout; ``None`` waits for every reply.
    """

    stage: str
    round_idx: int
    messages: Mapping[ClientId, Any]
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class ClientFailure:
    """A client that contributed nothing to a stage, and why."""

    client_id: ClientId
    stage: str
    kind: FailureKind
    message: str

    def to_json(self) -> dict[str, str]:
        """JSON form for metrics and logs."""
        return {
            "client_id": self.client_id,
            "stage": self.stage,
            "kind": self.kind.value,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class StageReply:
    """What came back from one client in one stage: a value or a failure."""

    client_id: ClientId
    value: Any = None
    failure: ClientFailure | None = None

    @property
    def ok(self) -> bool:
        """Whether the client replied (validation of the value comes later)."""
        return self.failure is None


class RoundProtocol(Protocol):
    """Server side of one round, as a sans-I/O state machine.

    ``start`` returns the first stage; each ``receive`` gets that stage's
    replies and returns the next stage, or the round's result (any object that
    is not a :class:`StageRequest`) when the round is over.
    """

    def start(self) -> StageRequest:
        """The first stage."""

    def receive(self, replies: Iterable[StageReply]) -> object:
        """Consume one stage's replies; return the next stage or the result."""


class ClientSession:
    """One client as the process that holds it sees it, for one round.

    The backends build it on the client's first stage of a round and keep it
    until the round ends, so that every stage of a multi-stage protocol
    talks to the same client and the same round-local state: under secure
    aggregation the update trained in ``fit`` (until it is encoded) and the
    client's half of the protocol.
    """

    __slots__ = ("client", "client_id", "held", "secagg", "signing_key")

    def __init__(self, client_id: ClientId, client: Client) -> None:
        self.client_id = client_id
        self.client = client
        self.held: Any = None
        self.signing_key: Any = None
        self.secagg: Any = None

    @property
    def trust(self) -> Any:
        """What the client knows for itself (a ``ClientTrust``), if anything.

        Whoever runs the client attaches it to the client object as
        ``trust``; the server never sends it.
        """
        return getattr(self.client, "trust", None)

    @property
    def colluding(self) -> bool:
        """Whether the client is a simulated colluding attacker."""
        return bool(getattr(self.client, "colluding", False))


def fit_reply(session: ClientSession, message: FitIns, update: Any) -> Any:
    """What the client sends back for ``fit``: its update, or a receipt.

    Under secure aggregation (``message.hold``) the update stays with the
    client and the server gets a receipt.
    """
    if message.hold is None:
        return update
    return hold_update(session, update, message.hold, message.params.spec)


Rng = np.random.Generator | None
"""A stage's randomness: None for a stage that draws none
(:data:`STAGES_WITH_RANDOMNESS`)."""

STAGES_WITH_RANDOMNESS = frozenset({"fit", SECURE_STAGES[0]})
"""The client stages that draw from ``derive_rng(seed, "stage", stage, round,
client)``: training, and the secure round's first stage (the encoding's
stochastic rounding). The others get no generator, which saves deriving one
per client and stage."""


def _run_fit(session: ClientSession, message: Any, rng: Rng) -> Any:
    if not isinstance(message, FitIns):
        raise ProtocolError(f"stage 'fit' expects FitIns; got {type(message).__name__}")
    assert rng is not None
    update = session.client.fit(message.params, message.config, rng)
    return fit_reply(session, message, update)


def _run_evaluate(session: ClientSession, message: Any, rng: Rng) -> Any:
    if not isinstance(message, EvaluateIns):
        raise ProtocolError(
            f"stage 'evaluate' expects EvaluateIns; got {type(message).__name__}"
        )
    return dict(session.client.evaluate(message.params, message.config))


def _run_secure(stage: str) -> Callable[[ClientSession, Any, Rng], Any]:
    def run(session: ClientSession, message: Any, rng: Rng) -> Any:
        return run_secure_stage(session, stage, message, rng)

    return run


_CLIENT_STAGES: dict[str, Callable[[ClientSession, Any, Rng], Any]] = {
    "fit": _run_fit,
    "evaluate": _run_evaluate,
    **{stage: _run_secure(stage) for stage in SECURE_STAGES},
}


def execute_stage(
    client: ClientSession | Client,
    stage: str,
    message: Any,
    *,
    rng: Rng,
) -> Any:
    """Run the client half of ``stage`` on ``client``.

    ``client`` is the client's session for the round, or a bare client for
    a one-stage exchange.

    Raises
    ------
    ProtocolError
        If the stage is unknown or the message does not fit it.
    """
    handler = _CLIENT_STAGES.get(stage)
    if handler is None:
        raise ProtocolError(
            f"unknown stage {stage!r}; known stages: {sorted(_CLIENT_STAGES)}"
        )
    session = client if isinstance(client, ClientSession) else ClientSession("", client)
    return handler(session, message, rng)
