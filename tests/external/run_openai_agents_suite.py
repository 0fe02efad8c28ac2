"""Run the OpenAI Agents SDK's own tests against pforge_async's ``PforgeSession``.

The SDK's source distribution is fetched from the package index at test time (the version installed
here unless ``--version`` says otherwise) and unpacked into a temporary directory; nothing of it is
copied into this repository. In that copy two substitutions are made, and the SDK's tests run with
pytest:

1. The shared in-memory test session, ``tests/utils/simple_session.py::SimpleListSession`` (used by
   the runner, resume, compaction and deferred-write tests), becomes a ``PforgeSession`` on a SQLite
   store in the temporary directory (each instance its own session, as each list was its own). Its
   ``saved_items`` / ``_items``, which tests read, mirror what the store returned after each call.
2. In every test file that constructs ``SQLiteSession(...)`` or ``AsyncSQLiteSession(...)``, that
   name is rebound to a ``PforgeSession`` taking the same constructor arguments (a ``db_path`` names
   the store's directory; ``":memory:"`` a private in-memory store).

Excluded (``EXCLUDED``, each with its reason): only tests of the SDK's own SQLite classes' internals:
private attributes, raw SQL on their tables, their connection handling and their own messages. Any
other failure fails the run. The tests pytest-asyncio and pytest-mock need are installed into the
temporary directory, not into the environment.

    python tests/external/run_openai_agents_suite.py [--version X.Y.Z] [--workdir DIR] [--backend postgres]
        [-- pytest arguments]

``--backend postgres`` runs only the SDK's session test files (``SESSION_FILES``) with every
substituted session on PostgreSQL: a private server from
tests/_pg.py (or ``PFORGE_TEST_PG_DSN``'s), all sessions in one schema, a name prefix standing for
the database the SDK's class would have opened (``":memory:"``: one of the instance's own; a file:
one shared by every instance naming it).

A test that fails is run again in a second, unsubstituted copy: one that fails there too fails
because of this environment (say, a newer ``openai`` than the SDK's tests expect), and is reported as
such; the run fails only for a test that fails with ``PforgeSession`` alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

#: the test plugins the SDK's tests need beyond what pforge_async's environment has
PLUGINS = ["pytest-asyncio>=1.0,<2", "pytest-mock>=3.14,<4", "pytest-timeout>=2.3,<3"]

#: test files whose tests substitute a session class (found in the unpacked copy; listed so a file
#: the SDK renames or drops is noticed rather than silently not run)
SUBSTITUTED_CLASS_FILES = [
    "tests/memory/test_session.py",
    "tests/memory/test_session_limit.py",
    "tests/extensions/memory/test_async_sqlite_session.py",
    "tests/extensions/memory/test_encrypt_session.py",
    "tests/memory/test_compaction_model_visibility.py",
    "tests/memory/test_openai_responses_compaction_session.py",
    "tests/test_agent_runner.py",
    "tests/test_agent_runner_streamed.py",
    "tests/test_max_turns.py",
    "tests/test_run_impl_resume_paths.py",
    "tests/test_tool_batch_failure_history.py",
    "tests/test_native_tool_failure_history.py",
    "tests/test_programmatic_tool_calling.py",
    "tests/test_tool_failure_boundaries.py",
    "tests/test_soft_cancel.py",
    "tests/sandbox/test_memory.py",
]

# Why a test is not run against PforgeSession: each names what of the SDK's own SQLite classes it tests.
PRIVATE_CONN = "private connection handling of the SDK's SQLite class (_connections, _get_connection, quarantine)"
PRIVATE_LOCK = "a private attribute of SQLiteSession (its per-file lock table, _lock/_file_locks)"
PRIVATE_COMMIT = "patches the SDK's SQLite class's _get_connection with a sqlite3.Connection that pauses its commit"
PRIVATE_INIT = "the SDK's SQLite class's connection start-up (WAL set-up retries, _init_db_for_connection)"
PRIVATE_INSERT = "patches SQLiteSession._insert_items (a private method taking a sqlite3 connection)"
RAW_SQL_CORRUPT = "raw SQL writing corrupt JSON rows into the SDK's agent_messages table"
RAW_SQL_TIMESTAMP = "raw SQL rewriting created_at in the SDK's agent_messages table"
RAW_SQL_TXN = "raw SQL on the SDK's SQLite file (DROP TABLE to make a call fail, a probe of SQLite's write lock)"
OWN_ERROR = (
    "the SDK class's own error for a closed session (RuntimeError '...SQLiteSession is closed'); "
    "PforgeSession raises ActorClosed"
)
ENCRYPTED_NATIVE = (
    "EncryptedSession's atomic pop authentication, which the SDK runs only for its own SQLiteSession "
    "(isinstance in encrypt_session.py; for other backends it documents the guarantee absent)"
)

#: test file -> test (with its parameters) -> why it is not run against PforgeSession
EXCLUDED_TESTS: dict[str, dict[str, str]] = {
    "tests/extensions/memory/test_async_sqlite_session.py": {
        "test_async_sqlite_session_pop_item_skips_corrupt_most_recent": RAW_SQL_CORRUPT,
        "test_async_sqlite_session_pop_item_returns_none_after_dropping_only_corrupt_rows": RAW_SQL_CORRUPT,
        "test_async_sqlite_session_get_items_limit_skips_corrupt_newest_rows": RAW_SQL_CORRUPT,
        "test_async_sqlite_session_get_items_same_timestamp_consistent_order": RAW_SQL_TIMESTAMP,
        "test_async_sqlite_session_pop_item_same_timestamp_returns_latest": RAW_SQL_TIMESTAMP,
        "test_async_sqlite_session_closed_operations_raise_runtime_error": OWN_ERROR,
        "test_async_sqlite_session_closed_rejects_empty_add_items": OWN_ERROR,
        "test_async_sqlite_session_close_before_use_is_terminal": OWN_ERROR,
        "test_async_sqlite_session_close_is_idempotent": OWN_ERROR,
        "test_cancelled_close_finishes_cleanup_and_propagates_cancellation": PRIVATE_CONN,
        "test_post_commit_cancellation_propagates_after_known_mutation_outcome[add]": PRIVATE_COMMIT,
        "test_post_commit_cancellation_propagates_after_known_mutation_outcome[pop]": PRIVATE_COMMIT,
        "test_post_commit_cancellation_propagates_after_known_mutation_outcome[clear]": PRIVATE_COMMIT,
        "test_failed_add_items_rolls_back_and_reuses_connection": PRIVATE_CONN,
        "test_failed_clear_session_rolls_back": RAW_SQL_TXN,
        "test_failed_pop_item_releases_write_lock": RAW_SQL_TXN,
        "test_failed_initialization_closes_candidate_connection": PRIVATE_INIT,
        "test_initialization_retries_transient_wal_lock": PRIVATE_INIT,
        "test_initialization_does_not_retry_unrecoverable_wal_errors[busy-timeout-disabled]": PRIVATE_INIT,
        "test_initialization_does_not_retry_unrecoverable_wal_errors[busy-timeout-elapsed]": PRIVATE_INIT,
        "test_initialization_does_not_retry_unrecoverable_wal_errors[unrelated-error]": PRIVATE_INIT,
        "test_cancelled_wal_retry_closes_startup_connection": PRIVATE_INIT,
        "test_cancelled_add_items_rolls_back_write_transaction": PRIVATE_CONN,
        "test_operation_failure_then_cancellation_during_rollback": PRIVATE_CONN,
        "test_rollback_failure_closes_and_evicts_connection": PRIVATE_CONN,
        "test_close_retries_connection_quarantined_after_rollback_failure": PRIVATE_CONN,
        "test_close_retries_quarantined_failed_initialization_candidate": PRIVATE_INIT,
        "test_cancelled_initialization_finishes_candidate_close": PRIVATE_INIT,
        "test_initialization_failure_then_cancellation_during_candidate_close": PRIVATE_INIT,
        "test_cancelled_connect_closes_eventually_acquired_connection": PRIVATE_INIT,
    },
    "tests/memory/test_session.py": {
        "test_sqlite_session_close_closes_worker_thread_connections": PRIVATE_CONN,
        "test_sqlite_session_reaps_connections_from_exited_worker_threads": PRIVATE_CONN,
        "test_sqlite_session_closes_retired_connections_before_the_next_allocation": PRIVATE_CONN,
        "test_sqlite_session_keeps_connections_of_live_worker_threads": PRIVATE_CONN,
        "test_sqlite_session_closed_rejects_empty_add_items": OWN_ERROR,
        "test_sqlite_session_pop_item_skips_corrupt_most_recent": RAW_SQL_CORRUPT,
        "test_sqlite_session_pop_item_returns_none_after_dropping_only_corrupt_rows": RAW_SQL_CORRUPT,
        "test_sqlite_session_get_items_limit_skips_corrupt_newest_rows": RAW_SQL_CORRUPT,
        "test_sqlite_session_get_items_session_settings_limit_skips_corrupt_rows": RAW_SQL_CORRUPT,
        "test_sqlite_session_file_lock_is_shared_across_instances": PRIVATE_LOCK,
        "test_sqlite_session_failed_add_items_releases_write_lock": RAW_SQL_TXN,
        "test_sqlite_session_failed_clear_session_rolls_back": RAW_SQL_TXN,
        "test_sqlite_session_failed_pop_item_releases_write_lock": RAW_SQL_TXN,
        "test_sqlite_session_rollback_failure_evicts_connection": PRIVATE_CONN,
        "test_sqlite_session_close_retries_quarantined_connection": PRIVATE_CONN,
        "test_sqlite_session_post_commit_cancellation_propagates_after_known_outcome[add]": PRIVATE_COMMIT,
        "test_sqlite_session_post_commit_cancellation_propagates_after_known_outcome[pop]": PRIVATE_COMMIT,
        "test_sqlite_session_post_commit_cancellation_propagates_after_known_outcome[clear]": PRIVATE_COMMIT,
    },
    "tests/extensions/memory/test_encrypt_session.py": {
        "test_encrypted_pop_wrong_key_preserves_recoverable_history[False]": ENCRYPTED_NATIVE,
        "test_encrypted_pop_wrong_key_preserves_recoverable_history[True]": ENCRYPTED_NATIVE,
        "test_encrypted_pop_rechecks_authentication_after_expired_tail": ENCRYPTED_NATIVE,
        "test_encrypted_pop_authentication_is_atomic_with_concurrent_mutations[append]": ENCRYPTED_NATIVE,
        "test_encrypted_pop_authentication_is_atomic_with_concurrent_mutations[clear]": ENCRYPTED_NATIVE,
        "test_encrypted_pop_wrong_key_preserves_row_identity": ENCRYPTED_NATIVE,
        "test_encrypted_pop_cancellation_waits_for_authentication_rollback": ENCRYPTED_NATIVE,
    },
    "tests/memory/test_openai_responses_compaction_session.py": {
        "TestOpenAIResponsesCompactionSession::"
        "test_settled_pop_failure_invalidates_response_chain[cancelled]": PRIVATE_COMMIT,
        "TestOpenAIResponsesCompactionSession::"
        "test_settled_pop_failure_invalidates_response_chain[error]": PRIVATE_COMMIT,
        "TestOpenAIResponsesCompactionSession::"
        "test_settled_clear_failure_invalidates_response_chain[cancelled]": PRIVATE_COMMIT,
        "TestOpenAIResponsesCompactionSession::"
        "test_settled_clear_failure_invalidates_response_chain[error]": PRIVATE_COMMIT,
    },
    "tests/test_run_impl_resume_paths.py": {
        "test_handoff_resume_after_cancelled_compaction_commits[run-live]": PRIVATE_INSERT,
        "test_handoff_resume_after_cancelled_compaction_commits[run-json]": PRIVATE_INSERT,
        "test_handoff_resume_after_cancelled_compaction_commits[streamed-live]": PRIVATE_INSERT,
        "test_handoff_resume_after_cancelled_compaction_commits[streamed-json]": PRIVATE_INSERT,
    },
}
EXCLUDED = {f"{file}::{test}": why for file, tests in EXCLUDED_TESTS.items() for test, why in tests.items()}

#: the SDK's tests of the Session contract (its SQLite classes' tests, SQLiteSession and
#: AsyncSQLiteSession substituted, and the encrypted wrapper over them): all ``--backend postgres`` runs
#: (the runner and compaction tests above a session are the SQLite run's; they add nothing here)
SESSION_FILES = [
    "tests/memory/test_session.py",
    "tests/memory/test_session_limit.py",
    "tests/extensions/memory/test_async_sqlite_session.py",
    "tests/extensions/memory/test_encrypt_session.py",
]

SUBSTITUTES = '''\
"""Written by pforge_async's tests/external/run_openai_agents_suite.py: the session classes the SDK's
tests use, replaced by pforge_async's PforgeSession."""

