// Reads of the tasks table. The statements that change a task live beside it, one module per
// seam: insert.ts (new tasks), claim.ts (dispatch), transitions.ts (an attempt's reports, its
// loss, its lease, a cancel), each ending in the change tail of changes.ts.
import type { TaskState } from "../task/state";
import type { Task } from "../task/task";
import type { Sql } from "./sql";

export async function getTask(sql: Sql, id: string): Promise<Task | null> {
  const rows = await sql<Task[]>`SELECT * FROM tasks WHERE id = ${id}`;
  return rows[0] ?? null;
}

export interface ListTasksQuery {
  state?: TaskState;
  limit: number;
  /** List tasks older than this id (ids are UUIDv7: creation order). */
  before?: string;
}

/** Newest first; one more row than asked tells the caller whether a next page exists. */
export async function listTasks(sql: Sql, query: ListTasksQuery): Promise<Task[]> {
  return sql<Task[]>`
    SELECT * FROM tasks
    WHERE true
      ${query.state ? sql`AND state = ${query.state}` : sql``}
      ${query.before ? sql`AND id < ${query.before}` : sql``}
    ORDER BY id DESC
    LIMIT ${query.limit}`;
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
