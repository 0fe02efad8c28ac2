"""What the command writes: safe text, JSON, tables, sizes and times, and the progress bar.

Nothing that came out of a store reaches the terminal unescaped: names, keys, paths and payload
text may hold control characters (an escape sequence, a carriage return, a bidirectional override)
that would rewrite what the user sees, so :func:`safe` turns each into a visible escape.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TextIO

import anyio

from ..errors import StorageError

__all__ = [
    "Output",
    "OutputError",
    "Progress",
    "cost_text",
    "hexdump",
    "json_escaped",
    "ms_text",
    "safe",
    "safe_bytes",
    "size_text",
    "write_failed",
]

# C0 and C1 controls, DEL, the bidirectional controls, and lone surrogates (a file name that is not
# UTF-8, decoded with surrogateescape): each would change how the line around it is displayed, or
# could not be written at all.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_KEEP_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
# What json.dumps leaves unescaped inside a string that :func:`safe` escapes (it escapes C0 itself;
# outside strings, JSON has only its own punctuation and whitespace).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte it stands for
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str, *, lines: bool = False) -> str:
    """``text`` with every character that could change the display escaped; ``lines`` keeps
    newlines and tabs (for multi-line text such as a file's content)."""
    return (_UNSAFE_KEEP_LINES if lines else _UNSAFE).sub(_escape, text)


def safe_bytes(data: bytes) -> str:
    """Bytes as text: printable ASCII as itself, everything else as ``\\xNN`` (and ``\\\\``)."""
    out = []
    for byte in data:
        if byte == 0x5C:
            out.append("\\\\")
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(_NAMED.get(chr(byte), f"\\x{byte:02x}"))
    return "".join(out)


def hexdump(data: bytes) -> list[str]:
    """``xxd``-style lines: offset, 16 bytes in hex, the printable ones as text."""
    lines = []
    for at in range(0, len(data), 16):
        chunk = data[at : at + 16]
        hexes = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{at:08x}: {hexes:<39}  {text}")
    return lines


def json_text(value: Any, *, indent: int | None = None) -> str:
    """JSON with non-ASCII text kept readable, but every character :func:`safe` escapes written as a
    ``\\u`` escape (still valid JSON, and a lone surrogate can then be written at all)."""
    return json_escaped(json.dumps(value, ensure_ascii=False, indent=indent, allow_nan=False))


def json_escaped(text: str) -> str:
    """JSON text (``json.dumps(ensure_ascii=False)``'s) with what that leaves raw and :func:`safe`
    escapes written as ``\\u`` escapes: the same JSON value, nothing a terminal acts on."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def size_text(n: int) -> str:
    """A byte count for people: ``812 B``, ``16.0 KiB``, ``3.2 MiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def cost_text(micro: int) -> str:
    """Micro-units as a decimal, exactly (no float)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole:,}.{frac:06d}"


def ms_text(ms: int) -> str:
    """A store timestamp (ms since the epoch) in local time, to the second."""
    if ms <= 0:
        return "-"
    try:
        return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"


class OutputError(StorageError):
    """Standard output could not be written (a full disk, an I/O error): what is still buffered for it
    can never be written either, so the command drops it when it reports this (exit 1)."""


def write_failed(exc: OSError) -> OutputError:
    """``exc``, raised writing standard output, as the command's one-line error. (A reader that went
    away, ``BrokenPipeError``, is no error: the caller lets it through to end quietly.)"""
    return OutputError(f"cannot write standard output: {exc.strerror or exc}")


class Output:
    """stdout for results, stderr for notes: plain lines, tables and JSON documents."""

    def __init__(self, *, json_mode: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.json = json_mode
        # None: the process was started with stdout closed (``>&-``); the first write says so
        self._stdout: TextIO | None = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.tty = self._stdout is not None and self._stdout.isatty()

    @property
    def stdout(self) -> TextIO:
        if self._stdout is None:
            raise OutputError("cannot write standard output: it is closed")
        return self._stdout

    def write(self, text: str) -> None:
        try:
            self.stdout.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise write_failed(exc) from exc

    def write_bytes(self, data: bytes) -> None:
        """Bytes as they are (a blob into a file or a pipe), after what was written as text."""
        try:
            self.stdout.flush()
            self.stdout.buffer.write(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise write_failed(exc) from exc

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def note(self, text: str) -> None:
        """A remark for the person at the terminal (stderr: a pipe reading stdout never sees it)."""
        self.stderr.write(safe(text) + "\n")

    def document(self, value: Any) -> None:
        """One JSON document: indented on a terminal, one line otherwise (for ``jq`` and friends)."""
        self.write(json_text(value, indent=2 if self.tty else None) + "\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> None:
        """Columns padded to their widest cell; cells are escaped; ``right`` columns right-aligned."""
        cells = [[safe(c) for c in row] for row in rows]
        widths = [len(h) for h in headers]
        for row in cells:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))

        def render(row: Sequence[str]) -> str:
            parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            return "  ".join(parts).rstrip()

        self.line(render(headers))
        for row in cells:
            self.line(render(row))


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal.

    With a ``total`` it shows how far the work is (``advance``); without one (work the store does in
    one call) it shows that the work goes on, and for how long, from a task that redraws it ten
    times a second (:meth:`running`). The line is cleared when the work ends, so nothing of it stays
    on the screen or reaches a pipe or a log file.
    """

    _FRAME_S = 0.1
    _BAR = 24

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = _is_terminal(self.stream)
        # a session's, file's or directory's name: escaped like every other line the command writes
        self.label = safe(label)
        self.total = total
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0
        self._shown = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (
            now - self._drawn >= self._FRAME_S or (self.total is not None and self.done >= self.total)
        ):
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn = now
        elapsed = now - self._started
        if self.total:
            share = min(1.0, self.done / self.total)
            filled = int(share * self._BAR)
            bar = "#" * filled + "-" * (self._BAR - filled)
            text = f"{self.label} [{bar}] {self.done:,}/{self.total:,} {share:4.0%}"
        else:
            # a block bouncing across the bar: moving, so the user sees the work is not stuck
            span = self._BAR - 3
            step = int(elapsed / self._FRAME_S) % (2 * span)
            at = step if step < span else 2 * span - step
            text = f"{self.label} [{' ' * at}===" + " " * (span - at) + f"] {elapsed:.1f} s"
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + text[: max(10, width - 1)] + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def start(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())

    def close(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Progress]:
        """Draw the bar now and keep it moving until the block ends."""
        self.start()
        if not self.enabled:
            yield self
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._tick)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
                self.close()

    async def _tick(self) -> None:
        while True:
            await anyio.sleep(self._FRAME_S)
            self._draw(time.monotonic())


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def finite(value: float) -> float | None:
    """A float for JSON: NaN and infinities (which JSON cannot hold) as None."""
    return value if math.isfinite(value) else None