from __future__ import annotations

import atexit
import hashlib
import os
from typing import Any
from uuid import uuid4

from pforge_async.integrations.openai_agents import PforgeSession

_STORE = os.environ["PFORGE_SDK_TEST_STORE"]
#: "postgres": _STORE is a postgresql:// DSN, and every session lives in its one schema
_POSTGRES = os.environ.get("PFORGE_SDK_BACKEND") == "postgres"
_USED: set[str] = set()


def _used() -> None:
    _USED.add(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" (")[0])


@atexit.register
def _report() -> None:
    path = os.environ.get("PFORGE_SDK_TEST_USED")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(f"{test}\\n" for test in sorted(_USED))


class SQLiteSession(PforgeSession):
    """SQLiteSession's constructor; PforgeSession's everything else."""

    def __init__(
        self,
        session_id: str,
        db_path: Any = ":memory:",
        sessions_table: str = "agent_sessions",
        messages_table: str = "agent_messages",
        session_settings: Any = None,
    ) -> None:
        _used()
        prefix = "openai-agents" if messages_table == "agent_messages" else f"openai-agents/{messages_table}"
        store = ":memory:" if str(db_path) == ":memory:" else str(db_path)
        if _POSTGRES:
            # One schema for all: a name prefix stands for the database the SDK's class would open
            # (":memory:" one of this instance's own, a file one shared by every instance naming it).
            private = str(db_path) == ":memory:"
            where = uuid4().hex if private else hashlib.sha256(os.path.abspath(store).encode()).hexdigest()[:24]
            prefix, store = f"{prefix}/{where}", _STORE
        super().__init__(session_id, store, session_settings=session_settings, prefix=prefix)
        self.db_path = db_path


