-- Resource limits and usage. A task keeps the limits it asked for (null: none, each worker's
-- maxima apply); each attempt keeps how its worker enforced them, the limits that held, and
-- what it used. Every column is nullable with no default, so adding them rewrites nothing, and
-- a role built before them keeps working (it neither writes nor reads them).
ALTER TABLE tasks ADD COLUMN limits jsonb;

ALTER TABLE task_attempts
  ADD COLUMN limits_applied    text CHECK (limits_applied IN ('cgroup-v1', 'cgroup-v2', 'rlimit', 'none')),
  -- {memory_mb, pids, nofile, cpu}, each null when no such limit held.
  ADD COLUMN limits            jsonb,
  ADD COLUMN cpu_user_us       bigint CHECK (cpu_user_us >= 0),
  ADD COLUMN cpu_system_us     bigint CHECK (cpu_system_us >= 0),
  ADD COLUMN peak_memory_bytes bigint CHECK (peak_memory_bytes >= 0),
  ADD COLUMN oom_killed        boolean;
