-- compatible-with: 6
-- Whether the worker replaced bytes of a stream's output that text cannot hold (a NUL byte,
-- bytes that are not UTF-8) with U+FFFD, on the task (its current attempt) and on each attempt.
-- Adding a column with a constant default rewrites nothing, so this is safe on a big table
-- while older roles run: they never read or write these columns, which stay false for their
-- results, so every build from 6 on works against it.
ALTER TABLE tasks
  ADD COLUMN stdout_replaced boolean NOT NULL DEFAULT false,
  ADD COLUMN stderr_replaced boolean NOT NULL DEFAULT false;

ALTER TABLE task_attempts
  ADD COLUMN stdout_replaced boolean NOT NULL DEFAULT false,
  ADD COLUMN stderr_replaced boolean NOT NULL DEFAULT false;
