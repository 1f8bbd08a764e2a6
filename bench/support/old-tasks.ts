// Old history, fast: final tasks that ended `ageDays` ago, each with the rows a real run
// leaves (4 events: submitted, dispatched, started, succeeded; 1 attempt), written by
// generate_series INSERTs in chunks, so a million rows take seconds rather than a million
// submits. Used by the retention bench to give the pruner a backlog.
import type { Sql } from "../../src/db/sql";

/** Rows per generated task: the task, its 4 events, its attempt. */
export const ROWS_PER_OLD_TASK = 6;

export interface OldRows {
  tasks: number;
  task_events: number;
  task_attempts: number;
  /** All of them. */
  rows: number;
}

/** Inserts `tasks` succeeded tasks that ended about `ageDays` ago (1 ms apart), in chunks of `chunk`. */
export async function insertOldTasks(sql: Sql, tasks: number, ageDays: number, chunk = 50_000): Promise<OldRows> {
  const total: OldRows = { tasks: 0, task_events: 0, task_attempts: 0, rows: 0 };
  for (let from = 0; from < tasks; from += chunk) {
    const n = Math.min(chunk, tasks - from);
    const [row] = await sql<{ tasks: number; task_events: number; task_attempts: number }[]>`
      WITH s AS (
        SELECT gen_random_uuid() AS id,
               clock_timestamp() - make_interval(days => ${ageDays}) - make_interval(secs => (${from} + g) / 1000.0) AS at
        FROM generate_series(1, ${n}) g
      ),
      t AS (
        INSERT INTO tasks (id, command, state, scheduled_at, run_at, created_at, picked_at, started_at, completed_at,
                           attempt, exit_code, worker_id, coordinator_id)
        SELECT id, 'true', 'succeeded', at, at, at, at, at, at + interval '2 ms', 1, 0, 'bench-old-worker', 'bench-old'
        FROM s
        RETURNING id, created_at
      ),
      e AS (
        INSERT INTO task_events (task_id, at, kind, state, attempt, worker_id)
        SELECT t.id, t.created_at, k.kind, k.state, k.attempt, 'bench-old-worker'
        FROM t CROSS JOIN (VALUES ('submitted', 'queued', 0), ('dispatched', 'dispatched', 1),
                                  ('started', 'running', 1), ('succeeded', 'succeeded', 1)) AS k(kind, state, attempt)
        RETURNING 1
      ),
      a AS (
        INSERT INTO task_attempts (task_id, attempt, worker_id, coordinator_id, dispatched_at, started_at, finished_at,
                                   exit_code, outcome)
        SELECT id, 1, 'bench-old-worker', 'bench-old', created_at, created_at, created_at + interval '2 ms', 0, 'succeeded'
        FROM t
        RETURNING 1
      )
      SELECT (SELECT count(*) FROM t)::int AS tasks, (SELECT count(*) FROM e)::int AS task_events,
             (SELECT count(*) FROM a)::int AS task_attempts`;
    total.tasks += row?.tasks ?? 0;
    total.task_events += row?.task_events ?? 0;
    total.task_attempts += row?.task_attempts ?? 0;
  }
  total.rows = total.tasks + total.task_events + total.task_attempts;
  return total;
}