class AsyncSQLiteSession(SQLiteSession):
    """AsyncSQLiteSession's constructor and its async close()."""

    async def close(self) -> None:  # type: ignore[override]
        await self.aclose()


class SimpleListSession(PforgeSession):
    """The SDK's in-memory test session, on a pforge_async SQLite store: each instance its own
    session. ``saved_items`` (also ``_items``) mirrors what the store returned after each call."""

    def __init__(self, session_id: str = "test", history: Any = None) -> None:
        _used()
        super().__init__(session_id, _STORE, prefix=f"sdk-tests/{uuid4().hex}")
        self._ignore_ids_for_matching = False
        self._seed = list(history) if history else []
        self._items: list[Any] = list(self._seed)
        self.saved_items = self._items

    async def _ready(self) -> None:
        if self._seed:
            seed, self._seed = self._seed, []
            await PforgeSession.add_items(self, seed)

    async def _mirror(self) -> None:
        self._items[:] = await PforgeSession.get_items(self, limit=-1)

    async def get_items(self, limit: int | None = None, *, wrapper: Any = None) -> list[Any]:
        await self._ready()
        if limit is not None and limit <= 0:
            return []  # SimpleListSession's own rule for a non-positive limit
        return await PforgeSession.get_items(self, limit, wrapper=wrapper)

    async def add_items(self, items: list[Any], *, wrapper: Any = None) -> None:
        await self._ready()
        try:
            await PforgeSession.add_items(self, items, wrapper=wrapper)
        finally:
            await self._mirror()

    async def pop_item(self, *, wrapper: Any = None) -> Any:
        await self._ready()
        try:
            return await PforgeSession.pop_item(self, wrapper=wrapper)
        finally:
            await self._mirror()

    async def clear_session(self, *, wrapper: Any = None) -> None:
        self._seed = []
        try:
            await PforgeSession.clear_session(self, wrapper=wrapper)
        finally:
            await self._mirror()
