"""Git objects in SHA-256 format: ids, blob/tree/commit encoding and decoding, input validation.

Everything here is pure (no I/O). An object's id is ``sha256(b"<type> <size>\\0" + body)``, the body
bytes exactly as git writes them, so ``git cat-file`` and ``git fsck --strict`` accept what we store.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Mapping
from typing import Literal

import msgspec

from ..errors import IntegrityError, InvalidInput

__all__ = [
    "BLOB",
    "COMMIT",
    "EMPTY_TREE",
    "MODES",
    "NULL_OID",
    "TREE",
    "Commit",
    "TreeEntry",
    "decode_commit",
    "decode_tree",
    "encode_commit",
    "encode_tree",
    "hash_object",
    "mode_problem",
    "object_header",
    "parse_mode",
    "tree_name_problem",
    "validate_oid",
]

ObjectType = Literal["blob", "tree", "commit", "tag"]
# Pack type numbers (git's OBJ_COMMIT, OBJ_TREE, OBJ_BLOB, OBJ_TAG).
COMMIT, TREE, BLOB, TAG = 1, 2, 3, 4
TYPE_NAMES: dict[int, ObjectType] = {COMMIT: "commit", TREE: "tree", BLOB: "blob", TAG: "tag"}
TYPE_NUMBERS: dict[bytes, int] = {name.encode(): num for num, name in TYPE_NAMES.items()}

NULL_OID = "0" * 64
_OID_RE = re.compile(r"[0-9a-f]{64}")

#: the modes git writes: regular file, executable, symlink, directory.
MODES = (0o100644, 0o100755, 0o120000, 0o40000)
DIR_MODE = 0o40000
LINK_MODE = 0o120000
#: a submodule commit; git accepts it, the CAS refuses it (it cannot hold the commit it names).
GITLINK_MODE = 0o160000
#: git (2.41+, ``fsck.largePathname``) refuses tree entry names longer than this many bytes.
MAX_NAME_BYTES = 4096
_MODE_TEXT = {mode: f"{mode:o}" for mode in MODES}
_TEXT_MODE = {text: mode for mode, text in _MODE_TEXT.items()}


def validate_oid(oid: object, what: str = "object id") -> str:
    """Return ``oid`` if it is 64 lowercase hex characters; raise before any path is built from it."""
    if not isinstance(oid, str) or not _OID_RE.fullmatch(oid):
        raise InvalidInput(f"invalid {what} {oid!r}: want 64 lowercase hex characters")
    return oid


def object_header(type_num: int, size: int) -> bytes:
    return b"%s %d\0" % (TYPE_NAMES[type_num].encode(), size)


def hash_object(type_num: int, body: bytes) -> bytes:
    """The raw 32-byte id of an object."""
    h = hashlib.sha256(object_header(type_num, len(body)))
    h.update(body)
    return h.digest()


def parse_mode(mode: object) -> int:
    """Accept a mode as git's octal text (``"100644"``) or as an int (``0o100644``)."""
    if isinstance(mode, str) and mode in _TEXT_MODE:
        return _TEXT_MODE[mode]
    if isinstance(mode, int) and not isinstance(mode, bool) and mode in _MODE_TEXT:
        return mode
    raise InvalidInput(f"unknown tree entry mode {mode!r}: use 100644, 100755, 120000 or 40000")


def mode_problem(mode: int) -> str | None:
    """Why the CAS refuses a tree entry ``mode``, or None. git --strict accepts the four of
    :data:`MODES` and gitlinks; the CAS refuses gitlinks too: it cannot hold the commit one names."""
    if mode in _MODE_TEXT:
        return None
    if mode == GITLINK_MODE:
        return "gitlink (submodule) entries are not stored: the CAS cannot hold the commit they name"
    return f"mode {mode:o} is not one git accepts (100644, 100755, 120000, 40000)"


# -- the names git refuses (git's fsck.c fsck_tree, path.c is_hfs_* / is_ntfs_*, utf8.c) -------------

