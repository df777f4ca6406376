-- Retention: the sweeper walks finished tasks oldest first by completion time. Only final
-- states set complete_time, so this index holds exactly the finished tasks.
CREATE INDEX tasks_finished ON tasks (complete_time, id) WHERE complete_time IS NOT NULL;
