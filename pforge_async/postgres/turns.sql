-- Turn store on PostgreSQL, version 1: the SQLite turns.db (version 5) in one schema of its own.
-- Tables are named unqualified: migrate.py runs this with search_path set to the store's schema.
-- A turn is immutable once written (fs_root is set at most once, erasure empties its payload). A
-- context's name, base, parent and creation time never change; its head, metadata and updated_at_ms do.
-- Ids come from sequences: increasing, never reused, with gaps (rollbacks, retries). A child's id is
-- always above its parent's (the parent was committed before the child's id was drawn), which gc's
-- highest-first sweep relies on.

CREATE SEQUENCE context_ids;
CREATE SEQUENCE turn_ids;

CREATE TABLE contexts (
    context_id        bigint PRIMARY KEY,
    head_turn_id      bigint NOT NULL DEFAULT 0,   -- 0: empty
    created_at_ms     bigint NOT NULL,
    -- "C": byte order, which for UTF-8 is code point order, as every backend lists names.
    name              text COLLATE "C" CHECK (name <> ''),
    base_turn_id      bigint NOT NULL DEFAULT 0,   -- the turn it started from; 0: none
    parent_context_id bigint NOT NULL DEFAULT 0,   -- lineage: the context forked from; 0: none
    metadata          text   NOT NULL DEFAULT '{}', -- canonical JSON (rules.encode_metadata)
    updated_at_ms     bigint NOT NULL,             -- strictly increases with every change
    -- updated_at_ms >> 6: the "updated" order's index key, which moves at most once per 64 ms, so most
    -- updates of a busy context change no indexed column and are HOT (no index entry written)
    updated_bucket    bigint NOT NULL,
    -- delete_context: set, with name NULL, metadata '{}', head and base 0. The row stays while
    -- turns name it, so an id is never given to another context.
    deleted_at_ms     bigint
) WITH (fillfactor = 70);  -- room on each page for HOT updates of the heads

-- Names are unique among live contexts (a deleted one holds none); the "name" order and its prefix
-- ranges walk this index.
CREATE UNIQUE INDEX contexts_name ON contexts (name) WHERE name IS NOT NULL;
-- The "updated" order, scanned backwards from a cursor's bucket; each bucket's rows sorted by
-- (updated_at_ms, context_id).
CREATE INDEX contexts_updated ON contexts (updated_bucket) WHERE deleted_at_ms IS NULL;
-- The "created" order without walking deleted rows.
CREATE INDEX contexts_live ON contexts (context_id) WHERE deleted_at_ms IS NULL;
-- list_contexts(parent_context_id=...): the children of one context, by id.
CREATE INDEX contexts_parent ON contexts (parent_context_id, context_id) WHERE parent_context_id <> 0;

-- Idempotency keys of context creation (create_context, fork_context): one space per store.
CREATE TABLE context_keys (
    idempotency_key text   PRIMARY KEY,
    context_id      bigint NOT NULL,
    fingerprint     text   NOT NULL   -- rules.creation_fingerprint of the request that first used it
);

CREATE TABLE turns (
    turn_id         bigint  PRIMARY KEY,
    context_id      bigint  NOT NULL,            -- the context it was appended in
    parent_turn_id  bigint  NOT NULL,            -- 0: a first turn
    depth           bigint  NOT NULL CHECK (depth >= 1),
    jump_turn_id    bigint  NOT NULL,            -- skip link (skew-binary), for O(log n) ancestry
    jump_depth      bigint  NOT NULL,
    type_id         text    NOT NULL,
    type_version    bigint  NOT NULL,
    payload         bytea   NOT NULL,
    payload_hash    text    NOT NULL,
    idempotency_key text,
    created_at_ms   bigint  NOT NULL,
    fs_root         text,
    -- erase_turns: true, with payload '' and payload_hash '' for good (the row stays: chains hold).
    -- An erased turn's parent is erased too.
    erased          boolean NOT NULL DEFAULT false,
    -- CAS objects the turn keeps alive besides fs_root: their ids, sorted, space-separated; NULL: none
    refs            text
);

-- The idempotency backstop: one turn per key and context.
CREATE UNIQUE INDEX turns_idempotency ON turns (context_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- gc's re-check: has a candidate gained a child since the mark? (Ids are not commit-ordered across
-- processes, so "children above the mark's highest id" would miss some.)
CREATE INDEX turns_parent ON turns (parent_turn_id);

CREATE TABLE registry_bundles (
    bundle_id     text   PRIMARY KEY,
    bundle_json   bytea  NOT NULL,
    created_at_ms bigint NOT NULL
);