'''


def fetch(version: str, workdir: Path) -> Path:
    """Download the sdist (no wheel, no dependencies) and unpack it; returns the source root."""
    dl = workdir / "dl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"openai-agents=={version}",
            "-d",
            str(dl),
        ],
        check=True,
    )
    (archive,) = dl.glob("openai_agents-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(workdir / "src", members=members, filter="data")
        else:  # pragma: no cover - Pythons without the extraction filter
            tar.extractall(workdir / "src", members=members)
    (root,) = (workdir / "src").iterdir()
    return root


def install_plugins(workdir: Path) -> Path:
    target = workdir / "plugins"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *PLUGINS],
        check=True,
    )
    return target


def substitute(root: Path) -> None:
    """Make the substitutions in the unpacked copy."""
    tests = root / "tests"
    (tests / "_pforge_substitutes.py").write_text(SUBSTITUTES)
    simple = tests / "utils" / "simple_session.py"
    text = simple.read_text()
    start = text.index("class SimpleListSession(Session):")
    end = text.index("class CountingSession(SimpleListSession):")
    simple.write_text(
        text[:start] + "from tests._pforge_substitutes import SimpleListSession  # substituted\n\n\n" + text[end:]
    )
    for name in SUBSTITUTED_CLASS_FILES:
        path = root / name
        source = path.read_text()
        used = [cls for cls in ("SQLiteSession", "AsyncSQLiteSession") if re.search(rf"\b{cls}\(", source)]
        if not used:
            raise SystemExit(f"{name} no longer constructs SQLiteSession or AsyncSQLiteSession: update the list")
        path.write_text(
            source + f"\n\n# substituted by pforge_async's run_openai_agents_suite.py\n"
            f"from tests._pforge_substitutes import {', '.join(used)}  # noqa: E402, F811\n"
        )


def files_to_run(root: Path) -> list[str]:
    tests = root / "tests"
    found = {
        str(p.relative_to(root))
        for p in tests.rglob("test_*.py")
        if re.search(r"SimpleListSession|CountingSession|IdStrippingSession", p.read_text())
    }
    return sorted(found | set(SUBSTITUTED_CLASS_FILES))


OUTCOMES = '''\
"""Written by pforge_async's run_openai_agents_suite.py: records each test's outcome and what was deselected."""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("PFORGE_SDK_OUTCOMES")
    if path and (report.failed or (report.when == "call" and report.passed)):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{'failed' if report.failed else 'passed'} {report.nodeid}\\n")


