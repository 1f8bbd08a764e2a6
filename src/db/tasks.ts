// All SQL on the tasks table. Every state change is one statement that also appends its
// task_events row and sends the change on the notification channel, so history, live status
// and the row itself can never disagree. Each guarded change names the state(s) and attempt
// it expects; callers act on "nothing changed".
import type { Sql } from "./sql";
import type { Task, TaskSpec, AttemptResult } from "../task/task";
import type { TaskState } from "../task/state";
import { TASK_CHANNEL } from "./notify";

export type TaskChangeRow = Task & { event_id: string };

type Fragment = ReturnType<Sql>;

/**
 * The tail of every state change: given a CTE `t` of changed task rows, appends one event per
 * row and notifies. The payload is small and fixed (NOTIFY payloads are capped at 8000 bytes);
 * listeners read the rest from the row.
 */
function recordChange(sql: Sql, kind: string, detail: Record<string, string | number | null> | null = null): Fragment {
  return sql`
    e AS (
      INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail)
      SELECT t.id, ${kind}, t.state, t.attempt, t.worker_id, ${detail === null ? null : sql.json(detail)}::jsonb
      FROM t
      RETURNING id, task_id
    )
    SELECT t.*, e.id::text AS event_id,
      pg_notify(${TASK_CHANNEL}, json_build_object(
        'id', t.id, 'state', t.state, 'attempt', t.attempt, 'worker_id', t.worker_id,
        'coordinator_id', t.coordinator_id, 'event_id', e.id::text, 'kind', ${kind}::text,
        'due_in_ms', CASE WHEN t.state = 'queued'
          THEN greatest(0, ceil(extract(epoch FROM t.scheduled_at - clock_timestamp()) * 1000))::bigint END
      )::text)::text AS notified
    FROM t JOIN e ON e.task_id = t.id`;
}

function strip(rows: readonly (Task & { event_id: string; notified?: unknown })[]): TaskChangeRow[] {
  return rows.map(({ notified: _, ...row }) => row as TaskChangeRow);
}

export interface Assignment {
  workerId: string;
  coordinatorId: string;
}

/**
 * Persists a new task, its `submitted` event and the notification in one statement. With
 * `assignTo` the task is born dispatched to that worker (attempt 1): the run-now fast path of a
 * coordinator that has a free slot, which saves the claim round trip.
 */
export async function insertTask(sql: Sql, id: string, spec: TaskSpec, assignTo?: Assignment): Promise<TaskChangeRow> {
  const scheduledAt = spec.scheduledAt;
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      INSERT INTO tasks (id, command, state, scheduled_at, picked_at, attempt, max_attempts, timeout_ms, env, cwd,
                         worker_id, coordinator_id)
      VALUES (
        ${id}, ${spec.command}, ${assignTo ? "dispatched" : "queued"},
        coalesce(${scheduledAt}::timestamptz, clock_timestamp()),
        ${assignTo ? sql`clock_timestamp()` : null}, ${assignTo ? 1 : 0},
        ${spec.maxAttempts}, ${spec.timeoutMs}, ${sql.json(spec.env)}::jsonb, ${spec.cwd},
        ${assignTo?.workerId ?? null}, ${assignTo?.coordinatorId ?? null}
      )
      RETURNING *
    ),
    ${recordChange(sql, assignTo ? "submitted+dispatched" : "submitted")}`;
  return strip(rows)[0]!;
}

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
 * Claims due tasks for the given worker slots, one slot per task, in one statement: never
 * more tasks than slots, and SKIP LOCKED lets concurrent coordinators claim disjoint sets.
 * `slots[i]` is the worker the i-th claimed task goes to.
 */
export async function claimDue(sql: Sql, coordinatorId: string, slots: readonly string[]): Promise<TaskChangeRow[]> {
  if (slots.length === 0) return [];
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH c AS (
      SELECT id, row_number() OVER () AS n FROM (
        SELECT id FROM tasks
        WHERE state = 'queued' AND scheduled_at <= clock_timestamp()
        ORDER BY priority DESC, scheduled_at, id
        LIMIT ${slots.length}
        FOR UPDATE SKIP LOCKED
      ) due
    ),
    t AS (
      UPDATE tasks SET
        state = 'dispatched', picked_at = clock_timestamp(), attempt = tasks.attempt + 1,
        worker_id = ${sql.json(slots)}::jsonb ->> (c.n::int - 1), coordinator_id = ${coordinatorId},
        started_at = NULL, exit_code = NULL, signal = NULL, error = NULL
      FROM c WHERE tasks.id = c.id
      RETURNING tasks.*
    ),
    ${recordChange(sql, "dispatched")}`;
  return strip(rows);
}

