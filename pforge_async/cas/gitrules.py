"""What ``git fsck --strict`` (git 2.39) accepts, as pure functions over names, bodies and blobs.

Ported from git's fsck.c (``fsck_tree``, ``fsck_ident``, ``fsck_commit``, ``fsck_blob``), path.c
(``is_hfs_dotgit``, ``is_ntfs_dotgit`` and kin), utf8.c and config.c, so that the CAS writes nothing git
rejects and ``Cas.fsck`` finds what git finds. Where the CAS is stricter than git it says so.
"""

from __future__ import annotations

import re

__all__ = [
    "DIR_MODE",
    "DOTFILE_MAX_BYTES",
    "GITLINK_MODE",
    "LINK_MODE",
    "MAX_NAME_BYTES",
    "MAX_TIMESTAMP",
    "MAX_TREE_DEPTH",
    "MODES",
    "commit_problems",
    "dotfile_blob_problem",
    "dotfile_kind",
    "ident_problem",
    "mode_problem",
    "parse_tree",
    "tree_name_problem",
    "tree_problems",
]

#: the modes the CAS writes: regular file, executable, symlink, directory.
MODES = (0o100644, 0o100755, 0o120000, 0o40000)
DIR_MODE = 0o40000
LINK_MODE = 0o120000
#: a submodule commit; git accepts it, the CAS refuses it (it cannot hold the commit it names).
GITLINK_MODE = 0o160000
#: git (``fsck.largePathname``, from 2.47) refuses tree entry names longer than this many bytes.
MAX_NAME_BYTES = 4096
#: git's ``core.maxTreeDepth`` default (from 2.43.1): trees nested deeper than this, the root counted as
#: one, are what ``git rev-list --objects`` (so ``git gc``, ``repack``, ``push``), ``read-tree`` and
#: ``ls-tree -r`` refuse. ``write_tree`` and ``snapshot`` refuse them with ``InvalidInput``.
MAX_TREE_DEPTH = 4096
#: git's ``date_overflows``: a commit date must fit a signed 64-bit ``time_t``.
MAX_TIMESTAMP = 2**63 - 1
#: git's ``ATTR_MAX_FILE_SIZE``: the largest ``.gitattributes`` it parses; the CAS holds ``.gitmodules``
#: to the same bound, so a workspace's dotfiles are checked in memory of a known size.
DOTFILE_MAX_BYTES = 100 * 1024 * 1024
#: git's ``ATTR_MAX_LINE_LENGTH``: a ``.gitattributes`` line must be shorter.
_ATTR_MAX_LINE_LENGTH = 2048


def mode_problem(mode: int) -> str | None:
    """Why the CAS refuses a tree entry ``mode``, or None. git --strict accepts the four of
    :data:`MODES` and gitlinks; the CAS refuses gitlinks too: it cannot hold the commit one names."""
    if mode in MODES:
        return None
    if mode == GITLINK_MODE:
        return "gitlink (submodule) entries are not stored: the CAS cannot hold the commit they name"
    return f"mode {mode:o} is not one git accepts (100644, 100755, 120000, 40000)"


# -- the names git refuses ---------------------------------------------------------------------------

# Code points HFS+ ignores when it compares names, so ".g\u200cit" opens ".git" on a Mac.
_HFS_IGNORED = frozenset(
    {0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E}
    | {0x206A, 0x206B, 0x206C, 0x206D, 0x206E, 0x206F, 0xFEFF}
)
# A name can only be special to git if it starts with one of these bytes ('.', the first letters of
# 'git~1', 'gitmod~1', 'maba30~1' and kin, or the lead byte of an HFS-ignorable code point) or holds a
# backslash: every other name skips the slow checks.
_SPECIAL_FIRST = frozenset(b".gGmM\xe2\xef")


def _maybe_special(name: bytes) -> bool:
    return (bool(name) and name[0] in _SPECIAL_FIRST) or b"\\" in name


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


def _hfs_chars(name: bytes, limit: int) -> list[int]:
    """Up to ``limit`` code points as git's ``next_hfs_char`` yields them, ignorable ones dropped,
    then 0: git also returns 0 at malformed UTF-8 (so ``.git<bad byte>`` counts as ``.git``)."""
    out: list[int] = []
    pos = 0
    while pos < len(name) and len(out) < limit:
        width = _utf8_width(name[pos])
        chunk = name[pos : pos + width]
        if not width or len(chunk) < width:
            break
        try:
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
    chars = _hfs_chars(name, len(needle) + 2)
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
    low = name[:5].lower()
    if low.startswith(b".git"):
        i = 4
    elif low == b"git~1":
        i = 5
    else:
        return False
    while True:
        c = _at(name, i)
        if c in (0, 0x5C, 0x2F, 0x3A):  # end, '\\', '/', ':'
            return True
        if c not in (0x2E, 0x20):  # '.', ' '
            return False
        i += 1


