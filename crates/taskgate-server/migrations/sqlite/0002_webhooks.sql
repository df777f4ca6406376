-- One signing secret per tenant; during a rotation the previous one signs too until it expires.
CREATE TABLE webhook_secrets (
    tenant_id            TEXT PRIMARY KEY,
    secret               TEXT NOT NULL,
    previous_secret      TEXT,
    previous_expires_at  INTEGER,
    created_at           INTEGER NOT NULL
);

-- The outbox: a row is written in the same transaction as the task's final state.
CREATE TABLE webhook_deliveries (
    -- Sent as `webhook-id` on every attempt, so receivers can drop duplicates.
    id                TEXT PRIMARY KEY,
    task_id           TEXT NOT NULL,
    tenant_id         TEXT NOT NULL,
    url               TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('pending', 'delivering', 'succeeded', 'failed')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER NOT NULL,
    lease_token       TEXT,
    lease_expires_at  INTEGER,
    created_at        INTEGER NOT NULL,
    completed_at      INTEGER,
    last_error        TEXT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_task ON webhook_deliveries (task_id);

CREATE TABLE webhook_attempts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id   TEXT NOT NULL REFERENCES webhook_deliveries(id),
    attempted_at  INTEGER NOT NULL,
    status_code   INTEGER,
    latency_ms    INTEGER NOT NULL,
    error         TEXT
);

CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
