"""Where a ``PgCas`` given no ``cache_dir`` keeps its snapshot stat caches.

A PostgreSQL store has no directory of its own, so each ``PgCas`` opened without ``cache_dir`` needs a
private temporary one, removed when it closes. A process that is SIGKILLed never closes it. So the
directories live under one parent per user (``<tmp>/pforge-pgcas-cache-<uid>``, mode 0700), each
named after its owner's pid and that process's start time, and every new one first removes those
whose owner is gone: what a killed process left behind lasts until the next store opens, not for
ever. (The start time tells a live owner from a later process that got the same pid.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile

__all__ = ["private_cache_dir", "remove_private_cache_dir"]

_PARENT = "pforge-pgcas-cache-"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or ``"0"``
    where there is no ``/proc``; ``""`` if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return ""
    except OSError:
        return "0"
    return fields[19].decode("ascii") if len(fields) > 19 else "0"


def _owner_alive(pid: int, started: str) -> bool:
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True  # someone else's live process
        return True
    found = _start_time(pid)
    return bool(found) and (started in ("0", found) or found == "0")


def _sweep(parent: str) -> None:
    """Remove the directories under ``parent`` whose owner process is gone."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            pid, _, rest = name.partition("-")
            started = rest.partition("-")[0]
            if not pid.isdigit() or not started.isdigit():
                continue  # not one of ours
            if not _owner_alive(int(pid), started):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _shared_parent(base: str) -> str | None:
    """The per-user parent under ``base``, made if needed; None if the name is taken by something this
    user must not trust (another owner, a symlink, group or world access)."""
    uid = os.getuid()
    parent = os.path.join(base, f"{_PARENT}{uid}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(parent, 0o700)
    try:
        st = os.lstat(parent)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return None
    return parent


def private_cache_dir(base: str | None = None) -> str:
    """A new private directory for one ``PgCas``'s stat caches (under ``base``, default the system's
    temporary directory), after removing those of owners that are gone."""
    base = base if base is not None else tempfile.gettempdir()
    parent = _shared_parent(base) if hasattr(os, "getuid") else None
    if parent is None:
        return tempfile.mkdtemp(prefix=_PARENT, dir=base)  # as before: private, left behind by a kill
    _sweep(parent)
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"{pid}-{_start_time(pid) or '0'}-", dir=parent)


def remove_private_cache_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
