-- migrate: no-transaction
-- compatible-with: 6
-- Retention (src/db/retention.ts) finds final tasks by when they ended, oldest first, a small
-- batch at a time: this index holds final tasks only, so live ones never cost it anything and
-- a batch reads just the rows it deletes. The end time is the first of the three end columns
-- set, falling back to created_at, so that no final task escapes it. Built concurrently: a
-- plain CREATE INDEX would hold writes on tasks for the whole build.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_final_ended_idx
  ON tasks ((coalesce(completed_at, failed_at, cancelled_at, created_at)), id)
  WHERE state IN ('succeeded', 'failed', 'timed_out', 'cancelled');
-- Batch idempotency keys and schedule firings past the retention window, oldest first.
CREATE INDEX CONCURRENTLY IF NOT EXISTS task_batches_created_idx ON task_batches (created_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS schedule_firings_fire_at_idx ON schedule_firings (fire_at);
