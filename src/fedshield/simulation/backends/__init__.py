"""Backends that run protocol stages on clients.

``SequentialBackend`` is the reference; ``VectorisedBackend`` trains many
clients of one model in lockstep; ``ProcessPoolBackend`` runs clients in
worker processes; ``RayBackend`` (``pip install 'fedshield[ray]'``) on a Ray
cluster (imported only when used: ``from fedshield.simulation.backends.ray
import RayBackend``). All pass the same contract test suite.
"""

from fedshield.core.registry import Registry
from fedshield.simulation.backends.base import Backend, ClientFn
from fedshield.simulation.backends.process import ProcessPoolBackend
from fedshield.simulation.backends.sequential import SequentialBackend, run_client_stage
from fedshield.simulation.backends.vectorised import VectorisedBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "ClientFn",
    "ProcessPoolBackend",
    "SequentialBackend",
    "VectorisedBackend",
    "run_client_stage",
]

BACKENDS: Registry[str | None] = Registry("backend", "run.backend")
"""The backends by name: what ``run.backend`` and ``--backend`` accept.

Each value is where the backend's class lives (``"module:Class"``; None for
``auto``, which picks another); :func:`fedshield.api.backends.make_backend`
builds them."""
BACKENDS.add(
    "auto",
    None,
    "vectorised when the model and the run allow it, else sequential",
)
BACKENDS.add(
    "sequential",
    "fedshield.simulation.backends.sequential:SequentialBackend",
    "one client after the other, in this process (the reference)",
)
BACKENDS.add(
    "vectorised",
    "fedshield.simulation.backends.vectorised:VectorisedBackend",
    "many clients of one model trained in lockstep (torch.func.vmap), in this process",
)
BACKENDS.add(
    "process",
    "fedshield.simulation.backends.process:ProcessPoolBackend",
    "clients in worker processes (run.workers of them)",
)
BACKENDS.add(
    "ray",
    "fedshield.simulation.backends.ray:RayBackend",
    "clients on a Ray cluster (pip install 'fedshield[ray]')",
)
