-- migrate: no-transaction
-- compatible-with: 13
-- The claim reads queued tasks in rank order (run_at - priority * aging) on this index
-- (src/db/claim.ts). Built CONCURRENTLY: the tasks table takes writes while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_rank_idx ON tasks (rank, id) WHERE state = 'queued';
-- GET /queues (depth by state) and the GET /tasks queue filter.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_queue_state_idx ON tasks (queue, state);
