"""Writing files so that a crash never leaves one half-written."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fedshield.errors import RunDirectoryError

__all__ = ["SyncBehind", "append_line", "atomic_write"]

_TMP_COUNTER = itertools.count()


def atomic_write(path: Path, data: bytes, *, syncer: SyncBehind | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it.

    The temporary file is flushed to disk (``fsync``) before the rename, so
    that even after a power loss ``path`` holds either its old or its new
    content. With ``syncer``, the data is written now and the ``fsync`` and
    rename are queued on ``syncer``'s thread (in order with its other jobs):
    the caller goes on at once and the new content appears under ``path`` a
    moment later.

    Raises
    ------
    RunDirectoryError
        If the file cannot be written (with ``syncer``: a failure of the
        queued part is raised by the syncer's next call).
    """
    # A fresh name per write (writes may be queued): process id and counter,
    # created exclusively, so no two writes ever share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = _open_in_folder(tmp, flags)
        except FileExistsError:
            # Left by a crashed process that had our process id: stale.
            tmp.unlink()
            fd = os.open(tmp, flags, 0o644)
    except OSError as err:
        raise RunDirectoryError(f"cannot write {path}: {err}") from err
    try:
        _write_all(fd, data)
    except BaseException as err:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise RunDirectoryError(f"cannot write {path}: {err}") from err
        raise

    _finish(fd, path, syncer, rename_from=tmp)


def append_line(path: Path, line: str, *, syncer: SyncBehind | None = None) -> None:
    """Append ``line`` (with its newline) to ``path`` and flush it to disk.

    With ``syncer``, the line is written now and its ``fsync`` queued on
    ``syncer``'s thread.

    Raises
    ------
    RunDirectoryError
        If it cannot be written (with ``syncer``: a failure of the ``fsync``
        is raised by the syncer's next call).
    """
    try:
        fd = _open_in_folder(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as err:
        raise RunDirectoryError(f"cannot write {path}: {err}") from err
    try:
        _write_all(fd, line.encode("utf-8"))
    except BaseException as err:
        os.close(fd)
        if isinstance(err, OSError):
            raise RunDirectoryError(f"cannot write {path}: {err}") from err
        raise

    _finish(fd, path, syncer)


def _finish(
    fd: int, path: Path, syncer: SyncBehind | None, *, rename_from: Path | None = None
) -> None:
    """``fsync`` and close ``fd`` (then rename ``rename_from`` to ``path``).

    Now, or on ``syncer``'s thread when given.
    """

    def finish() -> None:
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if rename_from is not None:
                os.replace(rename_from, path)
        except OSError as err:
            if rename_from is None:
                raise RunDirectoryError(f"cannot flush {path} to disk: {err}") from err
            rename_from.unlink(missing_ok=True)
            raise RunDirectoryError(f"cannot write {path}: {err}") from err

    if syncer is None:
        finish()
    else:
        syncer.submit(finish)


def _open_in_folder(path: Path, flags: int) -> int:
    """``os.open(path, flags, 0o644)``, making the folder first if missing."""
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class SyncBehind:
    """One background thread that finishes file writes in order.

    ``fsync`` waits for the disk, which costs about as much as a small
    model's whole round; queued here (with the rename that must follow it)
    it overlaps the next round's training. The jobs are a few system calls
    each, so the thread rarely holds the interpreter lock.
    Jobs run in the order submitted, so files reach the disk in the order
    they were written (``metrics.jsonl`` before the checkpoint of the same
    round). A job's failure is raised, as :class:`RunDirectoryError`, by
    the next :meth:`submit` or :meth:`flush`; :meth:`flush` waits for every
    queued job. The thread is not a daemon: a process that exits normally
    completes the queue first; one that is killed loses at most the last
    queued files, whose previous versions stay (a resumed run restarts from
    the last checkpoint that reached its name).
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; raise a failure of an earlier one first."""
        self._raise_failed(wait=False)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="fedshield-sync"
                )
            self._pending.append(self._executor.submit(job))

    def flush(self) -> None:
        """Wait for every queued job; raise the first failure."""
        self._raise_failed(wait=True)

    def _raise_failed(self, *, wait: bool) -> None:
        with self._lock:
            pending = self._pending
            done = [f for f in pending if wait or f.done()]
            self._pending = [f for f in pending if f not in done]
        first: BaseException | None = None
        for future in done:
            err = future.exception()  # waits when not done
            if err is not None and first is None:
                first = err
        if first is not None:
            if isinstance(first, RunDirectoryError):
                raise first
            raise RunDirectoryError(f"writing run files failed: {first}") from first
