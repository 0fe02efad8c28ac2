"""The turn store on PostgreSQL: ``PgTurnStore``, the whole turn store contract (sessions, lineage,
compare-and-set heads, idempotency, atomic batches, delete, erase, refs, gc) as the SQLite store
implements it, for many processes on many machines sharing one server.

Writes go through :class:`PgTurnActor`, one per process, which group-commits each batch in ONE
transaction (see :mod:`.actor`): ``BEGIN``, one statement that takes the batch's locks and reads
what it needs, the commands decided in memory, one statement that writes, ``COMMIT``. Locks, always
in this order:

1. ``SELECT ... FROM contexts WHERE context_id = ANY(...) ORDER BY context_id FOR UPDATE``: the row of
   every context the batch names (appends, head moves, metadata, deletes, erasures, parents of new
   contexts). Every batch of every process locks contexts in id order, in one statement, before any
   other lock, so two batches never wait on each other in a cycle. The same statement reads the
   heads' skip-link chains and draws the ids the batch may use from the sequences (after the lock
   wait, so a new turn's id is above every turn it can build on).
2. ``pg_advisory_xact_lock`` on each name and creation key the batch's new contexts use, sorted: so
   a get-or-create by name, and a keyed fork, is decided by one process at a time per name or key,
   and the one that waited sees the other's commit (the unique indexes stay the backstop).
3. ``FOR KEY SHARE`` on the other turns the batch builds on (explicit parents, bases, head targets),
   sorted: a ``gc`` slice cannot delete them under the batch (it takes ``FOR UPDATE SKIP LOCKED`` and
   keeps what it could not lock). The heads of the contexts locked in 1 need no such lock: a slice
   keeps every live head, re-read inside its own transaction.

Idempotency keys are looked up after 1, so a twin committed by a batch that held the lock first is
seen (the unique index on ``(context_id, idempotency_key)`` is the backstop). Then every command is
decided in memory, as the SQLite actor does: head, key and expected head of each append checked
against the locked rows; only :meth:`PgTurnActor.flush` writes, one statement whose parts (new
contexts, creation keys, turns: ``INSERT ... SELECT FROM unnest(...)``) run as data-modifying CTEs
around the heads' ``UPDATE ... FROM unnest(...)``. A command that fails has written nothing, so no
savepoints are needed, and an ``append_turns`` is all or nothing. Deletes, erasures, ``attach_fs``
and registry bundles flush what came before them and then write at once.

A turn's refs are checked against the store's CAS (``cas_objects``, in the same schema) by the batch
itself, in its first statement, and freshened there when old: no read of the CAS before the write.

**One statement for the common case.** A batch made only of plain appends (no key, no explicit parent),
one per context, each on a head the actor knows (it wrote it, or read it under its lock), skips all of
the above: ``_FAST_APPEND`` locks those contexts in id order where the head is still the one known and
every ref is in the CAS, draws the ids after the locks and writes the turns and heads, as one statement
that commits by itself (one round trip, not four: what one writer waits for, and what each round trip
costs both ends in CPU). Everything it decides on comes from the locked rows or from turns, which never
change; a context whose head moved meanwhile (another process, a delete) is left untouched and its
append runs the ordinary way. A connection lost under that statement leaves its outcome unknown, as
one lost during a ``COMMIT``: ``StorageError`` saying so, never a second try.

Reads run on the actor's read pool and see every write whose call returned. Ids of turns and
contexts come from sequences: increasing, never reused, with gaps.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from importlib import resources
from typing import Any, ClassVar, Protocol, cast

import anyio

from ..actor import Failed
from ..clock import now_ms
from ..errors import (
    Conflict,
    ContextNotFound,
    HeadConflict,
    IntegrityError,
    InvalidInput,
    ObjectNotFound,
    PforgeError,
    TurnNotFound,
)
from ..lifecycle import PAYLOAD_OID_TYPES, add_row_roots
from ..turnstore.base import ContextKey, TurnStoreBase
from ..turnstore.commands import (
    AppendTurn,
    AppendTurns,
    AttachFs,
    CreateContext,
    DeleteContext,
    EraseTurns,
    PublishBundle,
    PutBlob,
    SetContextMetadata,
    SetHead,
    TurnCommand,
)
from ..turnstore.gc import SLICE, TurnGcReport, unreachable, validate_grace
from ..turnstore.rules import (
    DEFAULT_MAX_PAYLOAD,
    check_creation_retry,
    check_idempotent,
    creation_fingerprint,
    decode_metadata,
    jump_for,
    name_successor,
    next_updated,
    payload_hash,
    verify_turn,
)
from ..turnstore.types import ContextHead, ContextInfo, ContextOrder, TurnRecord
from .actor import PgActor, PgConn, _connection_lost, _nothing_sent, unknown_outcome
from .migrate import advisory_key

__all__ = ["PgTurnActor", "PgTurnStore"]

#: how many contexts' heads, and turns' nodes, a turn actor remembers for its fast path (least recently
#: learned first out: a context needs its head's node and a few of its skip links', so some MB at most)
_KNOWN_CONTEXTS = 16_384
_KNOWN_NODES = 131_072

COLUMNS = (
    "turn_id, context_id, parent_turn_id, depth, type_id, type_version, payload, payload_hash, "
    "idempotency_key, created_at_ms, fs_root, erased, refs"
)
_COLUMNS_OF_T = ", ".join("t." + c.strip() for c in COLUMNS.split(","))


def _record(row: Sequence[Any]) -> TurnRecord:
    refs = () if row[12] is None else tuple(row[12].split(" "))
    return TurnRecord(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        bytes(row[6]),
        row[7],
        row[8],
        row[9],
        row[10],
        bool(row[11]),
        refs,
    )


#: turn id -> (depth, skip link, skip link's depth, context it was appended in)
Node = tuple[int, int, int, int]


class _Context:
    """A context's row as the running batch has left it."""

    __slots__ = ("base", "context_id", "created", "dirty", "head", "metadata", "name", "new", "parent", "updated")

    def __init__(
        self,
        context_id: int,
        head: int,
        updated: int,
        name: str | None,
        base: int,
        parent: int,
        metadata: str,
        created: int,
        *,
        new: bool = False,
    ) -> None:
        self.context_id = context_id
        self.head = head
        self.updated = updated
        self.name = name
        self.base = base
        self.parent = parent
        self.metadata = metadata
        self.created = created
        #: not inserted yet (``flush`` inserts it); ``dirty``: head, metadata or updated_at_ms changed
        self.new = new
        self.dirty = False


# -- SQL ----------------------------------------------------------------------------------------------

#: ``updated_bucket = updated_at_ms >> UPDATED_SHIFT``: the "updated" order's index key, which moves at
#: most once per 64 ms however often a context changes; an update that leaves every indexed column as
#: it was is a HOT update (no index entry written), so appends to a busy context cost one heap tuple.
UPDATED_SHIFT = 6

