-- Fair sharing between tenants within a model (docs/gateway.md). The ready index leads with the
-- tenant after the model, so a claim finds the tenants with due work by a loose index scan (one
-- seek per tenant) and takes each tenant's next tasks by `priority DESC, id` from its own range.
-- It replaces the old `(model, priority DESC, id)` index rather than joining it: every submit
-- writes every index, and the queries that walked the old one (next_due, queue depths, queue
-- positions) walk this one as well.
DROP INDEX IF EXISTS tasks_ready;
CREATE INDEX tasks_ready ON tasks (model, tenant_id, priority DESC, id) WHERE state = 'pending';

-- Each tenant's pass (virtual finish time) per model; the row with tenant_id '' is the model's
-- virtual time, the pass at which the last task was picked. Written only by claims that chose
-- between two or more tenants.
CREATE TABLE fair_shares (
    model      TEXT NOT NULL,
    tenant_id  TEXT NOT NULL,
    pass       INTEGER NOT NULL,
    PRIMARY KEY (model, tenant_id)
);
