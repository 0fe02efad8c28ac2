-- Version 1 -> 2: transitions may carry the context they were recorded in.
ALTER TABLE transitions ADD COLUMN context TEXT;