#: The statement every batch begins with: the row locks of the contexts it names, in id order (see the
#: module docstring); their heads' nodes and skip-link chains; and the ids its turns and contexts may
#: take. One round trip. The turns are read in the statement's snapshot, which a lock wait may leave
#: behind the locked rows: a head committed meanwhile is then missing here, and looked up right after
#: (with the batch's other turns). The ids are drawn after the locks, in the Append's last branches.
_BEGIN = """
WITH RECURSIVE locked AS MATERIALIZED (
    SELECT context_id, head_turn_id, updated_at_ms, name, base_turn_id, parent_context_id, metadata, created_at_ms
    FROM contexts WHERE context_id = ANY($1::bigint[]) AND deleted_at_ms IS NULL ORDER BY context_id FOR UPDATE
), chain AS (
    SELECT t.turn_id, t.depth, t.jump_turn_id, t.jump_depth, t.context_id
    FROM locked l CROSS JOIN LATERAL (SELECT * FROM turns WHERE turn_id = l.head_turn_id LIMIT 1) t
    UNION
    SELECT t.turn_id, t.depth, t.jump_turn_id, t.jump_depth, t.context_id
    FROM chain c CROSS JOIN LATERAL (SELECT * FROM turns WHERE turn_id = c.jump_turn_id LIMIT 1) t
)
SELECT 0, context_id, head_turn_id, updated_at_ms, base_turn_id, parent_context_id, created_at_ms, name, metadata
FROM locked
UNION ALL SELECT 1, turn_id, depth, jump_turn_id, jump_depth, context_id, NULL, NULL, NULL FROM chain
UNION ALL SELECT 2, nextval('turn_ids'), NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM generate_series(1, $2::int)
UNION ALL SELECT 3, nextval('context_ids'), NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM generate_series(1, $3::int)
"""
#: the same, and which of the CAS objects ``$4`` the batch's turns name as refs are stored (kind 4: the id
#: as hex, and 1 if its ``touched_at`` is older than ``$5`` seconds): the store's own CAS is in the same
#: schema, so a turn's refs are checked in its write's transaction, not by a read before it
_BEGIN_REFS = _BEGIN.replace(
    "), chain AS (",
    "), refs AS MATERIALIZED (\n"
    "    SELECT oid, touched_at < now() - make_interval(secs => $5::float8) AS stale FROM cas_objects\n"
    "    WHERE oid = ANY($4::bytea[])\n"
    "), chain AS (",
    1,
) + (
    "UNION ALL SELECT 4, CASE WHEN stale THEN 1 ELSE 0 END, NULL, NULL, NULL, NULL, NULL, encode(oid, 'hex'), NULL "
    "FROM refs\n"
)
#: refs found older than the freshen age: stamped in the batch's transaction (so a CAS gc keeps them, as
#: ``PgCas.has`` would have); those a gc deleted meanwhile are not returned
_FRESHEN_REFS = "UPDATE cas_objects SET touched_at = now() WHERE oid = ANY($1::bytea[]) RETURNING encode(oid, 'hex')"
#: A batch of plain appends, one per context, each on the head this actor last saw there, as ONE
#: statement that commits by itself (no BEGIN, no COMMIT: one round trip instead of four). The contexts
#: are locked in id order, each only if its head is still the one given and every ref named is in the
#: CAS (freshened if old, as the locking statement's refs do); the ids are drawn after the locks; a
#: context whose head moved (another process, a delete) is left alone, and its append runs the batch's
#: ordinary way. Only what the locked rows hold decides: nothing read from the snapshot the lock wait
#: may leave behind (the parent is the locked head, its node and its skip link's are this actor's own
#: immutable knowledge).
_FAST_APPEND = """
WITH u AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[],
        $7::bigint[], $8::bytea[], $9::text[], $10::text[], $11::text[])
        AS u(ctx, parent, depth, jump, jump_depth, type_id, type_version, payload, hash, fs_root, refs)
), found AS MATERIALIZED (
    SELECT oid, touched_at < now() - make_interval(secs => $13::float8) AS stale FROM cas_objects
    WHERE oid = ANY($12::bytea[])
), touched AS (
    UPDATE cas_objects SET touched_at = now() WHERE oid IN (SELECT oid FROM found WHERE stale) RETURNING 1
), locked AS MATERIALIZED (
    SELECT c.context_id, c.updated_at_ms FROM contexts c JOIN u ON c.context_id = u.ctx AND c.head_turn_id = u.parent
    WHERE c.deleted_at_ms IS NULL
      AND (SELECT count(*) FROM found WHERE NOT stale) + (SELECT count(*) FROM touched) = cardinality($12::bytea[])
    ORDER BY c.context_id FOR UPDATE OF c
), new AS MATERIALIZED (
    SELECT u.*, nextval('turn_ids') AS id, GREATEST($14::bigint, l.updated_at_ms + 1) AS updated
    FROM u JOIN locked l ON l.context_id = u.ctx
), moved AS (
    UPDATE contexts c SET head_turn_id = n.id, updated_at_ms = n.updated, updated_bucket = n.updated >> {shift}
    FROM new n WHERE c.context_id = n.ctx
), added AS (
    INSERT INTO turns (turn_id, context_id, parent_turn_id, depth, jump_turn_id, jump_depth, type_id,
        type_version, payload, payload_hash, idempotency_key, created_at_ms, fs_root, refs)
    SELECT id, ctx, parent, depth, jump, jump_depth, type_id, type_version, payload, hash, NULL, $14::bigint,
        fs_root, refs FROM new
)
SELECT ctx, id FROM new
""".replace("{shift}", str(UPDATED_SHIFT))
#: the same for a batch naming no refs (a store without a CAS in its schema has no cas_objects)
_FAST_APPEND_NO_REFS = (
    _FAST_APPEND.replace(_FAST_APPEND[_FAST_APPEND.index("), found AS") : _FAST_APPEND.index("), locked AS")], "", 1)
    .replace(
        "      AND (SELECT count(*) FROM found WHERE NOT stale) + (SELECT count(*) FROM touched) = "
        "cardinality($12::bytea[])\n",
        "",
        1,
    )
    .replace("$14::bigint", "$12::bigint")
)
#: what a lost ``_FAST_APPEND`` left: its turns are the only keyless children of the known heads with
#: their payloads and its timestamp (the statement is atomic: all of them, or none)
_FAST_LANDED = (
    "SELECT t.context_id, t.turn_id FROM turns t JOIN unnest($1::bigint[], $2::bigint[], $3::text[]) "
    "AS u(ctx, parent, hash) ON t.context_id = u.ctx AND t.parent_turn_id = u.parent "
    "AND t.payload_hash = u.hash WHERE t.created_at_ms = $4::bigint AND t.idempotency_key IS NULL"
)
_ADVISORY = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS u(k)"
_NAMES_AND_KEYS = (
    "SELECT 0, name, context_id, NULL FROM contexts WHERE name = ANY($1::text[]) "
    "UNION ALL SELECT 1, idempotency_key, context_id, fingerprint FROM context_keys "
    "WHERE idempotency_key = ANY($2::text[])"
)
_TURN_KEYS = (
    f"SELECT {_COLUMNS_OF_T} FROM turns t JOIN unnest($1::bigint[], $2::text[]) AS k(c, key) "
    "ON t.context_id = k.c AND t.idempotency_key = k.key"
)
#: the turns a batch builds on, locked against gc (sorted), with their skip-link chains: every node
#: a chain of appends on them needs to compute its own skip links (see ``rules.jump_for``)
_NODES = """
WITH RECURSIVE locked AS MATERIALIZED (
    SELECT turn_id, depth, jump_turn_id, jump_depth, context_id FROM turns
    WHERE turn_id = ANY($1::bigint[]) ORDER BY turn_id FOR KEY SHARE
), chain AS (
    SELECT turn_id, depth, jump_turn_id, jump_depth, context_id FROM locked
    UNION
    SELECT t.turn_id, t.depth, t.jump_turn_id, t.jump_depth, t.context_id
    FROM chain c CROSS JOIN LATERAL (
        -- LIMIT 1: one index probe per row, never a hash join over the whole table
        SELECT turn_id, depth, jump_turn_id, jump_depth, context_id FROM turns WHERE turn_id = c.jump_turn_id LIMIT 1
    ) t
)
SELECT turn_id, depth, jump_turn_id, jump_depth, context_id FROM chain
"""
_INSERT_CONTEXTS = (
    "INSERT INTO contexts (context_id, head_turn_id, created_at_ms, name, base_turn_id, parent_context_id, "
    "metadata, updated_at_ms, updated_bucket) SELECT *, u.updated >> {shift} FROM unnest({}::bigint[], "
    "{}::bigint[], {}::bigint[], {}::text[], {}::bigint[], {}::bigint[], {}::text[], {}::bigint[]) "
    "AS u(id, head, created, name, base, parent, metadata, updated)"
)
_INSERT_CONTEXT_KEYS = (
    "INSERT INTO context_keys (idempotency_key, context_id, fingerprint) "
    "SELECT * FROM unnest({}::text[], {}::bigint[], {}::text[])"
)
_INSERT_TURNS = (
    "INSERT INTO turns (turn_id, context_id, parent_turn_id, depth, jump_turn_id, jump_depth, type_id, "
    "type_version, payload, payload_hash, idempotency_key, created_at_ms, fs_root, refs) "
    "SELECT * FROM unnest({}::bigint[], {}::bigint[], {}::bigint[], {}::bigint[], {}::bigint[], {}::bigint[], "
    "{}::text[], {}::bigint[], {}::bytea[], {}::text[], {}::text[], {}::bigint[], {}::text[], {}::text[])"
)
_UPDATE_CONTEXTS = (
    "UPDATE contexts c SET head_turn_id = u.head, updated_at_ms = u.updated, updated_bucket = u.updated >> {shift}, "
    "metadata = u.metadata FROM unnest({}::bigint[], {}::bigint[], {}::bigint[], {}::text[]) "
    "AS u(id, head, updated, metadata) WHERE c.context_id = u.id"
)
_DELETE_CONTEXT = (
    "WITH k AS (DELETE FROM context_keys WHERE context_id = $1) "
    "UPDATE contexts SET deleted_at_ms = $2, name = NULL, metadata = '{}', head_turn_id = 0, base_turn_id = 0 "
    "WHERE context_id = $1"
)

# Every recursive walk below probes turns through a LATERAL subquery with LIMIT 1: the planner then
# cannot turn a step into a hash join over the whole table (which it picks for a work table it thinks
# large), so each step is one primary-key probe and a walk costs its length, not the table's size.

_ANCESTOR_AT = """
WITH RECURSIVE walk (turn_id, depth, parent, jump, jump_depth) AS (
    SELECT turn_id, depth, parent_turn_id, jump_turn_id, jump_depth FROM turns WHERE turn_id = $1::bigint
    UNION ALL
    SELECT t.turn_id, t.depth, t.parent_turn_id, t.jump_turn_id, t.jump_depth
    FROM walk w CROSS JOIN LATERAL (
        SELECT * FROM turns WHERE turn_id = (CASE WHEN w.jump_depth >= $2::bigint THEN w.jump ELSE w.parent END)
        LIMIT 1
    ) t
    WHERE w.depth > $2::bigint
)
SELECT turn_id FROM walk WHERE depth = $2::bigint
"""

#: the chain down from ``$1`` to the first turn already erased (whose ancestors all are)
_ERASE_CHAIN = """
WITH RECURSIVE down (turn_id, parent) AS (
    SELECT turn_id, parent_turn_id FROM turns WHERE turn_id = $1::bigint AND NOT erased
    UNION ALL
    SELECT p.turn_id, p.parent_turn_id
    FROM down d CROSS JOIN LATERAL (SELECT * FROM turns WHERE turn_id = d.parent LIMIT 1) p WHERE NOT p.erased
)
SELECT turn_id FROM down
"""
_LOCK_FOR_ERASE = "SELECT turn_id FROM turns WHERE turn_id = ANY($1::bigint[]) ORDER BY turn_id FOR NO KEY UPDATE"
_ERASE = (
    "WITH e AS (UPDATE turns SET payload = ''::bytea, payload_hash = '', erased = true, refs = NULL "
    "WHERE turn_id = ANY($1::bigint[]) AND NOT erased RETURNING 1) SELECT count(*) FROM e"
)

