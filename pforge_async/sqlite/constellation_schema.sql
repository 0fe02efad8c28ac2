-- Constellation memory (memory.db). Version 2.
-- action_stats is maintained in the same transaction as every insert into transitions, so it always
-- equals the aggregate of transitions per (state, action).

CREATE TABLE transitions (
    transition_id   INTEGER PRIMARY KEY,
    state           TEXT    NOT NULL,
    action          TEXT    NOT NULL,
    next_state      TEXT    NOT NULL,
    reward          REAL    NOT NULL,
    success         INTEGER NOT NULL CHECK (success IN (0, 1)),
    idempotency_key TEXT    UNIQUE,
    recorded_at_ms  INTEGER NOT NULL,
    context         TEXT                       -- since version 2
);

CREATE INDEX transitions_state_action ON transitions (state, action);

CREATE TABLE action_stats (
    state         TEXT    NOT NULL,
    action        TEXT    NOT NULL,
    count         INTEGER NOT NULL,
    successes     INTEGER NOT NULL,
    reward_sum    REAL    NOT NULL,
    reward_sq_sum REAL    NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (state, action)
) WITHOUT ROWID;
