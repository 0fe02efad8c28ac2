"""Git refs as loose files under the CAS, updated compare-and-swap under a file lock."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..errors import InvalidInput, RefConflict, StorageError
from .objects import NULL_OID, validate_oid
from .pack import fsync_dir

__all__ = ["RefStore", "validate_ref_name"]

_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
#: a ref is a file under the CAS: each component a file name (NAME_MAX), the whole well under PATH_MAX.
MAX_REF_COMPONENT_BYTES = 255
MAX_REF_BYTES = 1024


def validate_ref_name(name: object) -> str:
    """``HEAD`` or ``refs/...`` following ``git check-ref-format`` (no control characters, space,
    ``~^:?*[\\``, ``..``, ``@{``, empty components, components starting with ``.`` or ending with
    ``.lock``, no trailing ``.``), valid UTF-8 text, each component at most 255 bytes and the whole at
    most 1,024. Checked before any path is built from it: anything else is ``InvalidInput``."""
    if not isinstance(name, str):
        raise InvalidInput(f"invalid ref name {name!r}: want a str")
    if name == "HEAD":
        return name
    shown = name if len(name) <= 200 else f"{name[:200]}... ({len(name)} characters)"
    try:
        encoded = name.encode()
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"invalid ref name {shown!r}: not valid Unicode text ({exc.reason})") from exc
    if len(encoded) > MAX_REF_BYTES:
        raise InvalidInput(f"invalid ref name {shown!r}: longer than {MAX_REF_BYTES} bytes")
    parts = encoded.split(b"/")
    if any(len(p) > MAX_REF_COMPONENT_BYTES for p in parts):
        raise InvalidInput(f"invalid ref name {shown!r}: a component longer than {MAX_REF_COMPONENT_BYTES} bytes")
    ok = (
        name.startswith("refs/")
        and len(parts) >= 3
        and not _BAD_REF_CHARS.search(name)
        and ".." not in name
        and "@{" not in name
        and not name.endswith((".", ".lock"))
        and all(p and not p.startswith(b".") and not p.endswith(b".lock") for p in parts)
    )
    if not ok:
        raise InvalidInput(f"invalid ref name {shown!r}: want 'HEAD' or 'refs/<kind>/<name>' as git allows")
    return name


class RefStore:
    def __init__(self, gitdir: Path, *, fsync: bool) -> None:
        self.gitdir = gitdir
        self.fsync = fsync

    def _resolve_symbolic(self, name: str) -> str:
        for _ in range(5):
            try:
                text = (self.gitdir / name).read_text().strip()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return name
            if not text.startswith("ref: "):
                return name
            name = validate_ref_name(text[5:])
        raise StorageError(f"symbolic ref chain from {name} is too deep")

    def get(self, name: str) -> str | None:
        """The oid a ref points at (following symbolic refs), or None if it does not exist."""
        target = self._resolve_symbolic(validate_ref_name(name))
        try:
            text = (self.gitdir / target).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return self._packed(target)
        except OSError as exc:
            raise StorageError(f"cannot read ref {target}: {exc.strerror or exc!r}") from exc
        return validate_oid(text, f"value of ref {target}")

    def _packed(self, name: str) -> str | None:
        try:
            lines = (self.gitdir / "packed-refs").read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            oid, _, ref = line.partition(" ")
            if ref == name:
                return validate_oid(oid, f"value of ref {name}")
        return None

    def iter_refs(self) -> list[tuple[str, str]]:
        """Every ref with the oid it holds (loose files under ``refs/``, then ``packed-refs`` entries
        no loose file overrides, then a detached ``HEAD``): what gc keeps alive. Lock files and
        files that do not hold an oid are skipped."""
        out: dict[str, str] = {}
        refs_dir = self.gitdir / "refs"
        for directory, _dirs, files in os.walk(refs_dir):
            for file in files:
                if file.endswith(".lock"):
                    continue
                path = Path(directory) / file
                try:
                    text = path.read_text().strip()
                    oid = validate_oid(text)
                except (OSError, UnicodeError, InvalidInput):
                    continue
                out[str(path.relative_to(self.gitdir))] = oid
        try:
            lines = (self.gitdir / "packed-refs").read_text().splitlines()
        except (OSError, UnicodeError):
            lines = []
        for line in lines:
            oid, _, ref = line.partition(" ")
            if line.startswith("^"):
                oid, ref = line[1:], f"{ref}^peeled-{len(out)}"
            try:
                out.setdefault(ref or f"packed-{len(out)}", validate_oid(oid))
            except InvalidInput:
                continue
        try:
            head = (self.gitdir / "HEAD").read_text().strip()
            out["HEAD"] = validate_oid(head)
        except (OSError, UnicodeError, InvalidInput):
            pass
        return sorted(out.items())

    def update(self, name: str, new: str, expected: str | None) -> None:
        """Set ``name`` to ``new``. The caller holds the refs lock. ``expected`` None means no check;
        the null oid means the ref must not exist yet."""
        target = self._resolve_symbolic(name)
        if expected is not None:
            current = self.get(target)
            if (current or NULL_OID) != expected:
                raise RefConflict(f"ref {target} is {current or 'absent'}, expected {expected}")
        path = self.gitdir / target
        # git's own lock-file name: a git process updating the same ref at once fails cleanly.
        temp = path.with_name(f"{path.name}.lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "w") as f:
                f.write(new + "\n")
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(temp, path)
            if self.fsync:
                fsync_dir(str(path.parent))
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise StorageError(f"cannot update ref {target}: {exc}") from exc
