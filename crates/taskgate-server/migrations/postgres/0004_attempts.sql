-- Who runs the claimed attempt: 'local' (a node's dispatcher) or 'worker' (a pull worker).
ALTER TABLE tasks ADD COLUMN runner TEXT;
-- Whether the runner confirmed it received the claim (a pull worker's first heartbeat); a claim
-- that expires unacknowledged never reached the worker and goes back without counting.
ALTER TABLE tasks ADD COLUMN claim_acked BOOLEAN NOT NULL DEFAULT TRUE;
-- How many claims of the task went back unacknowledged: after a few, a claim that is never
-- acknowledged counts like any lost attempt, so a task whose claim always kills its worker (or
-- cannot be read by it) still ends.
ALTER TABLE tasks ADD COLUMN unacked_refunds BIGINT NOT NULL DEFAULT 0;
