"""``PgCas``: the content-addressed store on PostgreSQL, with the public API of :class:`..cas.store.Cas`.

Objects are rows of one table keyed by their raw SHA-256 id in git's format (``sha256(b"<type> <size>\\0"
+ body)``): the type, the body as git hashes it, and ``touched_at`` for gc. A row is written once
(``ON CONFLICT``: an object already stored is never rewritten, only its ``touched_at`` freshened).
Every read re-hashes what it returns, so a damaged row is ``IntegrityError`` naming its id, never wrong
bytes. A blob over ``CHUNKED_ABOVE`` is stored in chunks (``cas_chunks``), written before its row and
read one at a time, so any size passes in bounded memory. Refs are rows of a second table, updated
compare-and-set in one statement each; ``HEAD`` is ``refs/heads/main``, as in the file CAS.

Writes go through one actor per process (:class:`PgCasActor` on the shared :class:`.actor.PgActor`): a
batch of commands is one transaction (objects inserted with one ``unnest`` statement in id order,
links looked up and locked with one ``FOR KEY SHARE`` statement). Reads go through the actor's pool
and see every write whose call returned.

The git rules, tree and commit encoding, the workspace scan (``SnapshotPlan``), ``restore_tree`` and
the fsck walk are the file CAS's own, called here on adapters: what the file CAS accepts and refuses,
this one does too, with the same workspace boundary guarantees (descriptor-relative scan and restore).
``export_git`` writes everything into a bare repository ``git fsck --strict`` accepts.

gc (git's rule, ``git prune``'s, as the file CAS's): an object younger than ``grace_s`` is kept, and so is
everything reachable from it, from the refs and from the roots given. A write that stores an object
again, links to it (a tree entry, a commit's tree or parent), or ``has()`` that finds it, freshens its
``touched_at`` if it is older than ``freshen_s`` (so most reads write nothing); hence gc requires
``grace_s >= freshen_s``. The sweep locks what it is about to delete and re-checks it (see
:meth:`PgCasActor._gc`), so a tree or commit written beside a gc never loses what it links to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec
from anyio.abc import TaskStatus

from ..cas.gc import CasGcReport, validate_gc_args
from ..cas.gitrules import dotfile_blob_problem, dotfile_kind
from ..cas.objects import (
    BLOB,
    COMMIT,
    DIR_MODE,
    NULL_OID,
    TREE,
    TYPE_NAMES,
    Commit,
    TreeEntry,
    decode_commit,
    decode_tree,
    encode_commit,
    hash_object,
    object_header,
    validate_oid,
)
from ..cas.odb import ObjectDB
from ..cas.pack import write_all
from ..cas.refs import RefStore, validate_ref_name
from ..cas.restore import restore_tree
from ..cas.snapshot import SnapshotPlan, cache_file, entry_oid
from ..cas.store import Cas, FsckReport, _build_trees, _Leaf, _local_path
from ..errors import (
    ActorClosed,
    IntegrityError,
    InvalidInput,
    ObjectNotFound,
    PforgeError,
    RefConflict,
    StorageError,
)
from .actor import PgActor, PgConn
from .cachedir import private_cache_dir, remove_private_cache_dir
from .migrate import quote_ident

__all__ = ["CAS_SCRIPTS", "PgCas", "PgCasActor", "open_pg_cas"]

#: PostgreSQL's bytea holds at most 1 GiB; a tree or commit must fit in one (a blob is chunked).
MAX_OBJECT_BYTES = (1 << 30) - (1 << 20)
#: a blob larger than this is stored in chunks of ``CHUNK_BYTES`` (``cas_chunks``), written and read
#: one chunk at a time: any size, in bounded memory (the snapshot of a large file, restore, fsck, export).
CHUNKED_ABOVE = 32 << 20
#: reads of a large file that keeps changing, the last of which takes it as its fstat sizes it
_READ_ATTEMPTS = 3
CHUNK_BYTES = 8 << 20
#: a snapshot sends what it read to the writer in commands of about this size, bounding its memory.
_SNAPSHOT_FLUSH_BYTES = 32 << 20
#: reads fetch objects in batches of at most this many bytes (restore, fsck, export).
_FETCH_BYTES = 16 << 20
_FETCH_ROWS = 512
_EXPORT_PACK_BYTES = 64 << 20
#: a gc's sweep keeps what trees and commits touched this long before its cutoff reach (see ``_gc``).
_SWEEP_MARGIN_S = 300.0
_HEAD_TARGET = "refs/heads/main"


#: the CAS's part of a store's schema, as :func:`.migrate.migrate` runs it (script i: version i-1 -> i;
#: tables unqualified, created in the store's schema).
CAS_SCRIPTS = [
    # Idempotent (IF NOT EXISTS): a script that runs twice, say after a version read from a stale
    # catalog cache, changes nothing the second time.
    """
    CREATE TABLE IF NOT EXISTS cas_objects (
        oid bytea PRIMARY KEY CHECK (length(oid) = 32),
        kind smallint NOT NULL,
        size bigint NOT NULL,
        body bytea NOT NULL,
        touched_at timestamptz NOT NULL DEFAULT now()
    );
    -- Bodies are git's raw bodies (not zlib'd): lz4 compresses source-like text fast. A server
    -- built without lz4 keeps its default.
    DO $$ BEGIN
        ALTER TABLE cas_objects ALTER COLUMN body SET COMPRESSION lz4;
    EXCEPTION WHEN others THEN NULL; END $$;
    CREATE TABLE IF NOT EXISTS cas_refs (
        name text PRIMARY KEY,
        oid bytea NOT NULL CHECK (length(oid) = 32),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: large blobs in chunks. An object row with ``chunked`` has an empty body; its bytes are the
    # chunks' in ``seq`` order. Chunks are written before their object row (which is written only once
    # they are all there), so chunks without an object row are an upload in progress or a crash's
    # leftovers: gc deletes them past the grace.
    """
    ALTER TABLE cas_objects ADD COLUMN IF NOT EXISTS chunked boolean NOT NULL DEFAULT false;
    CREATE TABLE IF NOT EXISTS cas_chunks (
        oid bytea NOT NULL CHECK (length(oid) = 32),
        seq integer NOT NULL CHECK (seq >= 0),
        data bytea NOT NULL,
        touched_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (oid, seq)
    );
    DO $$ BEGIN
        ALTER TABLE cas_chunks ALTER COLUMN data SET COMPRESSION lz4;
    EXCEPTION WHEN others THEN NULL; END $$;
    """,
]


# -- commands ----------------------------------------------------------------------------------


class PutObjects(msgspec.Struct, frozen=True, tag="pg_put_objects"):
    """Store objects given as ``(type, body)``; replies with their hex ids, in order. Every tree
    entry and commit link must name an object stored already or in this batch."""

    objects: list[tuple[int, bytes]]


class UpdateRef(msgspec.Struct, frozen=True, tag="pg_update_ref"):
    name: str
    new: str
    expected: str | None = None


class Gc(msgspec.Struct, frozen=True, tag="pg_gc"):
    """Delete these objects, each only if still untouched since ``cutoff_us`` (server epoch, µs)."""

    oids: list[bytes]
    cutoff_us: int


class Touch(msgspec.Struct, frozen=True, tag="pg_touch"):
    """Freshen these objects (``has()`` found them older than ``freshen_s``); replies with those found."""

    oids: list[bytes]


class PutChunk(msgspec.Struct, frozen=True, tag="pg_put_chunk"):
    """One chunk of a large blob being uploaded (before its :class:`SealChunked`)."""

    oid: bytes
    seq: int
    data: bytes


class SealChunked(msgspec.Struct, frozen=True, tag="pg_seal_chunked"):
    """Store the large blob ``oid`` of ``size`` bytes from its chunks (all there, adding up); replies
    with its hex id. The id is the uploader's (which hashed the bytes it sent): every read re-hashes."""

    oid: bytes
    size: int


PgCasCommand = PutObjects | UpdateRef | Gc | Touch | PutChunk | SealChunked


def _ref_target(name: str) -> str:
    # HEAD is symbolic, as in the file CAS's repository (``ref: refs/heads/main``).
    return _HEAD_TARGET if name == "HEAD" else name