_CHAIN_FROM = """
WITH RECURSIVE chain (turn_id, n) AS (
    {seed}
    UNION ALL
    SELECT t.parent_turn_id, c.n + 1
    FROM chain c CROSS JOIN LATERAL (SELECT * FROM turns WHERE turn_id = c.turn_id LIMIT 1) t
    WHERE c.n < $2::bigint AND t.parent_turn_id <> 0
)
SELECT {columns}
FROM chain c CROSS JOIN LATERAL (SELECT * FROM turns WHERE turn_id = c.turn_id LIMIT 1) t ORDER BY c.n DESC
"""
#: the ``$2`` turns that end at ``$1``
_CHAIN = _CHAIN_FROM.format(seed="SELECT $1::bigint, 1::bigint", columns=_COLUMNS_OF_T)
#: the same from a context's head, in one query
_CHAIN_FROM_HEAD = _CHAIN_FROM.format(
    seed="SELECT head_turn_id, 1::bigint FROM contexts WHERE context_id = $1::bigint AND head_turn_id <> 0 "
    "AND deleted_at_ms IS NULL",
    columns=_COLUMNS_OF_T,
)
#: an ``iter_turns`` page, oldest first: the ``$3`` turns that end at the ancestor of ``$1`` at depth
#: ``$2``, found over the skip links (O(log depth) steps), in one query
_CHAIN_AT_DEPTH = f"""
WITH RECURSIVE walk (turn_id, depth, parent, jump, jump_depth) AS (
    SELECT turn_id, depth, parent_turn_id, jump_turn_id, jump_depth FROM turns WHERE turn_id = $1::bigint
    UNION ALL
    SELECT t.turn_id, t.depth, t.parent_turn_id, t.jump_turn_id, t.jump_depth
    FROM walk w CROSS JOIN LATERAL (
        SELECT * FROM turns WHERE turn_id = (CASE WHEN w.jump_depth >= $2::bigint THEN w.jump ELSE w.parent END)
        LIMIT 1
    ) t
    WHERE w.depth > $2::bigint
),
chain (turn_id, n) AS (
    SELECT turn_id, 1::bigint FROM walk WHERE depth = $2::bigint
    UNION ALL
    SELECT t.parent_turn_id, c.n + 1
    FROM chain c CROSS JOIN LATERAL (SELECT * FROM turns WHERE turn_id = c.turn_id LIMIT 1) t
    WHERE c.n < $3::bigint AND t.parent_turn_id <> 0
)
SELECT {_COLUMNS_OF_T}
FROM chain c CROSS JOIN LATERAL (SELECT * FROM turns WHERE turn_id = c.turn_id LIMIT 1) t ORDER BY c.n DESC
"""

#: a context's row as ContextInfo takes it: the head's depth joined in
_INFO = (
    "SELECT c.context_id, c.head_turn_id, COALESCE(t.depth, 0), c.name, c.base_turn_id, c.parent_context_id, "
    "c.metadata, c.created_at_ms, c.updated_at_ms FROM contexts c "
    "LEFT JOIN turns t ON t.turn_id = c.head_turn_id"
)
_ORDER_BY: dict[str, str] = {
    # the bucket first: the index's own order, so only each bucket's rows are sorted
    "updated": "c.updated_bucket DESC, c.updated_at_ms DESC, c.context_id DESC",
    "created": "c.context_id DESC",
    "name": "c.name",
}


def _info_of(row: Sequence[Any]) -> ContextInfo:
    return ContextInfo(row[0], row[1], row[2], row[3], row[4], row[5], decode_metadata(row[6]), row[7], row[8])


def _load_schema() -> str:
    return resources.files(__package__).joinpath("turns.sql").read_text()


# -- the batch ----------------------------------------------------------------------------------------


