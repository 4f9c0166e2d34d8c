"""fedshield: federated learning that protects privacy and proves it.

The public API is imported lazily, so ``import fedshield`` is cheap and the
command line starts fast; torch loads only when a model is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedshield._version import __version__

_EXPORTS: dict[str, str] = {
    # core
    "Params": "fedshield.core",
    "ParamSpec": "fedshield.core",
    "ClientUpdate": "fedshield.core",
    "ServerState": "fedshield.core",
    "Aggregate": "fedshield.core",
    "Aggregator": "fedshield.core",
    "WeightedMean": "fedshield.core",
    "Client": "fedshield.core",
    "FitConfig": "fedshield.core",
    "EvalConfig": "fedshield.core",
    # api
    "fedavg": "fedshield.api",
    "FederatedProcess": "fedshield.api",
    "simulate": "fedshield.api",
    "ExperimentConfig": "fedshield.api",
    "load_config": "fedshield.api",
    # errors
    "FedShieldError": "fedshield.errors",
    "ConfigError": "fedshield.errors",
}

__all__ = [
    "Aggregate",
    "Aggregator",
    "Client",
    "ClientUpdate",
    "ConfigError",
    "EvalConfig",
    "ExperimentConfig",
    "FedShieldError",
    "FederatedProcess",
    "FitConfig",
    "ParamSpec",
    "Params",
    "ServerState",
    "WeightedMean",
    "__version__",
    "fedavg",
    "load_config",
    "simulate",
]

if TYPE_CHECKING:
    from fedshield.api import (
        ExperimentConfig,
        FederatedProcess,
        fedavg,
        load_config,
        simulate,
    )
    from fedshield.core import (
        Aggregate,
        Aggregator,
        Client,
        ClientUpdate,
        EvalConfig,
        FitConfig,
        Params,
        ParamSpec,
        ServerState,
        WeightedMean,
    )
    from fedshield.errors import ConfigError, FedShieldError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedshield' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
