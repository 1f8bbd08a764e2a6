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
function recordChange(
  sql: Sql,
  kind: string,
  detail: Record<string, string | number | boolean | null> | null = null,
  /** The API token (by name) that asked for the change, for the audit trail. */
  actor: string | null = null,
): Fragment {
  return changeTail(sql, sql`${kind}::text`, detail === null ? sql`NULL::jsonb` : sql`${sql.json(detail)}::jsonb`, actor);
}

/** recordChange for rows of `t` that carry their own event_kind and event_detail columns. */
function recordChanges(sql: Sql): Fragment {
  return changeTail(sql, sql`t.event_kind`, sql`t.event_detail`, null);
}

function changeTail(sql: Sql, kind: Fragment, detail: Fragment, actor: string | null): Fragment {
  return sql`
    e AS (
      INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail, actor)
      SELECT t.id, ${kind}, t.state, t.attempt, t.worker_id, ${detail}, ${actor}::text
      FROM t
      RETURNING id, task_id
    )
    SELECT t.*, e.id::text AS event_id,
      pg_notify(${TASK_CHANNEL}, json_build_object(
        'id', t.id, 'state', t.state, 'attempt', t.attempt, 'worker_id', t.worker_id,
        'coordinator_id', t.coordinator_id, 'event_id', e.id::text, 'kind', ${kind},
        'due_in_ms', CASE WHEN t.state = 'queued'
          THEN greatest(0, ceil(extract(epoch FROM t.scheduled_at - clock_timestamp()) * 1000))::bigint END
      )::text)::text AS notified
    FROM t JOIN e ON e.task_id = t.id`;
}

function strip(
  rows: readonly (Task & { event_id: string; notified?: unknown; event_kind?: unknown; event_detail?: unknown })[],
): TaskChangeRow[] {
  return rows.map(({ notified: _n, event_kind: _k, event_detail: _d, ...row }) => row as TaskChangeRow);
}

export interface Assignment {
  workerId: string;
  coordinatorId: string;
  /** Lease on the first attempt, renewed while the worker reports it. */
  leaseMs: number;
}

/** Identifies a request for idempotency: the same key with another request is a conflict. */
export function specHash(spec: TaskSpec): string {
  const { idempotencyKey: _, ...request } = spec;
  return new Bun.CryptoHasher("sha256").update(JSON.stringify(request)).digest("hex");
}

export type InsertOutcome =
  | { kind: "created"; task: TaskChangeRow }
  /** The Idempotency-Key was used before: the earlier task, and whether it was the same request. */
  | { kind: "existing"; task: Task; sameRequest: boolean };

/**
 * Persists a new task, its `submitted` event and the notification in one statement. With
 * `assignTo` the task is born dispatched to that worker (attempt 1): the run-now fast path of a
 * coordinator that has a free slot, which saves the claim round trip. With an idempotency key
 * already taken, nothing is written and the earlier task is returned (a concurrent repeat
 * waits for the first to commit, through the unique index).
 */
