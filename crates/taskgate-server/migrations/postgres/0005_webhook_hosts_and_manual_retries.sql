-- The receiver a delivery goes to, `scheme://host[:port]` (URLs are stored normalised, so the
-- default port never appears): the deliverer limits requests per host, and leaves hosts that
-- are saturated or failing out of its claims instead of claiming and deferring their rows.
-- Generated, so the outbox writes in the task engine need not know about it.
ALTER TABLE webhook_deliveries ADD COLUMN host TEXT
    GENERATED ALWAYS AS (COALESCE(substring(url from '^[^:/]+://[^/?#]*'), url)) STORED;

-- A circuit that opens moves its host's pending rows in one statement.
CREATE INDEX webhook_deliveries_host_due ON webhook_deliveries (host, next_attempt_at)
    WHERE state = 'pending';

-- When a person last asked for this delivery to be sent again: manual retries are rate-limited
-- per delivery, on every node alike.
ALTER TABLE webhook_deliveries ADD COLUMN last_manual_retry_at BIGINT;
