"""The files of a run, written so that nothing is ever half-written.

Every file is written to a temporary name in the same directory and moved
into place with :func:`os.replace`, so a crash leaves the previous version.
``metrics.jsonl`` is appended one flushed line per round; on resume it is cut
back to the rounds the checkpoint covers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedshield.core import ServerState
from fedshield.errors import CheckpointError, ConfigError, RunDirectoryError
from fedshield.simulation.state_store import ClientStateStore

__all__ = ["RunDirectory", "dumps"]

logger = logging.getLogger(__name__)

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PARTITION = "partition.json"
CHECKPOINT = "checkpoint.npz"
FAILURES = "failures.jsonl"
REPORT = "report.html"
_RUN_FILES = (CONFIG, METRICS, SUMMARY, PARTITION, CHECKPOINT, FAILURES, REPORT)


def _json_safe(value: Any) -> Any:
    # JSON has no NaN or Infinity: write them as null rather than emit a file
    # that strict parsers refuse.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def dumps(data: Any, *, indent: int | None = None) -> str:
    """Strict JSON (non-finite numbers become ``null``)."""
    return json.dumps(_json_safe(data), indent=indent, allow_nan=False)


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as err:
        raise RunDirectoryError(f"cannot write {path}: {err}") from err
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise RunDirectoryError(f"cannot write {path}: {err}") from err
        raise


class RunDirectory:
    """The output folder of one run.

    Parameters
    ----------
    path
        The folder (created when first written).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        """Path of one of the run's files."""
        return self.path / name

    def has_run(self) -> bool:
        """Whether the folder already holds (part of) a run."""
        return any((self.path / name).exists() for name in (CHECKPOINT, METRICS))

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Make the folder ready for a new or resumed run.

        Raises
        ------
        ConfigError
            If it holds a run and neither ``resume`` nor ``overwrite`` is set,
            or ``resume`` is set and there is no checkpoint.
        """
        if resume:
            if not self.file(CHECKPOINT).exists():
                raise CheckpointError(
                    f"cannot resume: no checkpoint in {self.path}; run without "
                    "--resume to start a new run"
                )
            return
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(
                f"run folder {self.path} exists and is not a folder; choose "
                "another --out"
            )
        if self.has_run():
            if not overwrite:
                raise ConfigError(
                    f"{self.path} already holds a run; pass --resume to continue it, "
                    "--overwrite to replace it, or --out DIR to write elsewhere"
                )
            for name in _RUN_FILES:
                self.file(name).unlink(missing_ok=True)
            for old in self.path.glob("client_states.r*.npz"):
                old.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file atomically."""
        path = self.file(name)
        _atomic_write(path, text.encode("utf-8"))
        return path

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path:
        """Write a JSON file atomically."""
        return self.write_text(name, dumps(data, indent=2) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        """Read a JSON file of the run."""
        data: dict[str, Any] = json.loads(self.file(name).read_text("utf-8"))
        return data

    def append_jsonl(self, name: str, record: Mapping[str, Any]) -> None:
        """Append one JSON line, flushed to disk."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with self.file(name).open("a", encoding="utf-8") as handle:
                handle.write(dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise RunDirectoryError(f"cannot write {self.file(name)}: {err}") from err

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-round records written so far (unparsable lines skipped)."""
        return self._read_jsonl(METRICS)

    def _read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.file(name)
        if not path.exists():
            return []
        records: list[dict[str, Any]] = []
        for line in path.read_text("utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping unreadable line in %s", path)
        return records

    def truncate_records(self, rounds: int) -> None:
        """Keep only the metrics and failures of rounds ``1..rounds`` (atomically).

        Called on resume: rounds after the checkpoint will be run again.
        """
        for name in (METRICS, FAILURES):
            if self.file(name).exists():
                kept = [
                    r
                    for r in self._read_jsonl(name)
                    if int(r.get("round", 0)) <= rounds
                ]
                self.write_text(name, "".join(dumps(r) + "\n" for r in kept))

    def save_checkpoint(
        self, state: ServerState, *, client_states: ClientStateStore | None = None
    ) -> Path:
        """Write the server state (and the clients' states) atomically.

        Client states go to ``client_states.r<round>.npz`` first, then the
        server state; older client-state files are removed only after that,
        so a crash in between leaves a consistent pair to resume from.
        """
        path = self.file(CHECKPOINT)
        if client_states is not None:
            _atomic_write(
                self._client_states_file(state.round_idx), client_states.to_bytes()
            )
        _atomic_write(path, state.to_bytes())
        for old in self.path.glob("client_states.r*.npz"):
            if old != self._client_states_file(state.round_idx):
                old.unlink(missing_ok=True)
        return path

    def _client_states_file(self, round_idx: int) -> Path:
        return self.file(f"client_states.r{round_idx}.npz")

    def load_client_states(self, round_idx: int) -> ClientStateStore:
        """The client states saved with the checkpoint of ``round_idx``.

        Raises
        ------
        CheckpointError
            If there is none or it is corrupt.
        """
        path = self._client_states_file(round_idx)
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

    def load_checkpoint(self) -> ServerState:
        """Read the server state.

        Raises
        ------
        CheckpointError
            If it is missing or corrupt.
        """
        path = self.file(CHECKPOINT)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
        try:
            return ServerState.from_bytes(data)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err
