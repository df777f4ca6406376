-- The W3C `traceparent` of the request that submitted the task, so the attempt's span can link
-- back to the submit's across the queue (docs/logs-and-traces.md). Written only while trace
-- export is on: otherwise NULL, which costs a submit nothing. No index: it is only read back
-- with the claimed row.
ALTER TABLE tasks ADD COLUMN trace_parent TEXT;
