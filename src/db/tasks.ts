// All SQL on the tasks table. Every state change is one statement that also appends its
// task_events row, writes the attempt's task_attempts row (src/db/attempts.ts) and notifies the
// change (src/db/notify.ts says on which channels), so history, attempts, live status and the
// row itself can never disagree. Each guarded change names the state(s) and attempt it expects;
// callers act on "nothing changed".

import { describeResult } from "../task/attempt";
import type { TaskState } from "../task/state";
import type { AttemptResult, Task, TaskSpec } from "../task/task";
import { endAttempts, finishAttemptRows, openAttempts, startAttempts } from "./attempts";
import { TASK_CHANNEL, TASK_CHANNEL_PREFIX } from "./notify";
import type { Sql } from "./sql";

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
  return changeTail(sql, {
    kind: sql`${kind}::text`,
    detail: detail === null ? sql`NULL::jsonb` : sql`${sql.json(detail)}::jsonb`,
    actor: sql`${actor}::text`,
  });
}

/** recordChange for rows of `t` that carry their own event_kind and event_detail columns. */
function recordChanges(sql: Sql): Fragment {
  return changeTail(sql, { kind: sql`t.event_kind`, detail: sql`t.event_detail`, actor: sql`NULL::text` });
}

/**
 * Each fragment may use the columns of `t`, the changed rows, and of what `from` joins to it
 * (by default nothing).
 */
function changeTail(
  sql: Sql,
  event: { kind: Fragment; detail: Fragment; actor: Fragment; from?: Fragment },
  /** False for new tasks: nobody can be watching a task whose id is not out yet. */
  watched = true,
): Fragment {
  return sql`
    e AS (
      INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail, actor)
      SELECT t.id, ${event.kind}, t.state, t.attempt, t.worker_id, ${event.detail}, ${event.actor}
      FROM ${event.from ?? sql`t`}
      RETURNING id, task_id, kind
    )
    SELECT t.*, e.id::text AS event_id,
      ${watched ? sql`pg_notify(${TASK_CHANNEL_PREFIX} || t.id::text, n.payload)::text` : sql`NULL::text`} AS notified,
      -- Coordinators need each cancel, but of the tasks queued here only the one due first:
      -- a dispatch pass claims whatever is due, so one wake-up (or timer) covers them all.
      CASE WHEN t.state = 'cancelled'
             OR t.id = (SELECT q.id FROM t q WHERE q.state = 'queued' ORDER BY q.run_at, q.id LIMIT 1)
        THEN pg_notify(${TASK_CHANNEL}, n.payload) END::text AS notified_all
    FROM t JOIN e ON e.task_id = t.id
    CROSS JOIN LATERAL (
      SELECT json_build_object(
        'id', t.id, 'state', t.state, 'attempt', t.attempt, 'worker_id', t.worker_id,
        'coordinator_id', t.coordinator_id, 'event_id', e.id::text, 'kind', e.kind,
        'due_in_ms', CASE WHEN t.state = 'queued'
          THEN greatest(0, ceil(extract(epoch FROM t.run_at - clock_timestamp()) * 1000))::bigint END
      )::text AS payload
    ) n`;
}

/**
 * An array literal of text values, to send as one text parameter and cast to the column's
 * array type. (postgres.js would serialise a JS array itself only once it has fetched the
 * server's array types, which a fresh connection may not have done yet.)
 */
function arrayLiteral(values: readonly (string | null)[]): string {
  const elements = values.map((v) => (v === null ? "NULL" : `"${v.replace(/[\\"]/g, "\\$&")}"`));
  return `{${elements.join(",")}}`;
}