/**
 * Milliseconds until the earliest queued task is due by the database's clock (0 when one is
 * due now), or null when nothing is queued. The database's clock, not ours, decides dueness.
 */
export async function nextDueIn(sql: Sql): Promise<number | null> {
  const rows = await sql<{ due_in_ms: string | null }[]>`
    SELECT greatest(0, ceil(extract(epoch FROM min(scheduled_at) - clock_timestamp()) * 1000))::bigint::text AS due_in_ms
    FROM tasks WHERE state = 'queued'`;
  const value = rows[0]?.due_in_ms;
  return value == null ? null : Number(value);
}

/** dispatched -> running, for the attempt and worker that hold the task. */
export async function markStarted(
  sql: Sql,
  ref: { id: string; attempt: number; workerId: string; startedAt: Date; pid: number },
): Promise<TaskChangeRow | null> {
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET state = 'running', started_at = ${ref.startedAt}
      WHERE id = ${ref.id} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId} AND state = 'dispatched'
      RETURNING *
    ),
    ${recordChange(sql, "started", { pid: ref.pid })}`;
  return strip(rows)[0] ?? null;
}

/**
 * Records an attempt's result if that attempt still holds the task (the fence). A report
 * from a superseded attempt or another worker changes nothing and is recorded as `stale`.
 */
export async function finishAttempt(
  sql: Sql,
  ref: { id: string; attempt: number; workerId: string },
  result: AttemptResult,
): Promise<{ applied: TaskChangeRow | null }> {
  const failed = result.state !== "succeeded";
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET
        state = ${result.state},
        started_at = coalesce(started_at, ${result.startedAt}::timestamptz),
        completed_at = ${failed ? null : result.finishedAt}::timestamptz,
        failed_at = ${failed ? result.finishedAt : null}::timestamptz,
        exit_code = ${result.exitCode}, signal = ${result.signal},
        stdout = ${result.stdout}, stderr = ${result.stderr},
        stdout_truncated = ${result.stdoutTruncated}, stderr_truncated = ${result.stderrTruncated},
        error = ${result.error}
      WHERE id = ${ref.id} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId}
        AND state IN ('dispatched', 'running')
      RETURNING *
    ),
    ${recordChange(sql, result.state, result.exitCode === null ? null : { exit_code: result.exitCode })}`;
  const applied = strip(rows)[0] ?? null;
  if (!applied) await recordStale(sql, ref, result.state);
  return { applied };
}

/** Appends a `stale` event: a report for an attempt that no longer holds the task. */
export async function recordStale(
  sql: Sql,
  ref: { id: string; attempt: number; workerId: string },
  reported: string,
): Promise<void> {
  await sql`
    INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail)
    SELECT id, 'stale', state, ${ref.attempt}, ${ref.workerId},
           jsonb_build_object('reported', ${reported}::text, 'current_attempt', attempt)
    FROM tasks WHERE id = ${ref.id}`;
}

/** SET clause for an attempt that ended without a result: back to queued, or failed when none are left. */
function requeueOrFail(sql: Sql, reason: string): Fragment {
  return sql`
    state = CASE WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END,
    failed_at = CASE WHEN attempt < max_attempts THEN NULL ELSE clock_timestamp() END,
    error = CASE WHEN attempt < max_attempts THEN error
                 ELSE ${reason} || '; no attempts left (' || max_attempts || ')' END`;
}

/**
 * Gives a worker's in-flight attempts back to the queue (worker lost, task handed back),
 * except the ones it still holds (`keep`, as "id:attempt"). A task with no attempts left
 * fails instead. Returns the changed rows.
 */
