-- Who runs the claimed attempt: 'local' (a node's dispatcher) or 'worker' (a pull worker).
ALTER TABLE tasks ADD COLUMN runner TEXT;
-- Whether the runner confirmed it received the claim (a pull worker's first heartbeat); a claim
-- that expires unacknowledged never reached the worker and goes back without counting.
ALTER TABLE tasks ADD COLUMN claim_acked BOOLEAN NOT NULL DEFAULT TRUE;
