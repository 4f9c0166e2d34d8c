"""Strategies: client sampling, aggregation and the server optimizer, assembled."""

from fedshield.strategies.base import RoundPlan, Strategy
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

__all__ = [
    "ClientSampler",
    "CountSampler",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "FractionSampler",
    "RoundPlan",
    "Scaffold",
    "ServerOptimizer",
    "ServerSgd",
    "Strategy",
]
