"""The server's durable state: a SQLite database and content-addressed files.

``STATE_DIR/state.db`` records, for every round and stage, the task each
site was given (its digest), each reply the server accepted (the reply's
bytes as a content-addressed file in ``STATE_DIR/blobs/``) and, once a stage
closes, who had replied. Nothing is pickled: replies are the wire codec's
bytes (:mod:`fedshield.simulation.wire`), everything else plain columns.

Decide, persist, then send: a stage's outcome is committed before the next
stage's tasks exist, so after a crash the server replays the round from its
checkpoint with the same answers and asks nobody a question whose answer it
already had (for secure aggregation, it can never ask one site for both
kinds of shares). Files are written to a temporary name, flushed, fsynced
and renamed before the row that names them is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from fedshield.errors import FedShieldError

__all__ = [
    "BlobStore",
    "HistoryError",
    "ServerStore",
    "StageRecord",
    "StateFullError",
    "disk_full",
]

SCHEMA_VERSION = 1


class HistoryError(FedShieldError):
    """The server's state disagrees with what it is asked to do (exit 46)."""

    exit_code = 46


class StateFullError(FedShieldError):
    """The state folder's disk is full (exit 48): free space, run again."""

    exit_code = 48


def disk_full(err: BaseException, where: Path) -> StateFullError | None:
    """The error to raise for ``err`` if it says the disk is full (else None)."""
    import errno

    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(err, sqlite3.OperationalError) and "full" in str(err)
    )
    if not full:
        return None
    return StateFullError(
        f"the disk holding {where} is full ({err}); nothing recorded "
        "so far is lost: free space and run the same command again to resume"
    )


