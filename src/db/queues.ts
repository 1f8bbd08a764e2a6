// SQL on named queues: their settings (limit, paused) and what they hold. A queue exists once a
// task names it (the insert trigger of the routing migration) or a PATCH creates it; `live`
// is kept by triggers on tasks while the queue has a limit, and read by the claim under the
// row's lock (src/db/claim.ts).
import { TASK_STATES, type TaskState } from "../task/state";
import { TASK_CHANNEL } from "./notify";
import type { Sql } from "./sql";

export interface QueueRow {
  name: string;
  paused: boolean;
  concurrency_limit: number | null;
  depth: Record<TaskState, number>;
}

const emptyDepth = (): Record<TaskState, number> =>
  Object.fromEntries(TASK_STATES.map((state) => [state, 0])) as Record<TaskState, number>;

/** Every queue with its tasks counted by state (one index scan per queue over tasks_queue_state_idx). */
export async function listQueues(sql: Sql, name?: string): Promise<QueueRow[]> {
  const rows = await sql<
    { name: string; paused: boolean; concurrency_limit: number | null; counts: Record<string, number> | null }[]
  >`
    SELECT q.name, q.paused, q.concurrency_limit,
           (SELECT jsonb_object_agg(c.state, c.n) FROM (
              SELECT state, count(*)::integer AS n FROM tasks WHERE tasks.queue = q.name GROUP BY state) c) AS counts
    FROM queues q
    ${name === undefined ? sql`` : sql`WHERE q.name = ${name}`}
    ORDER BY q.name`;
  return rows.map((row) => ({
    name: row.name,
    paused: row.paused,
    concurrency_limit: row.concurrency_limit,
    depth: { ...emptyDepth(), ...(row.counts ?? {}) },
  }));
}

/**
 * Sets (or with null removes) a queue's limit, creating the queue. The live count is taken in
 * the same statement, under the row's lock: from then on the triggers keep it.
 */
export async function setQueueLimit(sql: Sql, name: string, limit: number | null): Promise<void> {
  await sql`
    INSERT INTO queues AS q (name, concurrency_limit, live)
    VALUES (${name}, ${limit}::integer,
            (SELECT count(*) FROM tasks WHERE queue = ${name} AND state IN ('dispatched', 'running')))
    ON CONFLICT (name) DO UPDATE SET
      concurrency_limit = excluded.concurrency_limit,
      live = (SELECT count(*) FROM tasks WHERE queue = ${name} AND state IN ('dispatched', 'running')),
      updated_at = clock_timestamp()`;
  await wakeDispatchers(sql, name);
}

/** Pauses or resumes a queue, creating it; a resume wakes the coordinators. */
export async function setQueuePaused(sql: Sql, name: string, paused: boolean): Promise<void> {
  await sql`
    INSERT INTO queues (name, paused) VALUES (${name}, ${paused})
    ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, updated_at = clock_timestamp()`;
  if (!paused) await wakeDispatchers(sql, name);
}

/**
 * Wakes every coordinator's dispatcher, as a due queued task does: a notification on the
 * coordinators' channel with no task of its own (the nil id), so a resumed queue or a raised
 * limit is served at once rather than at the next safety poll.
 */
async function wakeDispatchers(sql: Sql, queue: string): Promise<void> {
  const payload = JSON.stringify({
    id: NIL_ID,
    state: "queued",
    attempt: 0,
    event_id: "0",
    kind: `queue:${queue}`,
    due_in_ms: 0,
  });
  await sql`SELECT pg_notify(${TASK_CHANNEL}, ${payload})`;
}

const NIL_ID = "00000000-0000-0000-0000-000000000000";
