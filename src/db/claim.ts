// The claim: due tasks handed to this coordinator's free worker slots, in one statement.
import { GUARDS } from "../task/state";
import { openAttempts } from "./attempts";
import { changedRows, recordChange, type TaskChangeRow } from "./changes";
import { array, fromNow, states } from "./encode";
import { flowAdmissible, flowAdmit, flowKeyRank, flowNextToken } from "./flow";
import type { Sql } from "./sql";
import { taskRowColumns } from "./tasks";

/** A claimed attempt, and how long until its task is due by the database's clock. */
export type ClaimedTask = TaskChangeRow & {
  /** 0 when due; otherwise the milliseconds (rounded up) until run_at. */
  start_in_ms: number;
};

/**
 * Claims due tasks for the given worker slots, one slot per task, in one statement: never
 * more tasks than slots, and SKIP LOCKED lets concurrent coordinators claim disjoint sets.
 * `slots[i]` is the worker the i-th claimed task goes to. With `aheadMs`, tasks due within
 * that many milliseconds are claimed too (earliest first); each row says how long until it
 * is due, for the worker to wait before starting it.
 */
export async function claimDue(
  sql: Sql,
  coordinatorId: string,
  slots: readonly string[],
  leaseMs: number,
  aheadMs = 0,
): Promise<ClaimedTask[]> {
  if (slots.length === 0) return [];
  const rows = await sql<(ClaimedTask & { event_id: string })[]>`
    WITH w AS (
      SELECT id, run_at, concurrency_key, rate_limit, rate_limit_key, ${flowKeyRank(sql)} AS key_rank FROM tasks
      -- now() (the statement's start), not clock_timestamp(): a volatile bound cannot be an
      -- index condition, and the scan would walk every future task. It is never later than
      -- the real time, so a task still never starts early.
      WHERE state IN (${states(sql, GUARDS.claim)}) AND run_at <= now() + make_interval(secs => ${Math.max(0, aheadMs) / 1000})
        -- Flow control (src/db/flow.ts): only tasks their key and bucket have room for.
        AND ${flowAdmissible(sql)}
      -- Due order, on tasks_run_at_idx (priorities come with their own issue).
      ORDER BY run_at, id
      -- Twice the slots: flowAdmit may leave some (a key or bucket another claim holds).
      LIMIT ${slots.length * 2}
      FOR UPDATE SKIP LOCKED
    ),
    ${flowAdmit(sql, slots.length)}
    t AS (
      UPDATE tasks SET
        state = 'dispatched', picked_at = clock_timestamp(), attempt = tasks.attempt + 1,
        worker_id = (${array(sql, slots, "text")})[c.n::int], coordinator_id = ${coordinatorId},
        lease_expires_at = ${fromNow(sql, leaseMs)},
        started_at = NULL, exit_code = NULL, signal = NULL, error = NULL
      FROM c WHERE tasks.id = c.id
      RETURNING ${taskRowColumns(sql, "tasks")},
        -- Rounded up, and read after the claim: waiting this long from any later moment never
        -- starts the task before its time.
        greatest(0, ceil(extract(epoch FROM tasks.run_at - clock_timestamp()) * 1000))::integer AS start_in_ms
    ),
    ${openAttempts(sql)},
    ${recordChange(sql, "dispatched")}`;
  return changedRows(rows) as ClaimedTask[];
}

/**
 * Milliseconds until the earliest queued task is due by the database's clock (0 when one is
 * due now), or null when nothing is queued. The database's clock, not ours, decides dueness.
 */
export async function nextDueIn(sql: Sql): Promise<number | null> {
  // Flow control: tasks their key or bucket holds back are not due; a bucket's next token is.
  const rows = await sql<{ due_in_ms: string | null }[]>`
    SELECT least(
      (SELECT greatest(0, ceil(extract(epoch FROM min(run_at) - clock_timestamp()) * 1000))::bigint
       FROM tasks WHERE state IN (${states(sql, GUARDS.claim)}) AND ${flowAdmissible(sql)}),
      ${flowNextToken(sql)})::text AS due_in_ms`;
  const value = rows[0]?.due_in_ms;
  return value == null ? null : Number(value);
}
