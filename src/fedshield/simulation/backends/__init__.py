"""Backends that run protocol stages on clients."""

from fedshield.simulation.backends.base import Backend, ClientFn
from fedshield.simulation.backends.sequential import SequentialBackend, run_client_stage

__all__ = ["Backend", "ClientFn", "SequentialBackend", "run_client_stage"]
