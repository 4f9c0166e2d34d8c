"""Torch-free, picklable clients for the backend contract.

Worker processes unpickle these by module name (``tests.contracts.fakes``),
so they live in a module of their own, never in a test module; the
``conftest.py`` beside this file puts the repository root on ``sys.path``,
which spawned workers inherit.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params

SPEC_PARAMS = Params({"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)})

KINDS = ("ok", "raise", "exit", "segfault", "sleep", "hang")
"""How a fake client behaves in ``fit``: as it should, raise, ``os._exit(1)``,
die of SIGSEGV, sleep ``sleep_s`` seconds first, or hang for an hour."""


def _append(path: str | None, line: str) -> None:
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def read_log(path: str | Path) -> list[str]:
    """The lines a fake wrote to ``path`` (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8").splitlines()


class FakeClient:
    """Moves the model towards its target, with noise from its own rng.

    It remembers what it drew in ``fit`` and reports it from ``evaluate``,
    so a test sees whether both stages of a round met the same object.
    """

    def __init__(
        self, client_id: str, kind: str, target: float, n: int, sleep_s: float
    ) -> None:
        self.client_id = client_id
        self.kind = kind
        self.target = target
        self.n = n
        self.sleep_s = sleep_s
        self.fits = 0
        self.fit_token = -1.0

    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        if self.kind == "raise":
            raise RuntimeError(f"disk on fire at {self.client_id}")
        if self.kind == "exit":
            os._exit(1)
        if self.kind == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(60)  # the signal is delivered before this ends
        if self.kind == "sleep":
            time.sleep(self.sleep_s)
        if self.kind == "hang":
            time.sleep(3600)
        self.fits += 1
        self.fit_token = float(rng.integers(2**31))
        noise = rng.standard_normal(params.spec.size).astype(np.float32)
        flat = (self.target - params.flat) + np.float32(0.01) * noise
        return ClientUpdate(
            self.client_id,
            Params.from_flat(flat.astype(np.float32), params.spec),
            self.n,
            {"loss": self.target, "token": self.fit_token},
        )

    def evaluate(self, params: Params, config: EvalConfig) -> Mapping[str, float]:
        return {
            "accuracy": 1.0,
            "loss": float(np.abs(params.flat - self.target).mean()),
            "num_examples": float(self.n),
            "fit_token": self.fit_token,
            "fits": float(self.fits),
        }


class FakeClients:
    """A picklable ``client_fn`` over fake clients ``"0" .. str(num_clients-1)``.

    Parameters
    ----------
    num_clients
        How many clients exist.
    kinds
        Behaviour of particular clients (see :data:`KINDS`); the rest are ``ok``.
    offset
        Added to every client's target (tells two ``client_fn`` apart).
    sleep_s
        How long ``sleep`` clients sleep.
    build_log
        File that gets a line ``"<pid> <client_id>"`` per client built.
    load_log
        File that gets a line ``"<pid>"`` each time this object is unpickled.
    """

    def __init__(
        self,
        num_clients: int = 8,
        kinds: Mapping[str, str] | None = None,
        *,
        offset: float = 0.0,
        sleep_s: float = 0.0,
        build_log: str | Path | None = None,
        load_log: str | Path | None = None,
    ) -> None:
        self.num_clients = num_clients
        self.kinds = dict(kinds or {})
        unknown = set(self.kinds.values()) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {unknown}")
        self.offset = offset
        self.sleep_s = sleep_s
        self.build_log = None if build_log is None else str(build_log)
        self.load_log = None if load_log is None else str(load_log)

    @property
    def client_ids(self) -> list[str]:
        return [str(i) for i in range(self.num_clients)]

    def __call__(self, client_id: str) -> FakeClient:
        index = int(client_id)
        if not 0 <= index < self.num_clients:
            raise KeyError(f"no client {client_id!r}")
        _append(self.build_log, f"{os.getpid()} {client_id}")
        return FakeClient(
            client_id,
            self.kinds.get(client_id, "ok"),
            target=self.offset + float(index % 5),
            n=1 + index % 3,
            sleep_s=self.sleep_s,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _append(self.load_log, f"{os.getpid()}")


class TorchThreadsClient:
    """Reports, from ``evaluate``, how many intra-op threads torch uses."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        raise NotImplementedError

    def evaluate(self, params: Params, config: EvalConfig) -> Mapping[str, float]:
        import torch

        return {"num_examples": 1.0, "torch_threads": float(torch.get_num_threads())}


def torch_threads_client(client_id: str) -> TorchThreadsClient:
    """A ``client_fn`` that loads torch only when it builds a client."""
    import torch  # noqa: F401

    return TorchThreadsClient(client_id)


class ExitOnLoad:
    """A ``client_fn`` whose copy in a worker process exits as it is unpickled."""

    def __init__(self) -> None:
        self.parent_pid = os.getpid()

    def __call__(self, client_id: str) -> FakeClient:
        raise AssertionError("never built: the worker dies loading client_fn")

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.parent_pid:
            os._exit(1)
