-- compatible-with: 6
-- (Builds before it insert tasks without run_at, which is NOT NULL from here: stop them first.)
-- The requested time is kept, and every attempt has its own record.

-- scheduled_at is the time the client asked for and never changes; run_at is when the current
-- or next attempt becomes due (a retry's backoff moves it). Existing rows are due when they
-- were scheduled (an earlier retry may already have overwritten their scheduled_at: that time
-- is lost, run_at takes it too).
ALTER TABLE tasks ADD COLUMN run_at timestamptz(3);
UPDATE tasks SET run_at = scheduled_at;
ALTER TABLE tasks ALTER COLUMN run_at SET NOT NULL;

-- The claim's index on run_at is built by a later migration, concurrently (outside a
-- transaction), so that a big tasks table stays writable meanwhile.

-- One row per attempt, written by the same statements that change the task: a claim (or the
-- run-now fast path) opens it, the worker's reports fill it in, and whatever ends the attempt
-- sets its outcome. The task row shows only the current attempt; these keep every one.
CREATE TABLE task_attempts (
  task_id          uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
  attempt          integer NOT NULL CHECK (attempt >= 1),
  worker_id        text NOT NULL,
  coordinator_id   text,
  dispatched_at    timestamptz(3) NOT NULL,
  started_at       timestamptz(3),
  finished_at      timestamptz(3),
  pid              integer,
  exit_code        integer,
  signal           text,
  error            text,
  stdout           text,
  stderr           text,
  stdout_truncated boolean NOT NULL DEFAULT false,
  stderr_truncated boolean NOT NULL DEFAULT false,
  -- Null while the attempt holds its task. src/task/attempt.ts says what each one means.
  outcome          text CHECK (outcome IN ('succeeded', 'failed', 'timed_out', 'lost', 'stopped', 'stale')),
  PRIMARY KEY (task_id, attempt)
);

-- Attempts made before this migration, rebuilt from their history: each dispatch opened one,
-- its first result, requeue or cancel ended it.
INSERT INTO task_attempts (task_id, attempt, worker_id, coordinator_id, dispatched_at, started_at, finished_at, pid,
                           exit_code, signal, error, stdout, stderr, stdout_truncated, stderr_truncated, outcome)
SELECT d.task_id, d.attempt, coalesce(d.worker_id, ''),
       CASE WHEN t.attempt = d.attempt THEN t.coordinator_id END,
       d.at,
       CASE WHEN t.attempt = d.attempt THEN coalesce(t.started_at, s.at) ELSE s.at END,
       f.at, (s.detail ->> 'pid')::integer,
       (f.detail ->> 'exit_code')::integer, f.detail ->> 'signal',
       coalesce(f.detail ->> 'error', f.detail ->> 'reason'),
       f.detail ->> 'stdout', f.detail ->> 'stderr',
       coalesce((f.detail ->> 'stdout_truncated')::boolean, false), coalesce((f.detail ->> 'stderr_truncated')::boolean, false),
       CASE f.kind WHEN 'requeued' THEN 'lost' WHEN 'cancelled' THEN 'stopped' ELSE f.kind END
FROM task_events d
JOIN tasks t ON t.id = d.task_id
LEFT JOIN LATERAL (
  SELECT at, detail FROM task_events
  WHERE task_id = d.task_id AND attempt = d.attempt AND kind = 'started' ORDER BY id LIMIT 1
) s ON true
LEFT JOIN LATERAL (
  SELECT at, kind, detail FROM task_events
  WHERE task_id = d.task_id AND attempt = d.attempt AND id > d.id
    AND kind IN ('succeeded', 'failed', 'timed_out', 'requeued', 'cancelled')
  ORDER BY id LIMIT 1
) f ON true
WHERE d.kind IN ('dispatched', 'submitted+dispatched') AND d.attempt >= 1
ON CONFLICT DO NOTHING;