class _Batch:
    """What one batch's transaction holds: the locked contexts, the nodes, names and keys it looked up,
    and what its commands decided, until :meth:`flush` writes it."""

    def __init__(self, conn: PgConn, schema: str, refs_freshen_s: float | None = None) -> None:
        self.conn = conn
        self.schema = schema
        #: the CAS's freshen age when the batch checks its turns' refs itself (None: the store did)
        self.refs_freshen_s = refs_freshen_s
        #: the refs the batch's turns name that are in the CAS (hex ids), when it checks them
        self.refs_found: set[str] = set()
        self.contexts: dict[int, _Context] = {}
        #: contexts deleted in this batch (whatever the lock query found)
        self.deleted: set[int] = set()
        self.nodes: dict[int, Node] = {}
        self.missing_nodes: set[int] = set()
        #: (context, key) -> the turn it names, or None: looked up (or written) in this batch
        self.keys: dict[tuple[int, str], TurnRecord | None] = {}
        #: name -> context holding it, or None; creation key -> (context, fingerprint), or None
        self.names: dict[str, int | None] = {}
        self.context_keys: dict[str, tuple[int, str] | None] = {}
        self.turn_ids: list[int] = []
        self.context_ids: list[int] = []
        # What flush writes.
        self.new_turns: list[tuple[Any, ...]] = []
        self.new_context_keys: dict[str, tuple[int, str]] = {}

    # -- locks and lookups, before any command runs -----------------------------------------------

    async def prefetch(self, commands: Sequence[TurnCommand]) -> None:
        context_ids: set[int] = set()
        turns: set[int] = set()
        keys: set[tuple[int, str]] = set()
        names: set[str] = set()
        creation_keys: set[str] = set()
        refs: set[str] = set()
        n_turns = n_contexts = 0

        def append(turn: AppendTurn) -> None:
            nonlocal n_turns
            n_turns += 1
            refs.update(turn.refs)
            context_ids.add(turn.context_id)
            if turn.idempotency_key is not None:
                keys.add((turn.context_id, turn.idempotency_key))
            if turn.parent_turn_id:
                turns.add(turn.parent_turn_id)

        for command in commands:
            match command:
                case AppendTurn():
                    append(command)
                case AppendTurns():
                    for turn in command.turns:
                        append(turn)
                    context_ids.update(command.expected_heads)
                case CreateContext():
                    n_contexts += 1
                    if command.parent_context_id:
                        context_ids.add(command.parent_context_id)
                    if command.base_turn_id:
                        turns.add(command.base_turn_id)
                    if command.name is not None:
                        names.add(command.name)
                    if command.idempotency_key is not None:
                        creation_keys.add(command.idempotency_key)
                case SetHead():
                    context_ids.add(command.context_id)
                    if command.turn_id:
                        turns.add(command.turn_id)
                case SetContextMetadata() | DeleteContext() | EraseTurns():
                    context_ids.add(command.context_id)
        conn = self.conn
        if context_ids or n_turns or n_contexts:
            turn_ids: list[int] = []
            new_context_ids: list[int] = []
            stale: list[bytes] = []
            if refs and self.refs_freshen_s is not None:
                rows = await conn.fetch(
                    _BEGIN_REFS,
                    sorted(context_ids),
                    n_turns,
                    n_contexts,
                    sorted(bytes.fromhex(oid) for oid in refs),
                    self.refs_freshen_s,
                )
            else:
                rows = await conn.fetch(_BEGIN, sorted(context_ids), n_turns, n_contexts)
            for kind, a, b, c, d, e, f, name, metadata in rows:
                if kind == 0:
                    self.contexts[a] = _Context(a, b, c, name, d, e, metadata, f)
                elif kind == 1:
                    self.nodes[a] = (b, c, d, e)
                elif kind == 2:
                    turn_ids.append(a)
                elif kind == 3:
                    new_context_ids.append(a)
                else:
                    self.refs_found.add(name)
                    if a:
                        stale.append(bytes.fromhex(name))
            if stale:
                # Rare (only past freshen_s). One a gc deleted since the statement's snapshot is missing.
                self.refs_found -= {raw.hex() for raw in stale}
                self.refs_found.update(row[0] for row in await conn.fetch(_FRESHEN_REFS, sorted(stale)))
            # Popped from the end: lowest first, so turns get increasing ids in the batch's order.
            self.turn_ids = sorted(turn_ids, reverse=True)
            self.context_ids = sorted(new_context_ids, reverse=True)
        if names or creation_keys:
            locks = {advisory_key("pforge-turns-name", self.schema, name) for name in names}
            locks.update(advisory_key("pforge-turns-key", self.schema, key) for key in creation_keys)
            await conn.execute(_ADVISORY, sorted(locks))
            self.names = dict.fromkeys(names)
            self.context_keys = dict.fromkeys(creation_keys)
            for kind, text, context_id, fingerprint in await conn.fetch(
                _NAMES_AND_KEYS, sorted(names), sorted(creation_keys)
            ):
                if kind == 0:
                    self.names[text] = context_id
                else:
                    self.context_keys[text] = (context_id, fingerprint)
        live_keys = sorted(k for k in keys if k[0] in self.contexts)
        if live_keys:
            self.keys = dict.fromkeys(live_keys)
            for row in await conn.fetch(_TURN_KEYS, [k[0] for k in live_keys], [k[1] for k in live_keys]):
                record = _record(row)
                assert record.idempotency_key is not None
                self.keys[(record.context_id, record.idempotency_key)] = record
        # The heads of the contexts locked above (and their chains) need no turn lock: gc keeps a live
        # head. Any other turn the batch builds on is locked against gc here, and so is a head the
        # locking statement's snapshot did not show yet (committed while it waited for the lock).
        others = (turns | {ctx.head for ctx in self.contexts.values() if ctx.head}) - self.nodes.keys()
        if others:
            await self._fetch_nodes(others)

    async def _fetch_nodes(self, turn_ids: Iterable[int]) -> None:
        wanted = sorted(set(turn_ids))
        for turn_id, depth, jump, jump_depth, context_id in await self.conn.fetch(_NODES, wanted):
            self.nodes[turn_id] = (depth, jump, jump_depth, context_id)
        self.missing_nodes.update(t for t in wanted if t not in self.nodes)

    # -- lookups through what the batch holds ------------------------------------------------------

    def context(self, context_id: int, what: str = "") -> _Context:
        found = self.contexts.get(context_id)
        if found is None:
            raise ContextNotFound(f"no context {context_id}{what}")
        return found

    async def node(self, turn_id: int, what: str = "") -> Node:
        found = self.nodes.get(turn_id)
        if found is None:
            if turn_id not in self.missing_nodes:
                await self._fetch_nodes([turn_id])
                found = self.nodes.get(turn_id)
            if found is None:
                raise TurnNotFound(f"no turn {turn_id}{what}")
        return found

    async def stored_key(self, context_id: int, key: str) -> TurnRecord | None:
        pair = (context_id, key)
        if pair in self.keys:
            return self.keys[pair]
        record = None
        if not self.contexts[context_id].new:
            row = await self.conn.fetchrow(
                f"SELECT {COLUMNS} FROM turns WHERE context_id = $1 AND idempotency_key = $2", context_id, key
            )
            record = None if row is None else _record(row)
        self.keys[pair] = record
        return record

    async def live(self, context_id: int) -> bool:
        if context_id in self.contexts:
            return True
        if context_id in self.deleted:
            return False
        found = await self.conn.fetchval(
            "SELECT 1 FROM contexts WHERE context_id = $1 AND deleted_at_ms IS NULL", context_id
        )
        return found is not None

    async def info(self, context_id: int) -> ContextInfo:
        """A context as the batch so far left it."""
        ctx = self.contexts.get(context_id)
        if ctx is None:
            row = await self.conn.fetchrow(_INFO + " WHERE c.context_id = $1 AND c.deleted_at_ms IS NULL", context_id)
            if row is None:
                raise ContextNotFound(f"no context {context_id}")
            return _info_of(row)
        depth = (await self.node(ctx.head))[0] if ctx.head else 0
        return ContextInfo(
            context_id,
            ctx.head,
            depth,
            ctx.name,
            ctx.base,
            ctx.parent,
            decode_metadata(ctx.metadata),
            ctx.created,
            ctx.updated,
        )

    # -- commands ----------------------------------------------------------------------------------

    async def apply(self, command: TurnCommand) -> Any:
        match command:
            case AppendTurn():
                return await self._append(command)
            case AppendTurns():
                return await self._append_batch(command)
            case CreateContext():
                return await self._create(command)
            case SetHead(context_id=context_id, turn_id=turn_id, expected_head=expected):
                ctx = self.context(context_id)
                if expected is not None and ctx.head != expected:
                    raise HeadConflict(context_id, expected, ctx.head)
                if turn_id:
                    await self.node(turn_id)
                ctx.head, ctx.updated, ctx.dirty = turn_id, next_updated(ctx.updated, now_ms()), True
                return await self.info(context_id)
            case SetContextMetadata(context_id=context_id, metadata=metadata, expected_updated_at_ms=expected):
                ctx = self.context(context_id)
                if expected is not None and ctx.updated != expected:
                    raise Conflict(
                        f"context {context_id} changed since updated_at_ms {expected}: it is now {ctx.updated}"
                    )
                ctx.updated, ctx.dirty = next_updated(ctx.updated, now_ms()), True
                ctx.metadata = metadata.decode("utf-8")
                return await self.info(context_id)
            case DeleteContext(context_id=context_id):
                return await self._delete(context_id)
            case EraseTurns():
                return await self._erase(command)
            case PublishBundle(bundle_id=bundle_id, bundle_json=data):
                status = await self.conn.execute(
                    "INSERT INTO registry_bundles (bundle_id, bundle_json, created_at_ms) VALUES ($1, $2, $3) "
                    "ON CONFLICT (bundle_id) DO NOTHING",
                    bundle_id,
                    data,
                    now_ms(),
                )
                if status.endswith(" 0"):
                    stored = await self.conn.fetchval(
                        "SELECT bundle_json FROM registry_bundles WHERE bundle_id = $1", bundle_id
                    )
                    if stored is None or bytes(stored) != data:
                        raise Conflict(f"registry bundle {bundle_id!r} is already published with other content")
                return None
            case AttachFs(turn_id=turn_id, fs_root=fs_root):
                await self.flush()  # the turn may be one of this batch's
                done = await self.conn.fetchval(
                    "UPDATE turns SET fs_root = $2 WHERE turn_id = $1 AND fs_root IS NULL RETURNING 1", turn_id, fs_root
                )
                if done is None:
                    row = await self.conn.fetchrow("SELECT fs_root FROM turns WHERE turn_id = $1", turn_id)
                    if row is None:
                        raise TurnNotFound(f"no turn {turn_id}")
                    if row[0] != fs_root:
                        raise Conflict(f"turn {turn_id} already has fs_root {row[0]}")
                self.keys.clear()  # a cached record may name this turn
                return None
            case PutBlob():
                raise InvalidInput("blobs of the PostgreSQL turn store live in the CAS")
        raise InvalidInput(f"unknown turn store command {command!r}")

    async def _delete(self, context_id: int) -> None:
        ctx = self.context(context_id)
        await self.flush()  # it may be one of this batch's
        await self.conn.execute(_DELETE_CONTEXT, context_id, now_ms())
        del self.contexts[context_id]
        self.deleted.add(context_id)
        if ctx.name is not None:
            self.names[ctx.name] = None
        for key, known in self.context_keys.items():
            if known is not None and known[0] == context_id:
                self.context_keys[key] = None
        for pair in [pair for pair in self.keys if pair[0] == context_id]:
            del self.keys[pair]

    async def _erase(self, command: EraseTurns) -> int:
        context_id = command.context_id
        head = self.context(context_id).head
        await self.flush()  # the chain may hold this batch's turns
        conn = self.conn
        start = head
        if command.keep_last is not None:
            depth = (await self.node(head))[0] if head else 0
            start = 0
            if command.keep_last < depth:
                start = await conn.fetchval(_ANCESTOR_AT, head, depth - command.keep_last)
        elif command.before_turn_id is not None:
            before = command.before_turn_id
            cursor = await conn.fetchrow("SELECT depth, parent_turn_id FROM turns WHERE turn_id = $1", before)
            found = None
            if cursor is not None and head:
                found = await conn.fetchval(_ANCESTOR_AT, head, cursor[0])
            if cursor is None or found != before:
                raise InvalidInput(f"turn {before} is not on the chain of context {context_id}")
            start = cursor[1]
        if not start:
            return 0
        chain = [row[0] for row in await conn.fetch(_ERASE_CHAIN, start)]
        if not chain:
            return 0
        # Row locks in id order (as every erasure takes them), then the update: two erasures of chains
        # that share turns never wait on each other in a cycle. A turn another erasure emptied
        # meanwhile is not counted twice (NOT erased is checked again on the locked row).
        await conn.execute(_LOCK_FOR_ERASE, chain)
        erased = int(await conn.fetchval(_ERASE, chain))
        self.keys.clear()  # cached records may be erased now
        return erased

    async def _create(self, command: CreateContext) -> ContextInfo:
        key = command.idempotency_key
        if key is not None:
            known = self.context_keys.get(key)
            if known is not None:
                check_creation_retry(key, known[0], known[1], command)
                return await self.info(known[0])
        name = command.name
        if name is not None:
            holder = self.names.get(name)
            if holder is not None:
                if command.open_existing:
                    return await self.info(holder)
                raise Conflict(f"context name {name!r} is taken (context {holder})")
        base = command.base_turn_id
        parent = command.parent_context_id
        depth = 0
        if base:
            depth, _, _, base_context = await self.node(base)
            if parent is None:
                # the context it was appended in, unless that was deleted since
                parent = base_context if await self.live(base_context) else 0
        if command.parent_context_id:  # one the caller named: locked by prefetch, if live
            self.context(parent or 0, " (parent_context_id)")
        parent = parent or 0
        now = now_ms()
        context_id = self.context_ids.pop()
        metadata = command.metadata.decode("utf-8")
        self.contexts[context_id] = _Context(context_id, base, now, name, base, parent, metadata, now, new=True)
        if name is not None:
            self.names[name] = context_id
        if key is not None:
            known = (context_id, creation_fingerprint(command))
            self.context_keys[key] = known
            self.new_context_keys[key] = known
        return ContextInfo(context_id, base, depth, name, base, parent, decode_metadata(metadata), now, now)

    async def _new_turn(
        self, command: AppendTurn, turn_id: int, head: int, digest: str, now: int, pending: dict[int, Node]
    ) -> tuple[TurnRecord, tuple[Any, ...], Node]:
        """The record of a new turn, its row and its node; ``pending``: nodes decided but not yet
        taken into the batch's (an ``append_turns`` in progress)."""
        parent = head if command.parent_turn_id is None else command.parent_turn_id
        jump, jump_depth, depth = 0, 0, 1
        if parent:
            parent_node = pending.get(parent) or await self.node(parent, " to append to")
            parent_depth, parent_jump, parent_jump_depth, _ = parent_node
            grand_jump, grand_jump_depth = 0, 0
            if parent_jump:
                grand = pending.get(parent_jump) or await self.node(parent_jump)
                grand_jump, grand_jump_depth = grand[1], grand[2]
            jump, jump_depth = jump_for(parent, parent_depth, parent_jump_depth, grand_jump, grand_jump_depth)
            depth = parent_depth + 1
        context_id = command.context_id
        key = command.idempotency_key
        record = TurnRecord(
            turn_id,
            context_id,
            parent,
            depth,
            command.type_id,
            command.type_version,
            command.payload,
            digest,
            key,
            now,
            command.fs_root,
            False,
            command.refs,
        )
        row = (
            turn_id,
            context_id,
            parent,
            depth,
            jump,
            jump_depth,
            command.type_id,
            command.type_version,
            command.payload,
            digest,
            key,
            now,
            command.fs_root,
            " ".join(command.refs) if command.refs else None,
        )
        return record, row, (depth, jump, jump_depth, context_id)

    def check_refs(self, refs: Iterable[str]) -> None:
        """``ObjectNotFound`` naming the first of ``refs`` (sorted) not in the CAS, when the batch checks
        refs (as ``TurnStoreBase._check_refs`` would have, before anything else of the command)."""
        if self.refs_freshen_s is None:
            return
        for oid in sorted(refs):
            if oid not in self.refs_found:
                raise ObjectNotFound(f"ref {oid} is not in the CAS")

    async def _append(self, command: AppendTurn) -> TurnRecord:
        self.check_refs(command.refs)
        context_id = command.context_id
        ctx = self.context(context_id)
        digest = payload_hash(command.payload)
        key = command.idempotency_key
        if key is not None:
            first = await self.stored_key(context_id, key)
            if first is not None:
                return check_idempotent(first, command, digest)
        expected = command.expected_head
        if expected is not None and expected != ctx.head:
            raise HeadConflict(context_id, expected, ctx.head)
        now = now_ms()
        turn_id = self.turn_ids[-1]
        record, row, node = await self._new_turn(command, turn_id, ctx.head, digest, now, {})
        self.turn_ids.pop()
        self.new_turns.append(row)
        self.nodes[turn_id] = node
        ctx.head, ctx.updated, ctx.dirty = turn_id, next_updated(ctx.updated, now), True
        if key is not None:
            self.keys[(context_id, key)] = record
        return record

    async def _append_batch(self, command: AppendTurns) -> list[TurnRecord]:
        """Decide every turn against the state the batch's earlier turns leave, check the expected
        heads, and only then change the batch's state: a failure anywhere leaves it as it was."""
        now = now_ms()
        heads: dict[int, int] = {}
        written: set[int] = set()
        nodes: dict[int, Node] = {}
        keys: dict[tuple[int, str], TurnRecord] = {}
        rows: list[tuple[Any, ...]] = []
        replies: list[TurnRecord] = []
        taken = 0
        self.check_refs({oid for turn in command.turns for oid in turn.refs})
        for turn in command.turns:
            context_id = turn.context_id
            head = self.context(context_id).head
            digest = payload_hash(turn.payload)
            key = turn.idempotency_key
            if key is not None:
                first = keys.get((context_id, key)) or await self.stored_key(context_id, key)
                if first is not None:
                    heads.setdefault(context_id, head)
                    replies.append(check_idempotent(first, turn, digest))
                    continue
            turn_id = self.turn_ids[-1 - taken]
            record, row, node = await self._new_turn(turn, turn_id, heads.get(context_id, head), digest, now, nodes)
            nodes[turn_id] = node
            taken += 1
            heads[context_id] = turn_id
            written.add(context_id)
            rows.append(row)
            replies.append(record)
            if key is not None:
                keys[(context_id, key)] = record
        for context_id, expected in command.expected_heads.items():
            if context_id in heads and context_id not in written:
                continue  # every turn it has in the batch is a retry that landed
            actual = self.context(context_id).head
            if actual != expected:
                raise HeadConflict(context_id, expected, actual)
        del self.turn_ids[len(self.turn_ids) - taken :]
        self.nodes.update(nodes)
        self.new_turns.extend(rows)
        self.keys.update(keys)
        for context_id in written:
            ctx = self.contexts[context_id]
            ctx.head, ctx.updated, ctx.dirty = heads[context_id], next_updated(ctx.updated, now), True
        return replies

    # -- writing what was decided ------------------------------------------------------------------

    async def flush(self) -> None:
        """Write what the batch decided since the last flush: one statement, whose parts run as
        data-modifying CTEs (new contexts, creation keys, turns) around the heads' UPDATE."""
        params: list[Any] = []

        def bind(template: str, *columns: list[Any]) -> str:
            marks = []
            for column in columns:
                params.append(column)
                marks.append(f"${len(params)}")
            return template.format(*marks, shift=UPDATED_SHIFT)

        parts: list[str] = []
        new = [ctx for ctx in self.contexts.values() if ctx.new]
        dirty = [ctx for ctx in self.contexts.values() if ctx.dirty and not ctx.new]
        if new:
            parts.append(
                bind(
                    _INSERT_CONTEXTS,
                    [c.context_id for c in new],
                    [c.head for c in new],
                    [c.created for c in new],
                    [c.name for c in new],
                    [c.base for c in new],
                    [c.parent for c in new],
                    [c.metadata for c in new],
                    [c.updated for c in new],
                )
            )
        if self.new_context_keys:
            items = list(self.new_context_keys.items())
            parts.append(
                bind(_INSERT_CONTEXT_KEYS, [k for k, _ in items], [v[0] for _, v in items], [v[1] for _, v in items])
            )
        if self.new_turns:
            parts.append(bind(_INSERT_TURNS, *[list(column) for column in zip(*self.new_turns, strict=True)]))
        if dirty:
            main = bind(
                _UPDATE_CONTEXTS,
                [c.context_id for c in dirty],
                [c.head for c in dirty],
                [c.updated for c in dirty],
                [c.metadata for c in dirty],
            )
        elif parts:
            main = parts.pop()
        else:
            return
        if parts:
            main = "WITH " + ", ".join(f"w{i} AS ({part})" for i, part in enumerate(parts)) + " " + main
        await self.conn.execute(main, *params)
        for ctx in new + dirty:
            ctx.new = ctx.dirty = False
        self.new_context_keys = {}
        self.new_turns = []


