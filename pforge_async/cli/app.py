"""The command line: arguments, the store a command opens, exit statuses, and a quiet end when the
reader of its output goes away.

Exit statuses: 0 done; 1 the store is damaged, or ``check`` found a problem, or the storage failed;
2 the command line is wrong: a bad or unknown argument (a context, turn, session, object id), no
store at the root, a root that is a file; 130 interrupted. Every error is one line on stderr,
``pforge: error: ...``, never a traceback, and a command that fails on its arguments has written
nothing anywhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import anyio

from ..errors import Conflict, InvalidInput, NotFound, PforgeError
from ..store import DEFAULT_ROOT, Store, connect
from .sqlread import SqlReader
from .term import Output, OutputError, safe, write_failed

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found]

__all__ = ["Cli", "Command", "UsageError", "main"]

PROG = "pforge"


class UsageError(InvalidInput):
    """The command line itself is wrong (argparse's complaint, made one line)."""


@dataclass
class Cli:
    """What every command gets: where the store is, and where to write."""

    root: str
    out: Output

    @property
    def root_path(self) -> Path:
        return Path(self.root).absolute()

    @asynccontextmanager
    async def store(self, *, write: bool = False, create: bool = False) -> AsyncIterator[Store]:
        """The store at the root: read-only unless ``write``, and never created unless ``create``
        (no store there: ``NotFound``, exit 2, nothing made)."""
        try:
            store = await connect(self.root, create=create, readonly=not write, watch_workspaces=False)
        except NotFound as exc:
            raise NotFound(f"{exc}; `{PROG} --root {self.root} init` creates one") from exc
        try:
            yield store
        finally:
            with anyio.CancelScope(shield=True):
                await store.aclose()

    def refuse_inside(self, path: str, doing: str) -> None:
        """Refuse a path the command would write that lies inside the store (symlinks followed): an
        export file opened there truncates a database the command reads (``-o .pforge/turns.db``),
        a restore there makes files the store would take for its own."""
        real, store = os.path.realpath(path), os.path.realpath(self.root_path)
        if real == store or real.startswith(store.rstrip(os.sep) + os.sep):
            raise InvalidInput(
                f"cannot {doing} {path}: it is inside the store {self.root_path} (name a path outside it)"
            )

    @property
    def sql(self) -> SqlReader:
        return SqlReader(self.root_path)


Command = Callable[[Cli, argparse.Namespace], Awaitable[int]]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from . import contexts, ledgers, maintenance, transfer, workspace

    # --root and --json are accepted before the command and after it; the subcommands' copies
    # default to SUPPRESS, so a value given before the command is not reset by them.
    common = _Parser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help=f"the store (default: ./{DEFAULT_ROOT})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="output as JSON")
    parser = _Parser(
        prog=PROG,
        description="Look into, verify, export and tidy a pforge_async store.",
        epilog="Exit status: 0 done, 1 damage found or the store failed, 2 a bad argument or no store.",
    )
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"the store (default: ./{DEFAULT_ROOT})")
    parser.add_argument("--json", action="store_true", default=False, help="output as JSON")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (contexts, workspace, ledgers, maintenance, transfer):
        module.register(commands, common)
    return parser


def _version() -> str:
    from .. import __version__

    return f"{PROG} (pforge_async) {__version__}"


def exit_status(error: PforgeError) -> int:
    """2 for what the user asked (a bad, unknown or conflicting argument); 1 for the store's state."""
    return 2 if isinstance(error, (InvalidInput, NotFound, Conflict)) else 1


def one_line(text: str) -> str:
    return safe(" ".join(text.split()))


def _single(exc: BaseException) -> BaseException:
    """The one error a task group wrapped, as itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _silence_stdout() -> None:
    """The reader of stdout is gone: point it at /dev/null, so the interpreter's last flush of what
    is still buffered goes nowhere instead of raising again (Python's documented recipe)."""
    if sys.stdout is None:  # started with stdout closed: nothing is buffered for it
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _flush_stdout() -> None:
    if sys.stdout is None:  # started with stdout closed: nothing was written to it
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise write_failed(exc) from exc


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    cli = Cli(root=args.root, out=Output(json_mode=args.json))
    return anyio.run(func, cli, args)


class _OneLine(logging.Handler):
    """What the library logs while a command runs (a damaged index it re-indexes, a checkpoint it
    retries), as the command's own lines: one each, escaped (paths under the root are the user's
    text), and without the traceback a warning logged with ``exc_info`` would print."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        if stream is None:  # started with stderr closed: nowhere to say it
            return
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f": {record.exc_info[1]}"
            stream.write(f"{PROG}: {record.levelname.lower()}: {one_line(text)}\n")
        except Exception:  # a message that cannot be formatted or written costs only itself
            pass


@contextmanager
def _library_log() -> Iterator[None]:
    """The library's log records through :class:`_OneLine` while a command runs; as they were after."""
    logger = logging.getLogger("pforge_async")
    handler, propagate = _OneLine(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def main(argv: Sequence[str] | None = None) -> int:
    """The ``pforge`` console script (and ``python -m pforge_async``); returns the exit status."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure: Any = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    with _library_log():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        try:
            status = _run(argv)
            _flush_stdout()
            return status
        except BaseExceptionGroup as group:
            raise _single(group) from None
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OutputError as exc:
        # what is still buffered for stdout cannot be written either: the interpreter's last flush
        # would fail again and print a traceback of its own ("Exception ignored ...")
        _silence_stdout()
        sys.stderr.write(f"{PROG}: error: {one_line(str(exc))}\n")
        return exit_status(exc)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except PforgeError as exc:
        sys.stderr.write(f"{PROG}: error: {one_line(str(exc))}\n")
        return exit_status(exc)