/** A value as the text PostgreSQL reads for its column (objects as JSON); null stays null. */
function asText(value: string | number | boolean | object | null): string | null {
  if (value === null) return null;
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

/**
 * Rows as one JSON text parameter, for json_to_recordset. Text parsed as json, not jsonb: the
 * server parses it several times faster.
 */
function jsonRows(sql: Sql, rows: readonly unknown[]): Fragment {
  return sql`${JSON.stringify(rows)}::text::json`;
}

function strip(
  rows: readonly (Task & {
    event_id: string;
    notified?: unknown;
    notified_all?: unknown;
    event_kind?: unknown;
    event_detail?: unknown;
  })[],
): TaskChangeRow[] {
  return rows.map(({ notified: _n, notified_all: _a, event_kind: _k, event_detail: _d, ...row }) => row as TaskChangeRow);
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

/** Most tasks one insertTasks call should carry (the API's batch limit by default). */
export const MAX_INSERT_BATCH = 1000;

export interface NewTask {
  id: string;
  spec: TaskSpec;
  /** The API token (by name) that submitted it, for the audit trail. */
  actor?: string | null;
  /**
   * Born dispatched to this worker (attempt 1): the run-now fast path of a coordinator that
   * has a free slot, which saves the claim round trip.
   */
  assignTo?: Assignment;
}

/** insertTasks for one item. */
export async function insertTask(
  sql: Sql,
  id: string,
  spec: TaskSpec,
  options: { assignTo?: Assignment; actor?: string } = {},
): Promise<InsertOutcome> {
  const [outcome] = await insertTasks(sql, [{ id, spec, ...options }]);
  if (!outcome) throw new Error("insertTasks answered nothing for one task");
  return outcome;
}

/**
 * Persists new tasks with their `submitted` (or `submitted+dispatched`) events, and wakes
 * dispatch, in one statement; resolves after commit with one outcome per item, in order. A task whose idempotency key is already taken writes nothing
 * and its outcome is the earlier task (a concurrent repeat waits for the first to commit,
 * through the unique index); so does a repeat of a key earlier in the same call.
 */
export async function insertTasks(sql: Sql, items: readonly NewTask[]): Promise<InsertOutcome[]> {
  if (items.length === 0) return [];
  const hashes = items.map(({ spec }) => (spec.idempotencyKey === null ? null : specHash(spec)));
  // One text[] per column: for a 1000-task batch the server reads these several times faster
  // than the same rows through json_to_recordset.
  const column = (pick: (item: NewTask, i: number) => string | number | boolean | object | null) =>
    arrayLiteral(items.map((item, i) => asText(pick(item, i))));
  const inserted = await sql<(Task & { event_id: string })[]>`
    WITH r AS (
      SELECT * FROM unnest(
        ${column((t) => t.id)}::text::uuid[], ${column((t) => t.spec.command)}::text::text[],
        ${column((t) => t.spec.scheduledAt?.toISOString() ?? null)}::text::timestamptz[],
        ${column((t) => t.spec.maxAttempts)}::text::integer[], ${column((t) => t.spec.timeoutMs)}::text::integer[],
        ${column((t) => t.spec.env)}::text::jsonb[], ${column((t) => t.spec.secretEnv)}::text::jsonb[], ${column((t) => t.spec.cwd)}::text::text[],
        ${column((t) => t.spec.retry.onFailure)}::text::boolean[], ${column((t) => t.spec.retry.onTimeout)}::text::boolean[],
        ${column((t) => t.spec.retry.onLost)}::text::boolean[], ${column((t) => t.spec.retry.backoffBaseMs)}::text::integer[],
        ${column((t) => t.spec.retry.backoffCapMs)}::text::integer[],
        ${column((t) => t.spec.idempotencyKey)}::text::text[], ${column((_, i) => hashes[i] ?? null)}::text::text[],
        ${column((t) => t.actor ?? null)}::text::text[], ${column((t) => t.assignTo?.workerId ?? null)}::text::text[],
        ${column((t) => t.assignTo?.coordinatorId ?? null)}::text::text[],
        ${column((t) => (t.assignTo ? Math.max(0, t.assignTo.leaseMs) : null))}::text::double precision[]
      ) AS r(id, command, scheduled_at, max_attempts, timeout_ms, env, secret_env, cwd, retry_on_failure, retry_on_timeout,
             retry_on_lost, retry_backoff_base_ms, retry_backoff_cap_ms, idempotency_key, idempotency_hash,
             actor, worker_id, coordinator_id, lease_ms)
    ),
    t AS (
      INSERT INTO tasks (id, command, state, scheduled_at, run_at, picked_at, attempt, max_attempts, timeout_ms, env, secret_env, cwd,
                         worker_id, coordinator_id, lease_expires_at,
                         retry_on_failure, retry_on_timeout, retry_on_lost, retry_backoff_base_ms, retry_backoff_cap_ms,
                         idempotency_key, idempotency_hash)
      SELECT r.id, r.command, CASE WHEN r.worker_id IS NULL THEN 'queued' ELSE 'dispatched' END,
             due.at, due.at,
             CASE WHEN r.worker_id IS NOT NULL THEN clock_timestamp() END,
             CASE WHEN r.worker_id IS NULL THEN 0 ELSE 1 END,
             r.max_attempts, r.timeout_ms, coalesce(r.env, '{}'::jsonb), coalesce(r.secret_env, '{}'::jsonb), r.cwd,
             r.worker_id, r.coordinator_id,
             clock_timestamp() + make_interval(secs => r.lease_ms / 1000),
             r.retry_on_failure, r.retry_on_timeout, r.retry_on_lost, r.retry_backoff_base_ms, r.retry_backoff_cap_ms,
             r.idempotency_key, r.idempotency_hash
      FROM r
      -- Truncated, not rounded: timestamptz(3) would round a run-now time up to 0.5 ms into
      -- the future, making the task briefly "not yet due".
      CROSS JOIN LATERAL (SELECT coalesce(r.scheduled_at, date_trunc('milliseconds', clock_timestamp())) AS at) due
      ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
      RETURNING *
    ),
    ${openAttempts(sql)},
    ${changeTail(
      sql,
      {
        kind: sql`CASE WHEN t.state = 'dispatched' THEN 'submitted+dispatched' ELSE 'submitted' END`,
        detail: sql`NULL::jsonb`,
        actor: sql`r.actor`,
        from: sql`t JOIN r ON r.id = t.id`,
      },
      false,
    )}`;
  const created = new Map(strip(inserted).map((row) => [row.id, row]));
  const outcomes: (InsertOutcome | undefined)[] = items.map(({ id }) => {
    const task = created.get(id);
    return task ? { kind: "created", task } : undefined;
  });
  if (created.size === items.length) return outcomes as InsertOutcome[];

  const keys = [...new Set(items.filter(({ id }) => !created.has(id)).map(({ spec }) => spec.idempotencyKey))];
  if (keys.includes(null)) throw new Error("insert wrote nothing for a task without an idempotency key");
  const existing = await sql<Task[]>`
    SELECT * FROM tasks WHERE idempotency_key IN (SELECT json_array_elements_text(${jsonRows(sql, keys)}))`;
  const byKey = new Map(existing.map((task) => [task.idempotency_key, task]));
  return items.map(({ spec }, i) => {
    const outcome = outcomes[i];
    if (outcome) return outcome;
    const task = byKey.get(spec.idempotencyKey);
    if (!task) throw new Error("insert wrote nothing and no task holds its idempotency key");
    return { kind: "existing", task, sameRequest: task.idempotency_hash === hashes[i] };
  });
}

/** The end of a lease that starts now. */
function leaseUntil(sql: Sql, ms: number): Fragment {
  return sql`clock_timestamp() + make_interval(secs => ${Math.max(0, ms) / 1000})`;
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
    WITH c AS (
      SELECT id, row_number() OVER () AS n FROM (
        SELECT id FROM tasks
        -- now() (the statement's start), not clock_timestamp(): a volatile bound cannot be an
        -- index condition, and the scan would walk every future task. It is never later than
        -- the real time, so a task still never starts early.
        WHERE state = 'queued' AND run_at <= now() + make_interval(secs => ${Math.max(0, aheadMs) / 1000})
        -- Due order, on tasks_run_at_idx (priorities come with their own issue).
        ORDER BY run_at, id
        LIMIT ${slots.length}
        FOR UPDATE SKIP LOCKED
      ) due
    ),
    t AS (
      UPDATE tasks SET
        state = 'dispatched', picked_at = clock_timestamp(), attempt = tasks.attempt + 1,
        worker_id = ${jsonRows(sql, slots)} ->> (c.n::int - 1), coordinator_id = ${coordinatorId},
        lease_expires_at = ${leaseUntil(sql, leaseMs)},
        started_at = NULL, exit_code = NULL, signal = NULL, error = NULL,
        stdout = NULL, stderr = NULL, stdout_truncated = false, stderr_truncated = false
      FROM c WHERE tasks.id = c.id
      RETURNING tasks.*,
        -- Rounded up, and read after the claim: waiting this long from any later moment never
        -- starts the task before its time.
        greatest(0, ceil(extract(epoch FROM tasks.run_at - clock_timestamp()) * 1000))::integer AS start_in_ms
    ),
    ${openAttempts(sql)},
    ${recordChange(sql, "dispatched")}`;
  return strip(rows) as ClaimedTask[];
}

/**
 * Milliseconds until the earliest queued task is due by the database's clock (0 when one is
 * due now), or null when nothing is queued. The database's clock, not ours, decides dueness.
 */
export async function nextDueIn(sql: Sql): Promise<number | null> {
  const rows = await sql<{ due_in_ms: string | null }[]>`
    SELECT greatest(0, ceil(extract(epoch FROM min(run_at) - clock_timestamp()) * 1000))::bigint::text AS due_in_ms
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
  const json = refs.map((r) => ({
    id: r.id,
    attempt: r.attempt,
    worker_id: r.workerId,
    started_at: r.startedAt.toISOString(),
    pid: r.pid,
  }));
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET state = 'running', started_at = r.started_at
      FROM json_to_recordset(${jsonRows(sql, json)}) AS r(id uuid, attempt integer, worker_id text, started_at timestamptz, pid integer)
      WHERE tasks.id = r.id AND tasks.attempt = r.attempt AND tasks.worker_id = r.worker_id AND tasks.state = 'dispatched'
      RETURNING tasks.*, 'started'::text AS event_kind, jsonb_build_object('pid', r.pid) AS event_detail
    ),
    ${startAttempts(sql)},
    ${recordChanges(sql)}`;
  return strip(rows);
}

export interface FinishReport {
  ref: { id: string; attempt: number; workerId: string };
  result: AttemptResult;
}

/**
 * Records an attempt's result if that attempt still holds the task (the fence), on the task
 * and on its attempt row. A failure or timeout that the task's policy retries, with attempts
 * left, goes back to the queue with run_at after an exponential backoff with jitter (event
 * `retrying`); otherwise the result is final, and a final failure's error says why there is
 * no further attempt. scheduled_at never changes. A report from a superseded attempt or
 * another worker changes no task and is recorded as `stale` (see recordStaleResult).
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
    r_reason: result.state === "succeeded" ? null : describeResult(result),
    r_started_at: result.startedAt?.toISOString() ?? null,
    r_finished_at: result.finishedAt.toISOString(),
  }));
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH r AS (
      SELECT * FROM json_to_recordset(${jsonRows(sql, json)}) AS r(
        r_id uuid, r_attempt integer, r_worker_id text, r_state text, r_exit_code integer, r_signal text,
        r_stdout text, r_stderr text, r_stdout_truncated boolean, r_stderr_truncated boolean, r_error text,
        r_reason text, r_started_at timestamptz, r_finished_at timestamptz)
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
        run_at = CASE WHEN d.retry THEN clock_timestamp() + make_interval(secs => d.backoff_ms / 1000) ELSE tasks.run_at END,
        lease_expires_at = NULL,
        started_at = coalesce(tasks.started_at, d.r_started_at),
        completed_at = CASE WHEN d.r_state = 'succeeded' THEN d.r_finished_at END,
        failed_at = CASE WHEN d.r_state <> 'succeeded' AND NOT d.retry THEN d.r_finished_at END,
        exit_code = d.r_exit_code, signal = d.r_signal, stdout = d.r_stdout, stderr = d.r_stderr,
        stdout_truncated = d.r_stdout_truncated, stderr_truncated = d.r_stderr_truncated,
        error = CASE WHEN d.r_state = 'succeeded' OR d.retry THEN d.r_error
                     ELSE ${finalError(
                       sql,
                       sql`d.r_reason`,
                       sql`CASE d.r_state WHEN 'timed_out' THEN tasks.retry_on_timeout ELSE tasks.retry_on_failure END`,
                       sql`CASE d.r_state WHEN 'timed_out' THEN 'timeouts' ELSE 'failures' END`,
                     )} END
      FROM d WHERE tasks.id = d.id
      -- The output stays on the task and its attempt row; the event says what happened.
      RETURNING tasks.*, CASE WHEN d.retry THEN 'retrying' ELSE d.r_state END AS event_kind, jsonb_build_object(
        'outcome', d.r_state, 'exit_code', d.r_exit_code, 'signal', d.r_signal, 'error', d.r_error
      ) || CASE WHEN d.retry THEN jsonb_build_object('run_at', tasks.run_at) ELSE '{}'::jsonb END AS event_detail
    ),
    ${finishAttemptRows(sql)},
    ${recordChanges(sql)}`;
  const byId = new Map(strip(rows).map((row) => [row.id, row]));
  const out: (TaskChangeRow | null)[] = [];
  for (const { ref, result } of reports) {
    const applied = byId.get(ref.id);
    if (applied && applied.attempt === ref.attempt) out.push(applied);
    else {
      out.push(null);
      await recordStaleResult(sql, ref, result);
    }
  }
  return out;
}

/**
 * A final task's error: why its last attempt ended (`reason`, text), and why no other
 * follows: the task's policy does not retry this (`retries`, the policy's flag for it, and
 * `what`, its name), or it has run its max_attempts. For an UPDATE of tasks.
 */
function finalError(sql: Sql, reason: Fragment, retries: Fragment, what: Fragment): Fragment {
  return sql`CASE
    WHEN NOT ${retries} THEN ${reason} || '; the task does not retry ' || ${what}
    ELSE 'exhausted ' || tasks.max_attempts || CASE WHEN tasks.max_attempts = 1 THEN ' attempt' ELSE ' attempts' END
         || ': last ' || ${reason} END`;
}

/**
 * A result for an attempt that no longer holds its task (superseded, its task cancelled, or
 * a repeat of one already applied): the task does not change and its history gets a `stale`
 * event. An attempt that had ended without a result (lost or stopped) keeps this result on
 * its row, with outcome `stale`: what the process really did stays visible. An attempt whose
 * own result was applied keeps it.
 */
export async function recordStaleResult(sql: Sql, ref: AttemptRef, result: AttemptResult): Promise<void> {
  await sql`
    WITH a AS (
      UPDATE task_attempts SET
        started_at = coalesce(started_at, ${result.startedAt}::timestamptz), finished_at = ${result.finishedAt}::timestamptz,
        exit_code = ${result.exitCode}::integer, signal = ${result.signal}::text, error = coalesce(${result.error}::text, error),
        stdout = ${result.stdout}::text, stderr = ${result.stderr}::text,
        stdout_truncated = ${result.stdoutTruncated}, stderr_truncated = ${result.stderrTruncated}, outcome = 'stale'
      WHERE task_id = ${ref.id} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId}
        AND (outcome IS NULL OR outcome IN ('lost', 'stopped'))
    )
    INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail)
    SELECT id, 'stale', state, ${ref.attempt}, ${ref.workerId},
           jsonb_build_object('reported', ${result.state}::text, 'current_attempt', attempt)
    FROM tasks WHERE id = ${ref.id}`;
}

/**
 * The worker stopped an attempt's process as it was told (the task was cancelled, or the
 * attempt superseded): the task does not change; its history gets a `stopped` event, and an
 * attempt row not yet ended gets outcome `stopped`.
 */
export async function recordAttemptStopped(sql: Sql, ref: AttemptRef, reason: string): Promise<void> {
  await sql`
    WITH a AS (
      UPDATE task_attempts SET outcome = 'stopped', finished_at = clock_timestamp(), error = ${reason}
      WHERE task_id = ${ref.id} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId} AND outcome IS NULL
    )
    INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail)
    SELECT id, 'stopped', state, ${ref.attempt}, ${ref.workerId}, jsonb_build_object('reason', ${reason}::text, 'current_attempt', attempt)
    FROM tasks WHERE id = ${ref.id}`;
}

/**
 * The change for an attempt that ended without a result: its task goes back to the queue at
 * once (run_at unchanged: it was due already), or fails when no attempts are left or the
 * task's policy does not retry a lost worker; the attempt's outcome is `lost`. Given the
 * WHERE clause choosing the attempts, the whole statement.
 */
function requeueOrFail(sql: Sql, reason: string, where: Fragment): Fragment {
  const retry = sql`tasks.attempt < tasks.max_attempts AND tasks.retry_on_lost`;
  return sql`
    WITH t AS (
      UPDATE tasks SET
        state = CASE WHEN ${retry} THEN 'queued' ELSE 'failed' END,
        failed_at = CASE WHEN ${retry} THEN NULL ELSE clock_timestamp() END,
        lease_expires_at = NULL,
        error = CASE WHEN ${retry} THEN tasks.error
                     ELSE ${finalError(sql, sql`${reason}::text`, sql`tasks.retry_on_lost`, sql`'a lost worker'`)} END
      WHERE ${where}
      RETURNING *, CASE WHEN state = 'queued' THEN 'requeued' ELSE 'failed' END AS event_kind,
        jsonb_build_object('outcome', 'lost', 'reason', ${reason}::text) AS event_detail
    ),
    ${endAttempts(sql, "lost", reason)},
    ${recordChanges(sql)}`;
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
  const rows = await sql<(Task & { event_id: string })[]>`${requeueOrFail(
    sql,
    reason,
    sql`worker_id = ${workerId} AND state IN ('dispatched', 'running')
        AND (id::text || ':' || attempt) NOT IN (SELECT jsonb_array_elements_text(${sql.json(keep)}::jsonb))`,
  )}`;
  return strip(rows);
}

/** Requeues one attempt (a worker handed it back), under the same fence as a finish. */
export async function requeueAttempt(
  sql: Sql,
  ref: { id: string; attempt: number; workerId: string },
  reason: string,
): Promise<TaskChangeRow | null> {
  const rows = await sql<(Task & { event_id: string })[]>`${requeueOrFail(
    sql,
    reason,
    sql`id = ${ref.id} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId} AND state IN ('dispatched', 'running')`,
  )}`;
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
    FROM json_to_recordset(${jsonRows(
      sql,
      refs.map((r) => ({ id: r.id, attempt: r.attempt, worker_id: r.workerId })),
    )})
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
 *
 * A lapse is believed only once the worker's coordinator has had its say. Each coordinator
 * pass vouches for its workers (workers.last_heartbeat_at) and then renews what they report,
 * so a worker vouched for after its attempt's last renewal, without a renewal, no longer holds
 * that attempt. A worker not vouched for since then belongs to a coordinator that has not run
 * a pass for a lease period: it is dead or was cut off, or the database was away and it has
 * not yet caught up. Its leases are left alone for two lease periods from its last pass (or
 * from the database's own restart, whichever is later), so that a coordinator slower to
 * recover from an outage than the one rescuing does not have its healthy workers' tasks run
 * twice. A gone or unknown worker's lapsed leases are requeued at once.
 */
export async function requeueExpiredLeases(sql: Sql, leaseMs: number): Promise<TaskChangeRow[]> {
  const lease = sql`make_interval(secs => ${Math.max(0, leaseMs) / 1000})`;
  const rows = await sql<(Task & { event_id: string })[]>`${requeueOrFail(
    sql,
    "worker lost (lease expired)",
    sql`state IN ('dispatched', 'running') AND lease_expires_at < now()
        AND NOT EXISTS (
          SELECT 1 FROM workers w
          WHERE w.id = tasks.worker_id AND w.state <> 'gone'
            AND w.last_heartbeat_at <= tasks.lease_expires_at - ${lease}
            AND greatest(w.last_heartbeat_at, pg_postmaster_start_time()) > now() - 2 * ${lease}
        )`,
  )}`;
  return strip(rows);
}

export type CancelOutcome =
  | { kind: "cancelled"; task: TaskChangeRow; wasState: TaskState }
  | { kind: "final"; task: Task }
  | { kind: "not_found" };

/**
 * Cancels a task that has not reached a final state. An in-flight task is marked cancelled at
 * once, and its attempt ends `stopped`; the coordinator holding its worker sees the
 * notification and stops the process, and the fence turns the attempt's late report into a
 * stale event.
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
    ${endAttempts(sql, "stopped", "cancelled")},
    ${recordChange(sql, "cancelled", null, actor)}`;
  const row = rows[0];
  if (row) {
    const { was_state, ...task } = strip(rows)[0] as TaskChangeRow & { was_state: TaskState };
    return { kind: "cancelled", task: task as TaskChangeRow, wasState: was_state };
  }
  const task = await getTask(sql, id);
  return task ? { kind: "final", task } : { kind: "not_found" };
}
