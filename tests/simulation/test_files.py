from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fedshield.errors import RunDirectoryError
from fedshield.simulation.files import SyncBehind, append_line, atomic_write


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]
    assert (target.stat().st_mode & 0o777) == 0o644


def test_queued_writes_land_in_order_after_flush(tmp_path: Path) -> None:
    syncer = SyncBehind()
    target = tmp_path / "ckpt"
    log = tmp_path / "log.jsonl"
    for i in range(20):
        append_line(log, f"{i}\n", syncer=syncer)
        atomic_write(target, str(i).encode(), syncer=syncer)
    syncer.flush()
    assert target.read_text() == "19"
    assert log.read_text().splitlines() == [str(i) for i in range(20)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "log.jsonl"]


def test_a_queued_job_that_waits_keeps_the_old_content_visible(tmp_path: Path) -> None:
    # The rename happens on the syncer's thread, after the jobs before it.
    syncer = SyncBehind()
    target = tmp_path / "ckpt"
    atomic_write(target, b"old")
    gate = threading.Event()
    syncer.submit(gate.wait)
    atomic_write(target, b"new", syncer=syncer)
    assert target.read_bytes() == b"old"
    gate.set()
    syncer.flush()
    assert target.read_bytes() == b"new"


def test_a_failed_job_is_raised_by_the_next_call(tmp_path: Path) -> None:
    syncer = SyncBehind()

    def fail() -> None:
        raise OSError("disk full")

    syncer.submit(fail)
    with pytest.raises(RunDirectoryError, match="disk full"):
        syncer.flush()
    syncer.flush()  # reported once, then the syncer goes on
    atomic_write(tmp_path / "x", b"1", syncer=syncer)
    syncer.flush()
    assert (tmp_path / "x").read_bytes() == b"1"


def test_write_into_a_missing_folder_that_cannot_be_made_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirectoryError, match="cannot write"):
        atomic_write(blocker / "a.bin", b"x")
    with pytest.raises(RunDirectoryError, match="cannot write"):
        append_line(blocker / "a.jsonl", "x\n")


def test_a_stale_temporary_of_a_dead_process_is_replaced(tmp_path: Path) -> None:
    import fedshield.simulation.files as files

    target = tmp_path / "a.bin"
    counter = next(files._TMP_COUNTER) + 1  # the number the next write takes
    stale = tmp_path / f".a.bin.{os.getpid()}.{counter}.tmp"
    stale.write_bytes(b"junk")
    atomic_write(target, b"fresh")
    assert target.read_bytes() == b"fresh"
    assert not stale.exists()
