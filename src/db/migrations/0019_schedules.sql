-- compatible-with: 6
-- Recurring schedules. A schedule's firings are keyed by (schedule_id, fire_at): the firing loop
-- inserts the row in the same statement as its task, so a fire time makes one task however many
-- scheduler replicas try (src/db/insert.ts). Missed and skipped fire times get a row too, without
-- a task, so that nothing is skipped silently. Tasks gain two nullable columns without defaults
-- (no rewrite); older builds neither write nor read them.
CREATE TABLE schedules (
  id uuid PRIMARY KEY,
  name text NOT NULL UNIQUE,
  cron text,
  every_ms bigint CHECK (every_ms > 0),
  time_zone text NOT NULL DEFAULT 'UTC',
  template jsonb NOT NULL,
  overlap text NOT NULL CHECK (overlap IN ('allow', 'skip', 'buffer_one', 'cancel_previous')),
  catch_up_window_ms bigint NOT NULL CHECK (catch_up_window_ms >= 0),
  catch_up_mode text NOT NULL CHECK (catch_up_mode IN ('all', 'latest', 'none')),
  paused boolean NOT NULL DEFAULT false,
  -- Where an `every` schedule counts its intervals from.
  anchor_at timestamptz NOT NULL,
  -- The first fire time not yet planned (created, skipped, missed or buffered).
  next_fire_at timestamptz,
  -- A fire time held back by overlap buffer_one until the live task ends.
  buffered_fire_at timestamptz,
  -- Fire times missed beyond the 100 recorded per pass (an outage far longer than the window).
  missed_unrecorded bigint NOT NULL DEFAULT 0,
  actor text,
  created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  CHECK ((cron IS NULL) <> (every_ms IS NULL))
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;

CREATE TABLE schedule_firings (
  schedule_id uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
  fire_at timestamptz NOT NULL,
  outcome text NOT NULL CHECK (outcome IN ('created', 'skipped', 'missed', 'buffered')),
  task_id uuid,
  reason text,
  recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (schedule_id, fire_at)
);

ALTER TABLE tasks ADD COLUMN schedule_id uuid, ADD COLUMN fire_at timestamptz;
