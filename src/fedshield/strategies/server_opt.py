"""Server optimizers: how the aggregated update moves the global model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from fedshield.core import Params
from fedshield.errors import ConfigError

__all__ = ["ServerOptimizer", "ServerSgd"]


class ServerOptimizer(Protocol):
    """Applies an aggregated client update to the global parameters.

    State (momentum, moments) lives in ``ServerState.optimizer_state`` so it
    is checkpointed with the model.
    """

    def init(self, params: Params) -> Mapping[str, Params]:
        """Initial optimizer state for ``params``."""

    def step(
        self, params: Params, delta: Params, state: Mapping[str, Params]
    ) -> tuple[Params, Mapping[str, Params]]:
        """Return new parameters and optimizer state."""


@dataclass(frozen=True, slots=True)
class ServerSgd:
    """Plain server SGD on the pseudo-gradient: ``θ ← θ + server_lr · Δ``.

    With ``server_lr = 1`` and a weighted mean of deltas this is FedAvg
    (McMahan et al., AISTATS 2017, Algorithm 1).

    Examples
    --------
    >>> from fedshield.core import Params
    >>> opt = ServerSgd(server_lr=0.5)
    >>> new, _ = opt.step(Params({"w": [1.0]}), Params({"w": [2.0]}), {})
    >>> new["w"].tolist()
    [2.0]
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ConfigError(f"`server_lr` must be > 0; got {self.server_lr}")

    def init(self, params: Params) -> Mapping[str, Params]:
        """No state."""
        return {}

    def step(
        self, params: Params, delta: Params, state: Mapping[str, Params]
    ) -> tuple[Params, Mapping[str, Params]]:
        """Move ``params`` by ``server_lr × delta``."""
        if self.server_lr == 1.0:
            return params + delta, state
        return params + delta * self.server_lr, state
