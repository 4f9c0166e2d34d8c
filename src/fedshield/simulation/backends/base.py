"""The backend interface: something that runs one protocol stage on clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from fedshield.core import Client, ClientId
from fedshield.simulation.protocol import StageReply, StageRequest

__all__ = ["Backend", "ClientFn"]

ClientFn = Callable[[ClientId], Client]
"""Builds a client from its id, lazily, when it is first asked in a round."""


class Backend(Protocol):
    """Runs the client half of a stage and returns the replies.

    Every backend derives each client's randomness from ``(seed, stage,
    round_idx, client_id)``, so all backends give the same result for the same
    seed; failures and timeouts come back as :class:`StageReply` failures,
    never as exceptions.
    """

    def run_stage(
        self, request: StageRequest, *, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        """Run ``request`` and yield one reply per client asked."""

    def end_round(self) -> None:
        """Forget the clients built for the round that just ended."""

    def close(self) -> None:
        """Release workers and resources."""
