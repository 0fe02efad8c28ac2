-- Version 3 -> 4 (erasure): erase_turns empties a turn's payload and marks its row erased.

ALTER TABLE turns ADD COLUMN erased INTEGER NOT NULL DEFAULT 0;
