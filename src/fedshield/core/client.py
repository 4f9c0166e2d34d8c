"""The client interface and what the server tells a client to do."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from fedshield.core.params import Params
from fedshield.core.update import ClientUpdate

__all__ = [
    "CLIENT_CONTROL",
    "CONTROL_DELTA",
    "SCAFFOLD",
    "SERVER_CONTROL",
    "Client",
    "EvalConfig",
    "FitConfig",
]

# Names shared by the SCAFFOLD strategy and the clients that run it.
SCAFFOLD = "scaffold"
"""``FitConfig.options`` flag: run SCAFFOLD's local algorithm."""
SERVER_CONTROL = "scaffold/c"
"""``FitConfig.tensors`` key of the server control variate ``c``."""
CLIENT_CONTROL = "scaffold/c_i"
"""``FitConfig.state`` and ``ClientUpdate.state`` key of the client's ``c_i``."""
CONTROL_DELTA = "scaffold/delta_c"
"""``ClientUpdate.extras`` key of the client's ``c_i+ - c_i``."""


@dataclass(frozen=True, slots=True)
class FitConfig:
    """Instructions for one round of local training.

    Parameters
    ----------
    round_idx
        The round (0-based).
    epochs
        Passes over the local training data.
    batch_size
        Mini-batch size.
    lr
        Client learning rate.
    momentum
        SGD momentum.
    weight_decay
        L2 weight decay.
    options
        Strategy-specific values (for example a proximal ``mu``).
    tensors
        Strategy-specific tensors broadcast to every client (SCAFFOLD's
        server control variate ``"scaffold/c"``).
    state
        This client's own persistent state from its previous rounds
        (SCAFFOLD's client control variate ``"scaffold/c_i"``); empty the first
        time. Simulations keep it in a client state store; a real client keeps
        it on its own disk.
    """

    round_idx: int
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    options: Mapping[str, float | int | str | bool] = field(default_factory=dict)
    tensors: Mapping[str, Params] = field(default_factory=dict)
    state: Mapping[str, Params] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """Instructions for evaluating the global model on a client's local test data."""

    round_idx: int
    batch_size: int = 256


@runtime_checkable
class Client(Protocol):
    """A participant. It never knows whether it runs in-process, on Ray or over gRPC."""

    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        """Train locally from ``params``; return the update (new − old)."""

    def evaluate(self, params: Params, config: EvalConfig) -> Mapping[str, float]:
        """Evaluate ``params`` on local test data.

        Returns metrics including ``"num_examples"``.
        """
