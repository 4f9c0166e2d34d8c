"""Backends that run protocol stages on clients.

``SequentialBackend`` is the reference; ``VectorisedBackend`` trains many
clients of one model in lockstep; ``ProcessPoolBackend`` runs clients in
worker processes; ``RayBackend`` (``pip install 'fedshield[ray]'``) on a Ray
cluster (imported only when used: ``from fedshield.simulation.backends.ray
import RayBackend``). All pass the same contract test suite.
"""

from fedshield.simulation.backends.base import Backend, ClientFn
from fedshield.simulation.backends.process import ProcessPoolBackend
from fedshield.simulation.backends.sequential import SequentialBackend, run_client_stage
from fedshield.simulation.backends.vectorised import VectorisedBackend

__all__ = [
    "Backend",
    "ClientFn",
    "ProcessPoolBackend",
    "SequentialBackend",
    "VectorisedBackend",
    "run_client_stage",
]
