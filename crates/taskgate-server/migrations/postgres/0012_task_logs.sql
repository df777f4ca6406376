-- A task's log lines (a command's stdout, an http upstream's ndjson stream, a pull worker's
-- heartbeats), numbered per task from 1. Appends trim each task to its newest 1000 lines and
-- 256 KiB in the same transaction, and send `changed:TASK_ID` so streams on every node send
-- the lines; retention deletes them with the task. Tasks that log nothing never touch this
-- table.
CREATE TABLE task_logs (
    task_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
);