export async function insertTask(
  sql: Sql,
  id: string,
  spec: TaskSpec,
  options: { assignTo?: Assignment; actor?: string } = {},
): Promise<InsertOutcome> {
  const { assignTo, actor = null } = options;
  const hash = spec.idempotencyKey === null ? null : specHash(spec);
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      INSERT INTO tasks (id, command, state, scheduled_at, picked_at, attempt, max_attempts, timeout_ms, env, secret_env, cwd,
                         worker_id, coordinator_id, lease_expires_at,
                         retry_on_failure, retry_on_timeout, retry_on_lost, retry_backoff_base_ms, retry_backoff_cap_ms,
                         idempotency_key, idempotency_hash)
      VALUES (
        ${id}, ${spec.command}, ${assignTo ? "dispatched" : "queued"},
        -- Truncated, not rounded: timestamptz(3) would round a run-now time up to 0.5 ms into
        -- the future, making the task briefly "not yet due".
        coalesce(${spec.scheduledAt}::timestamptz, date_trunc('milliseconds', clock_timestamp())),
        ${assignTo ? sql`clock_timestamp()` : null}, ${assignTo ? 1 : 0},
        ${spec.maxAttempts}, ${spec.timeoutMs}, ${sql.json(spec.env)}::jsonb, ${sql.json(spec.secretEnv)}::jsonb, ${spec.cwd},
        ${assignTo?.workerId ?? null}, ${assignTo?.coordinatorId ?? null},
        ${assignTo ? leaseUntil(sql, assignTo.leaseMs) : null},
        ${spec.retry.onFailure}, ${spec.retry.onTimeout}, ${spec.retry.onLost},
        ${spec.retry.backoffBaseMs}, ${spec.retry.backoffCapMs},
        ${spec.idempotencyKey}, ${hash}
      )
      ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
      RETURNING *
    ),
    ${recordChange(sql, assignTo ? "submitted+dispatched" : "submitted", null, actor)}`;
  const created = strip(rows)[0];
  if (created) return { kind: "created", task: created };
  const existing = await sql<Task[]>`SELECT * FROM tasks WHERE idempotency_key = ${spec.idempotencyKey}`;
  if (!existing[0]) throw new Error("insert wrote nothing and no task holds its idempotency key");
  return { kind: "existing", task: existing[0], sameRequest: existing[0].idempotency_hash === hash };
}

/** The end of a lease that starts now. */
function leaseUntil(sql: Sql, ms: number): Fragment {
  return sql`clock_timestamp() + make_interval(secs => ${Math.max(0, ms) / 1000})`;
}

/**
 * Persists many new queued tasks in one statement (rows from one JSON array), with their
 * `submitted` events and notifications. Batches carry no idempotency keys.
 */
export async function insertTasks(
  sql: Sql,
  items: readonly { id: string; spec: TaskSpec }[],
  actor: string | null = null,
): Promise<TaskChangeRow[]> {
  if (items.length === 0) return [];
  const rows = items.map(({ id, spec }) => ({
    id,
    command: spec.command,
    scheduled_at: spec.scheduledAt?.toISOString() ?? null,
    max_attempts: spec.maxAttempts,
    timeout_ms: spec.timeoutMs,
    env: spec.env,
    secret_env: spec.secretEnv,
    cwd: spec.cwd,
    retry_on_failure: spec.retry.onFailure,
    retry_on_timeout: spec.retry.onTimeout,
    retry_on_lost: spec.retry.onLost,
    retry_backoff_base_ms: spec.retry.backoffBaseMs,
    retry_backoff_cap_ms: spec.retry.backoffCapMs,
  }));
  const inserted = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      INSERT INTO tasks (id, command, state, scheduled_at, max_attempts, timeout_ms, env, secret_env, cwd,
                         retry_on_failure, retry_on_timeout, retry_on_lost, retry_backoff_base_ms, retry_backoff_cap_ms)
      SELECT r.id, r.command, 'queued', coalesce(r.scheduled_at, date_trunc('milliseconds', clock_timestamp())), r.max_attempts, r.timeout_ms,
             coalesce(r.env, '{}'::jsonb), coalesce(r.secret_env, '{}'::jsonb), r.cwd,
             r.retry_on_failure, r.retry_on_timeout, r.retry_on_lost, r.retry_backoff_base_ms, r.retry_backoff_cap_ms
      FROM jsonb_to_recordset(${sql.json(rows)}::jsonb) AS r(
        id uuid, command text, scheduled_at timestamptz, max_attempts integer, timeout_ms integer, env jsonb,
        secret_env jsonb, cwd text, retry_on_failure boolean, retry_on_timeout boolean, retry_on_lost boolean,
        retry_backoff_base_ms integer, retry_backoff_cap_ms integer)
      RETURNING *
    ),
    ${recordChange(sql, "submitted", null, actor)}`;
  return strip(inserted);
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
export async function claimDue(
  sql: Sql,
  coordinatorId: string,
  slots: readonly string[],
  leaseMs: number,
): Promise<TaskChangeRow[]> {
  if (slots.length === 0) return [];
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH c AS (
      SELECT id, row_number() OVER () AS n FROM (
        SELECT id FROM tasks
        -- now() (the statement's start), not clock_timestamp(): a volatile bound cannot be an
        -- index condition, and the scan would walk every future task. It is never later than
        -- the real time, so a task still never starts early.
        WHERE state = 'queued' AND scheduled_at <= now()
        -- Due order, on tasks_due_idx (priorities come with their own issue).
        ORDER BY scheduled_at, id
        LIMIT ${slots.length}
        FOR UPDATE SKIP LOCKED
      ) due
    ),
    t AS (
      UPDATE tasks SET
        state = 'dispatched', picked_at = clock_timestamp(), attempt = tasks.attempt + 1,
        worker_id = ${sql.json(slots)}::jsonb ->> (c.n::int - 1), coordinator_id = ${coordinatorId},
        lease_expires_at = ${leaseUntil(sql, leaseMs)},
        started_at = NULL, exit_code = NULL, signal = NULL, error = NULL,
        stdout = NULL, stderr = NULL, stdout_truncated = false, stderr_truncated = false
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

export interface StartReport {
  id: string;
  attempt: number;
  workerId: string;
  startedAt: Date;
  pid: number;
}

/** dispatched -> running, for the attempt and worker that hold the task. */
export async function markStarted(sql: Sql, ref: StartReport): Promise<TaskChangeRow | null> {
  return (await markStartedMany(sql, [ref]))[0] ?? null;
}

/** markStarted for many reports in one statement; returns the rows that changed. */
export async function markStartedMany(sql: Sql, refs: readonly StartReport[]): Promise<TaskChangeRow[]> {
  if (refs.length === 0) return [];
  const json = refs.map((r) => ({ id: r.id, attempt: r.attempt, worker_id: r.workerId, started_at: r.startedAt.toISOString(), pid: r.pid }));
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET state = 'running', started_at = r.started_at
      FROM jsonb_to_recordset(${sql.json(json)}::jsonb) AS r(id uuid, attempt integer, worker_id text, started_at timestamptz, pid integer)
      WHERE tasks.id = r.id AND tasks.attempt = r.attempt AND tasks.worker_id = r.worker_id AND tasks.state = 'dispatched'
      RETURNING tasks.*, 'started'::text AS event_kind, jsonb_build_object('pid', r.pid) AS event_detail
    ),
    ${recordChanges(sql)}`;
  return strip(rows);
}

export interface FinishReport {
  ref: { id: string; attempt: number; workerId: string };
  result: AttemptResult;
}

/**
 * Records an attempt's result if that attempt still holds the task (the fence). A failure or
 * timeout that the task's policy retries, with attempts left, goes back to the queue due
 * after an exponential backoff with jitter; otherwise the result is final. Either way the
 * attempt's result is kept in its event. A report from a superseded attempt or another
 * worker changes nothing and is recorded as `stale`.
 */
export async function finishAttempt(
  sql: Sql,
  ref: { id: string; attempt: number; workerId: string },
  result: AttemptResult,
): Promise<{ applied: TaskChangeRow | null }> {
  const [applied] = await finishAttempts(sql, [{ ref, result }]);
  return { applied: applied ?? null };
}

/**
 * finishAttempt for many reports in one statement (a completer's batch); returns, per report
 * in order, the changed row or null for a stale one (recorded as such).
 */
export async function finishAttempts(sql: Sql, reports: readonly FinishReport[]): Promise<(TaskChangeRow | null)[]> {
  if (reports.length === 0) return [];
  const json = reports.map(({ ref, result }) => ({
    r_id: ref.id,
    r_attempt: ref.attempt,
    r_worker_id: ref.workerId,
    r_state: result.state,
    r_exit_code: result.exitCode,
    r_signal: result.signal,
    r_stdout: result.stdout,
    r_stderr: result.stderr,
    r_stdout_truncated: result.stdoutTruncated,
    r_stderr_truncated: result.stderrTruncated,
    r_error: result.error,
    r_started_at: result.startedAt?.toISOString() ?? null,
    r_finished_at: result.finishedAt.toISOString(),
  }));
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH r AS (
      SELECT * FROM jsonb_to_recordset(${sql.json(json)}::jsonb) AS r(
        r_id uuid, r_attempt integer, r_worker_id text, r_state text, r_exit_code integer, r_signal text,
        r_stdout text, r_stderr text, r_stdout_truncated boolean, r_stderr_truncated boolean, r_error text,
        r_started_at timestamptz, r_finished_at timestamptz)
    ),
    d AS (
      SELECT r.*, tasks.id,
        r.r_state <> 'succeeded' AND tasks.attempt < tasks.max_attempts
          AND CASE r.r_state WHEN 'timed_out' THEN tasks.retry_on_timeout ELSE tasks.retry_on_failure END AS retry,
        least(tasks.retry_backoff_cap_ms, tasks.retry_backoff_base_ms * power(2, least(tasks.attempt - 1, 30)))
          * (0.5 + random() / 2) AS backoff_ms
      FROM tasks JOIN r ON tasks.id = r.r_id AND tasks.attempt = r.r_attempt AND tasks.worker_id = r.r_worker_id
      WHERE tasks.state IN ('dispatched', 'running')
      FOR UPDATE OF tasks
    ),
    t AS (
      UPDATE tasks SET
        state = CASE WHEN d.retry THEN 'queued' ELSE d.r_state END,
        scheduled_at = CASE WHEN d.retry THEN clock_timestamp() + make_interval(secs => d.backoff_ms / 1000)
                            ELSE tasks.scheduled_at END,
        lease_expires_at = NULL,
        started_at = coalesce(tasks.started_at, d.r_started_at),
        completed_at = CASE WHEN d.r_state = 'succeeded' THEN d.r_finished_at END,
        failed_at = CASE WHEN d.r_state <> 'succeeded' AND NOT d.retry THEN d.r_finished_at END,
        exit_code = d.r_exit_code, signal = d.r_signal, stdout = d.r_stdout, stderr = d.r_stderr,
        stdout_truncated = d.r_stdout_truncated, stderr_truncated = d.r_stderr_truncated, error = d.r_error
      FROM d WHERE tasks.id = d.id
      RETURNING tasks.*, d.r_state AS event_kind, jsonb_build_object(
        'exit_code', d.r_exit_code, 'signal', d.r_signal, 'error', d.r_error, 'stdout', d.r_stdout,
        'stderr', d.r_stderr, 'stdout_truncated', d.r_stdout_truncated, 'stderr_truncated', d.r_stderr_truncated
      ) AS event_detail
    ),
    ${recordChanges(sql)}`;
  const byId = new Map(strip(rows).map((row) => [row.id, row]));
  const out: (TaskChangeRow | null)[] = [];
  for (const { ref, result } of reports) {
    const applied = byId.get(ref.id);
    if (applied && applied.attempt === ref.attempt) out.push(applied);
    else {
      out.push(null);
      await recordAttemptNote(sql, ref, "stale", { reported: result.state });
    }
  }
  return out;
}

/**
 * Appends an event about one attempt that does not change the task: `stale`, a report for an
 * attempt that no longer holds the task; `stopped`, the worker stopped an attempt's process
 * as it was told (the task was cancelled, or the attempt superseded).
 */
export async function recordAttemptNote(
  sql: Sql,
  ref: { id: string; attempt: number; workerId: string },
  kind: "stale" | "stopped",
  note: { reported: string } | { reason: string },
): Promise<void> {
  await sql`
    INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail)
    SELECT id, ${kind}, state, ${ref.attempt}, ${ref.workerId},
           ${sql.json(note)}::jsonb || jsonb_build_object('current_attempt', attempt)
    FROM tasks WHERE id = ${ref.id}`;
}

/**
 * SET clause for an attempt that ended without a result (its worker was lost or gave it
 * back): back to the queue at once, or failed when no attempts are left or the task's policy
 * does not retry a lost worker.
 */
function requeueOrFail(sql: Sql, reason: string): Fragment {
  return sql`
    state = CASE WHEN attempt < max_attempts AND retry_on_lost THEN 'queued' ELSE 'failed' END,
    failed_at = CASE WHEN attempt < max_attempts AND retry_on_lost THEN NULL ELSE clock_timestamp() END,
    lease_expires_at = NULL,
    error = CASE WHEN attempt < max_attempts AND retry_on_lost THEN error
                 WHEN NOT retry_on_lost THEN ${reason} || '; the task does not retry a lost worker'
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

export interface AttemptRef {
  id: string;
  attempt: number;
  workerId: string;
}

/**
 * Renews the leases of attempts that their workers report holding, in one statement, and
 * returns the ones renewed. An attempt not renewed no longer holds its task (superseded,
 * cancelled or finished): the caller tells the worker to stop it.
 */
export async function renewLeases(sql: Sql, refs: readonly AttemptRef[], leaseMs: number): Promise<Set<string>> {
  if (refs.length === 0) return new Set();
  const rows = await sql<{ key: string }[]>`
    UPDATE tasks SET lease_expires_at = ${leaseUntil(sql, leaseMs)}
    FROM jsonb_to_recordset(${sql.json(refs.map((r) => ({ id: r.id, attempt: r.attempt, worker_id: r.workerId })))}::jsonb)
      AS r(id uuid, attempt integer, worker_id text)
    WHERE tasks.id = r.id AND tasks.attempt = r.attempt AND tasks.worker_id = r.worker_id
      AND tasks.state IN ('dispatched', 'running')
    RETURNING tasks.id::text || ':' || tasks.attempt AS key`;
  return new Set(rows.map((row) => row.key));
}

/**
 * Requeues in-flight tasks whose lease lapsed: no worker has reported them for a lease period
 * (the worker or its coordinator died, or the assignment never arrived). Any coordinator may
 * run it.
 */
export async function requeueExpiredLeases(sql: Sql): Promise<TaskChangeRow[]> {
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET ${requeueOrFail(sql, "worker lost (lease expired)")}
      WHERE state IN ('dispatched', 'running') AND lease_expires_at < now()
      RETURNING *
    ),
    ${recordChange(sql, "requeued", { reason: "lease expired" })}`;
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
export async function cancelTask(sql: Sql, id: string, actor: string | null = null): Promise<CancelOutcome> {
  const rows = await sql<(Task & { event_id: string; was_state: TaskState })[]>`
    WITH before AS (
      SELECT id, state FROM tasks WHERE id = ${id} AND state IN ('queued', 'dispatched', 'running') FOR UPDATE
    ),
    t AS (
      UPDATE tasks SET state = 'cancelled', cancelled_at = clock_timestamp(), lease_expires_at = NULL
      FROM before WHERE tasks.id = before.id
      RETURNING tasks.*, before.state AS was_state
    ),
    ${recordChange(sql, "cancelled", null, actor)}`;
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
