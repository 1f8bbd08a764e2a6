-- Claims read queued tasks in due order. The first claim index led with priority, so with
-- many tasks waiting in the future and none due, every claim walked past all of them (no
-- index skip scan before PostgreSQL 18). Priorities are not in use yet; their issue brings an
-- ordering that stays cheap with a large future backlog.
DROP INDEX IF EXISTS tasks_claim_idx;
CREATE INDEX tasks_due_idx ON tasks (scheduled_at, id) WHERE state = 'queued';
