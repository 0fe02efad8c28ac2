-- Token budget ledger (budget.db). Version 2 (budget_ledger_v2.sql migrates version 1).
-- Money is an integer number of micro-units everywhere: no floats.

CREATE TABLE budgets (
    vendor        TEXT    NOT NULL,
    window        TEXT    NOT NULL CHECK (window IN ('total', 'day')),
    token_limit   INTEGER CHECK (token_limit >= 0),
    cost_limit    INTEGER CHECK (cost_limit >= 0),
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (vendor, window)
) WITHOUT ROWID;

CREATE TABLE reservations (
    reservation_id  TEXT    PRIMARY KEY,
    vendor          TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    tokens          INTEGER NOT NULL CHECK (tokens >= 0),
    cost            INTEGER NOT NULL CHECK (cost >= 0),
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('held', 'committed', 'released')),
    idempotency_key TEXT                                      -- since version 2
) WITHOUT ROWID;

CREATE INDEX reservations_held ON reservations (vendor, state, expires_at_ms);

CREATE UNIQUE INDEX reservations_key ON reservations (idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE spend (
    spend_id        INTEGER PRIMARY KEY,
    vendor          TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    input_tokens    INTEGER NOT NULL CHECK (input_tokens >= 0),
    output_tokens   INTEGER NOT NULL CHECK (output_tokens >= 0),
    cost            INTEGER NOT NULL CHECK (cost >= 0),
    idempotency_key TEXT    UNIQUE,
    reservation_id  TEXT,
    recorded_at_ms  INTEGER NOT NULL,
    -- since version 2: how far this spend took a budget past its limit (a commit after the
    -- reservation expired is recorded, never refused)
    over_tokens     INTEGER NOT NULL DEFAULT 0 CHECK (over_tokens >= 0),
    over_cost       INTEGER NOT NULL DEFAULT 0 CHECK (over_cost >= 0)
);

CREATE INDEX spend_vendor_time ON spend (vendor, recorded_at_ms);

CREATE INDEX spend_reservation ON spend (reservation_id) WHERE reservation_id IS NOT NULL;

-- Running all-time totals per vendor, kept with every spend insert, so a 'total' budget check costs
-- the same at the millionth row as at the first.
CREATE TABLE spend_totals (
    vendor TEXT    PRIMARY KEY,
    tokens INTEGER NOT NULL,
    cost   INTEGER NOT NULL
) WITHOUT ROWID;

-- Tags (since version 2): a reservation's, copied to its spend when it is committed. Totals filter
-- by them through the (tag, value) indexes.
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
