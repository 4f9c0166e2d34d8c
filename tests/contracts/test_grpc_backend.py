"""The backend contract over gRPC: a real server and sites on 127.0.0.1.

Every stage goes through :class:`~fedshield.transport.backend.GrpcBackend`,
the Fleet server and one site per client (threads of this process, each
with its own gRPC channel), and must give the sequential backend's replies
bit for bit.
"""

from __future__ import annotations

import pytest

from fedshield.transport.loopback import LoopbackBackend

from .backend_contract import BackendContract, collect, evaluate_request
from .fakes import FakeClients

pytestmark = pytest.mark.grpc

SITES = (*(str(i) for i in range(16)), "99")


class TestGrpcBackend(BackendContract):
    @classmethod
    def make_backend(cls) -> LoopbackBackend:
        return LoopbackBackend(SITES, poll_s=2.0)

    def test_slow_client_times_out(self, backend):
        # Sites in threads of one process run one at a time here (they share
        # the model): a slow site would hold up the others. The contract's
        # case runs below on sites that run in parallel, as real ones do.
        pytest.skip("see test_slow_site_times_out_and_the_others_reply")


def test_slow_site_times_out_and_the_others_reply():
    with_parallel_sites = LoopbackBackend(SITES, poll_s=2.0, serial=False)
    try:
        # The sites connect first (a stage without a deadline), as a run's do.
        collect(
            with_parallel_sites,
            evaluate_request(["0", "1", "2", "3"], round_idx=9),
            FakeClients(4),
        )
        BackendContract.test_slow_client_times_out(None, with_parallel_sites)
    finally:
        with_parallel_sites.close()
