-- Per-key scopes and limits (docs/gateway.md, "Per-key limits and scopes").
-- `models`: NULL lets the key use every model, else a JSON array of the model names it may use.
-- `read_only`: the key may read but not submit, cancel or change anything.
-- `requests_per_minute`, `concurrent_tasks`: NULL takes the server's `[limits]` default.
-- `changes` counts edits of the row (`taskgate keys update`): nodes watch its sum, with the
-- revocations, to drop their cached key records within a second of a change.
ALTER TABLE api_keys ADD COLUMN models TEXT;
ALTER TABLE api_keys ADD COLUMN read_only BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE api_keys ADD COLUMN requests_per_minute BIGINT;
ALTER TABLE api_keys ADD COLUMN concurrent_tasks BIGINT;
ALTER TABLE api_keys ADD COLUMN changes BIGINT NOT NULL DEFAULT 0;

-- The client key that submitted the task (NULL for tasks from before this migration), for the
-- per-key count of unfinished tasks and the usage report. No index: one costs every submit
-- (migration 0015 dropped one for that); the count reads the unfinished tasks' partial indexes.
ALTER TABLE tasks ADD COLUMN key_id TEXT;

-- Each node's count of a key's requests per 10-second bucket, for the requests-per-minute
-- limit across nodes: a node upserts its own rows in the background and sums the others'.
-- Rows older than the limit's window are deleted by the same background step.
CREATE TABLE key_usage (
    key_id  TEXT NOT NULL,
    node    TEXT NOT NULL,
    bucket  BIGINT NOT NULL,
    count   BIGINT NOT NULL,
    PRIMARY KEY (key_id, node, bucket)
);
CREATE INDEX key_usage_by_bucket ON key_usage (bucket);