def _only_spaces_and_periods(name: bytes, i: int) -> bool:
    while True:
        c = _at(name, i)
        if c in (0, 0x3A):  # end, ':'
            return True
        if c not in (0x20, 0x2E):
            return False
        i += 1


def _is_ntfs_dot(name: bytes, needle: bytes, short_prefix: bytes) -> bool:
    """git's ``is_ntfs_dot_generic``: ``.<needle>``, its 8.3 short names (``gitmod~1``) and its
    fall-back short names (``gi7eba~9``), then only spaces and dots up to the end or a colon."""
    if name[:1] == b"." and name[1 : 1 + len(needle)].lower() == needle:
        return _only_spaces_and_periods(name, 1 + len(needle))
    if name[:6].lower() == needle[:6] and _at(name, 6) == 0x7E and 0x31 <= _at(name, 7) <= 0x34:
        return _only_spaces_and_periods(name, 8)
    i, saw_tilde = 0, False
    while i < 8:
        c = _at(name, i)
        if c == 0:
            return False
        if saw_tilde:
            if not 0x30 <= c <= 0x39:
                return False
        elif c == 0x7E:  # '~'
            i += 1
            if not 0x31 <= _at(name, i) <= 0x39:
                return False
            saw_tilde = True
        elif i >= 6 or c & 0x80 or chr(c).lower() != chr(short_prefix[i]):
            return False
        i += 1
    return _only_spaces_and_periods(name, 8)


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
    return [name[i + 1 :] for i, c in enumerate(name) if c == 0x5C]


def dotfile_kind(name: bytes) -> str | None:
    """``"gitmodules"`` or ``"gitattributes"`` if git reads the blob at tree entry ``name`` as that
    file (any spelling; after a backslash too for ``.gitmodules``), else None: git checks its content."""
    if not _maybe_special(name):
        return None
    if _is_dotfile(name, b"gitmodules") or any(
        _is_ntfs_dot(rest, b"gitmodules", _DOTFILES[b"gitmodules"]) for rest in _after_backslashes(name)
    ):
        return "gitmodules"
    if _is_dotfile(name, b"gitattributes"):
        return "gitattributes"
    return None


def tree_name_problem(name: bytes, mode: int) -> str | None:
    """Why ``git fsck --strict`` (git 2.39) rejects a tree entry ``name`` with ``mode``, or None.

    The CAS refuses a little more than git's errors, things git only warns about or refuses only in
    later versions: a ``.gitignore``, ``.mailmap`` or ``.gitattributes`` that is a symlink, a name over
    4,096 bytes."""
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
    if not _maybe_special(name):
        return None
    if _is_hfs_dot(name, b"git") or _is_ntfs_dotgit(name):
        return "is a spelling of '.git' (case, trailing dots or spaces, NTFS short name or HFS+ ignorables)"
    if any(_is_ntfs_dotgit(rest) for rest in _after_backslashes(name)):
        return "holds '.git' after a backslash (a path on NTFS)"
    kind = dotfile_kind(name)
    if kind is not None and mode == LINK_MODE:
        return f"a spelling of '.{kind}' that is a symlink"
    if kind is not None and mode in (DIR_MODE, GITLINK_MODE):
        return f"a spelling of '.{kind}' that is not a file"
    if mode == LINK_MODE and (_is_dotfile(name, b"gitignore") or _is_dotfile(name, b"mailmap")):
        return "a spelling of '.gitignore' or '.mailmap' that is a symlink"
    return None


# -- trees -------------------------------------------------------------------------------------------

_MODE_TEXT_RE = re.compile(rb"[0-7]+")