def pytest_deselected(items):
    path = os.environ.get("PFORGE_SDK_DESELECTED")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(f"{item.nodeid}\\n" for item in items)
'''


def run_pytest(
    root: Path, plugins: Path, workdir: Path, tag: str, args: list[str], *, quiet: bool = False, dsn: str | None = None
) -> tuple[int, dict[str, str], set[str]]:
    """Run pytest in ``root``; returns its exit status, each test's outcome and the deselected ids.
    ``dsn``: the sessions live on that PostgreSQL server (one schema) instead of a SQLite store."""
    outcomes, deselected = workdir / f"{tag}.outcomes", workdir / f"{tag}.deselected"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugins), *filter(None, [env.get("PYTHONPATH")])])
    env["PFORGE_SDK_TEST_STORE"] = str(workdir / f"{tag}-store") if dsn is None else dsn
    env["PFORGE_SDK_BACKEND"] = "sqlite" if dsn is None else "postgres"
    env["PFORGE_SDK_TEST_USED"] = str(workdir / f"{tag}.used")
    env["PFORGE_SDK_OUTCOMES"] = str(outcomes)
    env["PFORGE_SDK_DESELECTED"] = str(deselected)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "pforge_outcomes",
        "--timeout",
        "120",
        "--rootdir",
        str(root),
        "-c",
        str(root / "pyproject.toml"),
        *args,
    ]
    if quiet:
        with open(workdir / f"{tag}.log", "w", encoding="utf-8") as log:
            status = subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    else:
        status = subprocess.run(command, cwd=root, env=env).returncode
    result: dict[str, str] = {}
    if outcomes.exists():
        for line in outcomes.read_text().splitlines():
            outcome, _, node = line.partition(" ")
            if result.get(node) != "failed":
                result[node] = outcome
    dropped = set(deselected.read_text().splitlines()) if deselected.exists() else set()
    return status, result, dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default=importlib.metadata.version("openai-agents"))
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary one)")
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "all"],
        default="sqlite",
        help="postgres: only the session test files, every session on a private PostgreSQL server; "
        "all: sqlite then postgres, the SDK fetched once",
    )
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pforge-sdk-tests-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.monotonic()
        root = fetch(args.version, workdir / "substituted")
        plugins = install_plugins(workdir)
        (plugins / "pforge_outcomes.py").write_text(OUTCOMES)
        files = files_to_run(root)
        substitute(root)
        status = 0
        if args.backend in ("sqlite", "all"):
            status = run(args, root, plugins, workdir, files, None, started) or status
        if args.backend in ("postgres", "all"):
            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
            from tests._pg import pg_server

            try:
                with pg_server(fsync="off") as (dsn, _):
                    pg = f"{dsn}?schema=sdk_tests"
                    status = run(args, root, plugins, workdir, files, pg, time.monotonic()) or status
            except RuntimeError as exc:  # no server binaries and no PFORGE_TEST_PG_DSN: say how to get one
                print(exc)
                return 2
        return status
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def server_sessions(dsn: str) -> int:
    """How many sessions (named contexts) the run left in the server's ``sdk_tests`` schema."""
    import asyncio

    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(dsn.split("?", 1)[0])
        try:
            return int(await conn.fetchval("SELECT count(*) FROM sdk_tests.contexts WHERE name IS NOT NULL"))
        finally:
            await conn.close()

    return asyncio.run(count())


def run(
    args: argparse.Namespace,
    root: Path,
    plugins: Path,
    workdir: Path,
    files: list[str],
    dsn: str | None,
    started: float,
) -> int:
    """One backend's run of the substituted copy; 0 unless a test fails with PforgeSession alone."""
    tag = "substituted" if dsn is None else "substituted-postgres"
    excluded = EXCLUDED
    if dsn is not None:
        missing = sorted(set(SESSION_FILES) - set(files))
        if missing:
            raise SystemExit(f"session test files no longer in the SDK (update SESSION_FILES): {missing}")
        files = list(SESSION_FILES)
        excluded = {node: why for node, why in EXCLUDED.items() if node.split("::")[0] in files}
    deselect = [arg for node in excluded for arg in ("--deselect", node)]
    backend = "SQLite store" if dsn is None else "PostgreSQL store (a private server)"
    print(
        f"openai-agents {args.version} on a {backend}: {len(files)} test files, {len(excluded)} tests excluded",
        flush=True,
    )
    status, outcomes, dropped = run_pytest(root, plugins, workdir, tag, [*deselect, *args.pytest_args, *files], dsn=dsn)
    if status not in (0, 1):
        print(f"pytest stopped with status {status} (not a test failure): see above")
        return status
    if dsn is not None and outcomes:
        stored = server_sessions(dsn)
        print(f"{stored} sessions stored on the server (schema sdk_tests)")
        if not stored:
            print("nothing reached the PostgreSQL server: the sessions were stored elsewhere")
            return 2
    stale = set(excluded) - dropped
    if stale:
        print("excluded tests that no longer exist (update EXCLUDED):", *sorted(stale), sep="\n  ")
        return 2
    failed = sorted(node for node, outcome in outcomes.items() if outcome == "failed")
    passed = len(outcomes) - len(failed)
    used = workdir / f"{tag}.used"
    constructed = {line for line in used.read_text().splitlines() if line} if used.exists() else set()
    regressions = failed
    if failed:
        # Does each failure fail the same way with the SDK's own classes, in this environment?
        base_root = workdir / "baseline"
        base_root = next((base_root / "src").iterdir()) if base_root.exists() else fetch(args.version, base_root)
        _, base, _ = run_pytest(base_root, plugins, workdir, f"baseline-{tag}", failed, quiet=True)
        regressions = [node for node in failed if base.get(node) != "failed"]
    print(
        f"\nopenai-agents {args.version}, PforgeSession on a {backend} substituted: {passed} passed, "
        f"{len(failed)} failed, {len(excluded)} excluded (SQLite internals, listed in {Path(__file__).name}); "
        f"{len(constructed)} distinct tests constructed a PforgeSession"
    )
    if failed:
        print(
            f"of the {len(failed)} failures, {len(failed) - len(regressions)} fail the same way with the "
            f"SDK's own session classes here (this environment, not the substitution)"
        )
    for node in regressions:
        print(f"FAILS ONLY WITH PforgeSession: {node}")
    print(f"({time.monotonic() - started:.0f} s)", flush=True)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
