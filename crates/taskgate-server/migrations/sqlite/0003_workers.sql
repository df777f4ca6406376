-- Worker tokens are keys of another kind: they claim work, they cannot submit or read tasks.
ALTER TABLE api_keys ADD COLUMN kind TEXT NOT NULL DEFAULT 'client';
-- Progress (0..1) reported by a pull worker's heartbeat.
ALTER TABLE tasks ADD COLUMN progress REAL;

-- Claims count a model's running tasks (pull workers have no local semaphore).
CREATE INDEX tasks_running_by_model ON tasks (model) WHERE state = 'processing';
