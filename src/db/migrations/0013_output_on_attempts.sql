-- compatible-with: 6
-- A task's output is stored once, on its attempt (task_attempts); every read takes it from the
-- task's current attempt. The output columns of tasks stay for now (expand/contract: a later
-- release drops them): older builds still write them, which is harmless, as nothing reads them,
-- and they write the attempt row too (every build from 6 on does), so each works against this.
--
-- A current attempt whose row lacks the output its task holds (rebuilt from history by 0006, or
-- written before the replaced flags existed) takes it from the task, which was its copy.
UPDATE task_attempts a SET
  stdout = t.stdout, stderr = t.stderr,
  stdout_truncated = t.stdout_truncated, stderr_truncated = t.stderr_truncated,
  stdout_replaced = t.stdout_replaced, stderr_replaced = t.stderr_replaced
FROM tasks t
WHERE a.task_id = t.id AND a.attempt = t.attempt
  AND (t.stdout IS NOT NULL OR t.stderr IS NOT NULL)
  AND a.stdout IS NULL AND a.stderr IS NULL;
