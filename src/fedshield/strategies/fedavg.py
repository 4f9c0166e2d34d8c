"""Federated averaging (McMahan et al., AISTATS 2017)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedshield.core import (
    Aggregate,
    Aggregator,
    ClientId,
    ClientUpdate,
    FitConfig,
    Params,
    ServerState,
    WeightedMean,
)
from fedshield.errors import ConfigError
from fedshield.strategies.base import RoundPlan
from fedshield.strategies.sampling import ClientSampler, FractionSampler
from fedshield.strategies.server_opt import ServerOptimizer, ServerSgd

__all__ = ["FedAvg"]


@dataclass(frozen=True)
class FedAvg:
    """FedAvg, assembled from a sampler, an aggregator and a server optimizer.

    Each round samples clients, each trains locally from the global model and
    returns ``Δ_k = θ_k − θ``; the server computes ``Δ = Σ_k n_k Δ_k / Σ_k n_k``
    and sets ``θ ← θ + server_lr · Δ``. With ``server_lr = 1`` this is exactly
    ``θ ← Σ_k (n_k / n) θ_k``.

    Parameters
    ----------
    sampler
        Which clients take part (default: all of them).
    aggregator
        How updates combine (default: :class:`~fedshield.core.WeightedMean`).
    server_opt
        How the aggregate moves the model (default: SGD with ``server_lr = 1``).
    local
        Local-training settings sent to clients (``round_idx`` is filled in).
    min_clients
        Fewest successful updates for a round to count.
    weighted
        Weight updates by ``num_examples`` (FedAvg) or equally.
    """

    sampler: ClientSampler = field(default_factory=lambda: FractionSampler(1.0))
    aggregator: Aggregator = field(default_factory=WeightedMean)
    server_opt: ServerOptimizer = field(default_factory=lambda: ServerSgd(1.0))
    local: FitConfig = field(default_factory=lambda: FitConfig(round_idx=0))
    min_clients: int = 1
    weighted: bool = True
    round_aggregator: Callable[[ServerState], Aggregator] | None = None
    """Builds each round's aggregation rule from the state (FLTrust needs the
    server's own update on its root data at the current model); None: the
    fixed ``aggregator``."""

    is_stateful = False
    """FedAvg's clients keep no state between rounds."""

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ConfigError(f"`min_clients` must be >= 1; got {self.min_clients}")

    def init(self, params: Params) -> ServerState:
        """State before round 0, with the optimizer's initial buffers."""
        return ServerState(
            round_idx=0,
            params=params,
            optimizer_state=dict(self.server_opt.init(params)),
        )

    def check(self, num_available: int) -> None:
        """Refuse a setup whose rounds could never reach ``min_clients``.

        Raises
        ------
        ConfigError
            If fewer clients are available, or sampled per round, than
            ``min_clients``, or the aggregator's own requirement (a robust
            rule's n > 2f + 2, ...) fails for the clients sampled per round.
        """
        if num_available < self.min_clients:
            raise ConfigError(
                f"`min_clients` is {self.min_clients} but only {num_available} "
                "clients are available; lower min_clients or add clients"
            )
        sampled = self.sampler.expected_count(num_available)
        if sampled < self.min_clients:
            raise ConfigError(
                f"`min_clients` is {self.min_clients} but each round samples only "
                f"{sampled} of {num_available} clients; raise the fraction or "
                "clients_per_round, or lower min_clients"
            )
        # A robust rule's own requirement (Krum: n > 2f + 2, ...), for the
        # round's expected number of updates.
        rule_check = getattr(self.aggregator, "check", None)
        if callable(rule_check):
            rule_check(sampled)

    def configure(
        self,
        state: ServerState,
        available: Sequence[ClientId],
        *,
        rng: np.random.Generator,
    ) -> RoundPlan:
        """Sample this round's clients.

        Raises
        ------
        ConfigError
            If fewer clients are available than ``min_clients``.
        """
        self.check(len(available))
        clients = self.sampler.sample(available, round_idx=state.round_idx, rng=rng)
        return RoundPlan(
            round_idx=state.round_idx,
            clients=tuple(clients),
            fit_config=replace(self.local, round_idx=state.round_idx),
            min_clients=self.min_clients,
            num_available=len(available),
            aggregator=(
                self.round_aggregator(state) if self.round_aggregator else None
            ),
        )

    def weight(self, update: ClientUpdate) -> float:
        """``num_examples`` when weighted, else 1."""
        return float(update.num_examples) if self.weighted else 1.0

    def apply(
        self,
        state: ServerState,
        aggregate: Aggregate,
        *,
        plan: RoundPlan,
        rng: np.random.Generator,
    ) -> ServerState:
        """Apply the server optimizer and advance the round."""
        params, opt_state = self.server_opt.step(
            state.params, aggregate.delta, state.optimizer_state
        )
        return state.evolve(
            round_idx=state.round_idx + 1,
            params=params,
            optimizer_state=dict(opt_state),
        )
