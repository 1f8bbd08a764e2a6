// SQL on task_events, the append-only history. Rows are written by the state-change
// statements in tasks.ts; this module reads them.
import type { Sql } from "./sql";

export interface TaskEventRow {
  id: string;
  task_id: string;
  at: Date;
  kind: string;
  state: string;
  attempt: number;
  worker_id: string | null;
  detail: Record<string, unknown> | null;
}

export async function listTaskEvents(sql: Sql, taskId: string): Promise<TaskEventRow[]> {
  return sql<TaskEventRow[]>`
    SELECT id::text AS id, task_id, at, kind, state, attempt, worker_id, detail
    FROM task_events WHERE task_id = ${taskId} ORDER BY id`;
}

/** The newest event of a task: the change its current state came from. */
export async function lastTaskEvent(sql: Sql, taskId: string): Promise<TaskEventRow | null> {
  const rows = await sql<TaskEventRow[]>`
    SELECT id::text AS id, task_id, at, kind, state, attempt, worker_id, detail
    FROM task_events WHERE task_id = ${taskId} AND kind <> 'stale' ORDER BY id DESC LIMIT 1`;
  return rows[0] ?? null;
}
