"""Where simulated clients keep their state between rounds.

Stateful algorithms (SCAFFOLD's client control variates) need each client to
remember something from the last round it took part in. A real client keeps
it on its own disk; simulated clients are built afresh every round, so the
simulation keeps their state in a store and hands it to them in
``FitConfig.state``. Stores are saved with every checkpoint, so a resumed run
continues with exactly the state an uninterrupted one would have.

Two stores:

- :class:`ClientStateStore` keeps everything in memory and writes a
  snapshot (``client_states.r<round>.npz``) with each checkpoint. Simple and
  fast while clients × state size fits in memory.
- :class:`DiskStateStore` keeps one file per client and version
  (``client_states/<key>.r<round>.npz``), writing only the clients of each
  round: memory stays flat however many clients there are.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from fedshield.core import ClientId, Params, ParamSpec
from fedshield.errors import CheckpointError
from fedshield.simulation.files import atomic_write

__all__ = [
    "ClientStateStore",
    "DiskStateStore",
    "StateStore",
    "load_client_states",
]

_FORMAT = "fedshield.ClientStateStore/1"
_SNAPSHOT = "client_states.r{round_idx}.npz"
_DISK_DIR = "client_states"


class StateStore(Protocol):
    """What the round loop needs from a client state store."""

    def get(self, client_id: ClientId) -> Mapping[str, Params]:
        """The client's state (empty before its first round)."""

    def update(
        self, states: Mapping[ClientId, Mapping[str, Params]], *, round_idx: int
    ) -> None:
        """Record the states clients returned in the round that made ``round_idx``."""

    def persist(self, run_dir: Path, round_idx: int) -> None:
        """Make the states as of ``round_idx`` durable (before its checkpoint)."""

    def prune(self, run_dir: Path, round_idx: int) -> None:
        """Drop what the checkpoint of ``round_idx`` no longer needs."""


def _encode(entries: Mapping[str, Mapping[str, Params]]) -> bytes:
    index: list[list[object]] = []
    arrays: dict[str, np.ndarray] = {}
    for i, (client_id, state) in enumerate(sorted(entries.items())):
        for j, (key, params) in enumerate(sorted(state.items())):
            name = f"a{i}_{j}"
            index.append([client_id, key, name, params.spec.to_json()])
            arrays[name] = np.asarray(params.flat)
    header = json.dumps({"format": _FORMAT, "index": index}).encode("utf-8")
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(header, dtype=np.uint8), **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _decode(data: bytes) -> dict[str, dict[str, Params]]:
    entries: dict[str, dict[str, Params]] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            header = json.loads(bytes(archive["header"]).decode("utf-8"))
            if header.get("format") != _FORMAT:
                raise CheckpointError("not a fedshield client state store")
            for client_id, key, name, spec in header["index"]:
                params = Params.from_flat(archive[name], ParamSpec.from_json(spec))
                entries.setdefault(str(client_id), {})[str(key)] = params
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"client state store is corrupt: {err}") from err
    return entries


class ClientStateStore:
    """In-memory store of each client's persistent tensors.

    Memory grows with the number of clients that have taken part times the
    size of their state (for SCAFFOLD, one model-sized vector per client);
    each checkpoint writes the whole store. For many clients use
    :class:`DiskStateStore`.
    """

    def __init__(self) -> None:
        self._states: dict[ClientId, dict[str, Params]] = {}

    def get(self, client_id: ClientId) -> Mapping[str, Params]:
        """The client's state (empty before its first round)."""
        return self._states.get(client_id, {})

    def update(
        self, states: Mapping[ClientId, Mapping[str, Params]], *, round_idx: int = 0
    ) -> None:
        """Replace the state of each client in ``states``."""
        for client_id, state in states.items():
            self._states[client_id] = dict(state)

    def persist(self, run_dir: Path, round_idx: int) -> None:
        """Write a snapshot ``client_states.r<round_idx>.npz``."""
        atomic_write(run_dir / _SNAPSHOT.format(round_idx=round_idx), self.to_bytes())

    def prune(self, run_dir: Path, round_idx: int) -> None:
        """Delete snapshots of other rounds."""
        keep = run_dir / _SNAPSHOT.format(round_idx=round_idx)
        for old in run_dir.glob("client_states.r*.npz"):
            if old != keep:
                old.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._states)

    def to_bytes(self) -> bytes:
        """Serialise (``.npz``, no pickle)."""
        return _encode(self._states)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientStateStore:
        """Load a store written by :meth:`to_bytes`.

        Raises
        ------
        CheckpointError
            If the data is not a client state store or is corrupt.
        """
        store = cls()
        store._states = _decode(data)
        return store


