-- Fault tolerance: leases on dispatched tasks, per-task retry policy, idempotent submits.

-- A dispatched or running task is held under a lease, renewed while its worker reports it in
-- heartbeats. Any coordinator requeues a task whose lease lapsed (its worker or coordinator
-- died, or the assignment never arrived).
ALTER TABLE tasks ADD COLUMN lease_expires_at timestamptz(3);
CREATE INDEX tasks_lease_idx ON tasks (lease_expires_at) WHERE state IN ('dispatched', 'running');

-- What is retried while attempts remain, and the exponential backoff between attempts
-- (resolved from the global defaults at submit time).
ALTER TABLE tasks
  ADD COLUMN retry_on_failure boolean NOT NULL DEFAULT true,
  ADD COLUMN retry_on_timeout boolean NOT NULL DEFAULT true,
  ADD COLUMN retry_on_lost boolean NOT NULL DEFAULT true,
  ADD COLUMN retry_backoff_base_ms integer NOT NULL DEFAULT 1000 CHECK (retry_backoff_base_ms >= 0),
  ADD COLUMN retry_backoff_cap_ms integer NOT NULL DEFAULT 60000 CHECK (retry_backoff_cap_ms >= 0);

-- A client's Idempotency-Key: a repeated submit returns the original task. The hash of the
-- request tells a true repeat from a key reused for something else.
ALTER TABLE tasks
  ADD COLUMN idempotency_key text,
  ADD COLUMN idempotency_hash text;
CREATE UNIQUE INDEX tasks_idempotency_key_idx ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Tasks in flight before this migration keep running under a fresh lease.
UPDATE tasks SET lease_expires_at = clock_timestamp() + interval '1 minute'
WHERE state IN ('dispatched', 'running');
