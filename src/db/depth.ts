// What /metrics reads from the database at scrape time: the unfinished tasks by queue and
// state, and the age of the oldest task that is due and still queued. One statement, over the
// partial and state indexes; final states are not counted (their counts only grow: the
// counters say how many ended).
import { GUARDS } from "../task/state";
import { states } from "./encode";
import type { Sql } from "./sql";

export interface DepthRow {
  queue: string;
  state: string;
  tasks: number;
  /** Seconds since the oldest due, queued task of this queue became due; 0 when none. */
  oldest_due_s: number;
}

/** The unfinished states, read off the transition table: queued and in flight. */
const UNFINISHED = [...new Set([...GUARDS.claim, ...GUARDS.inFlight])];

/** Whether `tasks` has a `queue` column (queues are added by a later migration). */
export async function tasksHaveQueueColumn(sql: Sql): Promise<boolean> {
  const [row] = await sql<{ present: boolean }[]>`
    SELECT EXISTS (
      SELECT 1 FROM information_schema.columns
      WHERE table_schema = current_schema() AND table_name = 'tasks' AND column_name = 'queue'
    ) AS present`;
  return row?.present === true;
}

/** Unfinished tasks per queue and state; without a `queue` column, all under "default". */
export async function readQueueDepth(sql: Sql, byQueue: boolean): Promise<DepthRow[]> {
  const rows = byQueue
    ? await sql<DepthRow[]>`
        SELECT queue::text AS queue, state, count(*)::int AS tasks,
          coalesce(extract(epoch FROM clock_timestamp() - min(run_at) FILTER (WHERE run_at <= clock_timestamp())), 0)::float8 AS oldest_due_s
        FROM tasks WHERE state IN (${states(sql, UNFINISHED)}) GROUP BY queue, state`
    : await sql<DepthRow[]>`
        SELECT 'default' AS queue, state, count(*)::int AS tasks,
          coalesce(extract(epoch FROM clock_timestamp() - min(run_at) FILTER (WHERE run_at <= clock_timestamp())), 0)::float8 AS oldest_due_s
        FROM tasks WHERE state IN (${states(sql, UNFINISHED)}) GROUP BY state`;
  return rows;
}
