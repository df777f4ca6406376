-- One signing secret per tenant; during a rotation the previous one signs too until it expires.
CREATE TABLE webhook_secrets (
    tenant_id            TEXT PRIMARY KEY,
    secret               TEXT NOT NULL,
    previous_secret      TEXT,
    previous_expires_at  BIGINT,
    created_at           BIGINT NOT NULL
);

-- The outbox: a row is written in the same transaction as the task's final state.
CREATE TABLE webhook_deliveries (
    -- Sent as `webhook-id` on every attempt, so receivers can drop duplicates.
    id                TEXT PRIMARY KEY,
    task_id           TEXT NOT NULL,
    tenant_id         TEXT NOT NULL,
    url               TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('pending', 'delivering', 'succeeded', 'failed')),
    attempts          BIGINT NOT NULL DEFAULT 0,
    next_attempt_at   BIGINT NOT NULL,
    lease_token       TEXT,
    lease_expires_at  BIGINT,
    created_at        BIGINT NOT NULL,
    completed_at      BIGINT,
    last_error        TEXT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_task ON webhook_deliveries (task_id);

CREATE TABLE webhook_attempts (
    id            BIGSERIAL PRIMARY KEY,
    delivery_id   TEXT NOT NULL REFERENCES webhook_deliveries(id),
    attempted_at  BIGINT NOT NULL,
    status_code   BIGINT,
    latency_ms    BIGINT NOT NULL,
    error         TEXT
);

CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

-- Cluster-wide concurrency counts a model's running tasks at every claim.
CREATE INDEX tasks_running_by_model ON tasks (model) WHERE state = 'processing';
