-- A task's log lines (a command's stdout, an http upstream's ndjson stream, a pull worker's
-- heartbeats), numbered per task from 1. Appends trim each task to its newest 1000 lines and
-- 256 KiB in the same transaction; retention deletes them with the task. Clustered by task
-- (WITHOUT ROWID), so a task's lines sit together and a tail is one range read. Tasks that log
-- nothing never touch this table.
CREATE TABLE task_logs (
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;
