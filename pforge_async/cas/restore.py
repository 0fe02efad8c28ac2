"""Tree -> directory: ``restore``, into a workspace that untrusted tools may change meanwhile.

The target is opened once (a symlink *at* the target, which the caller named, is followed; it is
created first if missing) and must be empty. From there everything is created relative to directory
descriptors the restore opened itself (:mod:`.dirfd`): ``mkdirat`` then an ``O_NOFOLLOW`` open of
what it made, ``symlinkat``, and each file written under an ``O_EXCL`` temp name in its directory and
hard-linked to its name (which fails where something already stands, as ``mkdirat`` and
``symlinkat`` do; ``rename`` would replace it), then the temp name unlinked. A directory of the
target swapped for a symlink is never followed: the restore keeps writing into the directory it
opened, or, if the swap came before it could open it, fails with ``StorageError`` naming the path.
An entry another process made under a name the restore is about to create fails it the same way,
and is left as it is.

A restore that fails leaves no partly written file: the temp file is removed, and so is every file,
symlink and directory this call created (directories with whatever another process put inside them
meanwhile, never following a link). The target directory itself is left, empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

from ..errors import IntegrityError, InvalidInput, PforgeError, StorageError
from .dirfd import ROOT_FLAGS, open_dir_at, shown_path
from .objects import DIR_MODE, TREE, decode_tree, tree_name_problem
from .odb import ObjectDB

__all__ = ["restore_tree"]

_LINK_MODE = 0o120000
_FILE_MODES = {0o100644: 0o644, 0o100755: 0o755}
# O_EXCL creates or fails, so no FIFO or device can be opened here; O_NOCTTY all the same, as every
# open of a workspace path has it.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


class _Level:
    """A directory being restored: its descriptor, its tree's entries, and what this call made in it."""

    __slots__ = ("created", "entries", "fd", "next", "oid", "rel")

    def __init__(self, fd: int, rel: bytes, oid: str, entries: list[tuple[bytes, int, bytes]]) -> None:
        self.fd = fd
        self.rel = rel
        self.oid = oid
        self.entries = entries
        self.next = 0
        #: (name, inode or None if unknown): removed again if the restore fails
        self.created: list[tuple[bytes, int | None]] = []


def restore_tree(odb: ObjectDB, tree: str, directory: str) -> None:
    """Write the tree into ``directory``, which must be missing or empty."""
    type_num, body = odb.read(tree)
    if type_num != TREE:
        raise InvalidInput(f"{tree} is not a tree")
    entries = decode_tree(body, tree)
    try:
        os.makedirs(directory, exist_ok=True)
        root_fd = os.open(directory, ROOT_FLAGS)
    except OSError as exc:
        raise StorageError(f"cannot prepare {shown_path(directory, b'')}: {exc.strerror or exc!r}") from exc
    try:
        try:
            with os.scandir(root_fd) as listing:
                busy = next(listing, None) is not None
        except OSError as exc:
            raise StorageError(f"cannot list {shown_path(directory, b'')}: {exc.strerror or exc!r}") from exc
        if busy:
            raise InvalidInput(f"restore target {shown_path(directory, b'')} is not empty")
        _Restore(odb, directory).run(root_fd, tree, entries)
    finally:
        os.close(root_fd)


