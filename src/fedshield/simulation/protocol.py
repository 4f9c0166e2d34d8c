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

from fedshield.core import Client, ClientId, EvalConfig, FitConfig, Params
from fedshield.errors import ProtocolError

__all__ = [
    "ClientFailure",
    "EvaluateIns",
    "FailureKind",
    "FitIns",
    "RoundProtocol",
    "StageReply",
    "StageRequest",
    "execute_stage",
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
class FitIns:
    """Stage ``"fit"``: train from ``params`` as ``config`` says."""

    params: Params
    config: FitConfig


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


def _run_fit(client: Client, message: Any, rng: np.random.Generator) -> Any:
    if not isinstance(message, FitIns):
        raise ProtocolError(f"stage 'fit' expects FitIns; got {type(message).__name__}")
    return client.fit(message.params, message.config, rng)


def _run_evaluate(client: Client, message: Any, rng: np.random.Generator) -> Any:
    if not isinstance(message, EvaluateIns):
        raise ProtocolError(
            f"stage 'evaluate' expects EvaluateIns; got {type(message).__name__}"
        )
    return dict(client.evaluate(message.params, message.config))


_CLIENT_STAGES: dict[str, Callable[[Client, Any, np.random.Generator], Any]] = {
    "fit": _run_fit,
    "evaluate": _run_evaluate,
}


def execute_stage(
    client: Client, stage: str, message: Any, *, rng: np.random.Generator
) -> Any:
    """Run the client half of ``stage`` on ``client``.

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
    return handler(client, message, rng)