export async function requeueWorkerTasks(
  sql: Sql,
  workerId: string,
  reason: string,
  keep: readonly string[] = [],
): Promise<TaskChangeRow[]> {
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET ${requeueOrFail(sql, reason)}
      WHERE worker_id = ${workerId} AND state IN ('dispatched', 'running')
        AND (id::text || ':' || attempt) NOT IN (SELECT jsonb_array_elements_text(${sql.json(keep)}::jsonb))
      RETURNING *
    ),
    ${recordChange(sql, "requeued", { reason })}`;
  return strip(rows);
}

/** Requeues one attempt (a worker handed it back), under the same fence as a finish. */
export async function requeueAttempt(
  sql: Sql,
  ref: { id: string; attempt: number; workerId: string },
  reason: string,
): Promise<TaskChangeRow | null> {
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET ${requeueOrFail(sql, reason)}
      WHERE id = ${ref.id} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId}
        AND state IN ('dispatched', 'running')
      RETURNING *
    ),
    ${recordChange(sql, "requeued", { reason })}`;
  return strip(rows)[0] ?? null;
}

/**
 * Requeues in-flight tasks whose worker no coordinator vouches for any more: no live worker
 * row, or none heartbeating within the timeout (its coordinator died with it).
 */
export async function requeueOrphans(sql: Sql, heartbeatTimeoutMs: number): Promise<TaskChangeRow[]> {
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET ${requeueOrFail(sql, "worker lost")}
      WHERE state IN ('dispatched', 'running')
        AND NOT EXISTS (
          SELECT 1 FROM workers w
          WHERE w.id = tasks.worker_id AND w.state <> 'gone'
            AND w.last_heartbeat_at > clock_timestamp() - make_interval(secs => ${heartbeatTimeoutMs / 1000})
        )
      RETURNING *
    ),
    ${recordChange(sql, "requeued", { reason: "worker lost" })}`;
  return strip(rows);
}

export type CancelOutcome =
  | { kind: "cancelled"; task: TaskChangeRow; wasState: TaskState }
  | { kind: "final"; task: Task }
  | { kind: "not_found" };

/**
 * Cancels a task that has not reached a final state. An in-flight task is marked cancelled at
 * once; the coordinator holding its worker sees the notification and stops the process, and
 * the fence turns the attempt's late report into a stale event.
 */
export async function cancelTask(sql: Sql, id: string): Promise<CancelOutcome> {
  const rows = await sql<(Task & { event_id: string; was_state: TaskState })[]>`
    WITH before AS (
      SELECT id, state FROM tasks WHERE id = ${id} AND state IN ('queued', 'dispatched', 'running') FOR UPDATE
    ),
    t AS (
      UPDATE tasks SET state = 'cancelled', cancelled_at = clock_timestamp()
      FROM before WHERE tasks.id = before.id
      RETURNING tasks.*, before.state AS was_state
    ),
    ${recordChange(sql, "cancelled")}`;
  const row = rows[0];
  if (row) {
    const { was_state, ...task } = strip(rows)[0] as TaskChangeRow & { was_state: TaskState };
    return { kind: "cancelled", task: task as TaskChangeRow, wasState: was_state };
  }
  const task = await getTask(sql, id);
  return task ? { kind: "final", task } : { kind: "not_found" };
}

export type TaskWithLastEvent = Task & { event_id: string | null; event_kind: string | null };

/**
 * A task and the newest event its row reflects, read in one statement so they agree: live
 * watchers skip notifications for changes the row already shows.
 */
export async function getTaskWithLastEvent(sql: Sql, id: string): Promise<TaskWithLastEvent | null> {
  const rows = await sql<TaskWithLastEvent[]>`
    SELECT t.*, e.id::text AS event_id, e.kind AS event_kind
    FROM tasks t
    LEFT JOIN LATERAL (
      SELECT id, kind FROM task_events
      WHERE task_id = t.id AND kind <> 'stale'
      ORDER BY id DESC LIMIT 1
    ) e ON true
    WHERE t.id = ${id}`;
  return rows[0] ?? null;
}
