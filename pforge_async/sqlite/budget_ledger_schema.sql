-- Token budget ledger (budget.db). Version 1.
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
    reservation_id TEXT    PRIMARY KEY,
    vendor         TEXT    NOT NULL,
    model          TEXT    NOT NULL,
    tokens         INTEGER NOT NULL CHECK (tokens >= 0),
    cost           INTEGER NOT NULL CHECK (cost >= 0),
    created_at_ms  INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('held', 'committed', 'released'))
) WITHOUT ROWID;

CREATE INDEX reservations_held ON reservations (vendor, state, expires_at_ms);

CREATE TABLE spend (
    spend_id        INTEGER PRIMARY KEY,
    vendor          TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    input_tokens    INTEGER NOT NULL CHECK (input_tokens >= 0),
    output_tokens   INTEGER NOT NULL CHECK (output_tokens >= 0),
    cost            INTEGER NOT NULL CHECK (cost >= 0),
    idempotency_key TEXT    UNIQUE,
    reservation_id  TEXT,
    recorded_at_ms  INTEGER NOT NULL
);

CREATE INDEX spend_vendor_time ON spend (vendor, recorded_at_ms);

-- Running all-time totals per vendor, kept with every spend insert, so a 'total' budget check costs
-- the same at the millionth row as at the first.
CREATE TABLE spend_totals (
    vendor TEXT    PRIMARY KEY,
    tokens INTEGER NOT NULL,
    cost   INTEGER NOT NULL
) WITHOUT ROWID;
