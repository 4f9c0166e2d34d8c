"""A real Fleet server and real sites on 127.0.0.1, in one process.

:class:`LoopbackBackend` is a :class:`~fedshield.simulation.backends.base.
Backend` for tests and benchmarks: each ``run_stage`` goes through a
:class:`~fedshield.transport.backend.GrpcBackend`, a gRPC server on a port
the OS picks, and one :class:`~fedshield.transport.site.SiteClient` per
client, each in its own thread, that pulls its task over gRPC, runs it with
the ``client_fn`` of the call and pushes its reply. Everything but the
processes is what a deployment runs: the wire codec, the tasks' stage
seeds, long polls, chunked transfers, the store, signatures and (with
``ca_dir``) mutual TLS. The backend contract suite runs against it.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedshield.simulation.backends.base import ClientFn
from fedshield.simulation.protocol import StageReply, StageRequest
from fedshield.transport.backend import GrpcBackend, Mailbox
from fedshield.transport.server import FleetServer, ServerSettings
from fedshield.transport.site import SiteClient, SiteSetup
from fedshield.transport.store import ServerStore

__all__ = ["LoopbackBackend"]

logger = logging.getLogger(__name__)


class LoopbackBackend:
    """Stages carried to in-process sites over gRPC on 127.0.0.1.

    Parameters
    ----------
    sites
        Every client id that may be asked (the server's roster).
    identities
        Site name → :class:`~fedshield.transport.auth.Identity` for mutual
        TLS with ``ca_dir``; None: insecure loopback.
    ca_dir
        The federation CA (with ``identities``).
    chunk_bytes, poll_s, heartbeat_s
        As ``[network]`` says.
    fresh_store
        A new store for every stage (the contract suite asks the same round
        and stage many times with other messages, which one run never does).
    serial
        Run one site's stage at a time: sites in threads of one process
        share its model objects (a PyTorch module is not safe to train from
        two threads). False for clients that are.
    """

    def __init__(
        self,
        sites: Sequence[str],
        *,
        identities: dict[str, Any] | None = None,
        ca_dir: Path | None = None,
        chunk_bytes: int = 1 << 20,
        poll_s: float = 5.0,
        heartbeat_s: float = 1.0,
        fresh_store: bool = True,
        state_dir: Path | None = None,
        serial: bool = True,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fedshield-loopback-")
        self._root = Path(state_dir) if state_dir else Path(self._tmp.name)
        self._count = itertools.count()
        self._fresh = fresh_store
        store = ServerStore(self._root / "state-0")
        self.mailbox = Mailbox(store, offline_after_s=max(3 * heartbeat_s, 3.0))
        settings = ServerSettings(
            listen="127.0.0.1:0",
            sites=tuple(sites),
            run_id="loopback",
            plan_json=b'{"config": {}}',
            ca_dir=ca_dir,
            poll_s=poll_s,
            heartbeat_s=heartbeat_s,
            chunk_bytes=chunk_bytes,
        )
        self.server = FleetServer(settings, self.mailbox)
        self.port = self.server.start()
        self.backend = GrpcBackend(self.mailbox, store)
        self._identities = identities
        self._client_fn: ClientFn | None = None
        self._sites: dict[str, tuple[SiteClient, threading.Thread]] = {}
        self.errors: dict[str, BaseException] = {}
        # The sites share this process's model objects: one stage at a time
        # (serial=False: for clients that are safe to run in parallel).
        self._run_lock: Any = threading.Lock() if serial else None

    def _client(self, name: str) -> Any:
        assert self._client_fn is not None
        return self._client_fn(name)

    def _ensure_sites(self, ids: Sequence[str]) -> None:
        for name in ids:
            if name in self._sites:
                continue
            identity = self._identities.get(name) if self._identities else None
            site = SiteClient(
                f"127.0.0.1:{self.port}",
                identity,
                lambda plan: SiteSetup(self._client),
                insecure=identity is None,
                name=name,
                connect_timeout_s=30,
                run_lock=self._run_lock,
            )
            thread = threading.Thread(
                target=self._run_site,
                args=(name, site),
                name=f"site-{name}",
                daemon=True,
            )
            self._sites[name] = (site, thread)
            thread.start()

    def _run_site(self, name: str, site: SiteClient) -> None:
        try:
            site.run()
        except BaseException as err:  # reported by the test that needs it
            logger.warning("site %s stopped: %s", name, err)
            self.errors[name] = err
        finally:
            site.close()

    def run_stage(
        self, request: StageRequest, *, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        """Carry ``request`` to the sites over gRPC; yield their replies."""
        self._client_fn = client_fn
        if self._fresh:
            store = ServerStore(self._root / f"state-{next(self._count) + 1}")
            self.mailbox.store = store
            self.backend.store = store
        self._ensure_sites(list(request.messages))
        yield from self.backend.run_stage(request, client_fn=client_fn, seed=seed)

    def end_round(self) -> None:
        """Tell the sites to drop their clients.

        A real site does so at the next round's first task.
        """
        for site, _ in self._sites.values():
            site.forget_sessions()

    def close(self) -> None:
        """Finish the run (the sites' polls hear it), stop the server."""
        self.backend.close()
        for _, thread in self._sites.values():
            thread.join(timeout=10)
        self.server.stop(grace_s=0.5)
        self._tmp.cleanup()
