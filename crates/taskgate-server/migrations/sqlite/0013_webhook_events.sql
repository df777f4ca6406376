-- Webhook events beyond the final state (`webhook_events` at submit). Which events a task asked
-- for, as a bitmask: start = 1, progress = 2, completed = 4 (`domain::EventMask`). The default,
-- completed only, is what every task had before, so existing rows keep today's behaviour.
-- Adding a column with a constant default rewrites no row.
ALTER TABLE tasks ADD COLUMN webhook_events INTEGER NOT NULL DEFAULT 4;

-- When the task's last `progress` delivery was written (Unix ms): progress deliveries are held
-- to one per second per task, checked in the statement that writes them.
ALTER TABLE tasks ADD COLUMN last_progress_event_at INTEGER;

-- What a delivery reports. Final-state deliveries (every row before this migration) render the
-- task's status when each attempt is sent, so `payload` stays NULL for them; a start or
-- progress delivery carries the status at the moment of its event (statusTask's `data`).
ALTER TABLE webhook_deliveries ADD COLUMN event TEXT NOT NULL DEFAULT 'completed'
    CHECK (event IN ('start', 'progress', 'completed'));
ALTER TABLE webhook_deliveries ADD COLUMN payload TEXT;
