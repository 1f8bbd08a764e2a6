-- Interrupted attempts do not use up a task's attempts, and workers' clock skew is kept.

-- Attempts that ended interrupted: handed back by a draining worker, or never delivered
-- because a coordinator stopped or its worker left before the assignment went out. They are
-- not the task's failures: the retry decisions count attempt - interruptions against
-- max_attempts, while attempt stays the fencing token that only rises. Existing rows had no
-- such attempts counted apart, so 0 keeps their count as it was.
ALTER TABLE tasks ADD COLUMN interruptions integer NOT NULL DEFAULT 0 CHECK (interruptions >= 0);

-- An attempt's outcome may now be interrupted (src/task/attempt.ts says what each one means).
ALTER TABLE task_attempts DROP CONSTRAINT IF EXISTS task_attempts_outcome_check;
ALTER TABLE task_attempts ADD CONSTRAINT task_attempts_outcome_check
  CHECK (outcome IN ('succeeded', 'failed', 'timed_out', 'lost', 'interrupted', 'stopped', 'stale'));

-- The worker's wall clock minus the coordinator's when it said Hello (positive: it runs
-- ahead); null for a worker that did not say its time.
ALTER TABLE workers ADD COLUMN clock_skew_ms integer;