class _Restore:
    def __init__(self, odb: ObjectDB, directory: str) -> None:
        self.odb = odb
        self.directory = directory

    def run(self, root_fd: int, tree: str, entries: list[tuple[bytes, int, bytes]]) -> None:
        levels = [_Level(root_fd, b"", tree, entries)]
        try:
            while levels:
                level = levels[-1]
                if level.next == len(level.entries):
                    levels.pop()
                    if level.fd != root_fd:
                        os.close(level.fd)
                    continue
                name, mode, raw = level.entries[level.next]
                level.next += 1
                rel = level.rel + b"/" + name if level.rel else name
                _check_entry(level.oid, name, mode)
                try:
                    child = self._restore_entry(level, name, mode, raw.hex(), rel)
                except OSError as exc:
                    shown = shown_path(self.directory, rel)
                    raise StorageError(f"cannot restore {shown}: {exc.strerror or exc!r}") from exc
                if child is not None:
                    levels.append(child)
        except BaseException:
            # Deepest first: a directory's own leftovers go before the directory does.
            for level in reversed(levels):
                for name, ino in reversed(level.created):
                    _remove(level.fd, name, ino)
                if level.fd != root_fd:
                    os.close(level.fd)
            raise

    def _restore_entry(self, level: _Level, name: bytes, mode: int, oid: str, rel: bytes) -> _Level | None:
        dir_fd = level.fd
        if mode == DIR_MODE:
            child_type, child_body = self.odb.read(oid)
            if child_type != TREE:
                raise IntegrityError(f"tree {level.oid} says {oid} is a tree, it is not")
            child_entries = decode_tree(child_body, oid)
            os.mkdir(name, 0o755, dir_fd=dir_fd)
            level.created.append((name, None))
            opened = open_dir_at(dir_fd, name)
            if opened is None:
                # What stands there now is not what we made: the clean-up must leave it alone.
                level.created.pop()
                raise StorageError(
                    f"cannot restore {shown_path(self.directory, rel)}: it was replaced during the restore"
                )
            fd, st = opened
            level.created[-1] = (name, st.st_ino)
            return _Level(fd, rel, oid, child_entries)
        if mode == _LINK_MODE:
            target = self.odb.read_blob(oid)
            if not target or b"\0" in target:
                raise IntegrityError(f"symlink {oid} has an empty target or one with NUL")
            os.symlink(target, name, dir_fd=dir_fd)
            ino: int | None = None
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    return None  # replaced at once: what stands there is not ours to remove
                ino = st.st_ino
            level.created.append((name, ino))
            return None
        permissions = _FILE_MODES.get(mode)
        if permissions is None:
            raise IntegrityError(f"tree {level.oid} has entry {name!r} of unsupported mode {mode:o}")
        level.created.append((name, self._write_file(dir_fd, name, oid, permissions)))
        return None

    def _write_file(self, dir_fd: int, name: bytes, oid: str, permissions: int) -> int:
        """Write a blob under a temp name and rename it into place: never a partly written ``name``."""
        temp = b".pforge-restore-" + secrets.token_hex(8).encode() + b".tmp"
        fd = os.open(temp, _TEMP_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            try:
                self.odb.copy_blob(oid, fd)
                os.fchmod(fd, permissions)
                ino = os.fstat(fd).st_ino
            finally:
                os.close(fd)
            _place(dir_fd, temp, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        return ino


#: what ``link`` says on a file system without hard links (FAT, some FUSE and network ones)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV})


def _place(dir_fd: int, temp: bytes, name: bytes) -> None:
    """Give the finished temp file its name, never in place of something else: ``rename`` would
    silently replace a file another process made under that name meanwhile (or, in a case-folding
    directory, the file restored just before under another case), losing it while the restore
    reports success. A hard link fails with ``EEXIST`` instead; then the temp name goes."""
    try:
        os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise  # EEXIST among them: the caller names the path
        # No hard links here: rename once the name is seen free (only a process racing this very
        # moment can still lose a file).
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from exc
    os.unlink(temp, dir_fd=dir_fd)


def _check_entry(tree: str, name: bytes, mode: int) -> None:
    # '..', '/' and '.git' are checked here whatever tree_name_problem says: they are what would
    # let a restore write outside its target or into a repository.
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or name.lower() == b".git":
        raise IntegrityError(f"tree {tree} has an unsafe entry name {name!r}")
    problem = tree_name_problem(name, mode)
    if problem is not None:
        raise IntegrityError(f"tree {tree} has an entry git refuses, {name!r}: {problem}")


def _remove(dir_fd: int, name: bytes, ino: int | None) -> None:
    """Best effort: remove ``name`` (recursively, never following a link) if it is what we made."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if ino is not None and st.st_ino != ino:
            return  # someone else's by now
        if ino is None and stat.S_ISDIR(st.st_mode):
            # Not known to be ours (made, never opened): only removed if empty, never cleared.
            os.rmdir(name, dir_fd=dir_fd)
            return
        if stat.S_ISDIR(st.st_mode):
            # Deepest first, so what we made is empty by now: rmdir needs no descriptor, and a
            # restore that failed for want of descriptors (one per level) can still clean up.
            try:
                os.rmdir(name, dir_fd=dir_fd)
            except OSError:
                _remove_tree(dir_fd, name)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except (OSError, PforgeError):
        pass


def _remove_tree(parent_fd: int, name: bytes) -> None:
    """``rm -rf`` relative to descriptors, one pass: what appears meanwhile is left (rmdir fails)."""
    opened = open_dir_at(parent_fd, name)
    if opened is None:
        return
    # (parent fd, name, fd, subdirectories still to remove)
    stack: list[tuple[int, bytes, int, list[bytes]]] = [(parent_fd, name, opened[0], [])]
    try:
        _clear_files(stack[-1])
        while stack:
            parent, here, fd, subdirs = stack[-1]
            if subdirs:
                sub = subdirs.pop()
                child = open_dir_at(fd, sub)
                if child is not None:
                    stack.append((fd, sub, child[0], []))
                    _clear_files(stack[-1])
                continue
            stack.pop()
            os.close(fd)
            with contextlib.suppress(OSError):
                os.rmdir(here, dir_fd=parent)
    finally:
        for _parent, _name, fd, _subdirs in stack:
            os.close(fd)


def _clear_files(frame: tuple[int, bytes, int, list[bytes]]) -> None:
    fd, subdirs = frame[2], frame[3]
    with os.scandir(fd) as listing:
        entries = list(listing)
    for entry in entries:
        name = os.fsencode(entry.name)
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(name)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
