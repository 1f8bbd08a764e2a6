-- compatible-with: 6
-- Task dependencies (src/db/dependencies.ts). A task with parents is born `waiting` (blocked on
-- them; not in the claim's queued index) and released to `queued`, or ended, as its parents
-- end. Older builds never write `waiting` and never claim it (their claim reads queued rows
-- only), so they work against this; a waiting task they cancel is simply cancelled.
ALTER TABLE tasks DROP CONSTRAINT tasks_state_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_state_check
  CHECK (state IN ('waiting', 'queued', 'dispatched', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled'));

-- The task's own ref in the batch that declared it (null outside a DAG batch).
ALTER TABLE tasks ADD COLUMN ref text;
-- What a failed parent does to this task: cancel, skip or run; null for a task without parents.
ALTER TABLE tasks ADD COLUMN on_parent_failure text CHECK (on_parent_failure IN ('cancel', 'skip', 'run'));
-- Parents not yet resolved (final, and counted exactly once through their edge's flag).
ALTER TABLE tasks ADD COLUMN parents_pending integer NOT NULL DEFAULT 0 CHECK (parents_pending >= 0);
-- Set (by the statement that adds an edge, which so also locks the parent row) when a task has
-- children: the statements that end a task resolve its edges only then.
ALTER TABLE tasks ADD COLUMN has_children boolean NOT NULL DEFAULT false;
-- TQ_PARENT_<ref>_EXIT for each parent, written at release, merged into the env at dispatch.
ALTER TABLE tasks ADD COLUMN parent_env jsonb;

-- No foreign keys, on purpose: both ends are checked by the one statement that adds edges (it
-- writes the parent row and the child was just inserted), tasks are never deleted, and a
-- reference would stop every `TRUNCATE tasks` that does not name this table too. Whatever
-- deletes tasks one day deletes their edges with them.
CREATE TABLE task_dependencies (
  child_id  uuid NOT NULL,
  parent_id uuid NOT NULL,
  -- The name the child knows the parent by: its batch ref, or its id with '-' as '_'.
  ref       text NOT NULL,
  -- The parent ended and this edge was counted off the child's parents_pending (exactly once).
  resolved  boolean NOT NULL DEFAULT false,
  PRIMARY KEY (child_id, parent_id),
  CHECK (child_id <> parent_id)
);

CREATE INDEX task_dependencies_parent_idx ON task_dependencies (parent_id);
-- The sweep finds edges whose parent ended but that no statement resolved yet.
CREATE INDEX task_dependencies_unresolved_idx ON task_dependencies (parent_id) WHERE NOT resolved;
-- The sweep's other half: waiting tasks.
CREATE INDEX tasks_waiting_idx ON tasks (id) WHERE state = 'waiting';
