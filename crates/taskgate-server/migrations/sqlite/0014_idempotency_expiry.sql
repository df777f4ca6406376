-- Idempotency keys live 24 hours; the retention sweeper deletes older ones oldest first
-- through this index, so the table holds about a day of keys rather than every key ever sent.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
