// SQL on task_events, the append-only history. Rows are written by the state-change
// statements in tasks.ts; this module reads them.
import type { Task } from "../task/task";
import type { Sql } from "./sql";
import { currentAttempt, outputColumns, taskRowColumns } from "./tasks";

export interface TaskEventRow {
  /** bigint, as text. */
  id: string;
  task_id: string;
  at: Date;
  kind: string;
  /** The task's state after the event. */
  state: string;
  attempt: number;
  worker_id: string | null;
  /** The API token (by name) that asked for the change. */
  actor: string | null;
  detail: Record<string, unknown> | null;
}

/**
 * Every event of a task, in order. Ordered by the table's column: `ORDER BY id` would sort by
 * the output column `id::text` ("10" before "7").
 */
export async function listTaskEvents(sql: Sql, taskId: string): Promise<TaskEventRow[]> {
  return sql<TaskEventRow[]>`
    SELECT id::text AS id, task_id, at, kind, state, attempt, worker_id, actor, detail
    FROM task_events WHERE task_id = ${taskId} ORDER BY task_events.id`;
}

/** Up to `limit` events of a task after the event `after` (a task_events id; "0": from the start), in order. */
export async function listTaskEventsAfter(sql: Sql, taskId: string, after: string, limit: number): Promise<TaskEventRow[]> {
  return sql<TaskEventRow[]>`
    SELECT id::text AS id, task_id, at, kind, state, attempt, worker_id, actor, detail
    FROM task_events WHERE task_id = ${taskId} AND id > ${after}::bigint ORDER BY task_events.id LIMIT ${limit}`;
}

export interface TaskSince {
  task: Task;
  /** Events after the one asked for, in order (at most the limit). */
  events: TaskEventRow[];
  /** The newest event of the task, whether or not listed ("0" when it has none). */
  lastEventId: string;
}

/**
 * A task and its events after `after`, read in one statement so they agree: every change the
 * row shows is among the events or before `after`.
 */
export async function readTaskSince(sql: Sql, id: string, after: string, limit: number): Promise<TaskSince | null> {
  const rows = await sql<(Task & { since_events: (Omit<TaskEventRow, "at"> & { at: string })[]; last_event_id: string })[]>`
    SELECT ${taskRowColumns(sql, "t")}, ${outputColumns(sql)},
      coalesce((
        SELECT json_agg(e ORDER BY e.seq) FROM (
          SELECT id AS seq, id::text AS id, task_id, at, kind, state, attempt, worker_id, actor, detail
          FROM task_events WHERE task_id = t.id AND id > ${after}::bigint ORDER BY task_events.id LIMIT ${limit}
        ) e
      ), '[]'::json) AS since_events,
      coalesce((SELECT max(id) FROM task_events WHERE task_id = t.id), 0)::text AS last_event_id
    FROM tasks t ${currentAttempt(sql, "t")} WHERE t.id = ${id}`;
  const row = rows[0];
  if (!row) return null;
  const { since_events, last_event_id, ...task } = row;
  const events = since_events.map(({ seq: _seq, ...event }: (typeof since_events)[number] & { seq?: unknown }) => ({
    ...event,
    at: new Date(event.at),
  }));
  return { task, events, lastEventId: last_event_id };
}
