"""Adversarial review of the file lock: its file deleted or replaced under a process that keeps it open."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pforge_async import FsLock, InvalidInput, StorageError

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


@pytest.mark.parametrize("timeout", [float("nan"), True, "1", -0.5, float("-inf")])
def test_a_timeout_that_is_not_a_duration_is_refused(tmp_path: Path, timeout: object) -> None:
    # NaN was taken: no deadline is ever reached, so a contended wait never ended.
    with pytest.raises(InvalidInput, match="timeout"):
        FsLock(tmp_path / "x.lock", timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("timeout", [10**400, float("inf")], ids=["10**400", "inf"])
async def test_a_timeout_too_long_to_reach_waits_as_none_does(tmp_path: Path, timeout: float) -> None:
    # 10**400 seconds overflowed the deadline's float (a bare OverflowError at acquire).
    path = tmp_path / "x.lock"
    with FsLock(path, timeout=timeout) as lock:
        assert lock.held
    async with FsLock(path, timeout=timeout) as lock:
        assert lock.held


@pytest.mark.parametrize("path", [None, 5, "x\0y.lock"], ids=["None", "int", "NUL"])
def test_a_path_that_names_no_file_is_refused(tmp_path: Path, path: object) -> None:
    # None and 5 were a bare TypeError; a NUL a bare ValueError at acquire.
    with pytest.raises(InvalidInput, match="path"):
        FsLock(path).acquire()  # type: ignore[arg-type]


def test_a_lock_file_replaced_by_a_symlink_loop_is_a_storage_error_and_then_serves_again(tmp_path: Path) -> None:
    path = tmp_path / "db.lock"
    keeper = spawn(KEEPER, path, stdin=subprocess.PIPE)
    wait_for_line(keeper, "ready")
    os.unlink(path)
    path.symlink_to(path.name)  # ELOOP: the open file can no longer be compared with the path
    assert _second_try(keeper) == "storage"
    path.unlink()
    lock = FsLock(path, keep_open=True, timeout=0)
    with lock:
        assert lock.held
    lock.close()


@pytest.mark.parametrize("option", ["shared", "keep_open"])
def test_a_flag_that_is_not_a_bool_is_refused(tmp_path: Path, option: str) -> None:
    # shared="no" is truthy: it took a shared lock where the caller asked for none.
    with pytest.raises(InvalidInput, match=option):
        FsLock(tmp_path / "x.lock", **{option: "no"})  # type: ignore[arg-type]
