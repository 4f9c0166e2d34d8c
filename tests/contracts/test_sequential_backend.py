from __future__ import annotations

from fedshield.simulation import SequentialBackend

from .backend_contract import BackendContract


class TestSequentialBackend(BackendContract):
    @classmethod
    def make_backend(cls) -> SequentialBackend:
        return SequentialBackend()
