-- migrate: no-transaction
-- compatible-with: 6
-- The claim reads queued tasks in due order on this index (src/db/claim.ts). Built
-- CONCURRENTLY, which cannot run in a transaction: the tasks table takes writes while it
-- builds. A build that failed leaves an INVALID index, which src/db/migrate.ts drops and builds
-- again. Builds from 6 on work without it, only slower to claim.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_run_at_idx ON tasks (run_at, id) WHERE state = 'queued';

-- The due index on scheduled_at that run_at replaced.
DROP INDEX CONCURRENTLY IF EXISTS tasks_due_idx;
