"""Core data types: parameters, updates, server state, aggregation, randomness.

This layer depends on numpy only (and on SciPy's BLAS binding when present);
it never imports torch, networking or cryptography.
"""

from fedshield.core.aggregate import (
    Accumulator,
    Aggregate,
    Aggregator,
    WeightedMean,
    aggregate,
)
from fedshield.core.client import Client, EvalConfig, FitConfig
from fedshield.core.params import Params, ParamSpec
from fedshield.core.rng import derive_rng, derive_seed
from fedshield.core.state import ServerState
from fedshield.core.update import (
    ClientId,
    ClientUpdate,
    metric_problems,
    validate_update,
)

__all__ = [
    "Accumulator",
    "Aggregate",
    "Aggregator",
    "Client",
    "ClientId",
    "ClientUpdate",
    "EvalConfig",
    "FitConfig",
    "ParamSpec",
    "Params",
    "ServerState",
    "WeightedMean",
    "aggregate",
    "metric_problems",
    "derive_rng",
    "derive_seed",
    "validate_update",
]
