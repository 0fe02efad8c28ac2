-- Version 2 -> 3 (lifecycle): delete_context marks a context's row deleted (it stays while turns name
-- it); the "updated" order indexes live contexts only, so pages of list_contexts never walk deleted ones.

ALTER TABLE contexts ADD COLUMN deleted_at_ms INTEGER;
DROP INDEX contexts_updated;
CREATE INDEX contexts_updated ON contexts (updated_at_ms) WHERE deleted_at_ms IS NULL;
