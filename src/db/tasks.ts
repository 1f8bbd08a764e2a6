// Reads of the tasks table. The statements that change a task live beside it, one module per
// seam: insert.ts (new tasks), claim.ts (dispatch), transitions.ts (an attempt's reports, its
// loss, its lease, a cancel), each ending in the change tail of changes.ts.
import type { TaskState } from "../task/state";
import type { Task } from "../task/task";
import { array, type Fragment } from "./encode";
import type { Sql } from "./sql";

/**
 * A task's output, which is stored once, on its attempt (task_attempts): the columns of the
 * same names on tasks are no longer written (a later release drops them) and never read.
 */
export const OUTPUT_COLUMNS = [
  "stdout",
  "stderr",
  "stdout_truncated",
  "stderr_truncated",
  "stdout_replaced",
  "stderr_replaced",
] as const;

/** Every column of a Task that its own row holds: all of tasks but the output (a test checks it against the table). */
export const TASK_ROW_COLUMNS = [
  "id",
  "command",
  "state",
  "priority",
  "scheduled_at",
  "run_at",
  "created_at",
  "picked_at",
  "started_at",
  "completed_at",
  "failed_at",
  "cancelled_at",
  "attempt",
  "interruptions",
  "max_attempts",
  "timeout_ms",
  "env",
  "cwd",
  "worker_id",
  "coordinator_id",
  "exit_code",
  "signal",
  "error",
  "lease_expires_at",
  "lease_ms",
  "retry_on_failure",
  "retry_on_timeout",
  "retry_on_lost",
  "retry_backoff_base_ms",
  "retry_backoff_cap_ms",
  "idempotency_key",
  "idempotency_hash",
  "secret_env",
  "limits",
  "traceparent",
  // Flow control (src/db/flow.ts).
  "concurrency_key",
  "concurrency_max",
  "concurrency_strategy",
  "rate_limit",
  "rate_limit_key",
  "key_held_until",
  // Routing (src/db/claim.ts, src/task/labels.ts).
  "queue",
  "requires",
  "prefers",
  "schedule_timeout_ms",
  "priority_aging_ms",
  "rank",
  "ref",
  "on_parent_failure",
  "parents_pending",
  "has_children",
  "parent_env",
  "schedule_id",
  "fire_at",
] as const;

/** The task row's own columns, qualified by `table` (a statement's RETURNING, or a read's select list). */
export function taskRowColumns(sql: Sql, table: string): Fragment {
  // Built once per table name: escaping some 60 identifiers on every statement was a visible
  // part of the coordinator's CPU per task (issue 16's profile). No column transform is set
  // (src/db/sql.ts), so the text is what sql(names) would build.
  let text = ROW_COLUMN_LISTS.get(table);
  if (text === undefined) {
    text = TASK_ROW_COLUMNS.map((column) => `"${table.replace(/"/g, '""')}"."${column}"`).join(",");
    ROW_COLUMN_LISTS.set(table, text);
  }
  return sql.unsafe(text) as unknown as Fragment;
}

const ROW_COLUMN_LISTS = new Map<string, string>();

/**
 * The output columns of a Task, read from `o`: its current attempt (currentAttempt), or a
 * relation with the same columns. No attempt (a task never claimed) is no output.
 */
export function outputColumns(sql: Sql): Fragment {
  return sql`o.stdout, o.stderr,
    coalesce(o.stdout_truncated, false) AS stdout_truncated, coalesce(o.stderr_truncated, false) AS stderr_truncated,
    coalesce(o.stdout_replaced, false) AS stdout_replaced, coalesce(o.stderr_replaced, false) AS stderr_replaced`;
}

/** Joins the current attempt of the task rows `table` as `o`, by its primary key. */
export function currentAttempt(sql: Sql, table: string): Fragment {
  return sql`LEFT JOIN task_attempts o ON o.task_id = ${sql(`${table}.id`)} AND o.attempt = ${sql(`${table}.attempt`)}`;
}