# Code points HFS+ ignores when it compares names, so ".g\u200cit" opens ".git" on a Mac.
_HFS_IGNORED = frozenset(
    {0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E}
    | {0x206A, 0x206B, 0x206C, 0x206D, 0x206E, 0x206F, 0xFEFF}
)


def _utf8_width(lead: int) -> int:
    if lead < 0x80:
        return 1
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 0


def _hfs_chars(name: bytes) -> list[int]:
    """The code points git's ``next_hfs_char`` yields, ignorable ones dropped. Ends with 0, which git
    also returns at malformed UTF-8 (so ``.git<bad byte>`` counts as ``.git``, as in git)."""
    out: list[int] = []
    pos = 0
    while pos < len(name):
        width = _utf8_width(name[pos])
        chunk = name[pos : pos + width]
        try:
            if not width or len(chunk) < width:
                raise UnicodeDecodeError("utf-8", chunk, 0, 1, "truncated")
            point = ord(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            break
        if point in (0xFFFE, 0xFFFF):  # git's decoder refuses these two
            break
        pos += width
        if point not in _HFS_IGNORED:
            out.append(point)
    out.append(0)
    return out


def _is_hfs_dot(name: bytes, needle: bytes) -> bool:
    """git's ``is_hfs_dot_generic``: ``name`` opens ``.<needle>`` on HFS+ (case and ignorables)."""
    chars = _hfs_chars(name)
    if len(chars) < len(needle) + 2 or chars[0] != ord("."):
        return False
    for got, want in zip(chars[1:], needle, strict=False):
        if got > 127 or chr(got).lower() != chr(want):
            return False
    return chars[len(needle) + 1] in (0, ord("/"))


def _at(name: bytes, i: int) -> int:
    return name[i] if i < len(name) else 0


def _is_ntfs_dotgit(name: bytes) -> bool:
    """git's ``is_ntfs_dotgit``: ``.git`` or ``git~1``, then only spaces and dots up to the end, a
    backslash, a slash or a colon (an NTFS stream name)."""
    low = name.lower()
    if low.startswith(b".git"):
        i = 4
    elif low.startswith(b"git~1"):
        i = 5
    else:
        return False
    while True:
        c = _at(name, i)
        if c in (0, ord("\\"), ord("/"), ord(":")):
            return True
        if c not in (ord("."), ord(" ")):
            return False
        i += 1


def _is_ntfs_dot(name: bytes, needle: bytes, short_prefix: bytes) -> bool:
    """git's ``is_ntfs_dot_generic``: ``.<needle>``, its 8.3 short names (``gitmod~1``) and its
    fall-back short names (``gi7eba~9``), then only spaces and dots up to the end or a colon."""

    def only_spaces_and_periods(i: int) -> bool:
        while True:
            c = _at(name, i)
            if c in (0, ord(":")):
                return True
            if c not in (ord(" "), ord(".")):
                return False
            i += 1

    if name[:1] == b"." and name[1 : 1 + len(needle)].lower() == needle:
        return only_spaces_and_periods(1 + len(needle))
    if name[:6].lower() == needle[:6] and _at(name, 6) == ord("~") and ord("1") <= _at(name, 7) <= ord("4"):
        return only_spaces_and_periods(8)
    i, saw_tilde = 0, False
    while i < 8:
        c = _at(name, i)
        if c == 0:
            return False
        if saw_tilde:
            if not ord("0") <= c <= ord("9"):
                return False
        elif c == ord("~"):
            i += 1
            if not ord("1") <= _at(name, i) <= ord("9"):
                return False
            saw_tilde = True
        elif i >= 6 or c & 0x80 or chr(c).lower() != chr(short_prefix[i]):
            return False
        i += 1
    return only_spaces_and_periods(8)


_DOTFILES = {
    b"gitmodules": b"gi7eba",
    b"gitattributes": b"gi7d29",
    b"gitignore": b"gi250a",
    b"mailmap": b"maba30",
}


def _is_dotfile(name: bytes, needle: bytes) -> bool:
    return _is_hfs_dot(name, needle) or _is_ntfs_dot(name, needle, _DOTFILES[needle])


def _after_backslashes(name: bytes) -> list[bytes]:
    """What follows each backslash: git checks each as a name, since NTFS reads ``\\`` as ``/``."""
    return [name[i + 1 :] for i, c in enumerate(name) if c == ord("\\")]


def dotfile_kind(name: bytes) -> bytes | None:
    """``b"gitmodules"`` or ``b"gitattributes"`` if git reads the blob at ``name`` as that file (any
    spelling, including after a backslash for ``.gitmodules``), else None: git checks their content."""
    if _is_dotfile(name, b"gitmodules") or any(
        _is_ntfs_dot(rest, b"gitmodules", _DOTFILES[b"gitmodules"]) for rest in _after_backslashes(name)
    ):
        return b"gitmodules"
    if _is_dotfile(name, b"gitattributes"):
        return b"gitattributes"
    return None


def tree_name_problem(name: bytes, mode: int) -> str | None:
    """Why ``git fsck --strict`` (git 2.39) rejects a tree entry ``name`` with ``mode``, or None.

    The CAS refuses more than git's errors in two places, both things git reports at a lower level:
    a ``.gitignore`` or ``.mailmap`` that is a symlink, and a name over 4,096 bytes."""
    if not name:
        return "empty name"
    if b"/" in name:
        return "contains '/'"
    if b"\0" in name:
        return "contains NUL"
    if name in (b".", b".."):
        return f"is {name.decode()!r}"
    if len(name) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    if _is_hfs_dot(name, b"git") or _is_ntfs_dotgit(name):
        return "is a spelling of '.git' (case, trailing dots or spaces, NTFS short name or HFS+ ignorables)"
    if any(_is_ntfs_dotgit(rest) for rest in _after_backslashes(name)):
        return "holds '.git' after a backslash (a path on NTFS)"
    kind = dotfile_kind(name)
    if kind is not None and mode == LINK_MODE:
        return f"a spelling of '.{kind.decode()}' that is a symlink"
    if kind is not None and mode in (DIR_MODE, GITLINK_MODE):
        return f"a spelling of '.{kind.decode()}' that is not a file"
    if mode == LINK_MODE and (_is_dotfile(name, b"gitignore") or _is_dotfile(name, b"mailmap")):
        return "a spelling of '.gitignore' or '.mailmap' that is a symlink"
    return None


class TreeEntry(msgspec.Struct, frozen=True):
    """One entry of a tree: ``name`` is a single path component (or, from ``read_tree(recursive=True)``,
    a path relative to the tree); ``mode`` is an int such as ``0o100644``."""

    name: str
    mode: int
    oid: str

    @property
    def is_tree(self) -> bool:
        return self.mode == DIR_MODE


def _validate_name(name: bytes) -> None:
    why = ""
    if not name or name in (b".", b".."):
        why = "empty, '.' or '..'"
    elif b"/" in name or b"\0" in name:
        why = "contains '/' or NUL"
    elif name.lower() == b".git":
        why = "git refuses '.git' in trees"
    if why:
        shown = name.decode("utf-8", "surrogateescape")
        raise InvalidInput(f"invalid tree entry name {shown!r}: {why}")


def _sort_key(item: tuple[bytes, int, bytes]) -> bytes:
    name, mode, _ = item
    return name + b"/" if mode == DIR_MODE else name


def encode_tree(entries: Iterable[tuple[bytes, int, bytes]]) -> bytes:
    """Encode one level of a tree from ``(name bytes, mode, raw oid)``; validates and sorts as git."""
    items = sorted(entries, key=_sort_key)
    out = bytearray()
    previous: bytes | None = None
    for name, mode, raw in items:
        _validate_name(name)
        if name == previous:
            raise InvalidInput(f"duplicate tree entry {name.decode('utf-8', 'surrogateescape')!r}")
        previous = name
        out += b"%s %s\0" % (_MODE_TEXT[mode].encode(), name)
        out += raw
    return bytes(out)


def decode_tree(body: bytes, oid: str = "") -> list[tuple[bytes, int, bytes]]:
    """Decode a tree body into ``(name bytes, mode, raw oid)`` in stored order."""
    entries = []
    pos, end = 0, len(body)
    try:
        while pos < end:
            space = body.index(b" ", pos)
            nul = body.index(b"\0", space)
            mode = int(body[pos:space], 8)
            name = body[space + 1 : nul]
            raw = body[nul + 1 : nul + 33]
            if len(raw) != 32:
                raise ValueError("truncated entry")
            entries.append((name, mode, raw))
            pos = nul + 33
    except ValueError as exc:
        raise IntegrityError(f"tree {oid} is malformed: {exc}") from exc
    return entries


EMPTY_TREE = hash_object(TREE, b"").hex()


class Commit(msgspec.Struct, frozen=True):
    """A commit as ``read_commit`` returns it. ``metadata`` travels as trailers in the message."""

    tree: str
    parents: tuple[str, ...]
    author: str
    timestamp: int
    message: str
    metadata: dict[str, str]
    committer: str = ""


_IDENT_RE = re.compile(r"[^<>\n]+ <[^<>\n]*>")
_TRAILER_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_TRAILER_LINE_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*): (.*)")
DEFAULT_AUTHOR = "pforge <pforge@localhost>"


