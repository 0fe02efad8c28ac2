-- Version 4 -> 5 (refs): the CAS objects a turn keeps alive besides fs_root.

ALTER TABLE turns ADD COLUMN refs TEXT;
