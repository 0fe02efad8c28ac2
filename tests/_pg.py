"""A real, private PostgreSQL server for the tests and benchmarks, started and stopped by them.

``PFORGE_TEST_PG_DSN`` names a server to use instead (it must let the tests create and drop schemas).
Otherwise a throwaway cluster is made from the installed server binaries (``initdb`` and ``pg_ctl``)
in a temporary directory outside the clone (the server's user must be able to reach it), listening on a
free loopback port and on a socket in that directory. As root the binaries refuse to run, so they run as
the ``postgres`` user through ``runuser``. With no PostgreSQL at all the tests fail with a message
saying how to get it: they never skip silently.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["MISSING", "PgCluster", "find_bindir", "pg_server"]

MISSING = (
    "the PostgreSQL tests need a PostgreSQL server: install the server binaries "
    "(Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql`) so `initdb` and "
    "`pg_ctl` are found (on PATH or in /usr/lib/postgresql/*/bin), or point PFORGE_TEST_PG_DSN at a "
    "server the tests may create schemas in (postgresql://user@host:port/db)"
)


def find_bindir() -> str | None:
    """The directory holding ``initdb`` and ``pg_ctl``: PATH first, then Debian's versioned dirs."""
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) for x in p.split("/")[4].split(".") if x.isdigit()],
    )
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    """One throwaway cluster: ``start``, ``restart`` (``-m fast``, as an operator would), ``stop``."""

    bindir: str
    data: str = ""
    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    _as_postgres: bool = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, quiet: bool = True) -> None:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE)

    def init(self) -> None:
        self._as_postgres = os.geteuid() == 0
        self.data = tempfile.mkdtemp(prefix="pforge-pg-", dir="/tmp")
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
        self._run(
            os.path.join(self.bindir, "initdb"),
            "-D",
            self.data,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.port = _free_port()

    def _options(self) -> str:
        opts = {"listen_addresses": "127.0.0.1", "max_connections": "300", **self.settings}
        return " ".join([f"-p {self.port}", f"-k {self.data}", *(f"-c {k}={v}" for k, v in opts.items())])

    def start(self) -> None:
        pg_ctl = os.path.join(self.bindir, "pg_ctl")
        log = os.path.join(self.data, "server.log")
        self._run(pg_ctl, "-D", self.data, "-l", log, "-w", "-t", "60", "-o", self._options(), "start")

    def restart(self) -> None:
        pg_ctl = os.path.join(self.bindir, "pg_ctl")
        log = os.path.join(self.data, "server.log")
        self._run(pg_ctl, "-D", self.data, "-l", log, "-m", "fast", "-w", "-t", "60", "-o", self._options(), "restart")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.data, ignore_errors=True)

    def version(self) -> str:
        out = subprocess.run([os.path.join(self.bindir, "postgres"), "--version"], capture_output=True, text=True)
        return out.stdout.strip()


@contextlib.contextmanager
def pg_server(**settings: str) -> Iterator[tuple[str, PgCluster | None]]:
    """Yield ``(dsn, cluster)``: the server named by PFORGE_TEST_PG_DSN (cluster None), or a fresh private one.

    Raises RuntimeError with :data:`MISSING` when there is neither."""
    dsn = os.environ.get("PFORGE_TEST_PG_DSN")
    if dsn:
        yield dsn, None
        return
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(MISSING)
    cluster = PgCluster(bindir, settings=dict(settings))
    cluster.init()
    try:
        cluster.start()
        yield cluster.dsn, cluster
    finally:
        cluster.stop()
