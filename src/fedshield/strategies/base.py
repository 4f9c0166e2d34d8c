"""The strategy interface: what the server decides in each round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedshield.core import (
    Aggregate,
    Aggregator,
    ClientId,
    ClientUpdate,
    FitConfig,
    Params,
    ServerState,
)

__all__ = ["PrivateRelease", "RoundPlan", "Strategy"]


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """Who trains in a round and how.

    Parameters
    ----------
    round_idx
        The round (0-based).
    clients
        The sampled clients.
    fit_config
        Local-training instructions sent to every sampled client.
    min_clients
        Fewest successful updates for the round to count.
    num_available
        How many clients were available to sample from.
    is_stateful
        Whether clients keep state across rounds (sent in
        ``FitConfig.state``, returned in ``ClientUpdate.state``).
    aggregator
        This round's aggregation rule, when the strategy builds one per
        round (DP-FedAvg's clip norm changes between rounds); None: the
        strategy's ``aggregator``.
    """

    round_idx: int
    clients: tuple[ClientId, ...]
    fit_config: FitConfig
    min_clients: int
    num_available: int = 0
    is_stateful: bool = False
    aggregator: Aggregator | None = None


class Strategy(Protocol):
    """Sampler + aggregator + server optimizer, assembled.

    The round loop calls :meth:`configure`, streams each validated update
    into ``aggregator`` with :meth:`weight`, then calls :meth:`apply`.
    """

    @property
    def aggregator(self) -> Aggregator:
        """How updates are combined."""

    @property
    def is_stateful(self) -> bool:
        """Whether clients keep state between rounds (needs a state store)."""

    def init(self, params: Params) -> ServerState:
        """State before round 0."""

    def configure(
        self,
        state: ServerState,
        available: Sequence[ClientId],
        *,
        rng: np.random.Generator,
    ) -> RoundPlan:
        """Plan round ``state.round_idx`` over the ``available`` clients."""

    def weight(self, update: ClientUpdate) -> float:
        """Aggregation weight of a (validated) update."""

    def apply(
        self,
        state: ServerState,
        aggregate: Aggregate,
        *,
        plan: RoundPlan,
        rng: np.random.Generator,
    ) -> ServerState:
        """Return the state after the round (``round_idx`` advanced by one)."""


@runtime_checkable
class PrivateRelease(Protocol):
    """A strategy whose outputs must stay within a privacy guarantee.

    DP-FedAvg (:class:`~fedshield.strategies.dp.DpFedAvg`): the round loop
    writes only what :meth:`released` keeps of a round's metrics, a round
    that ends without an update still costs what it spent
    (:meth:`charge_unfinished`), and a round is checkpointed charged
    (:meth:`charge_before`) before its clients train.
    """

    def released(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The part of a round's server-side metrics that may leave the server."""

    def charge_before(self, state: ServerState, plan: RoundPlan) -> ServerState:
        """``state`` with (at least) the privacy cost of ``plan``'s round recorded.

        Before the round's clients train: the round loop checkpoints it, so
        that a run stopped inside the round resumes charged for it. The
        parameters and round index are ``state``'s.
        """

    def charge_unfinished(self, state: ServerState, plan: RoundPlan) -> ServerState:
        """``state`` with the privacy cost of ``plan``'s round recorded.

        For a round that aborted (below ``min_clients``, or secure
        aggregation below its threshold) after its clients may have
        released something: the parameters are ``state``'s.
        """
