-- Who runs the claimed attempt: 'local' (the dispatcher of the process holding the data dir)
-- or 'worker' (a pull worker). A restart recovers only the attempts that ran in the process.
ALTER TABLE tasks ADD COLUMN runner TEXT;
-- Whether the runner confirmed it received the claim. A pull worker's claim is unacknowledged
-- until its first heartbeat; one that expires unacknowledged never reached the worker and is
-- handed back without counting the attempt.
ALTER TABLE tasks ADD COLUMN claim_acked INTEGER NOT NULL DEFAULT 1;
-- How many claims of the task went back unacknowledged: after a few, a claim that is never
-- acknowledged counts like any lost attempt, so a task whose claim always kills its worker (or
-- cannot be read by it) still ends.
ALTER TABLE tasks ADD COLUMN unacked_refunds INTEGER NOT NULL DEFAULT 0;
