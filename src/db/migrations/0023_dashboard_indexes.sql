-- migrate: no-transaction
-- compatible-with: 21
-- The dashboard's overview charts the last hour's attempts by when they ended and started
-- (src/db/overview.ts): a range scan each, not a pass over every attempt ever made.
-- Concurrently: a plain CREATE INDEX would hold writes on task_attempts for the whole build.
CREATE INDEX CONCURRENTLY IF NOT EXISTS task_attempts_finished_idx ON task_attempts (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS task_attempts_started_idx ON task_attempts (started_at) WHERE started_at IS NOT NULL;
-- The task list's key filter (GET /tasks?key=), newest first.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_concurrency_key_idx ON tasks (concurrency_key, id) WHERE concurrency_key IS NOT NULL;