def _commit_links(body: bytes) -> list[bytes]:
    header = body.split(b"\n\n", 1)[0]
    links = []
    for line in header.split(b"\n"):
        key, _, value = line.partition(b" ")
        if key in (b"tree", b"parent"):
            try:
                links.append(bytes.fromhex(validate_oid(value.decode("ascii", "replace"))))
            except InvalidInput as exc:
                raise InvalidInput(f"commit has a malformed {key.decode()} line: {exc}") from exc
    return links


class _Prepared:
    """One PutObjects command, hashed and checked: its rows and what they link to outside themselves."""

    __slots__ = ("links", "oids", "rows")

    def __init__(self, objects: list[tuple[int, bytes]]) -> None:
        self.rows: dict[bytes, tuple[int, bytes]] = {}
        self.oids: list[str] = []
        links: set[bytes] = set()
        for type_num, body in objects:
            if type_num not in (BLOB, TREE, COMMIT):
                raise InvalidInput(f"unknown object type {type_num}: want blob, tree or commit")
            if len(body) > MAX_OBJECT_BYTES:
                raise InvalidInput(f"a {TYPE_NAMES[type_num]} of {len(body)} bytes is larger than PostgreSQL can hold")
            raw = hash_object(type_num, body)
            if type_num == TREE:
                try:
                    entries = decode_tree(body, raw.hex())
                except IntegrityError as exc:  # not stored data: input
                    raise InvalidInput(str(exc)) from exc
                links.update(target for _name, _mode, target in entries)
            elif type_num == COMMIT:
                links.update(_commit_links(body))
            self.rows[raw] = (type_num, body)
            self.oids.append(raw.hex())
        self.links = links - self.rows.keys()


class _Plan:
    """What a batch's :meth:`PgCasActor.begin` decided: each PutObjects command's reply (or error), the
    rows to insert at :meth:`PgCasActor.flush`, and every object id the batch may link or point to."""

    def __init__(self) -> None:
        self.replies: dict[int, list[str] | PforgeError] = {}
        self.rows: dict[bytes, tuple[int, bytes]] = {}
        self.available: set[bytes] = set()


