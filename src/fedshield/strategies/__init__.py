"""Strategies: client sampling, aggregation and the server optimizer, assembled.

The differentially private strategy (:mod:`fedshield.strategies.dp`) loads on
first use: it imports the accountant (``dp-accounting``), which a run without
``[privacy]`` never needs.
"""

from typing import Any

from fedshield.strategies.base import PrivateRelease, RoundPlan, Strategy
from fedshield.strategies.fedavg import FedAvg
from fedshield.strategies.sampling import ClientSampler, CountSampler, FractionSampler
from fedshield.strategies.scaffold import Scaffold
from fedshield.strategies.server_opt import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    ServerSgd,
)

_LAZY = {
    "Bulyan": "fedshield.strategies.robust",
    "CoordinateMedian": "fedshield.strategies.robust",
    "FLTrust": "fedshield.strategies.robust",
    "GeometricMedian": "fedshield.strategies.robust",
    "Krum": "fedshield.strategies.robust",
    "NormBound": "fedshield.strategies.robust",
    "TrimmedMean": "fedshield.strategies.robust",
    "make_robust": "fedshield.strategies.robust",
    "DpFedAvg": "fedshield.strategies.dp",
    "DpMean": "fedshield.strategies.dp",
    "PoissonSampler": "fedshield.strategies.dp",
    "PrivacySettings": "fedshield.strategies.dp",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Bulyan",
    "ClientSampler",
    "CoordinateMedian",
    "CountSampler",
    "DpFedAvg",
    "DpMean",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FLTrust",
    "FedYogi",
    "FractionSampler",
    "GeometricMedian",
    "Krum",
    "NormBound",
    "PoissonSampler",
    "PrivacySettings",
    "PrivateRelease",
    "RoundPlan",
    "Scaffold",
    "ServerOptimizer",
    "ServerSgd",
    "Strategy",
    "TrimmedMean",
    "make_robust",
]
