-- Version 1 -> 2: idempotent reservations, tags on reservations and spend, and spend committed after
-- its reservation expired, recorded with how far it took the budget past its limit.
ALTER TABLE reservations ADD COLUMN idempotency_key TEXT;

CREATE UNIQUE INDEX reservations_key ON reservations (idempotency_key) WHERE idempotency_key IS NOT NULL;

ALTER TABLE spend ADD COLUMN over_tokens INTEGER NOT NULL DEFAULT 0 CHECK (over_tokens >= 0);

ALTER TABLE spend ADD COLUMN over_cost INTEGER NOT NULL DEFAULT 0 CHECK (over_cost >= 0);

CREATE INDEX spend_reservation ON spend (reservation_id) WHERE reservation_id IS NOT NULL;

CREATE TABLE reservation_tags (
    reservation_id TEXT NOT NULL,
    tag            TEXT NOT NULL,
    value          TEXT NOT NULL,
    PRIMARY KEY (reservation_id, tag)
) WITHOUT ROWID;

CREATE INDEX reservation_tags_value ON reservation_tags (tag, value);

CREATE TABLE spend_tags (
    spend_id INTEGER NOT NULL,
    tag      TEXT    NOT NULL,
    value    TEXT    NOT NULL,
    PRIMARY KEY (spend_id, tag)
) WITHOUT ROWID;

CREATE INDEX spend_tags_value ON spend_tags (tag, value);
