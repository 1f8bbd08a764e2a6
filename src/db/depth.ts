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
  /** Seconds since the oldest due task of this queue and state became due; 0 when none. */
  oldest_due_s: number;
}

/**
 * The unfinished states, read off the transition table: waiting for parents (src/db/dependencies.ts),
 * queued, and in flight.
 */
const UNFINISHED = [...new Set([...GUARDS.waiting, ...GUARDS.claim, ...GUARDS.inFlight])];

/** Unfinished tasks per queue (tasks.queue, src/db/queues.ts) and state. */
export async function readQueueDepth(sql: Sql): Promise<DepthRow[]> {
  return sql<DepthRow[]>`
    SELECT queue::text AS queue, state, count(*)::int AS tasks,
      coalesce(extract(epoch FROM clock_timestamp() - min(run_at) FILTER (WHERE run_at <= clock_timestamp())), 0)::float8 AS oldest_due_s
    FROM tasks WHERE state IN (${states(sql, UNFINISHED)}) GROUP BY queue, state`;
}
