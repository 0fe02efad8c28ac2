-- Version 1 -> 2 (sessions): context names, lineage, metadata, updated_at_ms, creation keys.
-- Runs in one transaction under the writers' lock (SqliteActor._migrate), about one pass over each table.

ALTER TABLE contexts ADD COLUMN name TEXT;
ALTER TABLE contexts ADD COLUMN base_turn_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contexts ADD COLUMN parent_context_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contexts ADD COLUMN metadata BLOB NOT NULL DEFAULT X'7B7D';
ALTER TABLE contexts ADD COLUMN updated_at_ms INTEGER NOT NULL DEFAULT 0;

-- Version 1 started a context from a turn (create_context(base) or fork_context) with its head
-- there, and its first append took that head as parent. So a context's base is its first turn's
-- parent, or its head while it has no turn; its parent context is the one that base turn was
-- appended in. It was last changed by its last append, or when it was created.
-- (No UPDATE ... FROM: that needs SQLite 3.33, and Python 3.10 may come with an older one.)
CREATE TEMP TABLE v2_turns_of (
    context_id INTEGER PRIMARY KEY,
    first_turn INTEGER NOT NULL,
    last_ms    INTEGER NOT NULL
);
INSERT INTO v2_turns_of
    SELECT context_id, min(turn_id), max(created_at_ms) FROM turns GROUP BY context_id;

UPDATE contexts SET
    base_turn_id = COALESCE(
        (SELECT t.parent_turn_id FROM v2_turns_of s JOIN turns t ON t.turn_id = s.first_turn
         WHERE s.context_id = contexts.context_id),
        head_turn_id),
    updated_at_ms = max(created_at_ms, COALESCE(
        (SELECT s.last_ms FROM v2_turns_of s WHERE s.context_id = contexts.context_id), 0));

UPDATE contexts SET parent_context_id = COALESCE(
    (SELECT t.context_id FROM turns t
     WHERE t.turn_id = contexts.base_turn_id AND t.context_id != contexts.context_id), 0)
WHERE base_turn_id != 0;

DROP TABLE temp.v2_turns_of;

CREATE UNIQUE INDEX contexts_name ON contexts (name) WHERE name IS NOT NULL;
CREATE INDEX contexts_updated ON contexts (updated_at_ms);
CREATE INDEX contexts_parent ON contexts (parent_context_id) WHERE parent_context_id != 0;

CREATE TABLE context_keys (
    idempotency_key TEXT PRIMARY KEY,
    context_id      INTEGER NOT NULL REFERENCES contexts (context_id),
    fingerprint     TEXT    NOT NULL
) WITHOUT ROWID;
