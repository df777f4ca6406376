-- Every change to a task's state or progress sends a NOTIFY naming the task, so a request
-- waiting on it (`Prefer: wait`, `streamTask`) on any node wakes without polling. A trigger
-- rather than a statement in each write: it cannot be forgotten by a new write, and it costs no
-- extra round trip on the claim and final-state paths. Lease renewals that change neither
-- column notify nothing. Payloads stay under PostgreSQL's 8000-byte limit: ids are grouped by
-- their running length, about 7000 bytes per notification.
CREATE FUNCTION taskgate_tasks_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    chunk text;
BEGIN
    FOR chunk IN
        SELECT string_agg(c.id, ',')
        FROM (
            SELECT n.id, (sum(length(n.id) + 1) OVER (ORDER BY n.id)) / 7000 AS grp
            FROM changed_new n JOIN changed_old o ON o.id = n.id
            WHERE n.state IS DISTINCT FROM o.state OR n.progress IS DISTINCT FROM o.progress
        ) c
        GROUP BY c.grp
    LOOP
        PERFORM pg_notify('taskgate', 'changed:' || chunk);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_changed
    AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION taskgate_tasks_changed();
