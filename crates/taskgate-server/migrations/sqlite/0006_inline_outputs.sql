-- Small outputs of in-process backends (an echo's JSON, a demo image) kept in the database
-- instead of one file each: a no-op task then allocates no inode. A blob is written in the same
-- transaction as the `success` that lists its key, so it exists exactly when the task says so;
-- it is served through the same signed /files URL as a file.
CREATE TABLE output_blobs (
    key     TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    content BLOB NOT NULL
) WITHOUT ROWID;
