"""Secure aggregation's client halves on other cores, in a simulation.

In a simulated round every client's :class:`~fedshield.secagg.protocol.
SecAggClient` would run in the simulating process, one after another. A
:class:`HalfWorkers` pool moves some of them to worker processes (started
once per simulation, ``spawn``), as real clients would run on their own
machines: a worker builds and keeps its clients' halves, so their secrets
(key pairs, masks, shares) never leave it, and only the protocol's byte
messages and each client's encoded input cross the pipe. Each stage the
simulating process sends every worker its clients' requests, answers its
own clients meanwhile, then collects the workers' replies and hands every
reply to the server as it arrives.

A worker that dies or stops answering is a failure the protocol already
survives: its clients are counted as dropped from that stage on (the round
completes if enough others remain), and the pool starts a fresh worker for
the next round.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from fedshield.secagg.protocol import SecAggConfig

__all__ = ["AUTO_MIN_CLIENTS", "HalfWorkers", "auto_workers", "shared_workers"]

logger = logging.getLogger(__name__)

AUTO_MIN_CLIENTS = 32
"""``workers = auto`` uses another core from this many clients in a round
(below it a round costs a few milliseconds and the hand-over would not pay)."""

STAGE_TIMEOUT_S = 600.0
"""How long a worker may take to answer one stage before it counts as failed."""


def auto_workers(num_clients: int) -> int:
    """Worker processes for ``[secagg] workers = auto``: one if cores allow."""
    cores = os.cpu_count() or 1
    return 1 if cores >= 2 and num_clients >= AUTO_MIN_CLIENTS else 0


def _serve(conn: Connection) -> None:  # pragma: no cover - runs in the worker
    """A worker's loop: hold some clients' halves and answer their requests."""
    from fedshield.errors import FedShieldError
    from fedshield.secagg import crypto
    from fedshield.secagg.protocol import SecAggClient

    config: SecAggConfig | None = None
    round_idx = 0
    inputs: dict[str, np.ndarray] = {}
    signing: dict[str, crypto.SigningKey] = {}
    halves: dict[str, SecAggClient] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        try:
            if kind == "round":
                _, config, round_idx, inputs, malicious = message
                signing = (
                    {cid: crypto.generate_signing_key() for cid in inputs}
                    if malicious
                    else {}
                )
                halves = {}
                conn.send({cid: key.public for cid, key in signing.items()})
            elif kind == "start":
                _, verify = message
                assert config is not None
                halves = {}
                for cid, vector in inputs.items():
                    half = SecAggClient(
                        config,
                        round_idx,
                        cid,
                        signing_key=signing.get(cid),
                        verify_keys=verify,
                        idempotent=False,  # the pipe never retransmits
                    )
                    half.set_input(vector)
                    halves[cid] = half
                inputs = {}
                conn.send(None)
            elif kind == "stage":
                _, requests = message
                replies: dict[str, bytes | str] = {}
                for cid, request in requests.items():
                    try:
                        replies[cid] = halves[cid].handle(request)
                    except FedShieldError as err:  # refused: reported, not sent
                        replies[cid] = str(err)
                conn.send(replies)
            else:
                conn.send(f"unknown message {kind!r}")
        except Exception as err:  # reported to the parent
            conn.send(f"worker failed: {type(err).__name__}: {err}")


class _Worker:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        self.conn: Connection = ours
        self.process: BaseProcess = ctx.Process(
            target=_serve, args=(theirs,), daemon=True, name="fedshield-secagg-half"
        )
        self.process.start()
        theirs.close()
        self.clients: list[str] = []
        self.alive = True

    def ask(self, message: tuple[Any, ...]) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError) as err:
            self._fail(f"could not be sent to: {err}")

    def answer(self) -> Any:
        if not self.alive:
            return None
        try:
            if not self.conn.poll(STAGE_TIMEOUT_S):
                self._fail(f"did not answer within {STAGE_TIMEOUT_S:g} s")
                return None
            reply = self.conn.recv()
        except (EOFError, OSError) as err:
            self._fail(f"died ({type(err).__name__})")
            return None
        if isinstance(reply, str) and reply.startswith("worker failed"):
            self._fail(reply)
            return None
        return reply

    def _fail(self, why: str) -> None:
        if self.alive:
            logger.warning(
                "secure aggregation worker %s %s; its %d clients count as dropped",
                self.process.name,
                why,
                len(self.clients),
            )
        self.alive = False

    def stop(self) -> None:
        try:
            if self.alive:
                self.conn.send(("stop",))
            self.process.join(timeout=5)
        except (OSError, ValueError):
            pass
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


class HalfWorkers:
    """Worker processes that run some clients' halves of secure aggregation.

    Parameters
    ----------
    processes
        How many worker processes (>= 1). With ``p`` workers the round's
        clients are dealt round-robin over ``p + 1`` parts, one of them kept
        by the simulating process.
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1; got {processes}")
        self.processes = processes
        self._workers: list[_Worker] = []

    def begin(
        self,
        config: SecAggConfig,
        round_idx: int,
        inputs: Mapping[str, np.ndarray],
        *,
        malicious: bool,
    ) -> tuple[list[str], dict[str, bytes]]:
        """Deal the round's clients; returns the local ones and remote public keys.

        The workers build their clients' signing keys (malicious mode) and
        return the verification keys, for the simulation's key table.
        """
        kept = []
        for worker in self._workers:
            if worker.alive and worker.process.is_alive():
                kept.append(worker)
            else:  # failed last round: make sure it is gone
                worker.stop()
        self._workers = kept
        while len(self._workers) < self.processes:
            self._workers.append(_Worker())
        clients = sorted(inputs)
        parts = self.processes + 1
        local = clients[0::parts]
        public: dict[str, bytes] = {}
        for i, worker in enumerate(self._workers, start=1):
            worker.clients = clients[i::parts]
            worker.ask(
                (
                    "round",
                    config,
                    round_idx,
                    {cid: inputs[cid] for cid in worker.clients},
                    malicious,
                )
            )
        for worker in self._workers:
            keys = worker.answer()
            if isinstance(keys, dict):
                public.update(keys)
        return local, public

    def start(self, verify: Mapping[str, bytes] | None) -> None:
        """Let the workers build their clients' halves (with the key table)."""
        for worker in self._workers:
            worker.ask(("start", dict(verify) if verify else None))
        for worker in self._workers:
            worker.answer()

    def remote(self) -> set[str]:
        """The clients whose halves the workers hold (alive or not)."""
        return {cid for worker in self._workers for cid in worker.clients}

    def send(self, requests: Mapping[str, bytes]) -> None:
        """Send each live worker its clients' requests of this stage."""
        for worker in self._workers:
            if worker.alive:
                mine = {c: requests[c] for c in worker.clients if c in requests}
                worker.ask(("stage", mine))

    def collect(self) -> dict[str, bytes | str]:
        """The workers' replies (bytes) or refusals (a message), by client."""
        replies: dict[str, bytes | str] = {}
        for worker in self._workers:
            got = worker.answer()
            if isinstance(got, dict):
                replies.update(got)
        return replies

    def close(self) -> None:
        """Stop every worker process."""
        for worker in self._workers:
            worker.stop()
        self._workers = []


_SHARED: dict[int, HalfWorkers] = {}


def shared_workers(processes: int) -> HalfWorkers:
    """The simulation's pool of ``processes`` workers, started on first use.

    Kept for the life of the process (a simulation reuses it every round)
    and stopped at exit.
    """
    pool = _SHARED.get(processes)
    if pool is None:
        pool = _SHARED[processes] = HalfWorkers(processes)
    return pool


@atexit.register
def _close_all() -> None:
    for pool in _SHARED.values():
        pool.close()
    _SHARED.clear()
