-- Earlier attempts of a task, for the dashboard's timeline: a JSON array appended to only when
-- an attempt ends without ending the task (a retry, a lost lease), in the statement that
-- requeues it, so a task that succeeds at its first attempt never writes it.
ALTER TABLE tasks ADD COLUMN attempt_history TEXT;

-- Pull workers seen by the cluster (the operator view): upserted on claims and heartbeats, at
-- most every 10 s per worker per node.
CREATE TABLE pull_workers (
    name          TEXT PRIMARY KEY,
    node          TEXT NOT NULL,
    -- A JSON array of model names: the ones its last claim asked for.
    models        TEXT NOT NULL,
    last_seen_at  INTEGER NOT NULL
);
CREATE INDEX pull_workers_seen ON pull_workers (last_seen_at);

-- A tenant's deliveries that are not done, counted by the operator view without walking the
-- delivered ones (the great majority).
CREATE INDEX webhook_deliveries_backlog ON webhook_deliveries (tenant_id, state, attempts, next_attempt_at)
    WHERE state <> 'succeeded';
