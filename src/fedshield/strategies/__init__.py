"""Strategies: client sampling, aggregation and the server optimizer, assembled."""

from fedshield.strategies.base import RoundPlan, Strategy
from fedshield.strategies.fedavg import FedAvg
from fedshield.strategies.sampling import ClientSampler, CountSampler, FractionSampler
from fedshield.strategies.server_opt import ServerOptimizer, ServerSgd

__all__ = [
    "ClientSampler",
    "CountSampler",
    "FedAvg",
    "FractionSampler",
    "RoundPlan",
    "ServerOptimizer",
    "ServerSgd",
    "Strategy",
]
