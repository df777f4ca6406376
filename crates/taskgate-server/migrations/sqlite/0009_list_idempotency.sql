-- GET /api/v1/tasks: a tenant's tasks newest first, walked backwards from the cursor's id, with
-- or without a model; without these every page would scan the whole table.
CREATE INDEX tasks_by_tenant ON tasks (tenant_id, id);
CREATE INDEX tasks_by_tenant_model ON tasks (tenant_id, model, id);

-- Idempotency-Key: the tasks a keyed submit created, written in the transaction that inserted
-- them. A row older than 24 h has expired and is replaced by the next request with its key.
CREATE TABLE idempotency_keys (
    tenant_id     TEXT NOT NULL,
    key           TEXT NOT NULL,
    -- SHA-256 of the endpoint, the model and the raw body: a replay must match it.
    request_hash  BLOB NOT NULL,
    -- JSON array of the task ids the request created, in its order.
    task_ids      TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, key)
) WITHOUT ROWID;