class PgCasActor(PgActor[PgCasCommand]):
    """The one writer of a process's CAS rows: a batch of commands is one transaction.

    :meth:`begin` decides every PutObjects of the batch at once (hashes, tree and commit links looked
    up and locked ``FOR KEY SHARE`` in one statement, in id order), :meth:`flush` inserts all their
    rows in one ``unnest`` statement in id order (so two processes inserting the same new objects
    never deadlock); refs and gc deletes run one statement per command. No command writes before it
    can fail, so the batch runs without savepoints."""

    command_type = PgCasCommand
    name = "pg-cas"
    part = "cas"
    scripts = tuple(CAS_SCRIPTS)
    savepoints = False
    invariants = (
        (
            "objects whose size column is not their body's",
            "SELECT encode(oid, 'hex') FROM cas_objects WHERE NOT chunked AND size <> length(body)",
        ),
        (
            "chunked blobs whose chunks do not add up to their size",
            "SELECT encode(o.oid, 'hex') FROM cas_objects o WHERE chunked AND size <> "
            "(SELECT coalesce(sum(length(c.data)), 0) FROM cas_chunks c WHERE c.oid = o.oid)",
        ),
        (
            "refs to missing objects",
            "SELECT name FROM cas_refs r WHERE NOT EXISTS (SELECT 1 FROM cas_objects o WHERE o.oid = r.oid)",
        ),
    )

    def __init__(self, dsn: str, *, schema: str = "pforge", freshen_s: float = 60.0, **kwargs: Any) -> None:
        kwargs.setdefault("mailbox_size", 64)
        kwargs.setdefault("max_batch", 64)
        super().__init__(dsn, schema=schema, **kwargs)
        if (
            not isinstance(freshen_s, (int, float))
            or isinstance(freshen_s, bool)
            or not 0 <= freshen_s <= 1e9
            or freshen_s != freshen_s
        ):
            raise InvalidInput(f"freshen_s must be a number of seconds from 0 to 1e9, not {freshen_s!r}")
        self.freshen_s = float(freshen_s)
        s = quote_ident(self.schema)
        self.objects_table = f"{s}.cas_objects"
        self.refs_table = f"{s}.cas_refs"
        self.chunks_table = f"{s}.cas_chunks"
        self._plan = _Plan()
        self._prepared: tuple[Sequence[PgCasCommand], dict[int, _Prepared], set[bytes]] | None = None

    def abort(self) -> None:
        self._plan = _Plan()
        self._prepared = None

    def _prepare(self, commands: Sequence[PgCasCommand]) -> tuple[dict[int, _Prepared], set[bytes]]:
        """Each PutObjects of the batch hashed and checked (errors into a new plan's replies), and the
        ids the batch links or points to outside itself (once per batch: kept for :meth:`begin`)."""
        if self._prepared is not None and self._prepared[0] is commands:
            return self._prepared[1], self._prepared[2]
        plan = self._plan = _Plan()
        prepared: dict[int, _Prepared] = {}
        for command in commands:
            if isinstance(command, PutObjects):
                try:
                    prepared[id(command)] = _Prepared(command.objects)
                except PforgeError as exc:
                    plan.replies[id(command)] = exc
        in_batch = {raw for p in prepared.values() for raw in p.rows}
        wanted = {raw for p in prepared.values() for raw in p.links}
        wanted |= {bytes.fromhex(c.new) for c in commands if isinstance(c, UpdateRef) and _valid_oid(c.new)}
        self._prepared = (commands, prepared, wanted - in_batch)
        return prepared, wanted - in_batch

    def single_statement(self, commands: Sequence[PgCasCommand]) -> bool:
        # Objects only (blobs, and trees and commits whose links are in the batch): nothing to look up
        # or lock, and their one INSERT ... ON CONFLICT may run twice to the same effect.
        if not all(isinstance(c, PutObjects) for c in commands):
            return False
        return not self._prepare(commands)[1]

    async def begin(self, conn: PgConn, commands: Sequence[PgCasCommand]) -> None:
        prepared, outside = self._prepare(commands)
        self._prepared = None
        plan = self._plan
        plan.available = await self._lock_present(conn, outside)
        for command in commands:
            p = prepared.get(id(command))
            if p is None:
                continue
            missing = sorted(raw for raw in p.links if raw not in plan.available)
            if missing:
                plan.replies[id(command)] = ObjectNotFound(
                    f"a tree or commit refers to missing object {missing[0].hex()}"
                )
                continue
            plan.rows.update(p.rows)
            plan.available.update(p.rows)
            plan.replies[id(command)] = p.oids

    async def apply(self, conn: PgConn, command: PgCasCommand) -> Any:
        match command:
            case PutObjects():
                reply = self._plan.replies[id(command)]
                if isinstance(reply, PforgeError):
                    raise reply
                return reply
            case UpdateRef():
                return await self._update_ref(conn, command)
            case Gc():
                return await self._gc(conn, command)
            case PutChunk():
                return await self._put_chunk(conn, command)
            case SealChunked():
                return await self._seal(conn, command)
            case Touch(oids=oids):
                # Asked for because they were old: touched whatever another writer did since; the
                # reply is those still there (a gc may have deleted one meanwhile).
                found = await conn.fetch(
                    f"UPDATE {self.objects_table} SET touched_at = now() WHERE oid = ANY($1::bytea[]) RETURNING oid",
                    sorted(oids),
                )
                return [bytes(r[0]) for r in found]

    async def flush(self, conn: PgConn) -> None:
        rows = self._plan.rows
        if not rows:
            return
        oids = sorted(rows)
        await conn.execute(
            f"""INSERT INTO {self.objects_table} AS o (oid, kind, size, body)
                SELECT * FROM unnest($1::bytea[], $2::int2[], $3::int8[], $4::bytea[])
                ON CONFLICT (oid) DO UPDATE SET touched_at = now()
                WHERE o.touched_at < now() - make_interval(secs => $5)""",
            oids,
            [rows[r][0] for r in oids],
            [len(rows[r][1]) for r in oids],
            [rows[r][1] for r in oids],
            self.freshen_s,
        )

    async def _put_chunk(self, conn: PgConn, command: PutChunk) -> None:
        if len(command.oid) != 32 or not 0 <= command.seq < 2**31 - 1 or not 0 < len(command.data) <= CHUNK_BYTES:
            raise InvalidInput("a chunk needs a 32-byte id, a sequence number and 1 to CHUNK_BYTES bytes")
        # Touched again if already there: an upload in progress stays young for gc.
        await conn.execute(
            f"""INSERT INTO {self.chunks_table} (oid, seq, data) VALUES ($1, $2, $3)
                ON CONFLICT (oid, seq) DO UPDATE SET touched_at = now()""",
            command.oid,
            command.seq,
            command.data,
        )

    async def _seal(self, conn: PgConn, command: SealChunked) -> str:
        oid, size = command.oid, command.size
        if len(oid) != 32 or not CHUNKED_ABOVE < size < 2**62:
            raise InvalidInput(f"a chunked blob needs a 32-byte id and more than {CHUNKED_ABOVE} bytes")
        chunks = -(-size // CHUNK_BYTES)
        # Touched, not only counted: a gc deleting chunks no object claims waits for this transaction,
        # then finds them young and leaves them.
        lengths = await conn.fetch(
            f"""UPDATE {self.chunks_table} SET touched_at = now() WHERE oid = $1 AND seq < $2
                RETURNING length(data)""",
            oid,
            chunks,
        )
        count, total = len(lengths), sum(int(r[0]) for r in lengths)
        if (int(count), int(total)) != (chunks, size):
            raise StorageError(
                f"large blob {oid.hex()}: {count} of {chunks} chunks ({total} of {size} bytes) are stored; "
                "an upload was cut short or a gc took them: write it again"
            )
        await conn.execute(
            f"""INSERT INTO {self.objects_table} AS o (oid, kind, size, body, chunked) VALUES ($1, {BLOB}, $2, '', true)
                ON CONFLICT (oid) DO UPDATE SET touched_at = now()
                WHERE o.touched_at < now() - make_interval(secs => $3)""",
            oid,
            size,
            self.freshen_s,
        )
        return oid.hex()

    async def _lock_present(self, conn: PgConn, wanted: set[bytes]) -> set[bytes]:
        """Which of ``wanted`` exist, locked against a concurrent gc's delete until this batch commits,
        and freshened when older than ``freshen_s`` (so a gc that already marked them keeps them)."""
        if not wanted:
            return set()
        ids = sorted(wanted)  # locks in one order: two writers never deadlock on them
        found = await conn.fetch(
            f"SELECT oid FROM {self.objects_table} WHERE oid = ANY($1::bytea[]) ORDER BY oid FOR KEY SHARE", ids
        )
        await self._touch(conn, ids)
        return {bytes(r[0]) for r in found}

    async def _touch(self, conn: PgConn, oids: list[bytes]) -> None:
        await conn.execute(
            f"""UPDATE {self.objects_table} SET touched_at = now()
                WHERE oid = ANY($1::bytea[]) AND touched_at < now() - make_interval(secs => $2)""",
            sorted(oids),
            self.freshen_s,
        )

    async def _update_ref(self, conn: PgConn, command: UpdateRef) -> None:
        name = _ref_target(validate_ref_name(command.name))
        new = validate_oid(command.new)
        expected = command.expected
        if expected is not None:
            validate_oid(expected, "expected ref value")
        raw = bytes.fromhex(new)
        if raw not in self._plan.available:
            raise ObjectNotFound(f"cannot point ref {name} at missing object {new}")
        if expected is None:
            await conn.execute(
                f"""INSERT INTO {self.refs_table} (name, oid) VALUES ($1, $2)
                    ON CONFLICT (name) DO UPDATE SET oid = excluded.oid, updated_at = now()""",
                name,
                raw,
            )
            return
        if expected == NULL_OID:
            done = await conn.fetchval(
                f"INSERT INTO {self.refs_table} (name, oid) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING 1",
                name,
                raw,
            )
        else:
            done = await conn.fetchval(
                f"UPDATE {self.refs_table} SET oid = $2, updated_at = now() WHERE name = $1 AND oid = $3 RETURNING 1",
                name,
                raw,
                bytes.fromhex(expected),
            )
        if done is None:
            current = await conn.fetchval(f"SELECT oid FROM {self.refs_table} WHERE name = $1", name)
            shown = bytes(current).hex() if current is not None else "absent"
            raise RefConflict(f"ref {name} is {shown}, expected {expected}")

    async def _gc(self, conn: PgConn, command: Gc) -> tuple[int, int]:
        """Delete what the mark found unreachable, unless something made it reachable since: replies
        ``(objects deleted, body bytes reclaimed)``.

        The candidates are locked ``FOR UPDATE`` first, which waits for every writer whose batch
        links to one of them (they hold it ``FOR KEY SHARE``): their trees and commits are committed
        by then, young, and read below; a writer coming later waits for this transaction and then
        finds the object gone (``ObjectNotFound``), never a dangling link. Then what every young tree
        or commit reaches through candidates is kept, and so is every candidate freshened since the
        mark (``touched_at`` re-checked under the lock)."""
        candidates = set(command.oids)
        cutoff = command.cutoff_us
        if not candidates:
            await self._drop_chunks(conn, [], cutoff)
            return 0, 0
        await conn.fetch(
            f"SELECT 1 FROM {self.objects_table} WHERE oid = ANY($1::bytea[]) ORDER BY oid FOR UPDATE",
            sorted(candidates),
        )
        kept: set[bytes] = set()
        # What this very batch stores, links to or points a ref at is not in the table yet (or not
        # as such): kept, with what it reaches.
        frontier = self._plan.available & candidates
        # "Young" here reaches back _SWEEP_MARGIN_S further than the cutoff: a tree's touched_at is its
        # transaction's start, so one that began before the mark and committed after it is young here.
        young = f"""SELECT kind, body FROM {self.objects_table}
                    WHERE touched_at >= to_timestamp($1::float8 / 1e6) AND kind IN ({TREE}, {COMMIT})"""
        async for record in conn.raw.cursor(young, cutoff - int(_SWEEP_MARGIN_S * 1e6), prefetch=64):
            frontier.update(raw for raw in _links(int(record[0]), bytes(record[1])) if raw in candidates)
        while frontier:
            kept |= frontier
            rows = await conn.fetch(
                f"SELECT kind, body FROM {self.objects_table} "
                f"WHERE oid = ANY($1::bytea[]) AND kind IN ({TREE}, {COMMIT})",
                sorted(frontier),
            )
            frontier = {raw for kind, body in rows for raw in _links(int(kind), bytes(body))}
            frontier = (frontier & candidates) - kept
        done = await conn.fetch(
            f"""DELETE FROM {self.objects_table}
                WHERE oid = ANY($1::bytea[]) AND touched_at < to_timestamp($2::float8 / 1e6)
                RETURNING oid, size""",
            sorted(candidates - kept),
            cutoff,
        )
        await self._drop_chunks(conn, [bytes(r[0]) for r in done], cutoff)
        return len(done), sum(int(r[1]) for r in done)

    async def _drop_chunks(self, conn: PgConn, deleted: list[bytes], cutoff: int) -> None:
        """The chunks of deleted blobs, and chunks no object row claims (an upload cut short), each only
        if untouched since the cutoff: an upload of the same bytes running now touches its chunks."""
        await conn.execute(
            f"""DELETE FROM {self.chunks_table} c
                WHERE c.touched_at < to_timestamp($2::float8 / 1e6)
                  AND (c.oid = ANY($1::bytea[])
                       OR NOT EXISTS (SELECT 1 FROM {self.objects_table} o WHERE o.oid = c.oid))""",
            sorted(deleted),
            cutoff,
        )


def _links(kind: int, body: bytes) -> list[bytes]:
    """What a tree or commit links to; nothing if it is damaged (fsck names it; gc keeps its links)."""
    try:
        if kind == TREE:
            return [raw for _name, _mode, raw in decode_tree(body)]
        if kind == COMMIT:
            return _commit_links(body)
    except PforgeError:
        pass
    return []


def _valid_oid(oid: object) -> bool:
    try:
        validate_oid(oid)
    except InvalidInput:
        return False
    return True


# -- reading -----------------------------------------------------------------------------------


def _checked(oid: str, kind: int, body: bytes) -> tuple[int, bytes]:
    """``(type, body)`` of a row whose hash matches its id; otherwise ``IntegrityError`` naming it."""
    if kind not in TYPE_NAMES or kind not in (BLOB, TREE, COMMIT):
        raise IntegrityError(f"object {oid} is corrupt: unknown type {kind}")
    digest = hashlib.sha256(object_header(kind, len(body)))
    digest.update(body)
    if digest.hexdigest() != oid:
        raise IntegrityError(f"object {oid} does not match its id: the stored bytes are corrupt")
    return kind, body


class _RowView:
    """The file CAS's ``ObjectDB`` read surface over the table, for code run in a worker thread
    (``restore_tree``, ``SnapshotPlan``, ``Cas._fsck``): each call crosses back to the event loop."""

    def __init__(self, cas: PgCas) -> None:
        self._cas = cas
        self._cache: dict[str, tuple[int, bytes]] = {}
        #: blobs restore will ask for, in its order: fetched ahead in batches.
        self._ahead: list[str] = []
        self._ahead_at: dict[str, int] = {}
        self._ahead_next = 0
        self._sizes: dict[str, int] = {}
        #: large blobs (in chunks): streamed, never fetched ahead
        self._chunked: set[str] = set()
        self.present: set[bytes] = set()
        #: for fsck: the page being verified (a chunked blob's body is None: it is streamed)
        self._page: dict[str, tuple[int, bytes | None]] = {}

    def _fetch(self, oids: list[str], *, whole: bool = True) -> dict[str, tuple[int, bytes]]:
        return anyio.from_thread.run(lambda: self._cas._fetch_rows(oids, whole=whole))

    def plan(
        self, trees: dict[str, tuple[int, bytes]], order: list[str], sizes: dict[str, int], chunked: set[str]
    ) -> None:
        self._cache.update(trees)
        self._ahead = order
        self._ahead_at = {oid: i for i, oid in reversed(list(enumerate(order)))}
        self._sizes = sizes
        self._chunked = chunked

    def read(self, oid: str) -> tuple[int, bytes]:
        validate_oid(oid)
        row = self._cache.get(oid)
        if row is None:
            batch = [oid]
            at = self._ahead_at.get(oid)
            if at is not None and at >= self._ahead_next:
                total, end = 0, at
                while end < len(self._ahead) and end - at < _FETCH_ROWS:
                    total += self._sizes.get(self._ahead[end], 0)
                    if end > at and total > _FETCH_BYTES:
                        break
                    end += 1
                batch = list(dict.fromkeys(self._ahead[at:end]))
                self._ahead_next = end
            fetched = self._fetch(batch, whole=False)
            if oid not in fetched:
                fetched = self._fetch([oid])  # a large blob, read whole (restore streams it instead)
            if oid not in fetched:
                raise ObjectNotFound(f"object {oid} not found")
            self._cache.update(fetched)
            row = fetched[oid]
        if row[0] == BLOB:
            self._cache.pop(oid, None)  # read once, in order: memory stays one batch
        return _checked(oid, *row)

    def read_blob(self, oid: str) -> bytes:
        type_num, body = self.read(oid)
        if type_num != BLOB:
            raise InvalidInput(f"object {oid} is a {TYPE_NAMES[type_num]}, not a blob")
        return body

    def copy_blob(self, oid: str, fd: int) -> None:
        if oid in self._chunked:
            self.stream_chunked(oid, lambda data: write_all(fd, data))
        else:
            write_all(fd, self.read_blob(oid))

    def stream_chunked(self, oid: str, out: Callable[[bytes], object]) -> None:
        """Hand a large blob's chunks to ``out`` in order, one in memory at a time; ``IntegrityError``
        (after the last) unless they hash to ``oid``, or if one is missing."""
        raw = bytes.fromhex(oid)
        row = anyio.from_thread.run(self._cas._chunked_size, raw)
        if row is None:
            raise ObjectNotFound(f"object {oid} not found")
        kind, size = row
        if kind != BLOB:
            raise IntegrityError(f"object {oid} is corrupt: a chunked object of type {kind}")
        digest = hashlib.sha256(object_header(BLOB, size))
        done = 0
        for seq in range(-(-size // CHUNK_BYTES)):
            data = anyio.from_thread.run(self._cas._chunk, raw, seq)
            if data is None:
                raise IntegrityError(f"object {oid} is corrupt: its chunk {seq} is missing")
            digest.update(data)
            done += len(data)
            out(data)
        if done != size or digest.digest() != raw:
            raise IntegrityError(f"object {oid} does not match its id: the stored bytes are corrupt")

    def has(self, raw: bytes) -> bool:
        # The snapshot's stat cache hits were looked up at once before the scan; anything else asks.
        if raw in self.present:
            return True
        return bool(anyio.from_thread.run(self._cas._types, [raw.hex()]))

    # -- fsck's walk

    def iter_oids(self) -> Iterator[str]:
        after = b""
        while True:
            page = anyio.from_thread.run(self._cas._page, after)
            if not page:
                return
            self._page = {oid: (kind, body) for oid, kind, body in page}
            for oid, _kind, _body in page:
                yield oid
            self._page = {}
            after = bytes.fromhex(page[-1][0])

    def verify(self, oid: str) -> tuple[int, bytes | None]:
        row = self._page.get(oid)
        if row is None:
            row = self._fetch([oid], whole=False).get(oid)
            if row is None:
                if anyio.from_thread.run(self._cas._chunked_size, bytes.fromhex(oid)) is None:
                    raise ObjectNotFound(f"object {oid} vanished")  # a gc deleted it meanwhile
                row = (BLOB, None)
        kind, body = row
        if body is None:
            self.stream_chunked(oid, lambda data: None)
            return BLOB, None
        type_num, body = _checked(oid, kind, body)
        return type_num, None if type_num == BLOB else body


class _SnapshotSink:
    """Where a snapshot scan puts what it reads: staged in memory, sent to the writer in chunks."""

    def __init__(self, cas: PgCas, present: set[bytes]) -> None:
        self._cas = cas
        #: the stat cache's blobs found stored: a file it answers is not read again.
        self.present = present
        self.staged: dict[bytes, tuple[int, bytes]] = {}
        self.size = 0
        self.sent: set[bytes] = set()

    def add(self, type_num: int, body: bytes, raw: bytes | None = None) -> bytes:
        if raw is None:
            raw = hash_object(type_num, body)
        if raw not in self.staged and raw not in self.sent:
            if len(body) > MAX_OBJECT_BYTES:
                raise InvalidInput(f"a file of {len(body)} bytes is larger than PostgreSQL can hold")
            self.staged[raw] = (type_num, body)
            self.size += len(body)
            if self.size >= _SNAPSHOT_FLUSH_BYTES:
                self.flush_from_thread()
        return raw

    def add_large_file(self, fd: int, shown: str) -> bytes:
        """The large regular file open on ``fd``: up to ``CHUNKED_ABOVE`` read into one row, past it a
        chunked blob. A file that changed while it was read is read again, each time as it is sized
        then (one that grew past, or shrank below, ``CHUNKED_ABOVE`` meanwhile is stored as what its
        new size makes it: a chunked blob of 32 MiB or less is refused by the writer); the last time
        takes it as its fstat sizes it, as the file CAS does, so a log a tool keeps appending to does
        not fail every snapshot of its workspace."""
        for attempt in range(_READ_ATTEMPTS):
            last = attempt == _READ_ATTEMPTS - 1
            size = os.fstat(fd).st_size
            if size > CHUNKED_ABOVE:
                raw = _upload_chunked(self._cas, fd, size, prefix=last)
            else:
                data = _read_sized(fd, size, prefix=last)
                raw = None if data is None else self.add(BLOB, data)
            if raw is not None:
                return raw
        raise StorageError(f"{shown} kept changing while it was read")

    def freshen(self, raw: bytes) -> bool:
        # Whether a file the stat cache answers may be named by its id. The final write links the
        # trees to it, and the writer locks and freshens what trees link to in that transaction.
        return raw in self.present

    def take(self) -> list[tuple[int, bytes]]:
        objects = list(self.staged.values())
        self.sent.update(self.staged)
        self.staged = {}
        self.size = 0
        return objects

    def flush_from_thread(self) -> None:
        objects = self.take()
        if objects:
            anyio.from_thread.run(self._cas._put, objects)


# -- the facade --------------------------------------------------------------------------------


class PgCas:
    """Blobs, trees, commits and refs in PostgreSQL: the API of :class:`..cas.store.Cas`."""

    def __init__(self, actor: PgCasActor, *, cache_dir: Path | None = None) -> None:
        self._actor = actor
        self.schema = actor.schema
        self._objects = actor.objects_table
        self._refs_table = actor.refs_table
        self.readonly = actor.readonly
        self.freshen_s = actor.freshen_s
        self._own_cache: str | None = None
        if cache_dir is None:
            self._own_cache = private_cache_dir()
            cache_dir = Path(self._own_cache)
        self._cache_dir = cache_dir
        self._snapshot_locks: dict[str, anyio.Lock] = {}
        self.path = None  # no repository on disk: export_git writes one
        self.snapshots_unchanged = 0
        self.snapshots_scanned = 0
        #: single-object reads waiting for this turn of the event loop's query (see _coalesced)
        self._reads: list[tuple[str, asyncio.Future[tuple[int, bytes] | None]]] = []
        self._read_tasks: set[asyncio.Task[None]] = set()

    def _open(self) -> None:
        if self._actor.closed:
            raise ActorClosed("the CAS is closed")

    async def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        self._open()
        return await self._actor.fetch(sql, *args)

    async def _fetch_rows(self, oids: list[str], *, whole: bool = True) -> dict[str, tuple[int, bytes]]:
        """``(type, body)`` of each id found, as stored (not re-hashed). A large blob's body is read
        from its chunks, or, without ``whole``, left out."""
        if len(oids) == 1:  # the common read: a plain index lookup plans and runs faster than = ANY
            rows = await self._fetch(
                f"SELECT oid, kind, body, chunked, size FROM {self._objects} WHERE oid = $1", bytes.fromhex(oids[0])
            )
        else:
            rows = await self._fetch(
                f"SELECT oid, kind, body, chunked, size FROM {self._objects} WHERE oid = ANY($1::bytea[])",
                [bytes.fromhex(o) for o in oids],
            )
        out = {}
        for oid, kind, body, chunked, size in rows:
            if chunked:
                if not whole:
                    continue
                body = await self._assemble(bytes(oid), int(size))
            out[bytes(oid).hex()] = (int(kind), bytes(body))
        return out

    async def _assemble(self, raw: bytes, size: int) -> bytes:
        """A large blob's bytes from its chunks (whatever they hold: the caller re-hashes)."""
        parts = []
        for seq in range(-(-size // CHUNK_BYTES)):
            data = await self._chunk(raw, seq)
            if data is None:
                raise IntegrityError(f"object {raw.hex()} is corrupt: its chunk {seq} is missing")
            parts.append(data)
        return b"".join(parts)

    async def _chunk(self, raw: bytes, seq: int) -> bytes | None:
        rows = await self._fetch(f"SELECT data FROM {self._actor.chunks_table} WHERE oid = $1 AND seq = $2", raw, seq)
        return bytes(rows[0][0]) if rows else None

    async def _chunked_size(self, raw: bytes) -> tuple[int, int] | None:
        """``(type, size)`` of a chunked object, or None if there is no such object."""
        rows = await self._fetch(f"SELECT kind, size FROM {self._objects} WHERE oid = $1 AND chunked", raw)
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    async def _put_chunk(self, raw: bytes, seq: int, data: bytes) -> None:
        await self._actor.call(PutChunk(raw, seq, data))

    async def _seal(self, raw: bytes, size: int) -> str:
        return cast("str", await self._actor.call(SealChunked(raw, size)))

    async def _page(self, after: bytes) -> list[tuple[str, int, bytes | None]]:
        """The objects after ``after`` in id order: up to ``_FETCH_ROWS`` of them and about
        ``_FETCH_BYTES`` (at least one), so a walk over the table holds one page in memory. A large
        blob's body is None: its chunks are streamed by whoever walks."""
        sized = await self._fetch(
            f"SELECT oid, size, chunked, kind FROM {self._objects} WHERE oid > $1 ORDER BY oid LIMIT {_FETCH_ROWS}",
            after,
        )
        total = 0
        take: list[tuple[bytes, bool, int]] = []
        for oid, size, chunked, kind in sized:
            if take and not chunked and total + int(size) > _FETCH_BYTES:
                break
            take.append((bytes(oid), bool(chunked), int(kind)))
            total += 0 if chunked else int(size)
        small = [raw.hex() for raw, chunked, _kind in take if not chunked]
        rows = await self._fetch_rows(small, whole=False) if small else {}
        page: list[tuple[str, int, bytes | None]] = []
        for raw, chunked, kind in take:
            if chunked:
                page.append((raw.hex(), kind, None))
            elif raw.hex() in rows:  # one deleted between the two reads (gc) is simply not there
                page.append((raw.hex(), *rows[raw.hex()]))
        return page

    async def _put(self, objects: list[tuple[int, bytes]]) -> list[str]:
        if self.readonly:
            raise InvalidInput("the store is open read-only")
        return cast("list[str]", await self._actor.call(PutObjects(objects)))

    async def _read(self, oid: str) -> tuple[int, bytes]:
        validate_oid(oid)
        self._open()
        row = await self._coalesced(oid)
        if row is None:
            raise ObjectNotFound(f"object {oid} not found")
        return _checked(oid, *row)

    async def _coalesced(self, oid: str) -> tuple[int, bytes] | None:
        """One object's row, read together with every other read asked for in the same turn of the
        event loop: 64 tasks reading cost one query, not 64 (and not 64 pool checkouts)."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[tuple[int, bytes] | None] = loop.create_future()
        self._reads.append((oid, reply))
        if len(self._reads) == 1:
            loop.call_soon(self._start_reads)
        return await reply

    def _start_reads(self) -> None:
        batch, self._reads = self._reads, []
        task = asyncio.get_running_loop().create_task(self._run_reads(batch))
        self._read_tasks.add(task)
        task.add_done_callback(self._read_tasks.discard)

    async def _run_reads(self, batch: list[tuple[str, asyncio.Future[tuple[int, bytes] | None]]]) -> None:
        try:
            rows = await self._fetch_rows(list(dict.fromkeys(oid for oid, _ in batch)))
        except BaseException as exc:
            for _oid, reply in batch:
                if reply.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    reply.cancel()
                else:
                    reply.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for oid, reply in batch:
            if not reply.done():
                reply.set_result(rows.get(oid))

    async def _types(self, oids: Iterable[str]) -> dict[str, int]:
        """The stored type of each id found (from the row; reads re-hash, this only routes)."""
        ids = sorted({bytes.fromhex(o) for o in oids})
        if not ids:
            return {}
        rows = await self._fetch(f"SELECT oid, kind FROM {self._objects} WHERE oid = ANY($1::bytea[])", ids)
        return {bytes(r[0]).hex(): int(r[1]) for r in rows}

    # -- blobs -------------------------------------------------------------------------------------

    async def write_blob(self, data: bytes) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"write_blob takes bytes, not {type(data).__name__}")
        if len(data) > CHUNKED_ABOVE:
            return await self._write_chunked(bytes(data))
        (oid,) = await self._put([(BLOB, bytes(data))])
        return oid

    async def _write_chunked(self, data: bytes) -> str:
        """A large blob, in chunks: each chunk its own command, then the object row."""
        if self.readonly:
            raise InvalidInput("the store is open read-only")
        raw = hash_object(BLOB, data)
        if (await self._present([raw.hex()]))[0]:
            return raw.hex()  # stored already (and freshened)
        for seq, offset in enumerate(range(0, len(data), CHUNK_BYTES)):
            await self._put_chunk(raw, seq, data[offset : offset + CHUNK_BYTES])
        return await self._seal(raw, len(data))

    async def read_blob(self, oid: str) -> bytes:
        type_num, body = await self._read(oid)
        if type_num != BLOB:
            raise InvalidInput(f"object {oid} is a {TYPE_NAMES[type_num]}, not a blob")
        return body

    async def has(self, oid: str) -> bool:
        """Whether the object is stored. A caller about to reference it (a turn's ``refs``) may rely
        on it: one found older than ``freshen_s`` is freshened, so a gc within the grace keeps it."""
        validate_oid(oid)
        return (await self._present([oid]))[0]

    async def has_many(self, oids: Sequence[str]) -> list[bool]:
        """:meth:`has` for each of ``oids``, in order, in one query (and one write for the old ones)."""
        if isinstance(oids, (str, bytes)) or not isinstance(oids, Sequence):
            raise InvalidInput(f"has_many takes a sequence of object ids, not {type(oids).__name__}")
        for oid in oids:
            validate_oid(oid)
        return await self._present(list(oids))

    async def _present(self, oids: list[str]) -> list[bool]:
        if not oids:
            return []
        ids = sorted({bytes.fromhex(o) for o in oids})
        rows = await self._fetch(
            f"""SELECT oid, touched_at < now() - make_interval(secs => $2) FROM {self._objects}
                WHERE oid = ANY($1::bytea[])""",
            ids,
            self.freshen_s,
        )
        found = {bytes(r[0]) for r in rows}
        stale = [bytes(r[0]) for r in rows if r[1]]
        if stale and not self.readonly:
            # Rare (only past freshen_s), so it may queue behind writes: the writer is the one that writes.
            # One a gc deleted meanwhile is gone.
            touched = set(await self._actor.call(Touch(stale)))
            found -= set(stale) - touched
        return [bytes.fromhex(o) in found for o in oids]

    # -- trees -------------------------------------------------------------------------------------

    async def write_tree(self, entries: Iterable[tuple[str, str | int, str]]) -> str:
        """As :meth:`..cas.store.Cas.write_tree`: entry names, modes, entry types and dotfile contents
        git would reject are ``InvalidInput`` before anything is stored."""
        objects, root, leaves = _build_trees(entries)
        self._open()
        await self._check_leaves(leaves)
        if objects:
            await self._put(objects)
        return root

    async def _check_leaves(self, leaves: list[_Leaf]) -> None:
        types = await self._types(oid for _path, _name, _mode, oid in leaves)
        for path, name, mode, oid in leaves:
            if oid not in types:
                raise ObjectNotFound(f"tree entry {path!r} points at missing object {oid}")
            want = TREE if mode == DIR_MODE else BLOB
            if types[oid] != want:
                raise InvalidInput(
                    f"tree entry {path!r} has mode {mode:o}, a {TYPE_NAMES[want]}, "
                    f"but {oid} is a {TYPE_NAMES.get(types[oid], 'corrupt object')}"
                )
            kind = dotfile_kind(name)
            if kind is not None and want == BLOB:
                why = dotfile_blob_problem(kind, await self.read_blob(oid))
                if why:
                    raise InvalidInput(f"tree entry {path!r}: git fsck rejects this content: {why}")

    async def read_tree(self, oid: str, recursive: bool = False) -> list[TreeEntry]:
        """One level of a tree, or with ``recursive`` every non-tree entry below it by path."""
        validate_oid(oid)
        out: list[TreeEntry] = []
        level = [(oid, "")]
        while level:
            rows = await self._fetch_rows([tree for tree, _prefix in level])
            following: list[tuple[str, str]] = []
            for tree, prefix in level:
                row = rows.get(tree)
                if row is None:
                    raise ObjectNotFound(f"object {tree} not found")
                type_num, body = _checked(tree, *row)
                if type_num != TREE:
                    raise InvalidInput(f"object {tree} is not a tree")
                for name, mode, raw in decode_tree(body, tree):
                    path = prefix + os.fsdecode(name)
                    if recursive and mode == DIR_MODE:
                        following.append((raw.hex(), path + "/"))
                    else:
                        out.append(TreeEntry(path, mode, raw.hex()))
            level = following
        if recursive:
            out.sort(key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        return out

    # -- commits -----------------------------------------------------------------------------------

    async def write_commit(
        self,
        tree: str,
        parents: Iterable[str] = (),
        *,
        message: str = "",
        author: str | None = None,
        timestamp: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """As :meth:`..cas.store.Cas.write_commit`."""
        if isinstance(parents, (str, bytes)) or not isinstance(parents, Iterable):
            raise InvalidInput(f"parents must be an iterable of commit ids, not {type(parents).__name__}")
        parents = tuple(parents)
        body = encode_commit(tree, parents, message=message, author=author, timestamp=timestamp, metadata=metadata)
        links = [(tree, TREE, "tree")] + [(parent, COMMIT, "parent") for parent in parents]
        types = await self._types(oid for oid, _want, _what in links)
        for oid, want, what in links:
            actual = types.get(oid)
            if actual is None:
                raise ObjectNotFound(f"the commit's {what} points at missing object {oid}")
            if actual != want:
                raise InvalidInput(
                    f"the commit's {what} {oid} is a {TYPE_NAMES.get(actual, 'corrupt object')}, "
                    f"not a {TYPE_NAMES[want]}"
                )
        (oid,) = await self._put([(COMMIT, body)])
        return oid

    async def read_commit(self, oid: str) -> Commit:
        type_num, body = await self._read(oid)
        if type_num != COMMIT:
            raise InvalidInput(f"object {oid} is not a commit")
        return decode_commit(body, oid)

    # -- refs --------------------------------------------------------------------------------------

    async def update_ref(self, name: str, new: str, *, expected: str | None = None) -> None:
        """Point ``name`` at ``new``. With ``expected``, only if the ref still holds it (the null oid
        means: only if the ref does not exist); otherwise ``RefConflict``. ``HEAD`` is ``refs/heads/main``."""
        validate_ref_name(name)
        validate_oid(new)
        if expected is not None:
            validate_oid(expected, "expected ref value")
        if self.readonly:
            raise InvalidInput("the store is open read-only")
        await self._actor.call(UpdateRef(name, new, expected))

    async def get_ref(self, name: str) -> str | None:
        target = _ref_target(validate_ref_name(name))
        rows = await self._fetch(f"SELECT oid FROM {self._refs_table} WHERE name = $1", target)
        return bytes(rows[0][0]).hex() if rows else None

    async def list_refs(self) -> dict[str, str]:
        """Every ref, by name."""
        rows = await self._fetch(f"SELECT name, oid FROM {self._refs_table} ORDER BY name")
        return {str(r[0]): bytes(r[1]).hex() for r in rows}

    # -- workspaces --------------------------------------------------------------------------------

    async def snapshot(self, directory: str | os.PathLike[str]) -> str:
        """Store a directory tree and return its tree id, as :meth:`..cas.store.Cas.snapshot` does (the
        same scan: descriptor-relative, the workspace's ``.git`` left out, names git refuses refused)."""
        root = _local_path(directory, "snapshot directory")
        if not os.path.isdir(root):
            raise InvalidInput(f"cannot snapshot {root}: not a directory")
        if self.readonly:
            raise InvalidInput("the store is open read-only")
        self._open()
        lock = self._snapshot_locks.setdefault(root, anyio.Lock())
        async with lock:
            self.snapshots_scanned += 1
            try:
                return await self._snapshot(root, use_cache=True)
            except ObjectNotFound:
                # A file the stat cache answered lost its object (a gc took it) before the trees were
                # written: scan again, reading every file.
                return await self._snapshot(root, use_cache=False)

    async def _snapshot(self, root: str, *, use_cache: bool) -> str:
        exclude: set[tuple[int, int]] = set()
        with contextlib.suppress(OSError):
            st = os.stat(self._cache_dir)
            exclude.add((st.st_dev, st.st_ino))
        plan = SnapshotPlan(root, cache_file(self._cache_dir, root), exclude)
        view = _RowView(self)
        # The stat cache's ids, looked up at once: a file it answers is not read again.
        cached = [bytes.fromhex(entry_oid(entry)) for entry in plan._load_cache().values()] if use_cache else []
        if cached:
            types = await self._types(raw.hex() for raw in cached)
            view.present = {bytes.fromhex(o) for o, kind in types.items() if kind == BLOB}
        sink = _SnapshotSink(self, view.present)

        def scan() -> bytes:
            return plan.run(sink, cast(ObjectDB, view), None)

        try:
            raw = await anyio.to_thread.run_sync(scan)
        except OSError as exc:
            raise StorageError(f"cannot snapshot {root}: {exc.strerror or exc!r}") from exc
        except ValueError as exc:
            raise InvalidInput(f"cannot snapshot {root}: {exc}") from exc
        # The trees link to every file the stat cache answered: the writer checks (and locks) those in
        # the same transaction, so a gc running meanwhile cannot take them.
        await self._put(sink.take())
        await anyio.to_thread.run_sync(plan.save_cache)
        return raw.hex()

    async def restore(self, tree: str, directory: str | os.PathLike[str]) -> None:
        """Recreate a snapshot in ``directory``, which must be missing or empty (the file CAS's
        ``restore_tree``: descriptor-relative, temp files renamed in, all undone on failure)."""
        validate_oid(tree)
        target = _local_path(directory, "restore directory")
        self._open()
        view = _RowView(self)
        trees, order = await self._walk_for_restore(tree)
        sizes: dict[str, int] = {}
        chunked: set[str] = set()
        if order:
            rows = await self._fetch(
                f"SELECT oid, size, chunked FROM {self._objects} WHERE oid = ANY($1::bytea[])",
                sorted({bytes.fromhex(o) for o in order}),
            )
            sizes = {bytes(r[0]).hex(): int(r[1]) for r in rows}
            chunked = {bytes(r[0]).hex() for r in rows if r[2]}
            order = [oid for oid in order if oid not in chunked]  # streamed, not fetched ahead
        view.plan(trees, order, sizes, chunked)
        await anyio.to_thread.run_sync(restore_tree, cast(ObjectDB, view), tree, target)

    async def _walk_for_restore(self, tree: str) -> tuple[dict[str, tuple[int, bytes]], list[str]]:
        """Every tree below ``tree`` (fetched a level at a time), and the blobs in the order restore
        reads them (depth first, entries in order). A tree that is missing or damaged is left for
        restore itself to meet and name."""
        trees: dict[str, tuple[int, bytes]] = {}
        level = [tree]
        while level:
            rows = await self._fetch_rows(level)
            following = []
            for oid in level:
                row = rows.get(oid)
                if row is None or row[0] != TREE:
                    continue
                trees[oid] = row
                try:
                    entries = decode_tree(_checked(oid, *row)[1], oid)
                except IntegrityError:
                    continue
                following += [raw.hex() for _n, mode, raw in entries if mode == DIR_MODE and raw.hex() not in trees]
            level = list(dict.fromkeys(following))
        order: list[str] = []
        # restore's own order (depth first, entries in order), without recursion: a tree may be
        # nested thousands deep. A subtree missing or damaged is skipped, as restore will name it.
        pending: list[Iterator[tuple[bytes, int, bytes]]] = []
        with contextlib.suppress(IntegrityError):
            if tree in trees:
                pending.append(iter(decode_tree(trees[tree][1], tree)))
        while pending:
            entry = next(pending[-1], None)
            if entry is None:
                pending.pop()
                continue
            _name, mode, raw = entry
            if mode != DIR_MODE:
                order.append(raw.hex())
                continue
            row = trees.get(raw.hex())
            if row is not None:
                with contextlib.suppress(IntegrityError):
                    pending.append(iter(decode_tree(row[1], raw.hex())))
        return trees, order

    # -- verification ------------------------------------------------------------------------------

    async def fsck(self) -> FsckReport:
        """Read and re-hash every object; report corrupt ones, links to missing ones, and every
        well-hashed object ``git fsck --strict`` would reject (the file CAS's own rules and walk)."""
        self._open()
        view = _RowView(self)
        shim = _FsckShim(view)
        return await anyio.to_thread.run_sync(Cas._fsck, cast(Cas, shim))

    check = fsck

    async def export_git(self, directory: str | os.PathLike[str]) -> int:
        """Write every object and ref into a bare SHA-256 git repository at ``directory`` (missing,
        empty, or such a repository already, then added to): packs ``git fsck --strict`` accepts.
        Objects are re-hashed as they are read; a corrupt one fails the export with
        ``IntegrityError`` naming it. Returns how many objects were written."""
        target = Path(_local_path(directory, "export directory"))
        self._open()
        if target.exists() and any(target.iterdir()) and not (target / "config").exists():
            raise InvalidInput(f"cannot export to {target}: not empty and not a git repository")
        odb = ObjectDB(target, fsync=True)
        written = 0
        try:
            await anyio.to_thread.run_sync(odb.init)
            after = b""
            objects: list[tuple[bytes, int, bytes]] = []
            size = 0
            while True:
                page = await self._page(after)
                for oid, kind, stored in page:
                    raw = bytes.fromhex(oid)
                    if odb.known(raw):
                        continue
                    if stored is None:  # a large blob: streamed into a loose object
                        await anyio.to_thread.run_sync(self._export_chunked, odb, oid)
                        written += 1
                        continue
                    type_num, body = _checked(oid, kind, stored)
                    objects.append((raw, type_num, body))
                    size += len(body)
                # One pack per _EXPORT_PACK_BYTES: few packs, bounded memory.
                if objects and (not page or size >= _EXPORT_PACK_BYTES):
                    await anyio.to_thread.run_sync(odb.write_pack, objects)
                    written += len(objects)
                    objects, size = [], 0
                if not page:
                    break
                after = bytes.fromhex(page[-1][0])
            refs = RefStore(target, fsync=True)
            for name, oid in (await self.list_refs()).items():
                await anyio.to_thread.run_sync(refs.update, name, oid, None)
        except OSError as exc:
            raise StorageError(f"cannot export to {target}: {exc.strerror or exc!r}") from exc
        finally:
            odb.close()
        return written

    def _export_chunked(self, odb: ObjectDB, oid: str) -> None:
        """(Worker thread.) A large blob into ``odb`` as a loose object, through a temp file beside it,
        one chunk in memory at a time; the chunks are re-hashed on the way."""
        fd, temp = tempfile.mkstemp(prefix="tmp_export_", dir=odb.objects)
        try:
            _RowView(self).stream_chunked(oid, lambda data: write_all(fd, data))
            os.lseek(fd, 0, os.SEEK_SET)
            raw, _st = odb.write_fd_blob(fd, temp)
            if raw.hex() != oid:
                raise IntegrityError(f"object {oid} changed while it was exported")
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)

    # -- gc ----------------------------------------------------------------------------------------

    async def gc(
        self,
        roots: Iterable[str],
        *,
        grace_s: float = 3600.0,
        dry_run: bool = False,
        roots_taken_at: float | None = None,
    ) -> CasGcReport:
        """Delete the objects nothing reaches, beside live writers (the file CAS's semantics, git's model).

        Kept: what ``roots`` and every ref reach, and, for ``grace_s`` seconds, every object younger than
        that and what it reaches. An object a writer freshened (stored again, named by a new tree or
        commit, or found by :meth:`has`) counts as new from then on, also while this gc runs: the sweep
        re-checks under row locks (see :meth:`PgCasActor._gc`). ``roots_taken_at`` (``time.time()``)
        is when the caller began to gather its roots: objects freshened since then are kept whatever
        the grace. A freshening touches only an object older than ``freshen_s``, so ``grace_s`` below
        ``freshen_s`` could take an object a caller was just told is there: refused (``InvalidInput``),
        as are malformed arguments and a read-only store, before anything is done.

        The report's byte counts are object body bytes (the table's ``size`` column); it has no packs
        or loose files (those counts are 0), one slice, and ``gate_held_s`` is how long the sweep's
        transaction held its row locks."""
        root_list = validate_gc_args(roots, grace_s, dry_run, roots_taken_at)
        if grace_s < self.freshen_s:
            raise InvalidInput(
                f"gc grace_s {grace_s} is below this CAS's freshen_s {self.freshen_s}: an object looked "
                "at that recently may be about to be referenced (open it with a smaller freshen_s)"
            )
        if self.readonly:
            raise InvalidInput("the store is open read-only: gc needs a writable store")
        started = time.monotonic()
        mark = await self._mark(root_list, float(grace_s), roots_taken_at)
        deleted = reclaimed = 0
        held = 0.0
        if not dry_run:  # also with nothing doomed: chunks of uploads cut short go
            t0 = time.monotonic()
            deleted, reclaimed = await self._sweep(mark.doomed, mark.cutoff_us)
            held = time.monotonic() - t0
        rescued = 0 if dry_run else len(mark.doomed) - deleted
        freed = sum(mark.sizes[raw] for raw in mark.doomed) if dry_run else reclaimed
        return CasGcReport(
            dry_run=dry_run,
            objects_before=len(mark.sizes),
            objects_kept=len(mark.kept),
            objects_young=len(mark.young),
            objects_rescued=rescued,
            objects_reclaimed=len(mark.doomed) if dry_run else deleted,
            bytes_before=mark.bytes_before,
            bytes_after=mark.bytes_before - freed,
            bytes_freed=freed,
            packs_before=0,
            packs_after=0,
            loose_before=0,
            loose_after=0,
            files_retired=0,
            slices=0 if dry_run else 1,
            gate_held_s=held,
            seconds=time.monotonic() - started,
            missing=mark.missing,
            unreadable=mark.unreadable,
        )

    async def _mark(self, roots: list[str], grace_s: float, roots_taken_at: float | None = None) -> _Mark:
        """What the refs and ``roots`` reach (kept), what objects younger than the cutoff reach beyond
        that (young), and the rest (doomed, in id order), with the cutoff (server clock, µs) the sweep
        re-checks. The cutoff is the server's now less ``grace_s``, or ``roots_taken_at`` (moved onto
        the server's clock) less ``grace_s`` if that is earlier."""
        asked_at = time.time()
        (now_row,) = await self._fetch("SELECT (extract(epoch from clock_timestamp()) * 1e6)::int8")
        server_now_us = int(now_row[0])
        cutoff_us = server_now_us - int(grace_s * 1e6)
        if roots_taken_at is not None:
            skew_us = server_now_us - int(asked_at * 1e6)
            cutoff_us = min(cutoff_us, int(roots_taken_at * 1e6) + skew_us - int(grace_s * 1e6))
        rows = await self._fetch(
            f"SELECT oid, kind, size, touched_at >= to_timestamp($1::float8 / 1e6) FROM {self._objects}", cutoff_us
        )
        mark = _Mark(cutoff_us)
        kinds = {bytes(r[0]): int(r[1]) for r in rows}
        mark.sizes = {bytes(r[0]): int(r[2]) for r in rows}
        mark.bytes_before = sum(mark.sizes.values())
        refs = [bytes.fromhex(o) for o in (await self.list_refs()).values()]
        starts = refs + [bytes.fromhex(o) for o in roots]
        mark.missing = sorted({raw.hex() for raw in starts if raw not in kinds})
        mark.kept = await self._reach(starts, kinds, set(), mark.unreadable)
        young = [bytes(r[0]) for r in rows if r[3] and bytes(r[0]) not in mark.kept]
        mark.young = await self._reach(young, kinds, mark.kept, mark.unreadable)
        mark.doomed = sorted(raw for raw in kinds if raw not in mark.kept and raw not in mark.young)
        return mark

    async def _reach(
        self, starts: list[bytes], kinds: dict[bytes, int], stop: set[bytes], unreadable: list[str]
    ) -> set[bytes]:
        """Every stored object ``starts`` reach (themselves included), not going into ``stop``."""
        reached: set[bytes] = set()
        todo = starts
        while todo:
            fresh = [raw for raw in dict.fromkeys(todo) if raw in kinds and raw not in reached and raw not in stop]
            todo = []
            reached.update(fresh)
            walk = [raw for raw in fresh if kinds[raw] in (TREE, COMMIT)]
            for start in range(0, len(walk), _FETCH_ROWS):
                chunk = [raw.hex() for raw in walk[start : start + _FETCH_ROWS]]
                fetched = await self._fetch_rows(chunk)
                for oid in chunk:
                    row = fetched.get(oid)
                    if row is None:
                        continue  # deleted meanwhile
                    try:
                        kind, body = _checked(oid, *row)
                    except IntegrityError:
                        unreadable.append(oid)  # kept, as what it may reach is unknown; fsck names it
                        continue
                    todo += _links(kind, body)
        return reached

    async def _sweep(self, doomed: list[bytes], cutoff_us: int) -> tuple[int, int]:
        # One sweep, one transaction: its re-check of what young objects reach spans every candidate.
        deleted, reclaimed = await self._actor.call(Gc(doomed, cutoff_us))
        return int(deleted), int(reclaimed)

    def close_cache(self) -> None:
        """Remove the private stat cache, if this CAS made one (the actor is closed by its owner)."""
        if self._own_cache is not None:
            remove_private_cache_dir(self._own_cache)


def _read_sized(fd: int, size: int, *, prefix: bool) -> bytes | None:
    """The file's bytes from the first, wherever the descriptor stands: None if it holds more than
    ``size`` (it grew: never read whole into memory), unless ``prefix``, which takes its first ``size``
    bytes. A file that shrank is what is left of it."""
    chunks, offset = [], 0
    limit = size if prefix else size + 1
    while offset < limit and (chunk := os.pread(fd, min(1 << 20, limit - offset), offset)):
        chunks.append(chunk)
        offset += len(chunk)
    return None if offset > size else b"".join(chunks)


def _upload_chunked(cas: PgCas, fd: int, size: int, *, prefix: bool) -> bytes | None:
    """(Worker thread.) The large regular file open on ``fd``, ``size`` bytes by its fstat, as a
    chunked blob, in bounded memory: one pass hashes it (and finds it stored already, the usual case
    for a large file that did not change), a second sends it a chunk at a time, re-hashing what it
    sends. None if it changed meanwhile (its size or mtime; with ``prefix`` only its first ``size``
    bytes count, which must read the same both times)."""
    before = os.fstat(fd)
    digest = hashlib.sha256(object_header(BLOB, size))
    offset = 0
    while offset < size and (data := os.pread(fd, min(CHUNK_BYTES, size - offset), offset)):
        digest.update(data)
        offset += len(data)
    if offset != size or (not prefix and os.pread(fd, 1, size)):
        return None  # shorter or longer than its size said: changed
    raw = digest.digest()

    def unchanged() -> bool:
        return prefix or (os.fstat(fd).st_mtime_ns == before.st_mtime_ns and before.st_size == size)

    if anyio.from_thread.run(cas._types, [raw.hex()]).get(raw.hex()) == BLOB:
        # The snapshot's trees link to it: that write locks and freshens it.
        return raw if unchanged() else None
    sent = hashlib.sha256(object_header(BLOB, size))
    offset = 0
    for seq in range(-(-size // CHUNK_BYTES)):
        data = os.pread(fd, min(CHUNK_BYTES, size - offset), offset)
        if not data:
            break
        sent.update(data)
        anyio.from_thread.run(cas._put_chunk, raw, seq, data)
        offset += len(data)
    if offset == size and sent.digest() == raw and unchanged():
        anyio.from_thread.run(cas._seal, raw, size)
        return raw
    return None


class _Mark:
    """What a gc's mark found (see :meth:`PgCas._mark`)."""

    def __init__(self, cutoff_us: int) -> None:
        self.cutoff_us = cutoff_us
        self.sizes: dict[bytes, int] = {}
        self.bytes_before = 0
        self.kept: set[bytes] = set()
        self.young: set[bytes] = set()
        self.doomed: list[bytes] = []
        self.missing: list[str] = []
        self.unreadable: list[str] = []


class _Started:
    """The ``task_status`` an actor reports its start to, outside a task group."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def started(self, value: object = None) -> None:
        self.event.set()


class _FsckShim:
    """What :meth:`..cas.store.Cas._fsck` reads from ``self``: only ``_odb``."""

    def __init__(self, view: _RowView) -> None:
        self._odb = view


# -- opening -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_pg_cas(
    dsn: str,
    *,
    schema: str = "pforge",
    cache_dir: Path | None = None,
    readonly: bool = False,
    freshen_s: float = 60.0,
    **kwargs: Any,
) -> AsyncIterator[PgCas]:
    """A ``PgCas`` on its own: its tables made or migrated if needed, its actor started, all closed on
    exit. (Inside a store, the store starts the actor in its task group.) ``kwargs`` go to
    :class:`.actor.PgActor`."""
    actor = PgCasActor(dsn, schema=schema, readonly=readonly, freshen_s=freshen_s, **kwargs)
    cas = PgCas(actor, cache_dir=cache_dir)
    # The actor runs as a task of its own, not in a task group around the caller's block: an error in
    # the block reaches the caller as itself, not wrapped in an exception group.
    started = _Started()
    task = asyncio.get_running_loop().create_task(actor.run(task_status=cast("TaskStatus[None]", started)))
    try:
        waiter = asyncio.ensure_future(started.event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            task.result()  # setup failed: its error, translated by the actor
            raise ActorClosed(f"{actor.where} stopped while starting")
        try:
            yield cas
        finally:
            with anyio.CancelScope(shield=True):
                await actor.aclose()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        if not task.done():
            task.cancel()
        cas.close_cache()
