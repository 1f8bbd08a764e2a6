-- migrate: no-transaction
-- compatible-with: 13
-- The claim reads queued tasks in rank order (run_at - priority * aging) on this index
-- (src/db/claim.ts). Built CONCURRENTLY: the tasks table takes writes while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_rank_idx ON tasks (rank, id) WHERE state = 'queued';
-- GET /queues (depth by state) and the GET /tasks queue filter.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_queue_state_idx ON tasks (queue, state);
-- The schedule_timeout_ms sweep (src/db/waiting.ts) reads only the queued tasks that have one.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_schedule_timeout_idx ON tasks (run_at) WHERE state = 'queued' AND schedule_timeout_ms > 0;