class DiskStateStore:
    """One file per client and version under ``directory``; O(1) memory.

    ``update`` writes (atomically) ``<key>.r<round>.npz`` for each client of
    the round; ``prune`` after a checkpoint removes each client's versions
    older than its newest one at or before the checkpoint. Opening a store
    with ``committed_round`` ignores and removes versions written after that
    round, so resuming from a checkpoint sees exactly its states.

    Parameters
    ----------
    directory
        Where the files live (created).
    committed_round
        The round of the checkpoint being resumed (``None``: a new run; any
        files already there are removed).
    """

    def __init__(self, directory: Path, *, committed_round: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._versions: dict[str, list[int]] = {}
        for path in self.directory.glob("*.r*.npz"):
            key, _, version = path.name.removesuffix(".npz").rpartition(".r")
            if committed_round is None or not version.isdigit():
                path.unlink(missing_ok=True)
            elif int(version) > committed_round:
                path.unlink(missing_ok=True)  # written after the checkpoint
            else:
                self._versions.setdefault(key, []).append(int(version))
        for versions in self._versions.values():
            versions.sort()

    @staticmethod
    def _key(client_id: ClientId) -> str:
        return hashlib.sha256(client_id.encode("utf-8")).hexdigest()[:32]

    def _path(self, key: str, version: int) -> Path:
        return self.directory / f"{key}.r{version}.npz"

    def get(self, client_id: ClientId) -> Mapping[str, Params]:
        """The client's newest state (empty before its first round).

        Raises
        ------
        CheckpointError
            If its file is unreadable or belongs to another client.
        """
        key = self._key(client_id)
        versions = self._versions.get(key)
        if not versions:
            return {}
        path = self._path(key, versions[-1])
        try:
            entries = _decode(path.read_bytes())
        except OSError as err:
            raise CheckpointError(f"cannot read client state {path}: {err}") from err
        if set(entries) != {client_id}:
            raise CheckpointError(f"{path} does not hold client {client_id!r}'s state")
        return entries[client_id]

    def update(
        self, states: Mapping[ClientId, Mapping[str, Params]], *, round_idx: int
    ) -> None:
        """Write a new version for each client in ``states``."""
        for client_id, state in states.items():
            key = self._key(client_id)
            atomic_write(self._path(key, round_idx), _encode({client_id: state}))
            versions = self._versions.setdefault(key, [])
            if not versions or versions[-1] != round_idx:
                versions.append(round_idx)

    def persist(self, run_dir: Path, round_idx: int) -> None:
        """Nothing to do: ``update`` already wrote each file durably."""

    def prune(self, run_dir: Path, round_idx: int) -> None:
        """Keep, per client, only its newest version at or before ``round_idx``."""
        for key, versions in self._versions.items():
            kept = [v for v in versions if v <= round_idx][-1:]
            for version in versions:
                if version <= round_idx and version not in kept:
                    self._path(key, version).unlink(missing_ok=True)
            versions[:] = kept + [v for v in versions if v > round_idx]

    def __len__(self) -> int:
        return len(self._versions)


def load_client_states(
    kind: str, run_dir: Path, round_idx: int
) -> ClientStateStore | DiskStateStore:
    """Open the client states saved with the checkpoint of ``round_idx``.

    Raises
    ------
    CheckpointError
        If the snapshot is missing or corrupt.
    """
    if kind == "disk":
        return DiskStateStore(run_dir / _DISK_DIR, committed_round=round_idx)
    path = run_dir / _SNAPSHOT.format(round_idx=round_idx)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(
            f"cannot read the client states of round {round_idx} ({path}): {err}"
        ) from err
    try:
        return ClientStateStore.from_bytes(data)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err


def new_client_states(
    kind: str, run_dir: Path | None
) -> ClientStateStore | DiskStateStore:
    """An empty store of ``kind`` (``"memory"`` or ``"disk"``) for a new run."""
    if kind == "disk":
        if run_dir is None:
            raise ValueError("a disk client state store needs a run folder")
        return DiskStateStore(run_dir / _DISK_DIR)
    return ClientStateStore()
