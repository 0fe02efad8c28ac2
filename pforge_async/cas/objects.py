"""Git objects in SHA-256 format: ids, blob/tree/commit encoding and decoding, input validation.

Everything here is pure (no I/O). An object's id is ``sha256(b"<type> <size>\\0" + body)``, the body
bytes exactly as git writes them, so ``git cat-file`` and ``git fsck --strict`` accept what we store.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Mapping
from typing import Literal, TypeGuard

import msgspec

from ..errors import IntegrityError, InvalidInput
from .gitrules import DIR_MODE, MAX_TIMESTAMP, MODES, mode_problem, parse_tree, tree_name_problem

__all__ = [
    "BLOB",
    "COMMIT",
    "DIR_MODE",
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
    "shown_name",
    "object_header",
    "parse_mode",
    "tree_name_problem",
    "utf8",
    "is_oid",
    "validate_oid",
]

ObjectType = Literal["blob", "tree", "commit", "tag"]
# Pack type numbers (git's OBJ_COMMIT, OBJ_TREE, OBJ_BLOB, OBJ_TAG).
COMMIT, TREE, BLOB, TAG = 1, 2, 3, 4
TYPE_NAMES: dict[int, ObjectType] = {COMMIT: "commit", TREE: "tree", BLOB: "blob", TAG: "tag"}
TYPE_NUMBERS: dict[bytes, int] = {name.encode(): num for num, name in TYPE_NAMES.items()}

NULL_OID = "0" * 64
_OID_RE = re.compile(r"[0-9a-f]{64}")

_MODE_TEXT = {mode: f"{mode:o}" for mode in MODES}
_TEXT_MODE = {text: mode for mode, text in _MODE_TEXT.items()}


def is_oid(oid: object) -> TypeGuard[str]:
    """Whether ``oid`` is an object id: 64 lowercase hex characters."""
    return isinstance(oid, str) and _OID_RE.fullmatch(oid) is not None


def validate_oid(oid: object, what: str = "object id") -> str:
    """Return ``oid`` if it is 64 lowercase hex characters; raise before any path is built from it."""
    if not is_oid(oid):
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
    why = None
    if isinstance(mode, str) and re.fullmatch(r"[0-7]{1,12}", mode):
        why = mode_problem(int(mode, 8))
    elif isinstance(mode, int) and not isinstance(mode, bool):
        why = mode_problem(mode)
    raise InvalidInput(f"unknown tree entry mode {mode!r}: {why or 'use 100644, 100755, 120000 or 40000'}")


class TreeEntry(msgspec.Struct, frozen=True):
    """One entry of a tree: ``name`` is a single path component (or, from ``read_tree(recursive=True)``,
    a path relative to the tree); ``mode`` is an int such as ``0o100644``."""

    name: str
    mode: int
    oid: str

    @property
    def is_tree(self) -> bool:
        return self.mode == DIR_MODE


def shown_name(name: bytes) -> str:
    """A tree entry name for a message: the str API's spelling of it (``os.fsdecode``)."""
    return name.decode("utf-8", "surrogateescape")


def _sort_key(item: tuple[bytes, int, bytes]) -> bytes:
    name, mode, _ = item
    return name + b"/" if mode == DIR_MODE else name


def encode_tree(entries: Iterable[tuple[bytes, int, bytes]]) -> bytes:
    """Encode one level of a tree from ``(name bytes, mode, raw oid)``, sorted as git sorts. Refuses
    with ``InvalidInput`` whatever ``git fsck --strict`` would reject (see :mod:`.gitrules`)."""
    items = sorted(entries, key=_sort_key)
    out = bytearray()
    seen: set[bytes] = set()
    for name, mode, raw in items:
        why = mode_problem(mode) or tree_name_problem(name, mode)
        if why:
            raise InvalidInput(f"invalid tree entry {shown_name(name)!r}: {why}")
        if name in seen:
            raise InvalidInput(f"duplicate tree entry {shown_name(name)!r}")
        seen.add(name)
        out += b"%s %s\0" % (_MODE_TEXT[mode].encode(), name)
        out += raw
    return bytes(out)


