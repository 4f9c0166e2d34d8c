"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., ICML 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedshield.core import (
    Aggregate,
    Aggregator,
    ClientId,
    ClientUpdate,
    Params,
    ServerState,
)
from fedshield.core.client import CONTROL_DELTA, SCAFFOLD, SERVER_CONTROL
from fedshield.errors import ConfigError
from fedshield.strategies.base import RoundPlan
from fedshield.strategies.fedavg import FedAvg

__all__ = ["Scaffold"]


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD, as FedAvg's parts plus control variates.

    Each client corrects every local gradient by ``c - c_i`` (server and
    client control variates), which removes the client drift that non-IID
    data causes in FedAvg. After training, client ``i`` sets
    ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (option II) and sends
    ``c_i+ - c_i``; the server moves ``x`` with its optimizer on the mean of
    the deltas and sets ``c <- c + (|S| / N) mean(c_i+ - c_i)``.

    Parameters
    ----------
    fedavg
        Sampler, aggregator, server optimizer and local training settings.

    Notes
    -----
    The server control variate lives in ``ServerState.optimizer_state``
    (``"scaffold/c"``); each client's ``c_i`` is client state (a client state
    store in simulation), checkpointed with the run. ``N`` is the number of
    clients available in the round. Reference: Karimireddy et al.,
    "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    ICML 2020, Algorithm 1.
    """

    fedavg: FedAvg = field(default_factory=FedAvg)

    is_stateful = True
    """Each client keeps its control variate ``c_i`` between rounds."""

    @property
    def aggregator(self) -> Aggregator:
        """The inner FedAvg's aggregator."""
        return self.fedavg.aggregator

    @property
    def min_clients(self) -> int:
        """Fewest valid updates for a round to count."""
        return self.fedavg.min_clients

    def check(self, num_available: int) -> None:
        """See :meth:`FedAvg.check`."""
        self.fedavg.check(num_available)

    def init(self, params: Params) -> ServerState:
        """FedAvg's state plus ``c = 0``."""
        state = self.fedavg.init(params)
        opt = dict(state.optimizer_state)
        opt[SERVER_CONTROL] = Params.zeros(params.spec)
        return state.evolve(optimizer_state=opt)

    def configure(
        self,
        state: ServerState,
        available: Sequence[ClientId],
        *,
        rng: np.random.Generator,
    ) -> RoundPlan:
        """FedAvg's plan, with ``c`` broadcast and client state kept."""
        plan = self.fedavg.configure(state, available, rng=rng)
        try:
            c = state.optimizer_state[SERVER_CONTROL]
        except KeyError:
            raise ConfigError(
                "this server state has no SCAFFOLD control variate; it was not "
                "initialised by Scaffold.init"
            ) from None
        config = replace(
            plan.fit_config,
            options={**plan.fit_config.options, SCAFFOLD: True},
            tensors={**plan.fit_config.tensors, SERVER_CONTROL: c},
        )
        return replace(plan, fit_config=config, is_stateful=True)

    def weight(self, update: ClientUpdate) -> float:
        """See :meth:`FedAvg.weight`."""
        return self.fedavg.weight(update)

    def apply(
        self,
        state: ServerState,
        aggregate: Aggregate,
        *,
        plan: RoundPlan,
        rng: np.random.Generator,
    ) -> ServerState:
        """Server step on the model, then ``c <- c + (|S|/N) mean(delta c)``."""
        control = state.optimizer_state[SERVER_CONTROL]
        inner = state.evolve(
            optimizer_state={
                k: v for k, v in state.optimizer_state.items() if k != SERVER_CONTROL
            }
        )
        new = self.fedavg.apply(inner, aggregate, plan=plan, rng=rng)
        delta_c = aggregate.extras.get(CONTROL_DELTA)
        if delta_c is not None:
            share = aggregate.num_updates / max(plan.num_available, 1)
            control = control + delta_c * share
        opt = dict(new.optimizer_state)
        opt[SERVER_CONTROL] = control
        return new.evolve(optimizer_state=opt)
