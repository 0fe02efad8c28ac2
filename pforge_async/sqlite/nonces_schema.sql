-- Capability nonces (nonces.db). Version 1.
-- A nonce is consumed by setting consumed_at_ms where it is still NULL: exactly one consumer wins.
-- Purged rows are deleted; a purged nonce is then unknown, so it can never be consumed.

CREATE TABLE nonces (
    nonce          TEXT    PRIMARY KEY,
    subject        TEXT    NOT NULL,
    issued_at_ms   INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    consumed_at_ms INTEGER
) WITHOUT ROWID;

CREATE INDEX nonces_expiry ON nonces (expires_at_ms);