def decode_tree(body: bytes, oid: str = "") -> list[tuple[bytes, int, bytes]]:
    """Decode a tree body into ``(name bytes, mode, raw oid)`` in stored order. A tree the CAS would
    not have written (malformed, unsorted, a name or mode git or the CAS refuses: ``..``, ``a/b``,
    ``.git``, a gitlink) raises ``IntegrityError`` naming the tree and the entry: no reader ever sees
    such a name."""
    entries, error = parse_tree(body)
    if error:
        raise IntegrityError(f"tree {oid} is malformed: {error}")
    out: list[tuple[bytes, int, bytes]] = []
    seen: set[bytes] = set()
    previous = b""
    for name, mode_text, raw in entries:
        mode = _TEXT_MODE.get(mode_text.decode())
        why: str | None
        if mode is None:
            why = mode_problem(int(mode_text, 8)) or f"mode {mode_text.decode()} is zero-padded"
        else:
            key = _sort_key((name, mode, raw))
            why = tree_name_problem(name, mode)
            if not why and name in seen:
                why = "duplicate entry"
            elif not why and key <= previous:
                why = "entries out of git's order"
            seen.add(name)
            previous = key
        if why or mode is None:
            raise IntegrityError(f"tree {oid} holds an entry git or the CAS refuses, {shown_name(name)!r}: {why}")
        out.append((name, mode, raw))
    return out


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


# git's fsck_ident: no '<', '>' or newline in the name or the email, a space before '<'; a NUL
# anywhere in a commit header is an error too.
_IDENT_RE = re.compile(r"[^<>\n\0]+ <[^<>\n\0]*>")
_TRAILER_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_TRAILER_LINE_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*): (.*)")
DEFAULT_AUTHOR = "pforge <pforge@localhost>"


def utf8(text: object, what: str) -> bytes:
    """``text`` as UTF-8, or ``InvalidInput`` naming ``what`` (not a str, or a lone surrogate)."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a str, not {type(text).__name__}")
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} {text!r} is not valid Unicode text: {exc.reason} at {exc.start}") from exc


def encode_commit(
    tree: str,
    parents: Iterable[str] = (),
    *,
    message: str = "",
    author: str | None = None,
    timestamp: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """A commit body ``git fsck --strict`` accepts; anything it would reject is ``InvalidInput``
    naming the field: author ``Name <email>`` without ``<``, ``>``, newline or NUL inside; timestamp
    0 to 2**63 - 1 (git's ``date_overflows``); message, metadata keys and values UTF-8 without NUL."""
    validate_oid(tree, "tree id")
    if isinstance(parents, (str, bytes)) or not isinstance(parents, Iterable):
        raise InvalidInput(f"parents must be an iterable of commit ids, not {type(parents).__name__}")
    parents = tuple(parents)
    for parent in parents:
        validate_oid(parent, "parent commit id")
    ident = DEFAULT_AUTHOR if author is None else author
    utf8(ident, "author")
    if not _IDENT_RE.fullmatch(ident):
        raise InvalidInput(f"invalid author {author!r}: want 'Name <email>' without '<', '>', newline or NUL inside")
    when = int(time.time()) if timestamp is None else timestamp
    if not isinstance(when, int) or isinstance(when, bool) or not 0 <= when <= MAX_TIMESTAMP:
        raise InvalidInput(f"invalid timestamp {timestamp!r}: want whole seconds since the epoch, 0 to 2**63 - 1")
    utf8(message, "commit message")
    if "\0" in message:
        raise InvalidInput("commit message must not contain NUL characters")
    text = message.rstrip("\n")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidInput(f"metadata must be a mapping of str to str, not {type(metadata).__name__}")
    if metadata:
        lines = []
        for key, value in metadata.items():
            if not isinstance(key, str) or not _TRAILER_KEY_RE.fullmatch(key) or not key.isascii():
                raise InvalidInput(f"invalid metadata key {key!r}: ASCII letters, digits and '-' only")
            utf8(value, f"metadata value for {key!r}")
            if "\n" in value or "\0" in value:
                raise InvalidInput(f"invalid metadata value for {key!r}: one line of text without NUL")
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
