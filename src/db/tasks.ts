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
