from __future__ import annotations

from fedshield.simulation import VectorisedBackend

from .backend_contract import BackendContract


class TestVectorisedBackend(BackendContract):
    # Lockstep training sums in another order than one client at a time.
    real_model_rtol = 1e-4

    @classmethod
    def make_backend(cls) -> VectorisedBackend:
        return VectorisedBackend(max_batch_clients=3)