def parse_tree(body: bytes) -> tuple[list[tuple[bytes, bytes, bytes]], str | None]:
    """Split a tree body into ``(name, mode text, raw oid)`` as git's ``decode_tree_entry`` does; the
    second item says why parsing stopped early (git: "cannot be parsed as a tree"), or is None."""
    entries: list[tuple[bytes, bytes, bytes]] = []
    pos, end = 0, len(body)
    while pos < end:
        space = body.find(b" ", pos)
        nul = body.find(b"\0", pos)
        if space < 0 or nul < 0 or nul < space:
            return entries, f"entry at byte {pos} has no mode or no name"
        mode_text = body[pos:space]
        if not _MODE_TEXT_RE.fullmatch(mode_text):
            return entries, f"entry at byte {pos} has a malformed mode {mode_text!r}"
        name = body[space + 1 : nul]
        if not name:
            return entries, f"entry at byte {pos} has an empty name"
        raw = body[nul + 1 : nul + 33]
        if len(raw) != 32:
            return entries, f"entry {name!r} is truncated"
        entries.append((name, mode_text, raw))
        pos = nul + 33
    return entries, None


def _sort_key(name: bytes, mode: int) -> bytes:
    return name + b"/" if mode == DIR_MODE else name


def tree_problems(body: bytes) -> list[str]:
    """Everything ``git fsck --strict`` reports about one tree body (and the gitlinks the CAS refuses)."""
    entries, parse_error = parse_tree(body)
    problems = [f"cannot be parsed as a tree: {parse_error}"] if parse_error else []
    seen: set[bytes] = set()
    previous: bytes | None = None
    for name, mode_text, raw in entries:
        shown = name.decode("utf-8", "backslashreplace")
        mode = int(mode_text, 8)
        if mode_text.startswith(b"0"):
            problems.append(f"entry {shown!r} has a zero-padded mode {mode_text.decode()}")
        why = mode_problem(mode)
        if why:
            problems.append(f"entry {shown!r}: {why}")
        why = tree_name_problem(name, mode)
        if why:
            problems.append(f"entry {shown!r}: {why}")
        if raw == bytes(32):
            problems.append(f"entry {shown!r} points at the null object id")
        if name in seen:
            problems.append(f"entry {shown!r} is duplicated")
        seen.add(name)
        key = _sort_key(name, mode)
        if previous is not None and key <= previous:
            problems.append(f"entry {shown!r} is out of git's order")
        previous = key
    return problems


# -- commits -----------------------------------------------------------------------------------------

_HEX_LINE_RE = re.compile(rb"[0-9a-f]{64}\n")


def ident_problem(line: bytes) -> str | None:
    """git's ``fsck_ident`` on what follows ``author `` or ``committer ``, up to and with its newline:
    ``Name <email> <seconds> <+hhmm>``."""
    if line.startswith(b"<"):
        return "missing name before email"
    lt = re.search(rb"[<>\n]", line)
    if lt is None or line[lt.start()] != ord("<"):
        return "bad name" if lt is not None and line[lt.start()] == ord(">") else "missing email"
    p = lt.start()
    if line[p - 1] != ord(" "):
        return "missing space before email"
    gt = re.compile(rb"[<>\n]").search(line, p + 1)
    if gt is None or line[gt.start()] != ord(">"):
        return "bad email"
    p = gt.start() + 1
    if line[p : p + 1] != b" ":
        return "missing space before date"
    p += 1
    while line[p : p + 1] in (b" ", b"\t"):
        p += 1
    digits = re.compile(rb"[0-9]*").match(line, p)
    assert digits is not None
    if not digits.group():
        return "bad date"
    if line[p : p + 1] == b"0" and line[p + 1 : p + 2] != b" ":
        return "zero-padded date"
    if int(digits.group()) > MAX_TIMESTAMP:
        return "date causes integer overflow"
    p = digits.end()
    if line[p : p + 1] != b" ":
        return "bad date"
    zone = line[p + 1 : p + 7]
    if not re.fullmatch(rb"[+-][0-9]{4}\n", zone):
        return "bad time zone"
    return None


