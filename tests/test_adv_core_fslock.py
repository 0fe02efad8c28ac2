"""Adversarial review of the file lock: its file deleted or replaced under a process that keeps it open."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pforge_async import FsLock, StorageError

from ._procs import spawn, wait_for_line

# A process that keeps its lock file open between holds (as every database writer does), takes and
# releases the lock once, waits for the parent's word, then tries once more (timeout 0).
KEEPER = """
import sys
from pforge_async import FsLock, LockTimeout, StorageError
lock = FsLock(sys.argv[1], keep_open=True, timeout=0)
lock.acquire()
lock.release()
print("ready", flush=True)
sys.stdin.readline()
try:
    lock.acquire()
except LockTimeout:
    print("busy", flush=True)
except StorageError as exc:
    print("storage", flush=True)
else:
    print("acquired", flush=True)
    lock.release()
"""


def _second_try(keeper: subprocess.Popen[str]) -> str:
    assert keeper.stdin is not None and keeper.stdout is not None
    keeper.stdin.write("go\n")
    keeper.stdin.flush()
    out, err = keeper.communicate(timeout=60)
    assert keeper.returncode == 0, err
    return out.strip()


def test_a_deleted_lock_file_does_not_split_a_kept_open_lock(tmp_path: Path) -> None:
    # The lock file is deleted (by hand, by a clean-up job) while a process keeps it open. The file
    # made anew is the lock from then on: the keeper must not go on locking the orphaned inode while
    # another process holds the new file, or both hold "the" lock for good.
    path = tmp_path / "db.lock"
    keeper = spawn(KEEPER, path, stdin=subprocess.PIPE)
    wait_for_line(keeper, "ready")
    os.unlink(path)
    with FsLock(path, timeout=5):
        assert _second_try(keeper) == "busy"
    assert path.exists()


def test_a_lock_file_replaced_by_a_directory_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "db.lock"
    keeper = spawn(KEEPER, path, stdin=subprocess.PIPE)
    wait_for_line(keeper, "ready")
    os.unlink(path)
    path.mkdir()
    assert _second_try(keeper) == "storage"
    with pytest.raises(StorageError):
        FsLock(path, timeout=0).acquire()
