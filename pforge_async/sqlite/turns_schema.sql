-- Turn store (turns.db). Version 5 (lifecycle: deletes, erasure, refs); turns_v2.sql upgrades a
-- version 1 file to version 2, turns_v3.sql version 2 to 3, turns_v4.sql 3 to 4, turns_v5.sql 4 to this.
-- A turn is immutable once written (fs_root is set at most once). A context's name, base, parent and
-- creation time never change; its head, metadata and updated_at_ms do. Columns a migration added
-- come after the version 1 columns, so a migrated file and a fresh one have the same table.

CREATE TABLE contexts (
    context_id        INTEGER PRIMARY KEY,
    head_turn_id      INTEGER NOT NULL DEFAULT 0,   -- 0: empty
    created_at_ms     INTEGER NOT NULL,
    name              TEXT,                         -- unique among contexts (contexts_name)
    base_turn_id      INTEGER NOT NULL DEFAULT 0,   -- the turn it started from; 0: none
    parent_context_id INTEGER NOT NULL DEFAULT 0,   -- lineage: the context forked from; 0: none
    metadata          BLOB    NOT NULL DEFAULT X'7B7D',  -- canonical JSON ('{}')
    updated_at_ms     INTEGER NOT NULL DEFAULT 0,   -- strictly increases with every change
    -- delete_context: set, with name NULL and metadata '{}'. The row stays while turns name it (their
    -- context_id is a foreign key), so an id is never given to another context.
    deleted_at_ms     INTEGER
);

-- Get-or-create by name: SQLite's own backstop behind the lock every writer takes per batch.
-- Also the "name" order of list_contexts, and its prefix ranges.
CREATE UNIQUE INDEX contexts_name ON contexts (name) WHERE name IS NOT NULL;
-- The "updated" order; the rowid (context_id) completes each key, so ties order by id.
CREATE INDEX contexts_updated ON contexts (updated_at_ms) WHERE deleted_at_ms IS NULL;
-- list_contexts(parent_context_id=...): the children of one context, by id.
CREATE INDEX contexts_parent ON contexts (parent_context_id) WHERE parent_context_id != 0;

-- Idempotency keys of context creation (create_context, fork_context): one space per store.
-- fingerprint: rules.creation_fingerprint of the request that first used the key.
CREATE TABLE context_keys (
    idempotency_key TEXT PRIMARY KEY,
    context_id      INTEGER NOT NULL REFERENCES contexts (context_id),
    fingerprint     TEXT    NOT NULL
) WITHOUT ROWID;

CREATE TABLE turns (
    turn_id         INTEGER PRIMARY KEY,
    context_id      INTEGER NOT NULL REFERENCES contexts (context_id),
    parent_turn_id  INTEGER NOT NULL,            -- 0: a first turn
    depth           INTEGER NOT NULL CHECK (depth >= 1),
    jump_turn_id    INTEGER NOT NULL,            -- skip link (skew-binary), for O(log n) ancestry
    jump_depth      INTEGER NOT NULL,
    type_id         TEXT    NOT NULL,
    type_version    INTEGER NOT NULL,
    payload         BLOB    NOT NULL,
    payload_hash    TEXT    NOT NULL,
    idempotency_key TEXT,
    created_at_ms   INTEGER NOT NULL,
    fs_root         TEXT,
    -- erase_turns: 1, with payload X'' and payload_hash '' for good (the row stays: chains hold).
    -- An erased turn's parent is erased too.
    erased          INTEGER NOT NULL DEFAULT 0,
    -- CAS objects the turn keeps alive besides fs_root: their ids, sorted, space-separated; NULL: none
    refs            TEXT
);

CREATE UNIQUE INDEX turns_idempotency ON turns (context_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE registry_bundles (
    bundle_id     TEXT PRIMARY KEY,
    bundle_json   BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