def encode_commit(
    tree: str,
    parents: Iterable[str] = (),
    *,
    message: str = "",
    author: str | None = None,
    timestamp: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    validate_oid(tree, "tree id")
    parents = tuple(parents)
    for parent in parents:
        validate_oid(parent, "parent commit id")
    ident = DEFAULT_AUTHOR if author is None else author
    if not isinstance(ident, str) or not _IDENT_RE.fullmatch(ident):
        raise InvalidInput(f"invalid author {author!r}: want 'Name <email>'")
    when = int(time.time()) if timestamp is None else timestamp
    if not isinstance(when, int) or isinstance(when, bool) or when < 0:
        raise InvalidInput(f"invalid timestamp {timestamp!r}: want seconds since the epoch, >= 0")
    if not isinstance(message, str) or "\0" in message:
        raise InvalidInput("commit message must be a str without NUL characters")
    text = message.rstrip("\n")
    if metadata:
        lines = []
        for key, value in metadata.items():
            if not isinstance(key, str) or not _TRAILER_KEY_RE.fullmatch(key):
                raise InvalidInput(f"invalid metadata key {key!r}: letters, digits and '-' only")
            if not isinstance(value, str) or "\n" in value or "\0" in value:
                raise InvalidInput(f"invalid metadata value for {key!r}: one line of text")
            lines.append(f"{key}: {value}")
        text = (text + "\n\n" if text else "") + "\n".join(lines)
    head = [f"tree {tree}"]
    head += [f"parent {p}" for p in parents]
    stamp = f"{ident} {when} +0000"
    head += [f"author {stamp}", f"committer {stamp}"]
    return ("\n".join(head) + "\n\n" + text + "\n").encode()


def decode_commit(body: bytes, oid: str = "") -> Commit:
    try:
        text = body.decode()
        header, _, message = text.partition("\n\n")
        tree = ""
        parents: list[str] = []
        author = committer = ""
        timestamp = 0
        for line in header.split("\n"):
            key, _, value = line.partition(" ")
            if key == "tree":
                tree = value
            elif key == "parent":
                parents.append(value)
            elif key in ("author", "committer"):
                ident, stamp, _zone = value.rsplit(" ", 2)
                if key == "author":
                    author, timestamp = ident, int(stamp)
                else:
                    committer = ident
    except ValueError as exc:
        raise IntegrityError(f"commit {oid} is malformed: {exc}") from exc
    message = message[:-1] if message.endswith("\n") else message
    body_text, _, last = message.rpartition("\n\n")
    metadata: dict[str, str] = {}
    candidate = last.split("\n") if last else []
    if candidate and all(_TRAILER_LINE_RE.fullmatch(line) for line in candidate):
        for line in candidate:
            match = _TRAILER_LINE_RE.fullmatch(line)
            assert match is not None
            metadata[match[1]] = match[2]
        message = body_text
    return Commit(tree, tuple(parents), author, timestamp, message, metadata, committer)
