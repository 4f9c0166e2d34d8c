"""The files of a run, written so that nothing is ever half-written.

Every file is written to a temporary name in the same directory and moved
into place with :func:`os.replace`, so a crash leaves the previous version.
``metrics.jsonl`` is appended one flushed line per round; on resume it is cut
back to the rounds the checkpoint covers. The per-round files (the metrics
line and the checkpoint) are written at once and made durable (``fsync``, then
the checkpoint's rename) on a background thread, in order, while the next
round trains; :meth:`RunDirectory.flush` waits for them, and every other
method of :class:`RunDirectory` flushes first.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedshield.core import ServerState
from fedshield.errors import CheckpointError, ConfigError, RunDirectoryError
from fedshield.simulation.files import SyncBehind, append_line
from fedshield.simulation.files import atomic_write as _atomic_write
from fedshield.simulation.state_store import (
    ClientStateStore,
    DiskStateStore,
    StateStore,
    load_client_states,
)

__all__ = ["RunDirectory", "dumps"]

logger = logging.getLogger(__name__)

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PARTITION = "partition.json"
CHECKPOINT = "checkpoint.npz"
FAILURES = "failures.jsonl"
REPORT = "report.html"
ATTACK = "attack.json"
_RUN_FILES = (
    CONFIG,
    METRICS,
    SUMMARY,
    PARTITION,
    CHECKPOINT,
    FAILURES,
    REPORT,
    ATTACK,
)


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


class RunDirectory:
    """The output folder of one run.

    Parameters
    ----------
    path
        The folder (created when first written).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._syncer = SyncBehind()

    def flush(self) -> None:
        """Wait until the files of past rounds are on disk under their names.

        Raises
        ------
        RunDirectoryError
            If writing one of them failed.
        """
        self._syncer.flush()

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
        self.flush()
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
            shutil.rmtree(self.file("client_states"), ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file atomically."""
        self.flush()
        path = self.file(name)
        _atomic_write(path, text.encode("utf-8"))
        return path

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path:
        """Write a JSON file atomically."""
        return self.write_text(name, dumps(data, indent=2) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        """Read a JSON file of the run."""
        self.flush()
        data: dict[str, Any] = json.loads(self.file(name).read_text("utf-8"))
        return data

    def append_jsonl(self, name: str, record: Mapping[str, Any]) -> None:
        """Append one JSON line; it is written and flushed in the background.

        The line is queued behind the files written before it (see
        :meth:`flush`); a reader of the file should call :meth:`flush` first.
        """
        append_line(self.file(name), dumps(record) + "\n", syncer=self._syncer)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-round records written so far (unparsable lines skipped)."""
        return self._read_jsonl(METRICS)

    def _read_jsonl(self, name: str) -> list[dict[str, Any]]:
        self.flush()
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
        self, state: ServerState, *, client_states: StateStore | None = None
    ) -> Path:
        """Write the server state (and the clients' states) atomically.

        The client states are made durable first, then the server state is
        written, and only then are client states the checkpoint no longer
        needs removed, so a crash at any point leaves a consistent pair.
        """
        path = self.file(CHECKPOINT)
        if client_states is None:
            # Written on the background thread, after this round's metrics
            # line: a crash leaves the previous checkpoint.
            _atomic_write(path, state.to_bytes(), syncer=self._syncer)
            return path
        self.flush()
        client_states.persist(self.path, state.round_idx)
        _atomic_write(path, state.to_bytes())
        client_states.prune(self.path, state.round_idx)
        return path

    def load_client_states(
        self, kind: str, round_idx: int
    ) -> ClientStateStore | DiskStateStore:
        """The client states saved with the checkpoint of ``round_idx``.

        Raises
        ------
        CheckpointError
            If they are missing or corrupt.
        """
        self.flush()
        return load_client_states(kind, self.path, round_idx)

    def load_checkpoint(self) -> ServerState:
        """Read the server state.

        Raises
        ------
        CheckpointError
            If it is missing or corrupt.
        """
        self.flush()
        path = self.file(CHECKPOINT)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
        try:
            return ServerState.from_bytes(data)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err