def commit_problems(body: bytes) -> list[str]:
    """What ``git fsck --strict`` reports about one commit body (its first error, as git stops there;
    a NUL in the message is reported too). Links to missing objects are the caller's business."""
    end = body.find(b"\n\n")
    header = body if end < 0 else body[: end + 1]
    if b"\0" in header:
        return ["unterminated header: NUL in the header"]
    if end < 0 and not body.endswith(b"\n"):
        return ["unterminated header"]
    lines = header.split(b"\n")[:-1]
    i = 0

    def take(key: bytes) -> bytes | None:
        nonlocal i
        if i < len(lines) and lines[i].startswith(key + b" "):
            i += 1
            return lines[i - 1][len(key) + 1 :] + b"\n"
        return None

    tree = take(b"tree")
    if tree is None:
        return ["expected a 'tree' line"]
    if not _HEX_LINE_RE.fullmatch(tree):
        return ["bad 'tree' line"]
    while (parent := take(b"parent")) is not None:
        if not _HEX_LINE_RE.fullmatch(parent):
            return ["bad 'parent' line"]
    authors = 0
    while (author := take(b"author")) is not None:
        authors += 1
        why = ident_problem(author)
        if why:
            return [f"bad author: {why}"]
    if authors != 1:
        return ["expected one 'author' line" if not authors else "more than one 'author' line"]
    committer = take(b"committer")
    if committer is None:
        return ["expected a 'committer' line"]
    why = ident_problem(committer)
    if why:
        return [f"bad committer: {why}"]
    if b"\0" in body:
        return ["NUL byte in the commit message"]
    return []


# -- the blobs git reads as .gitmodules and .gitattributes -------------------------------------------


def dotfile_blob_problem(kind: str, data: bytes) -> str | None:
    """Why git fsck rejects ``data`` as the content of a ``.gitmodules`` or ``.gitattributes`` blob
    (``kind`` from :func:`dotfile_kind`), or None."""
    if len(data) > DOTFILE_MAX_BYTES:
        # git: over 100 MiB for .gitattributes; over core.bigFileThreshold (512 MiB) for .gitmodules.
        return f".{kind} is larger than the CAS accepts ({DOTFILE_MAX_BYTES >> 20} MiB)"
    if kind == "gitattributes":
        for line in data.split(b"\0", 1)[0].split(b"\n"):
            if len(line) >= _ATTR_MAX_LINE_LENGTH:
                return f".gitattributes has a line of {len(line)} bytes (git parses under 2048)"
        return None
    for var, value in _config_entries(data):
        why = _gitmodules_entry_problem(var, value)
        if why:
            return f".gitmodules: {why}"
    return None


_SPACE = frozenset(b" \t\n\r")


def _isalpha(c: int) -> bool:
    return 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A


def _iskeychar(c: int) -> bool:
    return _isalpha(c) or 0x30 <= c <= 0x39 or c == 0x2D


class _ConfigSource:
    """git's config.c reader over a buffer: ``\\r\\n`` reads as ``\\n``, the end reads as ``\\n``. A UTF-8
    byte order mark is skipped as git skips it in a config file (git's reader of a blob misses it, a
    signed-char slip, and stops there: the CAS is the stricter)."""

    def __init__(self, data: bytes) -> None:
        self.data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        self.pos = 0
        self.eof = False

    def next(self) -> int:
        if self.pos >= len(self.data):
            self.eof = True
            return 0x0A
        c = self.data[self.pos]
        self.pos += 1
        if c == 0x0D and self.data[self.pos : self.pos + 1] == b"\n":
            self.pos += 1
            return 0x0A
        return c


def _config_entries(data: bytes) -> list[tuple[bytes, bytes | None]]:
    """The ``(variable, value)`` pairs git's config parser hands its callback before it stops, with
    C-string truncation at NUL as git's callback sees them."""
    src = _ConfigSource(data)
    out: list[tuple[bytes, bytes | None]] = []
    var = bytearray()
    base = 0
    comment = False
    while True:
        c = src.next()
        if c == 0x0A:
            if src.eof:
                return out
            comment = False
            continue
        if comment or c in _SPACE:
            continue
        if c in (0x23, 0x3B):  # '#', ';'
            comment = True
            continue
        if c == 0x5B:  # '['
            var = bytearray()
            if not _section(src, var) or not var:
                return out
            var += b"."
            base = len(var)
            continue
        if not _isalpha(c):
            return out
        del var[base:]
        var.append(c | 0x20)
        while True:
            c = src.next()
            if src.eof or not _iskeychar(c):
                break
            var.append(c | 0x20 if _isalpha(c) else c)
        while c in (0x20, 0x09):
            c = src.next()
        value: bytes | None = None
        if c != 0x0A:
            if c != 0x3D:  # '='
                return out
            value = _value(src)
            if value is None:
                return out
            value = value.split(b"\0", 1)[0]
        out.append((bytes(var).split(b"\0", 1)[0], value))