/**
 * The one select of a task with its output, for every read: append WHERE, ORDER BY and LIMIT,
 * naming the task's columns as `tasks.<column>` (task_attempts shares some of their names).
 */
export function selectTasks(sql: Sql): Fragment {
  return sql`SELECT ${taskRowColumns(sql, "tasks")}, ${outputColumns(sql)} FROM tasks ${currentAttempt(sql, "tasks")}`;
}

export async function getTask(sql: Sql, id: string): Promise<Task | null> {
  const rows = await sql<Task[]>`${selectTasks(sql)} WHERE tasks.id = ${id}`;
  return rows[0] ?? null;
}

export interface ListTasksQuery {
  state?: TaskState;
  /** Only the tasks of this recurring schedule. */
  scheduleId?: string;
  /** Only the task of this fire time (with scheduleId). */
  fireAt?: Date;
  limit: number;
  /** List tasks older than this id (ids are UUIDv7: creation order). */
  before?: string;
  queue?: string;
  /** Only tasks with this concurrency key. */
  key?: string;
  /** Only tasks requiring this label name, and value when given. */
  label?: { name: string; value?: string };
  /** Only tasks whose command contains this text (case-insensitive). */
  text?: string;
}

/** `%`, `_` and `\` stand for themselves in an ILIKE pattern. */
const likeEscaped = (text: string) => text.replace(/[\\%_]/g, (c) => `\\${c}`);

/** Newest first; one more row than asked tells the caller whether a next page exists (the pending statement: EXPLAIN can wrap it). */
export function listTasks(sql: Sql, query: ListTasksQuery) {
  return sql<Task[]>`
    ${selectTasks(sql)}
    WHERE true
      ${query.state ? sql`AND tasks.state = ${query.state}` : sql``}
      ${query.scheduleId ? sql`AND tasks.schedule_id = ${query.scheduleId}` : sql``}
      ${query.fireAt ? sql`AND tasks.fire_at = ${query.fireAt}` : sql``}
      ${query.before ? sql`AND tasks.id < ${query.before}` : sql``}
      ${query.queue ? sql`AND tasks.queue = ${query.queue}` : sql``}
      ${query.key ? sql`AND tasks.concurrency_key = ${query.key}` : sql``}
      ${
        query.label
          ? sql`AND tasks.requires @> ${sql.json([query.label.value === undefined ? { key: query.label.name } : { key: query.label.name, value: query.label.value }])}`
          : sql``
      }
      ${query.text ? sql`AND tasks.command ILIKE ${`%${likeEscaped(query.text)}%`}` : sql``}
    ORDER BY tasks.id DESC
    LIMIT ${query.limit}`;
}

/** Which of `ids` name a task. */
export async function existingTaskIds(sql: Sql, ids: readonly string[]): Promise<Set<string>> {
  if (ids.length === 0) return new Set();
  const rows = await sql<{ id: string }[]>`SELECT id FROM tasks WHERE id = ANY(${array(sql, ids, "uuid")})`;
  return new Set(rows.map((row) => row.id));
}

/**
 * Readiness: resolves when the tasks table can be read and written now, fails (57014 or
 * 55P03) when either would wait longer than `timeoutMs`. A bare SELECT 1 answers while the
 * table is locked and every submit and list hangs; this takes the lock a write takes (ROW
 * EXCLUSIVE, which a migration's CREATE INDEX or an ACCESS EXCLUSIVE holder blocks) and reads
 * a row, under timeouts of its own, in a transaction that changes nothing. ROW EXCLUSIVE
 * conflicts with no other writer, so the probe holds up nobody's work.
 */
export async function probeTasks(sql: Sql, timeoutMs: number): Promise<void> {
  await sql.begin(async (tx) => {
    await tx`SELECT set_config('lock_timeout', ${String(timeoutMs)}, true), set_config('statement_timeout', ${String(timeoutMs)}, true)`;
    await tx`LOCK TABLE tasks IN ROW EXCLUSIVE MODE`;
    await tx`SELECT 1 FROM tasks LIMIT 1`;
  });
}
