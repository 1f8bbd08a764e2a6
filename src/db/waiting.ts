// What queued tasks wait for (src/task/waiting.ts), read for the task views in one statement:
// routing's reasons here (queue paused, no live worker matches, queue full); flow control adds
// its own columns and reasons in the same statement (key full, rate limit, parents).
import { describeRequirement, type LabelRequirement } from "../task/labels";
import { GUARDS } from "../task/state";
import type { Task } from "../task/task";
import { firstWaiting, type Waiting } from "../task/waiting";
import { changedRows, recordChange, type TaskChangeRow } from "./changes";
import { array, states } from "./encode";
import type { Sql } from "./sql";
import { taskRowColumns } from "./tasks";

interface WaitingRow {
  id: string;
  queue: string;
  requires: LabelRequirement[];
  paused: boolean;
  full: boolean;
  served: boolean;
  matched: boolean;
}

/**
 * Fills `waiting` on the queued tasks of `tasks` (others get null). A live worker is one whose
 * row was refreshed within `workerTimeoutMs` and is not draining.
 */
export async function withWaiting<T extends Task>(sql: Sql, tasks: T[], workerTimeoutMs: number): Promise<T[]> {
  const queued = tasks.filter((task) => task.state === "queued");
  for (const task of tasks) task.waiting = null;
  if (queued.length === 0) return tasks;
  const rows = await sql<WaitingRow[]>`
    WITH live AS (
      SELECT labels, queues FROM workers
      WHERE state = 'connected' AND last_heartbeat_at > clock_timestamp() - make_interval(secs => ${workerTimeoutMs / 1000})
    )
    SELECT t.id, t.queue, t.requires,
      coalesce(q.paused, false) AS paused,
      coalesce(q.concurrency_limit IS NOT NULL AND q.live >= q.concurrency_limit, false) AS full,
      EXISTS (SELECT 1 FROM live w WHERE w.queues IS NULL OR w.queues ? t.queue) AS served,
      EXISTS (SELECT 1 FROM live w WHERE (w.queues IS NULL OR w.queues ? t.queue) AND tq_labels_match(t.requires, w.labels)) AS matched
    FROM tasks t LEFT JOIN queues q ON q.name = t.queue
    WHERE t.id = ANY(${array(
      sql,
      queued.map((task) => task.id),
      "uuid",
    )}) AND t.state = 'queued'`;
  const byId = new Map(rows.map((row) => [row.id, reasonsOf(row)]));
  for (const task of queued) task.waiting = firstWaiting(byId.get(task.id) ?? []);
  return tasks;
}

function reasonsOf(row: WaitingRow): Waiting[] {
  const reasons: Waiting[] = [];
  if (row.paused) reasons.push({ kind: "queue_paused", message: `queue ${row.queue} is paused` });
  if (!row.served) reasons.push({ kind: "no_worker", message: `no worker serves queue ${row.queue}` });
  else if (!row.matched) {
    reasons.push({ kind: "no_worker", message: `no worker with ${row.requires.map(describeRequirement).join(", ")}` });
  }
  if (row.full) reasons.push({ kind: "queue_full", message: `queue ${row.queue} is at its concurrency limit` });
  return reasons;
}

/**
 * Fails the queued tasks whose schedule_timeout_ms has passed since their run_at (by the
 * database's clock) without a dispatch, each with why it waited; returns them. Any coordinator
 * may run it: the guard makes a second run change nothing.
 */
export async function expireScheduleTimeouts(sql: Sql, limit = 1000): Promise<TaskChangeRow[]> {
  const rows = await sql<(TaskChangeRow & { event_id: string })[]>`
    WITH due AS (
      SELECT id FROM tasks
      WHERE state IN (${states(sql, GUARDS.scheduleTimeout)}) AND schedule_timeout_ms > 0
        AND run_at + make_interval(secs => schedule_timeout_ms / 1000.0) <= clock_timestamp()
      LIMIT ${limit}
      FOR UPDATE SKIP LOCKED
    ),
    t AS (
      UPDATE tasks SET state = 'failed', failed_at = clock_timestamp(), lease_expires_at = NULL,
        error = 'schedule_timeout: not dispatched within ' || tasks.schedule_timeout_ms || ' ms of its run_at'
      FROM due WHERE tasks.id = due.id
      RETURNING ${taskRowColumns(sql, "tasks")}
    ),
    ${recordChange(sql, "schedule_timeout")}`;
  return changedRows(rows);
}
