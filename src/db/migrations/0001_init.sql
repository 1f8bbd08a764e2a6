-- Tasks, their history, and the worker registry. States are documented in src/task/state.ts.

CREATE TABLE tasks (
  id             uuid PRIMARY KEY,
  command        text NOT NULL CHECK (command <> ''),
  state          text NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'dispatched', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled')),
  -- Higher runs first among due tasks; reserved for the priorities issue, 0 for now.
  priority       integer NOT NULL DEFAULT 0,
  scheduled_at   timestamptz(3) NOT NULL,
  created_at     timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  picked_at      timestamptz(3),
  started_at     timestamptz(3),
  completed_at   timestamptz(3),
  failed_at      timestamptz(3),
  cancelled_at   timestamptz(3),
  -- The attempt number is the fencing token: a claim raises it, and every report names it.
  attempt        integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
  max_attempts   integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
  timeout_ms     integer NOT NULL DEFAULT 0 CHECK (timeout_ms >= 0),
  env            jsonb NOT NULL DEFAULT '{}'::jsonb,
  cwd            text,
  -- The worker that holds (or last held) the task, and the coordinator it was connected to.
  worker_id      text,
  coordinator_id text,
  exit_code      integer,
  signal         text,
  stdout         text,
  stderr         text,
  stdout_truncated boolean NOT NULL DEFAULT false,
  stderr_truncated boolean NOT NULL DEFAULT false,
  error          text
);

-- The claim reads only queued rows, in the order it dispatches them.
CREATE INDEX tasks_claim_idx ON tasks (priority DESC, scheduled_at, id) WHERE state = 'queued';
-- Rescue finds a lost worker's tasks.
CREATE INDEX tasks_in_flight_idx ON tasks (worker_id) WHERE state IN ('dispatched', 'running');
-- Listing by state, newest first (ids are UUIDv7, so id order is creation order).
CREATE INDEX tasks_state_id_idx ON tasks (state, id DESC);

CREATE TABLE task_events (
  id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  task_id   uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
  at        timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  -- submitted, dispatched, started, succeeded, failed, timed_out, cancelled, requeued, stale
  kind      text NOT NULL,
  -- The task's state after the event.
  state     text NOT NULL,
  attempt   integer NOT NULL,
  worker_id text,
  detail    jsonb
);

CREATE INDEX task_events_task_idx ON task_events (task_id, id);

CREATE TABLE workers (
  id                text PRIMARY KEY,
  name              text NOT NULL,
  coordinator_id    text NOT NULL,
  slots             integer NOT NULL CHECK (slots >= 0),
  -- Reserved for the worker-labels issue.
  labels            jsonb NOT NULL DEFAULT '{}'::jsonb,
  version           text NOT NULL DEFAULT '',
  state             text NOT NULL CHECK (state IN ('connected', 'draining', 'gone')),
  connected_at      timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  last_heartbeat_at timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  disconnected_at   timestamptz(3)
);

CREATE INDEX workers_live_idx ON workers (coordinator_id) WHERE state <> 'gone';
