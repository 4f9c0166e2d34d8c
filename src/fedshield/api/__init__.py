"""The high-level API: the iterative process and configured simulations."""

from fedshield.api.config import ExperimentConfig, load_config, parse_config
from fedshield.api.experiment import Federation, build_federation, build_strategy
from fedshield.api.process import ClientData, FederatedProcess, fedavg
from fedshield.api.run import config_fingerprint, simulate

__all__ = [
    "ClientData",
    "ExperimentConfig",
    "FederatedProcess",
    "Federation",
    "build_federation",
    "build_strategy",
    "config_fingerprint",
    "fedavg",
    "load_config",
    "parse_config",
    "simulate",
]
