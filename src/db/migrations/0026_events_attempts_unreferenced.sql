-- compatible-with: 6
-- task_events and task_attempts lose their foreign keys to tasks (issue 16: the queue's cost
-- per task). Each key cost a check on every insert (`SELECT 1 FROM ONLY tasks ... FOR KEY
-- SHARE`, one per event and per attempt: about five a task) and, on each task deleted, a
-- cascade that finds nothing, as retention deletes them itself.
--
-- Why no row can be left without its task:
-- - Every insert of either table takes its task from the rows its own statement inserts or
--   updates (src/db/changes.ts, attempts.ts openAttempts), which hold the task's row lock; the
--   few that only read the task (a stale result or hand-back, a stopped attempt:
--   src/db/transitions.ts) lock it FOR KEY SHARE, as the key's check did.
-- - The one deleter of tasks, retention (src/db/retention.ts), locks the tasks it prunes FOR
--   UPDATE first and then deletes them with their events and attempts in one statement: a
--   writer waits for it and then finds the task gone, and writes nothing.
-- As with task_dependencies (0016), a `TRUNCATE tasks` now names these tables too.
-- task_log_chunks keeps its key: retention deletes a task's chunks through its cascade.
ALTER TABLE task_events DROP CONSTRAINT IF EXISTS task_events_task_id_fkey;
ALTER TABLE task_attempts DROP CONSTRAINT IF EXISTS task_attempts_task_id_fkey;
