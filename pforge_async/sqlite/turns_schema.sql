-- Turn store (turns.db). Version 1.
-- A turn is immutable once written (fs_root is set at most once). Contexts only move their head.

CREATE TABLE contexts (
    context_id    INTEGER PRIMARY KEY,
    head_turn_id  INTEGER NOT NULL DEFAULT 0,   -- 0: empty
    created_at_ms INTEGER NOT NULL
);

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
    fs_root         TEXT
);

CREATE UNIQUE INDEX turns_idempotency ON turns (context_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE registry_bundles (
    bundle_id     TEXT PRIMARY KEY,
    bundle_json   BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
