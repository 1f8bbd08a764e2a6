-- migrate: no-transaction
-- compatible-with: 6
-- GET /tasks?schedule_id= and the overlap check read a schedule's tasks newest first. Built
-- concurrently: a plain CREATE INDEX would hold writes on tasks for the whole build.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_schedule_idx ON tasks (schedule_id, id) WHERE schedule_id IS NOT NULL;