# -- the actor ----------------------------------------------------------------------------------------


class PgTurnActor(PgActor[TurnCommand]):
    """The one writer of a store's turn tables in this process: each batch one transaction (see the
    module docstring). Commands decide in memory and fail before they write, so savepoints are off."""

    command_type = TurnCommand
    name = "turns"
    part = "turns"
    scripts: ClassVar[tuple[str, ...]] = (_load_schema(),)
    savepoints: ClassVar[bool] = False
    invariants: ClassVar[tuple[tuple[str, str], ...]] = (
        (
            "turns whose parent is missing",
            "SELECT t.turn_id FROM turns t LEFT JOIN turns p ON p.turn_id = t.parent_turn_id "
            "WHERE t.parent_turn_id <> 0 AND p.turn_id IS NULL",
        ),
        (
            "turns whose depth is not their parent's plus one",
            "SELECT t.turn_id FROM turns t LEFT JOIN turns p ON p.turn_id = t.parent_turn_id "
            "WHERE t.depth <> COALESCE(p.depth, 0) + 1",
        ),
        (
            "turns whose skip link is not a shallower turn",
            "SELECT t.turn_id FROM turns t LEFT JOIN turns j ON j.turn_id = t.jump_turn_id "
            "WHERE (t.jump_turn_id = 0 AND t.jump_depth <> 0) OR (t.jump_turn_id <> 0 AND "
            "(j.turn_id IS NULL OR j.depth <> t.jump_depth OR j.depth >= t.depth))",
        ),
        (
            "turns whose id is not above their parent's",
            "SELECT turn_id FROM turns WHERE parent_turn_id >= turn_id",
        ),
        (
            "contexts whose head is missing",
            "SELECT c.context_id FROM contexts c LEFT JOIN turns t ON t.turn_id = c.head_turn_id "
            "WHERE c.head_turn_id <> 0 AND t.turn_id IS NULL",
        ),
        (
            "turns appended to a context that does not exist",
            "SELECT t.turn_id FROM turns t LEFT JOIN contexts c ON c.context_id = t.context_id "
            "WHERE c.context_id IS NULL",
        ),
        (
            "contexts whose base turn is missing",
            "SELECT c.context_id FROM contexts c LEFT JOIN turns t ON t.turn_id = c.base_turn_id "
            "WHERE c.base_turn_id <> 0 AND t.turn_id IS NULL",
        ),
        (
            "contexts whose parent context is missing",
            "SELECT c.context_id FROM contexts c LEFT JOIN contexts p ON p.context_id = c.parent_context_id "
            "WHERE c.parent_context_id <> 0 AND p.context_id IS NULL",
        ),
        (
            "contexts whose updated_bucket is not their updated_at_ms >> 6",
            f"SELECT context_id FROM contexts WHERE updated_bucket <> updated_at_ms >> {UPDATED_SHIFT}",
        ),
        (
            "contexts changed before they were created",
            "SELECT context_id FROM contexts WHERE updated_at_ms < created_at_ms",
        ),
        (
            "context creation keys of contexts that do not exist",
            "SELECT k.idempotency_key FROM context_keys k LEFT JOIN contexts c ON c.context_id = k.context_id "
            "WHERE c.context_id IS NULL OR c.deleted_at_ms IS NOT NULL",
        ),
        (
            "erased turns that still hold a payload",
            "SELECT turn_id FROM turns WHERE erased AND (length(payload) <> 0 OR payload_hash <> '' "
            "OR refs IS NOT NULL)",
        ),
        (
            "erased turns whose parent is not erased",
            "SELECT t.turn_id FROM turns t JOIN turns p ON p.turn_id = t.parent_turn_id "
            "WHERE t.erased AND NOT p.erased",
        ),
        (
            "deleted contexts that still hold a name",
            "SELECT context_id FROM contexts WHERE deleted_at_ms IS NOT NULL AND name IS NOT NULL",
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch: _Batch | None = None
        #: context -> the head this actor last saw it at (wrote, or read under its lock); only a hint:
        #: the fast path's statement checks it against the locked row
        self._heads: OrderedDict[int, int] = OrderedDict()
        #: turn -> its node, for the turns this actor wrote or read (turns are immutable)
        self._nodes: OrderedDict[int, Node] = OrderedDict()
        #: what the running batch leaves (heads, nodes), taken in once it has committed
        self._seen: tuple[dict[int, int], dict[int, Node]] | None = None
        self.fast_batches = 0
        #: set by :meth:`check_refs_in`: the freshen age of the CAS in this actor's schema, whose
        #: objects each batch then checks its turns' refs against (in the batch's first statement)
        self.refs_freshen_s: float | None = None

    def check_refs_in(self, freshen_s: float) -> None:
        """The store's CAS lives in this actor's schema (``cas_objects``), with this freshen age:
        batches check their turns' refs there themselves, in their own transaction (no read first)."""
        self.refs_freshen_s = float(freshen_s)

    async def begin(self, conn: PgConn, commands: Sequence[TurnCommand]) -> None:
        self._batch = _Batch(conn, self.schema, self.refs_freshen_s)
        await self._batch.prefetch(commands)

    async def apply(self, conn: PgConn, command: TurnCommand) -> Any:
        assert self._batch is not None
        return await self._batch.apply(command)

    async def flush(self, conn: PgConn) -> None:
        batch = self._batch
        if batch is not None:
            await batch.flush()
            self._batch = None
            self._seen = ({c.context_id: c.head for c in batch.contexts.values()}, batch.nodes)
            for context_id in batch.deleted:
                self._seen[0][context_id] = -1  # forgotten below

    def abort(self) -> None:
        self._batch = None
        self._seen = None

    def _learn(self, heads: dict[int, int], nodes: dict[int, Node]) -> None:
        for context_id, head in heads.items():
            if head < 0:
                self._heads.pop(context_id, None)
                continue
            self._heads[context_id] = head
            self._heads.move_to_end(context_id)
        self._nodes.update(nodes)
        while len(self._heads) > _KNOWN_CONTEXTS:
            self._heads.popitem(last=False)
        while len(self._nodes) > _KNOWN_NODES:
            self._nodes.popitem(last=False)

    async def _try_batch(self, conn: PgConn, commands: list[TurnCommand]) -> list[Any]:
        outcomes = await super()._try_batch(conn, commands)
        seen, self._seen = self._seen, None
        if seen is not None:
            self._learn(*seen)  # committed
        return outcomes

    # -- the fast path: plain appends on known heads, one statement ---------------------------------

    def _fast_rows(self, commands: Sequence[TurnCommand]) -> list[tuple[Any, ...]] | None:
        """The fast statement's rows for ``commands``, or None if the batch is not one for it: only
        appends with no key and no explicit parent, one per context, each on a head this actor knows
        (and that the call expects, if it says), naming refs only where the batch can check them."""
        rows: list[tuple[Any, ...]] = []
        contexts: set[int] = set()
        for command in commands:
            if type(command) is not AppendTurn or command.idempotency_key is not None:
                return None
            if command.parent_turn_id is not None:  # 0 too: a new root
                return None
            if command.refs and self.refs_freshen_s is None:
                return None
            context_id = command.context_id
            head = self._heads.get(context_id)
            if head is None or context_id in contexts:
                return None
            if command.expected_head is not None and command.expected_head != head:
                return None  # decided the ordinary way: HeadConflict, or a head this actor missed
            contexts.add(context_id)
            jump, jump_depth, depth = 0, 0, 1
            if head:
                parent = self._nodes.get(head)
                if parent is None:
                    return None
                grand_jump, grand_jump_depth = 0, 0
                if parent[1]:
                    grand = self._nodes.get(parent[1])
                    if grand is None:
                        return None
                    grand_jump, grand_jump_depth = grand[1], grand[2]
                jump, jump_depth = jump_for(head, parent[0], parent[2], grand_jump, grand_jump_depth)
                depth = parent[0] + 1
            rows.append(
                (
                    context_id,
                    head,
                    depth,
                    jump,
                    jump_depth,
                    command.type_id,
                    command.type_version,
                    command.payload,
                    payload_hash(command.payload),
                    command.fs_root,
                    " ".join(command.refs) if command.refs else None,
                )
            )
        return rows

    async def _fast_outcome(self, backend: int, columns: list[list[Any]], now: int) -> dict[int, int] | None:
        """What a ``_FAST_APPEND`` whose connection was lost stored, once its server process is gone
        (until then it could still commit); None when that cannot be known in ``reconnect_wait``.

        A keyless append cannot be retried safely by its caller, so an idle connection the server
        ended (a restart, ``idle_session_timeout``, an operator) must not make its outcome unknown."""
        deadline = time.monotonic() + self.reconnect_wait
        try:
            conn = await self._writer(deadline)
            alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND pid <> pg_backend_pid()"
            while await conn.fetchval(alive, backend):
                if time.monotonic() >= deadline:
                    return None
                await anyio.sleep(0.01)
            found = await conn.fetch(_FAST_LANDED, columns[0], columns[1], columns[8], now)
        except Exception:
            self._drop_writer()
            return None
        return {int(context_id): int(turn_id) for context_id, turn_id in found}

    async def handle_batch(self, commands: Sequence[TurnCommand]) -> list[Any]:
        if self.readonly or self._closing:
            return await super().handle_batch(commands)
        now = now_ms()
        rows = self._fast_rows(commands)
        if rows is None:
            return await super().handle_batch(commands)
        try:
            conn = await self._writer(time.monotonic() + self.reconnect_wait)
        except PforgeError:
            return await super().handle_batch(commands)  # it reports the same failure
        refs = sorted({bytes.fromhex(oid) for c in commands for oid in cast(AppendTurn, c).refs})
        columns = [list(column) for column in zip(*rows, strict=True)]
        backend = conn.raw.get_server_pid()
        try:
            if self.refs_freshen_s is None:
                found = await conn.fetch(_FAST_APPEND_NO_REFS, *columns, now)
            else:
                found = await conn.fetch(_FAST_APPEND, *columns, refs, self.refs_freshen_s, now)
            done = {int(context_id): int(turn_id) for context_id, turn_id in found}
        except Exception as exc:
            if not _connection_lost(exc, conn.raw):
                # The statement was its own transaction and it failed: nothing of it is stored.
                return await super().handle_batch(commands)
            self._drop_writer()
            if _nothing_sent(exc):
                # asyncpg refuses to start the statement on a connection still taking in the server's
                # FATAL (a terminated idle backend): nothing was sent, so the ordinary way, which
                # reconnects, runs the batch.
                return await super().handle_batch(commands)
            landed = await self._fast_outcome(backend, columns, now)
            if landed is None:
                error = unknown_outcome(self.where, exc)
                return [Failed(error) for _ in commands]
            done = landed  # what it stored is acknowledged; the rest goes the ordinary way below
        self.fast_batches += 1
        outcomes: list[Any] = [None] * len(commands)
        heads: dict[int, int] = {}
        nodes: dict[int, Node] = {}
        rest: list[int] = []
        for i, (command, row) in enumerate(zip(commands, rows, strict=True)):
            assert isinstance(command, AppendTurn)
            turn_id = done.get(command.context_id)
            if turn_id is None:
                rest.append(i)  # its head moved, or a ref is missing: the ordinary way decides
                self._heads.pop(command.context_id, None)
                continue
            context_id, parent, depth, jump, jump_depth = row[:5]
            outcomes[i] = TurnRecord(
                turn_id,
                context_id,
                parent,
                depth,
                command.type_id,
                command.type_version,
                command.payload,
                row[8],
                None,
                now,
                command.fs_root,
                False,
                command.refs,
            )
            heads[context_id] = turn_id
            nodes[turn_id] = (depth, jump, jump_depth, context_id)
        self._learn(heads, nodes)
        if rest:
            for i, outcome in zip(rest, await super().handle_batch([commands[i] for i in rest]), strict=True):
                outcomes[i] = outcome
        return outcomes


# -- the store ----------------------------------------------------------------------------------------


class BlobStore(Protocol):
    """What the turn store needs of a CAS (``PgCas`` and the SQLite store's ``Cas`` both are one)."""

    async def write_blob(self, data: bytes) -> str: ...

    async def read_blob(self, oid: str) -> bytes: ...

    async def read_tree(self, oid: str) -> object: ...

    async def has(self, oid: str) -> bool: ...


class PgTurnStore(TurnStoreBase):
    """``store.turns`` on PostgreSQL: writes group-committed through :class:`PgTurnActor`, reads on its
    read pool, blobs, trees and refs checked in the store's CAS. Without a CAS (``cas=None``) it takes
    no ``fs_root``, ``refs`` or blobs (``ObjectNotFound`` / ``InvalidInput``)."""

    def __init__(
        self, actor: PgTurnActor, cas: BlobStore | None, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    ) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes, trees=cas)
        self._actor = actor
        self._cas = cas

    @property
    def actor(self) -> PgTurnActor:
        return self._actor

    def _write(self, command: TurnCommand) -> Awaitable[object]:
        # The actor's awaitable handed on: no coroutine of ours for each reply to resume.
        return self._actor.send(command)

    async def _check_refs(self, oids: Sequence[str]) -> None:
        # With the store's own CAS the write checks them in its transaction (PgTurnActor.check_refs_in):
        # one statement fewer per append, and no window between the check and the write.
        if oids and self._actor.refs_freshen_s is not None:
            return
        await super()._check_refs(oids)

    async def _create(self, command: CreateContext) -> ContextInfo:
        # An open_context that finds its name on a reader is answered there, without a trip through
        # the writer's transaction and locks: as cheap as get_context.
        if command.open_existing and command.name is not None:
            found = await self._find_context(command.name)
            if found is not None:
                return found
        return await super()._create(command)

    # -- contexts ----------------------------------------------------------------------------------

    async def _get_context(self, context_id: int) -> ContextInfo:
        rows = await self._actor.fetch(_INFO + " WHERE c.context_id = $1 AND c.deleted_at_ms IS NULL", context_id)
        if not rows:
            raise ContextNotFound(f"no context {context_id}")
        return _info_of(rows[0])

    async def _find_context(self, name: str) -> ContextInfo | None:
        rows = await self._actor.fetch(_INFO + " WHERE c.name = $1", name)
        return _info_of(rows[0]) if rows else None

    async def _list_contexts(
        self,
        prefix: str | None,
        parent_context_id: int | None,
        order: ContextOrder,
        after: ContextKey | None,
        limit: int,
    ) -> list[ContextInfo]:
        """One query down one index: the order's own (updated: ``contexts_updated`` backwards, created:
        ``contexts_live`` backwards, name: ``contexts_name``), so a page costs O(limit + log n); with
        a filter that is not the order's own, down the filter's index and sorted, so it costs what
        passes the filter."""
        where = ["c.deleted_at_ms IS NULL"]
        params: list[Any] = [limit + 1]

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if parent_context_id is not None:
            where.append(f"c.parent_context_id = {param(parent_context_id)}::bigint AND c.parent_context_id <> 0")
        if prefix is not None or order == "name":
            if prefix:
                where.append(f"c.name >= {param(prefix)}::text")
                high = name_successor(prefix)
                if high is not None:
                    where.append(f"c.name < {param(high)}::text")
            else:
                where.append("c.name IS NOT NULL")
        if after is not None:
            if order == "updated":
                at, context_id = after  # type: ignore[misc]
                # The bucket bound is the index's range; the rest places the cursor within its bucket.
                where.append(
                    f"c.updated_bucket <= {param(at >> UPDATED_SHIFT)}::bigint AND "
                    f"(c.updated_at_ms, c.context_id) < ({param(at)}::bigint, {param(context_id)}::bigint)"
                )
            elif order == "created":
                where.append(f"c.context_id < {param(after[0])}::bigint")
            else:
                where.append(f"c.name > {param(after[0])}::text")
        sql = f"{_INFO} WHERE {' AND '.join(where)} ORDER BY {_ORDER_BY[order]} LIMIT $1::bigint"
        return [_info_of(row) for row in await self._actor.fetch(sql, *params)]

    # -- turns -------------------------------------------------------------------------------------

    async def _get_head(self, context_id: int) -> ContextHead:
        rows = await self._actor.fetch(
            "SELECT c.head_turn_id, COALESCE(t.depth, 0) FROM contexts c "
            "LEFT JOIN turns t ON t.turn_id = c.head_turn_id WHERE c.context_id = $1 AND c.deleted_at_ms IS NULL",
            context_id,
        )
        if not rows:
            raise ContextNotFound(f"no context {context_id}")
        return ContextHead(context_id, rows[0][0], rows[0][1])

    async def _get_turn(self, turn_id: int) -> TurnRecord:
        rows = await self._actor.fetch(f"SELECT {COLUMNS} FROM turns WHERE turn_id = $1", turn_id)
        if not rows:
            raise TurnNotFound(f"no turn {turn_id}")
        return _record(rows[0])

    async def _get_turn_by_key(self, context_id: int, key: str) -> TurnRecord | None:
        rows = await self._actor.fetch(
            f"SELECT c.context_id, {_COLUMNS_OF_T} FROM contexts c LEFT JOIN turns t "
            "ON t.context_id = c.context_id AND t.idempotency_key = $2 "
            "WHERE c.context_id = $1 AND c.deleted_at_ms IS NULL",
            context_id,
            key,
        )
        if not rows:
            raise ContextNotFound(f"no context {context_id}")
        return None if rows[0][1] is None else _record(rows[0][1:])

    async def _chain(self, top_turn_id: int, limit: int) -> list[TurnRecord]:
        rows = await self._actor.fetch(_CHAIN, top_turn_id, limit)
        if not rows:
            raise IntegrityError(f"turn {top_turn_id} is missing from the turns table, though a chain leads to it")
        return [_record(row) for row in rows]

    async def _ancestor_at(self, turn_id: int, depth: int) -> int:
        rows = await self._actor.fetch(_ANCESTOR_AT, turn_id, depth)
        if not rows:
            raise TurnNotFound(f"no turn {turn_id} (or no ancestor of it at depth {depth})")
        return int(rows[0][0])

    async def _iter_turns(self, context_id: int, newest_first: bool, page_size: int) -> AsyncIterator[TurnRecord]:
        if newest_first:
            async for record in super()._iter_turns(context_id, newest_first, page_size):
                yield record
            return
        # Oldest first: each page is one query that walks the skip links from the head to the
        # page's last turn and reads the page up from there.
        head = await self._get_head(context_id)
        start = 1
        while start <= head.head_depth:
            end = min(start + page_size - 1, head.head_depth)
            rows = await self._actor.fetch(_CHAIN_AT_DEPTH, head.head_turn_id, end, end - start + 1)
            if len(rows) != end - start + 1:
                raise IntegrityError(
                    f"context {context_id}: the chain from turn {head.head_turn_id} is broken between depths "
                    f"{start} and {end} (a turn is missing from the turns table)"
                )
            for row in rows:
                yield verify_turn(_record(row))
            start = end + 1

    async def _list_turns(self, context_id: int, before_turn_id: int | None, limit: int) -> list[TurnRecord]:
        if before_turn_id is None and limit:
            rows = await self._actor.fetch(_CHAIN_FROM_HEAD, context_id, limit)
            if not rows:
                await self._get_head(context_id)  # an empty context, or ContextNotFound
            return [_record(row) for row in rows]
        head = (await self._get_head(context_id)).head_turn_id
        start = head
        if before_turn_id is not None:
            cursor = await self._actor.fetch(
                "SELECT depth, parent_turn_id FROM turns WHERE turn_id = $1", before_turn_id
            )
            on_chain = False
            if cursor and head:
                found = await self._actor.fetch(_ANCESTOR_AT, head, cursor[0][0])
                on_chain = bool(found) and found[0][0] == before_turn_id
            if not on_chain:
                raise InvalidInput(f"turn {before_turn_id} is not on the chain of context {context_id}")
            start = cursor[0][1]
        if not start or not limit:
            return []
        return [_record(row) for row in await self._actor.fetch(_CHAIN, start, limit)]

    # -- verification ------------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """What is wrong in the turn tables: the schema version, the DAG's and the contexts'
        invariants, every context's metadata parsed and every payload re-hashed (by the server,
        in pages)."""
        problems = await self._actor.check()
        label = f"{self._actor.schema}.turns"
        after = 0
        while rows := await self._actor.fetch(
            "SELECT turn_id, NOT erased AND encode(sha256(payload), 'hex') <> payload_hash FROM turns "
            "WHERE turn_id > $1 ORDER BY turn_id LIMIT 5000",
            after,
        ):
            problems += [f"{label}: turn {turn_id} does not match its payload_hash" for turn_id, bad in rows if bad]
            after = rows[-1][0]
        after = 0
        while rows := await self._actor.fetch(
            "SELECT context_id, metadata FROM contexts WHERE context_id > $1 ORDER BY context_id LIMIT 5000", after
        ):
            for context_id, metadata in rows:
                try:
                    decode_metadata(metadata)
                except IntegrityError:
                    problems.append(f"{label}: context {context_id}'s metadata is not a JSON object")
            after = rows[-1][0]
        return problems

    # -- lifecycle ---------------------------------------------------------------------------------

    async def gc(
        self, *, grace_s: float = 3600.0, drop_deleted_rows: bool = False, dry_run: bool = False
    ) -> TurnGcReport:
        """Reclaim the turns no live context reaches (through heads, bases and parents), leaving
        everything created in the last ``grace_s`` seconds; with ``drop_deleted_rows``, also the rows
        of contexts deleted before the grace period that nothing names any more. Beside live writers
        of any process, crash-safe at any point (see ``turnstore.gc``: mark on a reader, sweep in
        slices of one short transaction each). With ``dry_run``, only count the turns and payload
        bytes that would go (no slice, no vacuum).

        A slice takes ``FOR UPDATE SKIP LOCKED`` on its candidates and keeps (with their ancestors)
        what it could not lock: a batch building on one of them holds ``FOR KEY SHARE`` on it, so it
        is never deleted under a writer, and a slice never waits on one. Then the turn tables are
        vacuumed, so the space is reused (``wal_truncated`` says the vacuum ran). Erased and deleted
        payloads leave the table's live rows at once; PostgreSQL's own WAL and free space are recycled
        by the server (see the design notes)."""
        grace_s = validate_grace(grace_s)
        if not isinstance(drop_deleted_rows, bool):
            raise InvalidInput(f"drop_deleted_rows must be a bool, got {drop_deleted_rows!r}")
        if not isinstance(dry_run, bool):
            raise InvalidInput(f"dry_run must be a bool, got {dry_run!r}")
        if self._actor.readonly:
            raise InvalidInput(f"{self._actor.where} is open read-only: gc needs a writable store")
        started = time.monotonic()
        before = await self._size()
        cutoff = now_ms() - int(grace_s * 1000)
        candidates, parents, context_of = await self._mark(cutoff, with_contexts=drop_deleted_rows)
        if dry_run:
            return TurnGcReport(
                turns_reclaimed=len(candidates),
                payload_bytes_reclaimed=await self._payload_bytes(candidates),
                contexts_reclaimed=0,
                slices=0,
                wal_truncated=False,
                bytes_before=before,
                bytes_after=before,
                seconds=time.monotonic() - started,
            )
        turns = payload = slices = 0
        kept: set[int] = set()
        gone: set[int] = set()
        for i in range(0, len(candidates), SLICE):
            chunk = [turn_id for turn_id in candidates[i : i + SLICE] if turn_id not in kept]
            if not chunk:
                continue
            deleted, size, keep = await self._collect_turns(chunk, cutoff)
            turns += len(deleted)
            gone.update(deleted)
            payload += size
            slices += 1
            for turn_id in keep:  # live again: so are its ancestors, in later slices
                while turn_id and turn_id not in kept:
                    kept.add(turn_id)
                    turn_id = parents.get(turn_id, 0)
        contexts = 0
        if drop_deleted_rows:
            named = {context_id for turn_id, context_id in context_of.items() if turn_id not in gone}
            deleted_contexts = await self._actor.fetch(
                "SELECT context_id FROM contexts WHERE deleted_at_ms IS NOT NULL AND deleted_at_ms <= $1", cutoff
            )
            bare = [row[0] for row in deleted_contexts if row[0] not in named]
            for i in range(0, len(bare), SLICE):
                contexts += await self._collect_contexts(bare[i : i + SLICE], cutoff)
                slices += 1
        del context_of
        vacuumed = await self._vacuum()
        return TurnGcReport(
            turns_reclaimed=turns,
            payload_bytes_reclaimed=payload,
            contexts_reclaimed=contexts,
            slices=slices,
            wal_truncated=vacuumed,
            bytes_before=before,
            bytes_after=await self._size(),
            seconds=time.monotonic() - started,
        )

    async def gc_candidates(self, *, grace_s: float = 3600.0) -> list[int]:
        """The turns a ``gc(grace_s=...)`` would reclaim now, highest first (what a store's dry run
        leaves out of the CAS roots)."""
        grace_s = validate_grace(grace_s)
        candidates, _, _ = await self._mark(now_ms() - int(grace_s * 1000), with_contexts=False)
        return candidates

    async def cas_roots(self, leave_out: Iterable[int] = ()) -> set[str]:
        """Every CAS object a turn present names (``fs_root``, ``refs``, and the blobs pipeline
        checkpoints and agent tool outputs name in their payloads: see ``lifecycle.payload_oids``),
        but those of the turns ``leave_out``: the roots a store's CAS gc keeps. Pages down the
        primary key, each page its own statement."""
        skip = set(leave_out)
        types = list(PAYLOAD_OID_TYPES)
        roots: set[str] = set()
        after = 0
        while rows := await self._actor.fetch(
            "SELECT turn_id, fs_root, refs, type_id, CASE WHEN type_id = ANY($2::text[]) THEN payload END "
            "FROM turns WHERE turn_id > $1 AND (fs_root IS NOT NULL OR refs IS NOT NULL OR type_id = ANY($2::text[])) "
            "ORDER BY turn_id LIMIT 5000",
            after,
            types,
        ):
            add_row_roots(roots, rows, skip)
            after = rows[-1][0]
        return roots

    async def _mark(self, cutoff: int, *, with_contexts: bool) -> tuple[list[int], dict[int, int], dict[int, int]]:
        """The candidates (highest first), every turn's parent, and (``with_contexts``) every turn's
        context: what no live head or base and no turn younger than ``cutoff`` reaches."""
        roots: list[int] = []
        for head, base in await self._actor.fetch(
            "SELECT head_turn_id, base_turn_id FROM contexts WHERE deleted_at_ms IS NULL"
        ):
            roots += (head, base)
        rows: list[tuple[int, int, int, int]] = []
        after = 0
        while page := await self._actor.fetch(
            "SELECT turn_id, parent_turn_id, created_at_ms, context_id FROM turns WHERE turn_id > $1 "
            "ORDER BY turn_id LIMIT 10000",
            after,
        ):
            rows += [(row[0], row[1], row[2], row[3]) for row in page]
            after = page[-1][0]
        # Roots read before the turns: a head moved meanwhile points at a turn the pages include, or
        # at one a slice's own re-check keeps. In a worker thread: the mark's Python work would
        # otherwise hold this event loop.
        candidates, parents = await anyio.to_thread.run_sync(unreachable, rows, roots, cutoff)
        context_of = {row[0]: row[3] for row in rows} if with_contexts else {}
        return candidates, parents, context_of

    async def _payload_bytes(self, turn_ids: list[int]) -> int:
        total = 0
        for i in range(0, len(turn_ids), 10_000):
            rows = await self._actor.fetch(
                "SELECT COALESCE(sum(octet_length(payload)), 0) FROM turns WHERE turn_id = ANY($1::bigint[])",
                turn_ids[i : i + 10_000],
            )
            total += int(rows[0][0])
        return total

    async def _collect_turns(self, turn_ids: list[int], cutoff: int) -> tuple[list[int], int, list[int]]:
        """One slice, in a transaction of its own on a read-pool connection (see :meth:`gc`):
        ``(ids deleted, payload bytes deleted, ids kept)``."""
        async with self._actor.reading() as conn, conn.raw.transaction():
            asked = set(turn_ids)
            parent: dict[int, int] = {}
            keep: set[int] = set()
            for turn_id, parent_id, created in await conn.fetch(
                "SELECT turn_id, parent_turn_id, created_at_ms FROM turns WHERE turn_id = ANY($1::bigint[]) "
                "ORDER BY turn_id FOR UPDATE SKIP LOCKED",
                sorted(asked),
            ):
                parent[turn_id] = parent_id
                if created > cutoff:
                    keep.add(turn_id)
            busy = sorted(asked - parent.keys())
            if busy:  # locked by a writer building on them (or gone already: a gc before this one)
                for turn_id, parent_id in await conn.fetch(
                    "SELECT turn_id, parent_turn_id FROM turns WHERE turn_id = ANY($1::bigint[])", busy
                ):
                    parent[turn_id] = parent_id
                    keep.add(turn_id)
            doomed = set(parent)
            if not doomed:
                return [], 0, []
            ids = sorted(doomed)
            for (turn_id,) in await conn.fetch(
                "SELECT head_turn_id FROM contexts WHERE head_turn_id = ANY($1::bigint[]) AND deleted_at_ms IS NULL "
                "UNION SELECT base_turn_id FROM contexts WHERE base_turn_id = ANY($1::bigint[]) "
                "AND deleted_at_ms IS NULL "
                "UNION SELECT parent_turn_id FROM turns WHERE parent_turn_id = ANY($1::bigint[]) "
                "AND NOT (turn_id = ANY($1::bigint[]))",
                ids,
            ):
                keep.add(turn_id)
            for turn_id in keep:  # what a kept turn stands on is kept too
                while turn_id in doomed:
                    doomed.discard(turn_id)
                    turn_id = parent[turn_id]
            kept = sorted(set(parent) - doomed)
            if not doomed:
                return [], 0, kept
            ids = sorted(doomed)
            size = await conn.fetchval(
                "WITH d AS (DELETE FROM turns WHERE turn_id = ANY($1::bigint[]) RETURNING octet_length(payload) AS n) "
                "SELECT COALESCE(sum(n), 0) FROM d",
                ids,
            )
            return ids, int(size), kept

    async def _collect_contexts(self, context_ids: list[int], cutoff: int) -> int:
        async with self._actor.reading() as conn, conn.raw.transaction():
            status = await conn.execute(
                "DELETE FROM contexts WHERE context_id = ANY($1::bigint[]) AND deleted_at_ms IS NOT NULL "
                "AND deleted_at_ms <= $2 AND NOT EXISTS (SELECT 1 FROM contexts c "
                "WHERE c.parent_context_id = contexts.context_id AND c.parent_context_id <> 0)",
                context_ids,
                cutoff,
            )
            return int(status.split()[-1])

    async def _vacuum(self) -> bool:
        """Make the space gc freed reusable (VACUUM runs outside a transaction and beside writers)."""
        async with self._actor.reading() as conn:
            await conn.execute("VACUUM (SKIP_LOCKED) turns, contexts, context_keys")
        return True

    async def _size(self) -> int:
        """Bytes the turn tables take on the server (heap, TOAST and indexes)."""
        rows = await self._actor.fetch(
            "SELECT pg_total_relation_size('turns') + pg_total_relation_size('contexts') "
            "+ pg_total_relation_size('context_keys') + pg_total_relation_size('registry_bundles')"
        )
        return int(rows[0][0])

    # -- registry bundles and blobs ----------------------------------------------------------------

    async def _get_registry_bundle(self, bundle_id: str) -> bytes | None:
        rows = await self._actor.fetch("SELECT bundle_json FROM registry_bundles WHERE bundle_id = $1", bundle_id)
        return bytes(rows[0][0]) if rows else None

    async def _put_blob(self, data: bytes) -> str:
        if self._cas is None:
            raise InvalidInput("this PostgreSQL turn store has no CAS to keep blobs in (give it cas=)")
        return await self._cas.write_blob(data)

    async def _get_blob(self, oid: str) -> bytes:
        if self._cas is None:
            raise ObjectNotFound(f"blob {oid}: this PostgreSQL turn store has no CAS (give it cas=)")
        return await self._cas.read_blob(oid)
