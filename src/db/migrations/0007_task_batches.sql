-- compatible-with: 6
-- (A build at 6 has no batch endpoint and never reads this table.)
-- The Idempotency-Key of a POST /tasks/batch: the batch it first created, so that a repeat
-- returns the same tasks and creates nothing, and the same key with a different batch is a
-- 409. Batch keys are their own namespace, apart from tasks.idempotency_key. task_ids holds
-- the ids the batch's items were given, in order (an item replayed through its own key is
-- found by that key instead).
CREATE TABLE task_batches (
  idempotency_key text PRIMARY KEY,
  request_hash    text NOT NULL,
  task_ids        uuid[] NOT NULL,
  actor           text,
  created_at      timestamptz(3) NOT NULL DEFAULT clock_timestamp()
);
