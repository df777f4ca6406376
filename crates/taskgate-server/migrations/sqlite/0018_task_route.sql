-- The route of a routed model (several backends with failover) that ran the task's last
-- attempt, written with the final state and shown as statusTask's `route`. NULL for models
-- with one backend, which costs their final-state write one NULL. No index: it is only read
-- back with the row.
ALTER TABLE tasks ADD COLUMN route TEXT;
