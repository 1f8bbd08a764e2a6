// SQL on task_attempts, one row per attempt. Rows are written inside the statements that
// change the task (src/db/insert.ts, claim.ts, transitions.ts), so an attempt and its task
// never disagree: each function here that returns a Fragment is one CTE of such a statement
// and names the CTE columns it reads. The reads are plain queries.
import type { Attempt } from "../task/attempt";
import type { AttemptResult, AttemptUsage } from "../task/task";
import type { Fragment } from "./encode";
import type { Sql } from "./sql";

/**
 * CTE `a_open`: opens an attempt for each row of `t` (the changed tasks) that is now
 * dispatched: a claim, or a task born dispatched on the run-now fast path.
 */
export function openAttempts(sql: Sql): Fragment {
  return sql`
    a_open AS (
      INSERT INTO task_attempts (task_id, attempt, worker_id, coordinator_id, dispatched_at)
      SELECT t.id, t.attempt, t.worker_id, t.coordinator_id, t.picked_at FROM t WHERE t.state = 'dispatched'
    )`;
}

/**
 * CTE `a_start`: the process of each row of `t` started (t.started_at, and the pid in
 * t.event_detail).
 */
export function startAttempts(sql: Sql): Fragment {
  return sql`
    a_start AS (
      UPDATE task_attempts SET started_at = t.started_at, pid = (t.event_detail ->> 'pid')::integer
      FROM t WHERE task_attempts.task_id = t.id AND task_attempts.attempt = t.attempt
    )`;
}

/**
 * CTE `a_end`: the worker's result for each row of `d` (finishAttempts' applied reports: the
 * task's id, the attempt, and the result's columns, its state as `outcome`, and `start_pid`,
 * the pid of a start merged into the finish) ends its attempt.
 */
export function finishAttemptRows(sql: Sql): Fragment {
  return sql`
    a_end AS (
      UPDATE task_attempts SET
        started_at = coalesce(task_attempts.started_at, d.started_at), finished_at = d.finished_at,
        pid = coalesce(task_attempts.pid, d.start_pid),
        exit_code = d.exit_code, signal = d.signal, error = d.error, stdout = d.stdout, stderr = d.stderr,
        stdout_truncated = d.stdout_truncated, stderr_truncated = d.stderr_truncated,
        stdout_replaced = d.stdout_replaced, stderr_replaced = d.stderr_replaced, outcome = d.outcome,
        limits_applied = d.limits_applied, limits = d.limits, cpu_user_us = d.cpu_user_us, cpu_system_us = d.cpu_system_us,
        peak_memory_bytes = d.peak_memory_bytes, oom_killed = d.oom_killed
      FROM d WHERE task_attempts.task_id = d.id AND task_attempts.attempt = d.attempt
    )`;
}

/**
 * CTE `a_end`: the current attempt of each row of `t` ended without a result, with `outcome`
 * (lost, interrupted or stopped) and the reason as its error. An attempt that already ended keeps its
 * outcome (a cancel of a task queued for its retry).
 */
export function endAttempts(sql: Sql, outcome: "lost" | "interrupted" | "stopped", reason: string | null): Fragment {
  return sql`
    a_end AS (
      UPDATE task_attempts SET outcome = ${outcome}, finished_at = clock_timestamp(), error = coalesce(${reason}::text, task_attempts.error)
      FROM t WHERE task_attempts.task_id = t.id AND task_attempts.attempt = t.attempt AND task_attempts.outcome IS NULL
    )`;
}

/**
 * The usage columns of a result, for the `unnest` of a statement that embeds finishAttemptRows
 * (each null when the worker did not measure).
 */
export function usageColumns<T>(usage: (item: T) => AttemptUsage | null | undefined) {
  const int = (value: number | null | undefined) =>
    value === null || value === undefined ? null : Math.max(0, Math.round(value));
  return {
    limits_applied: ["text", (item: T) => usage(item)?.limitsApplied ?? null],
    limits: ["jsonb", (item: T) => usage(item)?.limits ?? null],
    cpu_user_us: ["bigint", (item: T) => int(usage(item)?.cpuUserUs)],
    cpu_system_us: ["bigint", (item: T) => int(usage(item)?.cpuSystemUs)],
    peak_memory_bytes: ["bigint", (item: T) => int(usage(item)?.peakMemoryBytes)],
    oom_killed: ["boolean", (item: T) => usage(item)?.oomKilled ?? null],
  } as const;
}

/**
 * What a result the task did not take (stale) or a stopped attempt used, on its row: one
 * statement per rare report, so plain parameters. Changes nothing when the worker did not measure.
 */
export async function recordUsage(
  sql: Sql,
  ref: { taskId: string; attempt: number; workerId: string },
  usage: AttemptResult["usage"],
): Promise<void> {
  if (!usage) return;
  const int = (value: number | null) => (value === null ? null : Math.max(0, Math.round(value)));
  await sql`
    UPDATE task_attempts SET limits_applied = ${usage.limitsApplied}, limits = ${JSON.stringify(usage.limits)}::text::jsonb,
      cpu_user_us = ${int(usage.cpuUserUs)}::bigint, cpu_system_us = ${int(usage.cpuSystemUs)}::bigint,
      peak_memory_bytes = ${int(usage.peakMemoryBytes)}::bigint, oom_killed = ${usage.oomKilled}
    WHERE task_id = ${ref.taskId} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId}`;
}

/** Every attempt of a task, first to last. */
export async function listAttempts(sql: Sql, taskId: string): Promise<Attempt[]> {
  return sql<Attempt[]>`SELECT * FROM task_attempts WHERE task_id = ${taskId} ORDER BY attempt`;
}
