-- Small outputs of in-process backends kept in the database instead of one file each; written
-- in the same transaction as the `success` that lists them (see the SQLite migration).
CREATE TABLE output_blobs (
    key     TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    content BYTEA NOT NULL
);
