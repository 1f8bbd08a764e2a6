-- Flow control: per-key concurrency and named rate limits (src/db/flow.ts holds the SQL that
-- reads and writes these). No compatible-with header: an older build's claim knows neither
-- rule and would dispatch past them, so only builds that know this migration run against it.

-- A task's concurrency key (expanded at creation), the most tasks with that key that may be
-- live (dispatched or running) at once, and what a submit does when the key is full; its rate
-- limit (by name) and the bucket of that limit it draws from ('' for the limit's own bucket).
ALTER TABLE tasks
  ADD COLUMN concurrency_key text,
  ADD COLUMN concurrency_max integer,
  ADD COLUMN concurrency_strategy text,
  ADD COLUMN rate_limit text,
  ADD COLUMN rate_limit_key text;

-- The live tasks of a key, counted by the claim (a partial index: live tasks are few).
CREATE INDEX tasks_concurrency_live_idx ON tasks (concurrency_key)
  WHERE concurrency_key IS NOT NULL AND state IN ('dispatched', 'running');
-- The queued tasks of a key, in the claim's order (rank) (the strategies' and waiting reasons' reads).
CREATE INDEX tasks_concurrency_queued_idx ON tasks (concurrency_key, rank, id)
  WHERE concurrency_key IS NOT NULL AND state = 'queued';

-- One row per key, written only by claims: a claim locks the rows of the keys it admits from
-- (SKIP LOCKED: it never waits) and raises `claims`; a claim whose snapshot is older than the
-- row's latest claim skips the key, so the live count it read is never missing a claim.
CREATE TABLE concurrency_keys (
  key text PRIMARY KEY,
  claims bigint NOT NULL DEFAULT 0
);

-- Named token buckets: `rate_count` tokens every `period_ms`, holding at most `burst`.
CREATE TABLE rate_limits (
  name text PRIMARY KEY,
  rate_count integer NOT NULL CHECK (rate_count > 0),
  period_ms bigint NOT NULL CHECK (period_ms > 0),
  burst integer NOT NULL CHECK (burst > 0),
  created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A bucket's tokens as of updated_at; the claim refills them arithmetically up to the burst.
CREATE TABLE rate_buckets (
  name text NOT NULL REFERENCES rate_limits (name) ON DELETE CASCADE,
  key text NOT NULL,
  tokens double precision NOT NULL,
  updated_at timestamptz NOT NULL,
  PRIMARY KEY (name, key)
);

-- The queued tasks of a bucket, in the claim's order (the claim's rank of a task in its bucket).
CREATE INDEX tasks_rate_limit_queued_idx ON tasks (rate_limit, rate_limit_key, rank, id)
  WHERE rate_limit IS NOT NULL AND state = 'queued';