class BlobStore:
    """Files named by the SHA-256 of their content (``blobs/ab/abcd…``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists)."""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest

    def put(self, data: bytes | bytearray) -> str:
        """Store ``data`` durably; return its digest."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(exist_ok=True)
        tmp = self.root / "tmp" / f"{digest}.{secrets.token_hex(4)}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return digest

    def adopt(self, file: Path, digest: str) -> str:
        """Make ``file`` (content ``digest``, checked by the caller) the blob."""
        path = self.path(digest)
        if path.exists():
            Path(file).unlink(missing_ok=True)
            return digest
        path.parent.mkdir(exist_ok=True)
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(file, path)
        _fsync_dir(path.parent)
        return digest

    def get(self, digest: str) -> bytes:
        """The blob's bytes, checked against its name."""
        data = self.path(digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise HistoryError(f"blob {digest[:16]}… is corrupt on disk")
        return data

    def has(self, digest: str) -> bool:
        """Whether the blob is stored."""
        return self.path(digest).exists()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StageRecord:
    """What the store knows of one stage of one round."""

    tasks: dict[str, str]
    """Client id → the digest of the task it was given."""
    replies: dict[str, str]
    """Client id → the blob digest of its accepted reply (wire bytes)."""
    closed: bool
    """Whether the stage was closed (its outcome final)."""


class ServerStore:
    """``state.db`` and ``blobs/`` under a server's ``--state`` folder.

    One connection, used under a lock (writes are few and small: one row
    per task, reply and stage).
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.dir / "blobs")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.dir / "state.db", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS tasks (
                    round INTEGER, stage TEXT, client_id TEXT, task_id TEXT,
                    PRIMARY KEY (round, stage, client_id));
                CREATE TABLE IF NOT EXISTS replies (
                    round INTEGER, stage TEXT, client_id TEXT, digest TEXT,
                    PRIMARY KEY (round, stage, client_id));
                CREATE TABLE IF NOT EXISTS stages (
                    round INTEGER, stage TEXT, closed_json TEXT,
                    PRIMARY KEY (round, stage));
                CREATE TABLE IF NOT EXISTS events (
                    at REAL, client_id TEXT, kind TEXT, detail TEXT);
                """
            )
            version = self._get("schema_version")
            if version is None:
                self._set("schema_version", str(SCHEMA_VERSION))
            elif int(version) != SCHEMA_VERSION:
                raise HistoryError(
                    f"{self.dir / 'state.db'} has schema {version}; this fedshield "
                    f"reads {SCHEMA_VERSION}"
                )

    # -- meta --------------------------------------------------------------------

    def _get(self, key: str) -> str | None:
        row = self._db.execute(
            "SELECT value FROM meta WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else str(row[0])

    def _set(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)
        )

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table."""
        with self._lock:
            return self._get(key)

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the ``meta`` table (committed at once)."""
        with self._lock:
            self._set(key, value)

    def secret(self, key: str) -> bytes:
        """A 32-byte secret made on first use and kept from then on.

        Drawn from the operating system, or, to reproduce a run exactly
        (tests), derived from ``FEDSHIELD_SERVER_SECRET`` (hex, at least 32
        bytes) when that is set as the state is created. Keep it secret:
        the server's noise and every site's randomness derive from it.
        """
        with self._lock:
            found = self._get(key)
            if found is None:
                master = os.environ.get("FEDSHIELD_SERVER_SECRET")
                if master:
                    raw = bytes.fromhex(master)
                    if len(raw) < 32:
                        raise HistoryError(
                            "FEDSHIELD_SERVER_SECRET must be at least 32 bytes (64 hex)"
                        )
                    found = hashlib.blake2b(key.encode(), key=raw[:64]).hexdigest()[:64]
                else:
                    found = secrets.token_hex(32)
                self._set(key, found)
            return bytes.fromhex(found)

    # -- tasks and replies -------------------------------------------------------

    def stage(self, round_idx: int, stage: str) -> StageRecord:
        """The stage's tasks, accepted replies and whether it is closed."""
        with self._lock:
            tasks = dict(
                self._db.execute(
                    "SELECT client_id, task_id FROM tasks "
                    "WHERE round = ? AND stage = ?",
                    (round_idx, stage),
                ).fetchall()
            )
            replies = dict(
                self._db.execute(
                    "SELECT client_id, digest FROM replies "
                    "WHERE round = ? AND stage = ?",
                    (round_idx, stage),
                ).fetchall()
            )
            closed = self._db.execute(
                "SELECT 1 FROM stages WHERE round = ? AND stage = ?",
                (round_idx, stage),
            ).fetchone()
        return StageRecord(tasks, replies, closed is not None)

    def add_tasks(self, round_idx: int, stage: str, tasks: dict[str, str]) -> None:
        """Record the tasks of a stage (client id → task id), in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO tasks (round, stage, client_id, task_id) "
                    "VALUES (?, ?, ?, ?)",
                    [(round_idx, stage, cid, tid) for cid, tid in tasks.items()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add_reply(
        self,
        round_idx: int,
        stage: str,
        client_id: str,
        data: bytes | bytearray,
        *,
        file: Path | None = None,
        digest: str | None = None,
    ) -> bool:
        """Record a client's accepted reply; False if one was recorded already.

        With ``file`` (holding ``data``, of SHA-256 ``digest``) the file
        becomes the stored copy instead of a new write.
        """
        if file is not None and digest is not None:
            digest = self.blobs.adopt(file, digest)
        else:
            digest = self.blobs.put(data)
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO replies (round, stage, client_id, digest) "
                "VALUES (?, ?, ?, ?)",
                (round_idx, stage, client_id, digest),
            )
            return cursor.rowcount == 1

    def close_stage(self, round_idx: int, stage: str, replied: list[str]) -> None:
        """Make the stage's outcome final: who had replied when it closed."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO stages (round, stage, closed_json) "
                "VALUES (?, ?, ?)",
                (round_idx, stage, json.dumps(sorted(replied))),
            )

    def closed_replied(self, round_idx: int, stage: str) -> list[str] | None:
        """Who had replied when the stage closed (None: not closed)."""
        with self._lock:
            row = self._db.execute(
                "SELECT closed_json FROM stages WHERE round = ? AND stage = ?",
                (round_idx, stage),
            ).fetchone()
        return None if row is None else list(json.loads(row[0]))

    def log_event(self, client_id: str, kind: str, detail: str) -> None:
        """A security or operations event (refused requests, refusals by sites)."""
        import time

        with self._lock:
            self._db.execute(
                "INSERT INTO events (at, client_id, kind, detail) VALUES (?, ?, ?, ?)",
                (time.time(), client_id, kind, detail),
            )

    def events(self) -> list[tuple[float, str, str, str]]:
        """Every logged event, oldest first."""
        with self._lock:
            return [
                (float(a), str(b), str(c), str(d))
                for a, b, c, d in self._db.execute(
                    "SELECT at, client_id, kind, detail FROM events ORDER BY rowid"
                ).fetchall()
            ]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
