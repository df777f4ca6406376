-- Tenants own tasks; API keys belong to one tenant each.
CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    -- SHA-256 of the key: keys carry 256 random bits, so a fast hash is enough.
    key_hash    BYTEA NOT NULL UNIQUE,
    -- The first characters of the key, to recognise it in `keys list`.
    prefix      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL,
    model            TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'processing', 'success', 'failed')),
    input            TEXT NOT NULL,
    callback_url     TEXT,
    priority         BIGINT NOT NULL DEFAULT 0,
    attempts         BIGINT NOT NULL DEFAULT 0,
    max_attempts     BIGINT NOT NULL,
    -- Not claimable before this time (Unix ms): retry backoff.
    run_after        BIGINT NOT NULL,
    -- The current claim: a stale holder's token no longer matches.
    lease_token      TEXT,
    lease_expires_at BIGINT,
    create_time      BIGINT NOT NULL,
    start_time       BIGINT,
    complete_time    BIGINT,
    -- JSON array of artifact keys, on success.
    outputs          TEXT,
    fail_code        TEXT,
    fail_msg         TEXT
);

CREATE INDEX tasks_ready ON tasks (model, priority DESC, id) WHERE state = 'pending';
CREATE INDEX tasks_leased ON tasks (lease_expires_at) WHERE state = 'processing';

-- Server-wide secrets and settings shared by every node (e.g. the result-URL signing key).
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  BYTEA NOT NULL
);
