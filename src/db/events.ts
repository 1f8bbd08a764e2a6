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
