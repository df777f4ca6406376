-- A task's deadline to start (`ttl_seconds` at submit, Unix ms): a pending task past it fails
-- with EXPIRED instead of running. Only tasks that have one are indexed, so submits without a
-- deadline write no extra index entry.
ALTER TABLE tasks ADD COLUMN expires_at INTEGER;
CREATE INDEX tasks_expiring ON tasks (expires_at) WHERE state = 'pending' AND expires_at IS NOT NULL;
