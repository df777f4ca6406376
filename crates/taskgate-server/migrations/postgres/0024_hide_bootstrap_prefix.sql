-- A bootstrap key (TASKGATE_API_KEY) is chosen by the operator and may be short, so the first
-- ten characters stored as its prefix could be most of it. New ones store a fingerprint of the
-- hash instead (auth::key_prefix); the hash of an old one is not reversible here, so its prefix
-- is hidden.
UPDATE api_keys SET prefix = '(hidden)' WHERE name = 'TASKGATE_API_KEY';
