-- compatible-with: 13
-- Queues, priorities and labels (src/db/claim.ts, src/db/queues.ts). Builds from 13 keep
-- working against this: every new column has a default, and the triggers keep `rank` and the
-- queues' live counts true whoever writes the row.

-- A task's queue, what it requires of a worker's labels and what it prefers (weights), and how
-- long it may wait for a worker before it fails (0: forever).
ALTER TABLE tasks
  ADD COLUMN queue text NOT NULL DEFAULT 'default',
  ADD COLUMN requires jsonb NOT NULL DEFAULT '[]'::jsonb,
  ADD COLUMN prefers jsonb NOT NULL DEFAULT '[]'::jsonb,
  ADD COLUMN schedule_timeout_ms integer NOT NULL DEFAULT 0 CHECK (schedule_timeout_ms >= 0),
  -- The aging the submitting role was configured with (TQ_PRIORITY_AGING_MS): rank uses it.
  ADD COLUMN priority_aging_ms integer NOT NULL DEFAULT 1000 CHECK (priority_aging_ms >= 0),
  -- The claim's order: run_at - priority * priority_aging_ms. A task of priority p is passed by
  -- one of priority q > p only while that one has waited less than (q - p) * aging.
  ADD COLUMN rank timestamptz(3);

CREATE FUNCTION tq_task_rank() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.rank := NEW.run_at - make_interval(secs => NEW.priority::double precision * NEW.priority_aging_ms / 1000);
  RETURN NEW;
END $$;
-- Every writer of run_at (insert, retry backoff, requeue) gets a true rank, old builds too.
CREATE TRIGGER tasks_rank BEFORE INSERT OR UPDATE OF run_at, priority, priority_aging_ms ON tasks
  FOR EACH ROW EXECUTE FUNCTION tq_task_rank();
UPDATE tasks SET rank = run_at WHERE state = 'queued';

-- Named queues: created on first use (the insert trigger below) or by PATCH /queues/:name.
-- `live` counts the queue's dispatched and running tasks, kept only while it has a limit: the
-- claim reads it under the row's lock, which serialises the claims of every coordinator for a
-- limited queue and never for an unlimited one.
CREATE TABLE queues (
  name              text PRIMARY KEY,
  concurrency_limit integer CHECK (concurrency_limit IS NULL OR concurrency_limit >= 0),
  paused            boolean NOT NULL DEFAULT false,
  live              integer NOT NULL DEFAULT 0,
  created_at        timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  updated_at        timestamptz(3) NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO queues (name) VALUES ('default') ON CONFLICT DO NOTHING;

CREATE FUNCTION tq_queue_live() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  was boolean := TG_OP = 'UPDATE' AND OLD.state IN ('dispatched', 'running');
  now_live boolean := NEW.state IN ('dispatched', 'running');
BEGIN
  IF was AND NOT now_live THEN
    UPDATE queues SET live = greatest(0, live - 1) WHERE name = OLD.queue AND concurrency_limit IS NOT NULL;
  ELSIF now_live AND NOT was THEN
    UPDATE queues SET live = live + 1 WHERE name = NEW.queue AND concurrency_limit IS NOT NULL;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER tasks_queue_live_update AFTER UPDATE OF state ON tasks
  FOR EACH ROW WHEN ((OLD.state IN ('dispatched', 'running')) IS DISTINCT FROM (NEW.state IN ('dispatched', 'running')))
  EXECUTE FUNCTION tq_queue_live();
CREATE TRIGGER tasks_queue_live_insert AFTER INSERT ON tasks
  FOR EACH ROW WHEN (NEW.state IN ('dispatched', 'running'))
  EXECUTE FUNCTION tq_queue_live();

CREATE FUNCTION tq_queue_first_use() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO queues (name) SELECT DISTINCT queue FROM new_tasks WHERE queue <> 'default' ON CONFLICT DO NOTHING;
  RETURN NULL;
END $$;
CREATE TRIGGER tasks_queue_first_use AFTER INSERT ON tasks
  REFERENCING NEW TABLE AS new_tasks FOR EACH STATEMENT EXECUTE FUNCTION tq_queue_first_use();

-- The queues a worker serves (a JSON array); NULL: every queue. For the waiting reason.
ALTER TABLE workers ADD COLUMN queues jsonb;

-- A label value as a number, or NULL when it is not one (comparisons then do not match).
CREATE FUNCTION tq_label_number(value text) RETURNS numeric LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN value ~ '^-?[0-9]+(\.[0-9]+)?$' THEN value::numeric END
$$;

-- Whether a worker's labels satisfy one requirement {key, op, value} (src/task/labels.ts).
CREATE FUNCTION tq_label_matches(req jsonb, labels jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT coalesce(CASE req->>'op'
    WHEN 'exists' THEN labels ? (req->>'key')
    WHEN '=' THEN labels->>(req->>'key') = req->>'value'
    WHEN '!=' THEN labels->>(req->>'key') IS DISTINCT FROM req->>'value'
    WHEN '>' THEN tq_label_number(labels->>(req->>'key')) > tq_label_number(req->>'value')
    WHEN '>=' THEN tq_label_number(labels->>(req->>'key')) >= tq_label_number(req->>'value')
    WHEN '<' THEN tq_label_number(labels->>(req->>'key')) < tq_label_number(req->>'value')
    WHEN '<=' THEN tq_label_number(labels->>(req->>'key')) <= tq_label_number(req->>'value')
  END, false)
$$;

-- Every requirement holds (an empty list always does).
CREATE FUNCTION tq_labels_match(requires jsonb, labels jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT requires = '[]'::jsonb OR NOT EXISTS (
    SELECT 1 FROM jsonb_array_elements(requires) r WHERE NOT tq_label_matches(r, labels))
$$;

-- The sum of the weights of the preferences the labels satisfy.
CREATE FUNCTION tq_labels_score(prefers jsonb, labels jsonb) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN prefers = '[]'::jsonb THEN 0 ELSE (
    SELECT coalesce(sum((p->>'weight')::integer), 0)::integer FROM jsonb_array_elements(prefers) p WHERE tq_label_matches(p, labels)) END
$$;