def _section(src: _ConfigSource, var: bytearray) -> bool:
    """``[section]``, ``[section.sub]`` or ``[section "sub"]`` (git's get_base_var)."""
    while True:
        c = src.next()
        if src.eof:
            return False
        if c == 0x5D:  # ']'
            return True
        if c in _SPACE:
            break
        if not _iskeychar(c) and c != 0x2E:
            return False
        var.append(c | 0x20 if _isalpha(c) else c)
    while c in _SPACE:
        if c == 0x0A:
            return False
        c = src.next()
    if c != 0x22:  # '"'
        return False
    var += b"."
    while True:
        c = src.next()
        if c == 0x0A:
            return False
        if c == 0x22:
            break
        if c == 0x5C:
            c = src.next()
            if c == 0x0A:
                return False
        var.append(c)
    return src.next() == 0x5D


def _value(src: _ConfigSource) -> bytes | None:
    """git's parse_value: quotes, escapes, comments, trailing space trimmed; None if malformed."""
    out = bytearray()
    quote = comment = False
    space = 0
    escapes = {0x74: 0x09, 0x62: 0x08, 0x6E: 0x0A, 0x5C: 0x5C, 0x22: 0x22}
    while True:
        c = src.next()
        if c == 0x0A:
            return None if quote else bytes(out)
        if comment:
            continue
        if c in _SPACE and not quote:
            if out:
                space += 1
            continue
        if not quote and c in (0x23, 0x3B):
            comment = True
            continue
        out += b" " * space
        space = 0
        if c == 0x5C:
            c = src.next()
            if c == 0x0A:
                continue
            if c not in escapes:
                return None
            out.append(escapes[c])
            continue
        if c == 0x22:
            quote = not quote
            continue
        out.append(c)


def _gitmodules_entry_problem(var: bytes, value: bytes | None) -> str | None:
    """git's ``fsck_gitmodules_fn`` on one ``submodule.<name>.<key>`` variable."""
    if not var.startswith(b"submodule."):
        return None
    rest = var[len(b"submodule.") :]
    dot = rest.rfind(b".")
    if dot < 0:
        return None
    name, key = rest[:dot], rest[dot + 1 :]
    if _submodule_name_problem(name):
        return f"disallowed submodule name {name!r}"
    if value is None:
        return None
    if key == b"url" and _submodule_url_problem(value):
        return f"disallowed submodule url {value!r}"
    if key == b"path" and value.startswith(b"-"):
        return f"disallowed submodule path {value!r}"
    if key == b"update" and value.startswith(b"!"):
        return f"disallowed submodule update setting {value!r}"
    return None


def _submodule_name_problem(name: bytes) -> bool:
    """git's ``check_submodule_name``: empty, or '..' as a component ('/' or '\\' separated)."""
    return not name or any(part == b".." for part in re.split(rb"[/\\]", name))


def _url_decode(text: bytes) -> bytes:
    return re.sub(rb"%([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), text)


def _submodule_url_problem(url: bytes) -> bool:
    """git's ``check_submodule_url`` (fsck.c, 2.39), stricter on carriage returns."""
    if url.startswith(b"-"):
        return True
    if re.match(rb"\.\.?[/\\]", url) or url.startswith(b"git://"):
        if re.search(rb"[\n\r]", _url_decode(url)):
            return True
        # git's count_leading_dotdots: "../" escaping the root can rewrite the host (CVE-2020-11008).
        dotdots, rest = 0, url
        while True:
            if re.match(rb"\.\.[/\\]", rest):
                dotdots, rest = dotdots + 1, rest[3:]
            elif re.match(rb"\.[/\\]", rest):
                rest = rest[2:]
            else:
                break
        return dotdots > 0 and rest[:1] in (b":", b"/")
    for prefix in (b"http::", b"https::", b"ftp::", b"ftps::"):
        if url.startswith(prefix):
            return _curl_url_problem(url[len(prefix) :])
    if re.match(rb"(?:https?|ftps?)://", url):
        return _curl_url_problem(url)
    return False


def _curl_url_problem(url: bytes) -> bool:
    """git's ``credential_from_url_gently``: needs a scheme and a host; no newline in any part."""
    proto_end = url.find(b"://")
    if proto_end <= 0:
        return True
    cp = proto_end + 3
    end = re.search(rb"[/?#]", url[cp:])
    slash = len(url) if end is None else cp + end.start()
    at = url.find(b"@", cp)
    host_start = at + 1 if 0 <= at < slash else cp
    host = _url_decode(url[host_start:slash])
    if not host.split(b"\0", 1)[0]:
        return True
    return re.search(rb"[\n\r]", _url_decode(url)) is not None
