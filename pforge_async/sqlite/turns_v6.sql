-- Version 5 -> 6 (append cost). A fresh file is turns_schema.sql (version 5) and then this script
-- (TurnActor._migrate), so a fresh file and a migrated one are made by the same statements.
--
-- The "updated" order indexed updated_at_ms, which every append moves: each commit rewrote that
-- index entry (one page more in the WAL per commit). It now indexes updated_bucket, updated_at_ms
-- in 64 ms steps (updated_at_ms >> 6, TurnActor.UPDATED_SHIFT), and the writer sets the column only
-- when the step changes, so an agent loop appending to its context moves its index entry at most
-- once per 64 ms. list_contexts walks the buckets newest first and sorts each by updated_at_ms and
-- id: a page costs O(limit + the contexts changed in the same 64 ms as its last), never a sort of the
-- whole table. Invariant: updated_bucket = updated_at_ms >> 6 (check() verifies it).

ALTER TABLE contexts ADD COLUMN updated_bucket INTEGER NOT NULL DEFAULT 0;
UPDATE contexts SET updated_bucket = updated_at_ms >> 6;
DROP INDEX contexts_updated;
CREATE INDEX contexts_updated ON contexts (updated_bucket) WHERE deleted_at_ms IS NULL;

-- delete_context drops the context's creation keys, and removing a contexts row (gc's
-- drop_deleted_rows) checks that no creation key names it: both by context id, which context_keys
-- (keyed by the key) could only answer by a pass over the table. Only keyed creations write here.
CREATE INDEX context_keys_context ON context_keys (context_id);
