// The state changes of an attempt after its claim: started, finished, lost or handed back,
// renewed, and the client's cancel. Each is one statement that also writes the attempt's
// task_attempts row (src/db/attempts.ts) and the change tail (src/db/changes.ts). What a
// result or a loss does to the task is decided by src/task/retry.ts; the statements here only
// fence (the task, the attempt, its worker, and the states GUARDS names) and apply the
// decision. Callers act on "nothing changed".
import { type AttemptRef, attemptKey, type LossCause } from "../task/attempt";
import {
  decideFinish,
  decideLost,
  decideUnstorable,
  type FinishDecision,
  mayRetry,
  RETRY_FACT_COLUMNS,
  type RetryFacts,
} from "../task/retry";
import { GUARDS, type TaskState } from "../task/state";
import type { AttemptResult, Task } from "../task/task";
import { endAttempts, finishAttemptRows, recordUsage, startAttempts, usageColumns } from "./attempts";
import { changedRows, changeTail, recordChange, recordChanges, type TaskChangeRow } from "./changes";
import { afterTasksEnded } from "./dependencies";
import { array, type Column, type Fragment, states, unnest } from "./encode";
import { KEY_HOLD_GRACE_MS } from "./flow";
import { TASK_CHANNEL } from "./notify";
import type { Sql } from "./sql";
import { getTask, taskRowColumns } from "./tasks";

/** The batch columns naming each row's attempt: id, attempt, worker_id. */
function refColumns<R>(ref: (row: R) => AttemptRef): Record<string, Column<R>> {
  return {
    id: ["uuid", (row) => ref(row).taskId],
    attempt: ["integer", (row) => ref(row).attempt],
    worker_id: ["text", (row) => ref(row).workerId],
  };
}

/**
 * The fence: the task that batch row `r` names, while r's attempt and worker hold it in one of
 * `guard`. (A second condition naming the batch's ids as one array, tried against a small
 * table's scan, made the planner probe that whole array for every row of a large batch: PostgreSQL
 * CPU per task doubled in the control-plane bench's batches of ~500.)
 */
function fence(sql: Sql, guard: readonly TaskState[]): Fragment {
  return sql`tasks.id = r.id AND tasks.attempt = r.attempt AND tasks.worker_id = r.worker_id
    AND tasks.state IN (${states(sql, guard)})`;
}

/** A retry decision's facts for each task id (the attempt is the report's, which the fence pins). */
async function readRetryFacts(sql: Sql, ids: readonly string[]): Promise<Map<string, RetryFacts>> {
  if (ids.length === 0) return new Map();
  const rows = await sql<(RetryFacts & { id: string })[]>`
    SELECT id, ${sql(RETRY_FACT_COLUMNS)} FROM tasks WHERE id = ANY(${array(sql, ids, "uuid")})`;
  return new Map(rows.map(({ id, ...facts }) => [id, facts]));
}

export interface StartReport extends AttemptRef {
  startedAt: Date;
  pid: number;
}

/** dispatched -> running, for the attempt and worker that hold the task. */
export async function markStarted(sql: Sql, report: StartReport): Promise<TaskChangeRow | null> {
  return (await markStartedMany(sql, [report]))[0] ?? null;
}

/** markStarted for many reports in one statement; returns the rows that changed. */
export async function markStartedMany(sql: Sql, reports: readonly StartReport[]): Promise<TaskChangeRow[]> {
  if (reports.length === 0) return [];
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET state = 'running', started_at = r.started_at
      FROM ${unnest(sql, reports, {
        ...refColumns((report) => report),
        started_at: ["timestamptz", (report) => report.startedAt],
        pid: ["integer", (report) => report.pid],
      })}
      WHERE ${fence(sql, GUARDS.start)}
      RETURNING ${taskRowColumns(sql, "tasks")}, 'started'::text AS event_kind, jsonb_build_object('pid', r.pid) AS event_detail
    ),
    ${startAttempts(sql)},
    ${recordChanges(sql)}`;
  return changedRows(rows);
}

export interface FinishReport {
  ref: AttemptRef;
  result: AttemptResult;
  /** Stands in for a result the database refused: the task fails for good (decideUnstorable). */
  unstorable?: boolean;
  /**
   * The attempt's start, when its report had not been written yet (a short task's Started
   * and Finished in one flush): recorded by the same statement, its `started` event ahead of
   * the result's, its pid on the attempt row, and no statement of its own.
   */
  started?: { pid: number };
}

/**
 * Records an attempt's result if that attempt still holds the task (the fence), on the task
 * and on its attempt row (the output only there), as decideFinish says: back to the queue
 * after a backoff (event `retrying`), or final, a final failure's error saying why no attempt
 * follows.
 * scheduled_at never changes. A report from a superseded attempt or another worker changes
 * no task and is recorded as `stale` (see recordStaleResult).
 */
export async function finishAttempt(
  sql: Sql,
  ref: AttemptRef,
  result: AttemptResult,
): Promise<{ applied: TaskChangeRow | null }> {
  const [applied] = await finishAttempts(sql, [{ ref, result }]);
  return { applied: applied ?? null };
}

/**
 * finishAttempt for many reports in one statement (a completer's batch); returns, per report
 * in order, the changed row or null for a stale one (recorded as such). Only the reports that
 * may be retried need their task's retry facts, read first: a batch of successes is one
 * round trip. The facts read are still the ones the statement applies to: the policy never
 * changes, and the attempt is the report's, which the fence pins.
 */
export async function finishAttempts(sql: Sql, reports: readonly FinishReport[]): Promise<(TaskChangeRow | null)[]> {
  if (reports.length === 0) return [];
  const facts = await readRetryFacts(
    sql,
    reports.filter((report) => !report.unstorable && mayRetry(report.result)).map(({ ref }) => ref.taskId),
  );
  const decided: (FinishReport & { decision: FinishDecision })[] = [];
  for (const report of reports) {
    const { ref, result } = report;
    if (report.unstorable) {
      decided.push({ ...report, decision: decideUnstorable(result) });
      continue;
    }
    const task = facts.get(ref.taskId);
    // No such task: stale, below.
    if (mayRetry(result) && !task) continue;
    decided.push({ ...report, decision: decideFinish(result, task ? { ...task, attempt: ref.attempt } : null) });
  }
  const rows = decided.length === 0 ? [] : await applyFinishes(sql, decided);
  // Children of the tasks that ended here are resolved next, with a snapshot that sees them all.
  await afterTasksEnded(sql, rows);
  const byId = new Map(changedRows(rows).map((row) => [row.id, row]));
  const out: (TaskChangeRow | null)[] = [];
  for (const { ref, result } of reports) {
    const applied = byId.get(ref.taskId);
    if (applied && applied.attempt === ref.attempt) out.push(applied);
    else {
      out.push(null);
      await recordStaleResult(sql, ref, result);
    }
  }
  return out;
}

function applyFinishes(sql: Sql, decided: readonly (FinishReport & { decision: FinishDecision })[]) {
  return sql<(Task & { event_id: string })[]>`
    WITH r AS (
      SELECT * FROM ${unnest(sql, decided, {
        ...refColumns((d) => d.ref),
        outcome: ["text", (d) => d.result.state],
        exit_code: ["integer", (d) => d.result.exitCode],
        signal: ["text", (d) => d.result.signal],
        stdout: ["text", (d) => d.result.stdout],
        stderr: ["text", (d) => d.result.stderr],
        stdout_truncated: ["boolean", (d) => d.result.stdoutTruncated],
        stderr_truncated: ["boolean", (d) => d.result.stderrTruncated],
        stdout_replaced: ["boolean", (d) => d.result.stdoutReplaced],
        stderr_replaced: ["boolean", (d) => d.result.stderrReplaced],
        error: ["text", (d) => d.result.error],
        started_at: ["timestamptz", (d) => d.result.startedAt],
        finished_at: ["timestamptz", (d) => d.result.finishedAt],
        ...usageColumns((d: FinishReport) => d.result.usage),
        state: ["text", (d) => d.decision.state],
        retry_in_ms: ["double precision", (d) => d.decision.retryInMs],
        completed_at: ["timestamptz", (d) => d.decision.completedAt],
        failed_at: ["timestamptz", (d) => d.decision.failedAt],
        task_error: ["text", (d) => d.decision.error],
        event_kind: ["text", (d) => d.decision.eventKind],
        start_pid: ["integer", (d) => d.started?.pid ?? null],
      })}
    ),
    d AS (
      SELECT r.*, tasks.state AS was_state FROM tasks JOIN r ON ${fence(sql, GUARDS.inFlight)}
      FOR UPDATE OF tasks
    ),
    t AS (
      UPDATE tasks SET
        state = d.state,
        run_at = CASE WHEN d.retry_in_ms IS NULL THEN tasks.run_at
                      ELSE clock_timestamp() + make_interval(secs => d.retry_in_ms / 1000) END,
        lease_expires_at = NULL,
        started_at = coalesce(tasks.started_at, d.started_at),
        completed_at = d.completed_at, failed_at = d.failed_at,
        exit_code = d.exit_code, signal = d.signal,
        error = d.task_error
      FROM d WHERE tasks.id = d.id
      -- The output is stored once, on the attempt row (a_end); the event says what happened.
      RETURNING ${taskRowColumns(sql, "tasks")}, d.event_kind, jsonb_build_object(
        'outcome', d.outcome, 'exit_code', d.exit_code, 'signal', d.signal, 'error', d.error
      ) || CASE WHEN d.retry_in_ms IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('run_at', tasks.run_at) END AS event_detail
    ),
    ${finishAttemptRows(sql)},
    -- The statement cannot see what a_end writes: the answer's output is the result's own
    -- (one row per task, should a batch carry a report twice).
    ${recordChanges(sql, sql`CROSS JOIN LATERAL (SELECT * FROM d WHERE d.id = t.id LIMIT 1) o`, {
      // A start merged into this finish, when no start was recorded before: its own event,
      // as markStartedMany writes it.
      kind: "started",
      state: "running",
      from: sql`t CROSS JOIN LATERAL (
        SELECT s.start_pid FROM d s WHERE s.id = t.id AND s.start_pid IS NOT NULL AND s.was_state = 'dispatched' LIMIT 1
      ) s`,
      detail: sql`jsonb_build_object('pid', s.start_pid)`,
    })}`;
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
        stdout_truncated = ${result.stdoutTruncated}, stderr_truncated = ${result.stderrTruncated},
        stdout_replaced = ${result.stdoutReplaced}, stderr_replaced = ${result.stderrReplaced}, outcome = 'stale'
      WHERE task_id = ${ref.taskId} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId}
        AND (outcome IS NULL OR outcome IN ('lost', 'interrupted', 'stopped'))
    )
    INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail)
    SELECT id, 'stale', state, ${ref.attempt}, ${ref.workerId},
           jsonb_build_object('reported', ${result.state}::text, 'current_attempt', attempt)
    -- The lock keeps retention from deleting the task under the event (migration 0026).
    FROM tasks WHERE id = ${ref.taskId} FOR KEY SHARE`;
  await recordUsage(sql, ref, result.usage);
}

/**
 * A hand-back (the worker gave the attempt up: drained, fenced by its lease, or refused after a
 * stall) for an attempt that no longer holds its task: the task does not change, and its
 * history gets a `stale` event saying what was reported, as for a superseded result.
 */
export async function recordStaleHandBack(sql: Sql, ref: AttemptRef, reason: string, cause: LossCause): Promise<void> {
  await sql`
    INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail)
    SELECT id, 'stale', state, ${ref.attempt}, ${ref.workerId},
           jsonb_build_object('reported', 'handed_back', 'cause', ${cause}::text, 'reason', ${reason}::text,
                              'current_attempt', attempt)
    FROM tasks WHERE id = ${ref.taskId} FOR KEY SHARE`;
}

/**
 * The worker stopped an attempt's process as it was told (the task was cancelled, or the
 * attempt superseded): the task does not change; its history gets a `stopped` event, and an
 * attempt row not yet ended gets outcome `stopped`. A cancelled keyed task's hold on its key's
 * slot ends here (key_held_until): true when it did, for the caller to wake its dispatcher.
 */
export async function recordAttemptStopped(
  sql: Sql,
  ref: AttemptRef,
  reason: string,
  usage: AttemptResult["usage"] = null,
): Promise<boolean> {
  const rows = await sql<{ freed: boolean }[]>`
    WITH a AS (
      UPDATE task_attempts SET outcome = 'stopped', finished_at = clock_timestamp(), error = ${reason}
      WHERE task_id = ${ref.taskId} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId} AND outcome IS NULL
    ),
    -- The process is gone: a cancelled keyed task gives its key's slot back (and wakes every
    -- coordinator: the task waiting for it may be any one's to claim).
    held AS (
      UPDATE tasks SET key_held_until = NULL
      WHERE id = ${ref.taskId} AND attempt = ${ref.attempt} AND worker_id = ${ref.workerId} AND key_held_until IS NOT NULL
      RETURNING id, state, attempt, worker_id, coordinator_id,
        pg_notify(${TASK_CHANNEL}, json_build_object('id', id, 'state', state, 'attempt', attempt, 'worker_id', worker_id,
          'coordinator_id', coordinator_id, 'kind', 'stopped', 'frees_key', true)::text) AS notified
    ),
    -- The task as held changed it, or else read under a lock that keeps retention from
    -- deleting it under the event (migration 0026; a row this statement updated cannot be
    -- locked by it as well).
    locked AS (
      SELECT id, state, attempt FROM tasks WHERE id = ${ref.taskId} AND NOT EXISTS (SELECT 1 FROM held) FOR KEY SHARE
    ),
    e AS (
      INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail)
      SELECT id, 'stopped', state, ${ref.attempt}, ${ref.workerId}, jsonb_build_object('reason', ${reason}::text, 'current_attempt', attempt)
      FROM (SELECT held.id, held.state, held.attempt FROM held UNION ALL SELECT id, state, attempt FROM locked) task
    )
    SELECT EXISTS (SELECT 1 FROM held) AS freed`;
  await recordUsage(sql, ref, usage);
  return rows[0]?.freed === true;
}

/**
 * Ends the in-flight attempts that `where` chooses (a condition on `tasks`, every column
 * qualified) without a result, as decideLost says for `cause`: back to the queue at once
 * (run_at unchanged: it was due already), or failed. The attempt's outcome is the cause
 * (`lost` or `interrupted`), and so is the event's detail.cause; an interrupted attempt also
 * raises tasks.interruptions, so it does not count against max_attempts. Attempts whose key is
 * in `keep` are left alone.
 *
 * Two round trips when there is something to change, one when there is not (as on most
 * rescuer passes): the candidates and their retry facts are read, then the decisions applied
 * under the fence and `where` again, so an attempt that finished, was requeued by someone
 * else or had its lease renewed in between is not touched.
 */
async function loseAttempts(
  sql: Sql,
  reason: string,
  cause: LossCause,
  where: Fragment,
  keep: ReadonlySet<string> = new Set(),
): Promise<TaskChangeRow[]> {
  const candidates = await sql<(RetryFacts & { id: string; worker_id: string })[]>`
    SELECT id, worker_id, ${sql(RETRY_FACT_COLUMNS)} FROM tasks
    WHERE tasks.state IN (${states(sql, GUARDS.inFlight)}) AND ${where}`;
  const lost = candidates
    .filter((task) => !keep.has(attemptKey(task.id, task.attempt)))
    .map((task) => ({ task, decision: decideLost(task, reason, cause) }));
  if (lost.length === 0) return [];
  const rows = await sql<(Task & { event_id: string })[]>`
    WITH t AS (
      UPDATE tasks SET
        state = r.state,
        -- By the database's clock, as every final time of a lost attempt.
        failed_at = CASE WHEN r.state = 'failed' THEN clock_timestamp() END,
        lease_expires_at = NULL,
        interruptions = tasks.interruptions + CASE WHEN r.interrupted THEN 1 ELSE 0 END,
        error = coalesce(r.error, tasks.error)
      FROM ${unnest(sql, lost, {
        ...refColumns(({ task }) => ({ taskId: task.id, attempt: task.attempt, workerId: task.worker_id })),
        state: ["text", ({ decision }) => decision.state],
        error: ["text", ({ decision }) => decision.error],
        event_kind: ["text", ({ decision }) => decision.eventKind],
        interrupted: ["boolean", ({ decision }) => decision.interrupted],
      })}
      WHERE ${fence(sql, GUARDS.inFlight)} AND ${where}
      RETURNING ${taskRowColumns(sql, "tasks")}, r.event_kind,
        jsonb_build_object('outcome', ${cause}::text, 'cause', ${cause}::text, 'reason', ${reason}::text) AS event_detail
    ),
    ${endAttempts(sql, cause, reason)},
    ${recordChanges(sql)}`;
  await afterTasksEnded(sql, rows);
  return changedRows(rows);
}

/**
 * Gives a worker's in-flight attempts back to the queue, except the ones it still holds
 * (`keep`, by attemptKey): `lost` when the worker is (its stream ended, it went silent),
 * `interrupted` when they never reached it (it reconnected without them). A lost attempt of a
 * task with no attempts left fails it instead. Returns the changed rows.
 */
export async function requeueWorkerTasks(
  sql: Sql,
  workerId: string,
  reason: string,
  cause: LossCause,
  keep: Iterable<string> = [],
): Promise<TaskChangeRow[]> {
  return loseAttempts(sql, reason, cause, sql`tasks.worker_id = ${workerId}`, new Set(keep));
}

/**
 * Requeues one attempt under the same fence as a finish: its worker handed it back
 * (`interrupted` on drain, `lost` when it found its lease lapsed), or the assignment could not
 * be sent (`interrupted`).
 */
export async function requeueAttempt(sql: Sql, ref: AttemptRef, reason: string, cause: LossCause): Promise<TaskChangeRow | null> {
  const rows = await loseAttempts(
    sql,
    reason,
    cause,
    sql`tasks.id = ${ref.taskId} AND tasks.attempt = ${ref.attempt} AND tasks.worker_id = ${ref.workerId}`,
  );
  return rows[0] ?? null;
}

/**
 * Renews the leases of attempts that their workers report holding, in one statement, each by
 * its task's own lease_ms (`defaultLeaseMs`, TQ_DEFAULT_LEASE_MS, for a task that asks for
 * none), and returns the ones renewed: attemptKey to the lease granted, which the caller
 * confirms to the worker (src/worker/lease-fence.ts). An attempt not renewed no longer holds
 * its task (superseded, cancelled or finished): the caller tells the worker to stop it.
 */
export async function renewLeases(sql: Sql, refs: readonly AttemptRef[], defaultLeaseMs: number): Promise<Map<string, number>> {
  if (refs.length === 0) return new Map();
  const rows = await sql<{ id: string; attempt: number; lease_ms: number }[]>`
    UPDATE tasks SET lease_expires_at = clock_timestamp() + make_interval(secs => coalesce(tasks.lease_ms, ${defaultLeaseMs}::integer) / 1000.0)
    FROM ${unnest(
      sql,
      refs,
      refColumns((ref) => ref),
    )}
    WHERE ${fence(sql, GUARDS.inFlight)}
    RETURNING tasks.id, tasks.attempt, coalesce(tasks.lease_ms, ${defaultLeaseMs}::integer) AS lease_ms`;
  return new Map(rows.map((row) => [attemptKey(row.id, row.attempt), row.lease_ms]));
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
 *
 * Each task's lease is its own lease_ms (`defaultLeaseMs` for one that asks for none). And the
 * coordinator asking believes only lapses of leases no longer than `trustedForMs`, the time it
 * has been renewing without a gap (since its start, or since renewals were held up): a lease
 * longer than that may belong to a worker that is reconnecting to it and has not yet renewed
 * (src/task/lease.ts mayBelieveLapse).
 */
export async function requeueExpiredLeases(
  sql: Sql,
  defaultLeaseMs: number,
  trustedForMs = Number.POSITIVE_INFINITY,
): Promise<TaskChangeRow[]> {
  const leaseMsOf = sql`coalesce(tasks.lease_ms, ${defaultLeaseMs}::integer)`;
  const lease = sql`make_interval(secs => ${leaseMsOf} / 1000.0)`;
  const trusted = Number.isFinite(trustedForMs)
    ? sql`AND ${leaseMsOf} <= ${Math.max(0, Math.floor(trustedForMs))}::bigint`
    : sql``;
  return loseAttempts(
    sql,
    "worker lost (lease expired)",
    "lost",
    sql`tasks.lease_expires_at < now() ${trusted}
        AND NOT EXISTS (
          SELECT 1 FROM workers w
          WHERE w.id = tasks.worker_id AND w.state <> 'gone'
            AND w.last_heartbeat_at <= tasks.lease_expires_at - ${lease}
            AND greatest(w.last_heartbeat_at, pg_postmaster_start_time()) > now() - 2 * ${lease}
        )`,
  );
}

/**
 * ms until the soonest lease of an attempt in flight runs out (0 when one has), or null when
 * none is in flight: one probe of tasks_lease_idx (its predicate is this one).
 */
export async function nextLeaseExpiryIn(sql: Sql): Promise<number | null> {
  const rows = await sql<{ due_in_ms: string | null }[]>`
    SELECT ceil(extract(epoch FROM min(lease_expires_at) - clock_timestamp()) * 1000)::bigint::text AS due_in_ms
    FROM tasks WHERE state IN ('dispatched', 'running')`;
  const value = rows[0]?.due_in_ms;
  return value == null ? null : Math.max(0, Number(value));
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
  const [row] = await cancelTasks(sql, [id], actor);
  if (row) {
    const { was_state, ...task } = row;
    return { kind: "cancelled", task, wasState: was_state };
  }
  const task = await getTask(sql, id);
  return task ? { kind: "final", task } : { kind: "not_found" };
}

/** cancelTask for many ids in one statement; returns the rows it cancelled, each with the state it left. */
export async function cancelTasks(
  sql: Sql,
  ids: readonly string[],
  actor: string | null = null,
): Promise<(TaskChangeRow & { was_state: TaskState })[]> {
  if (ids.length === 0) return [];
  const rows = await sql<(Task & { event_id: string; was_state: TaskState })[]>`
    WITH before AS (
      SELECT id, state FROM tasks WHERE id = ANY(${array(sql, ids, "uuid")}) AND state IN (${states(sql, GUARDS.cancel)})
      ORDER BY id FOR UPDATE
    ),
    t AS (
      UPDATE tasks SET state = 'cancelled', cancelled_at = clock_timestamp(), lease_expires_at = NULL,
        -- A keyed task's process may still run until its worker has stopped it: it keeps its
        -- key's slot until the worker reports the stop (recordAttemptStopped), or at the
        -- latest past the lease it held by the kill grace (src/db/flow.ts HOLDING).
        key_held_until = CASE WHEN tasks.concurrency_key IS NOT NULL AND before.state IN ('dispatched', 'running')
          THEN greatest(tasks.lease_expires_at, clock_timestamp()) + make_interval(secs => ${KEY_HOLD_GRACE_MS / 1000}) END
      FROM before WHERE tasks.id = before.id
      RETURNING ${taskRowColumns(sql, "tasks")}, before.state AS was_state
    ),
    ${endAttempts(sql, "stopped", "cancelled")},
    ${recordChange(sql, "cancelled", null, actor)}`;
  if (rows.length > 0) await afterTasksEnded(sql, rows);
  return changedRows(rows) as (TaskChangeRow & { was_state: TaskState })[];
}

export type RetryOutcome =
  | { kind: "retried"; task: TaskChangeRow; wasState: TaskState }
  | { kind: "not_final"; task: Task }
  | { kind: "not_found" };

/**
 * A client's retry: a task in a final state (GUARDS.retry) is queued again, due now, for one
 * more attempt. The rule, in one place:
 * - the end of the last attempt is cleared from the task (completed_at, failed_at,
 *   cancelled_at, exit_code, signal, error); its attempt rows keep it, and the next claim
 *   opens a new attempt under the next fencing number;
 * - its attempt budget is raised only as far as one more attempt needs
 *   (max_attempts = greatest(max_attempts, counted attempts + 1)): a task that exhausted its
 *   attempts gets exactly one more, a cancelled one with attempts left keeps those. No attempt
 *   holds a final task, so no decision under a fence can read the policy as it changes;
 * - the event `retried` names the actor and the state it left (`detail.from`) and the budget
 *   before and after.
 * Children resolved when it ended stay as they were (each edge is resolved once).
 */
export async function retryTask(sql: Sql, id: string, actor: string | null = null): Promise<RetryOutcome> {
  const [row] = await retryTasks(sql, [id], actor);
  if (row) {
    const { was_state, ...task } = row;
    return { kind: "retried", task, wasState: was_state };
  }
  const task = await getTask(sql, id);
  return task ? { kind: "not_final", task } : { kind: "not_found" };
}

/** retryTask for many ids in one statement; returns the rows it queued, each with the state it left. */
export async function retryTasks(
  sql: Sql,
  ids: readonly string[],
  actor: string | null = null,
): Promise<(TaskChangeRow & { was_state: TaskState })[]> {
  if (ids.length === 0) return [];
  const rows = await sql<(Task & { event_id: string; was_state: TaskState; was_max_attempts?: number })[]>`
    WITH before AS (
      SELECT id, state, max_attempts FROM tasks
      WHERE id = ANY(${array(sql, ids, "uuid")}) AND state IN (${states(sql, GUARDS.retry)})
      ORDER BY id FOR UPDATE
    ),
    t AS (
      UPDATE tasks SET state = 'queued', run_at = clock_timestamp(), lease_expires_at = NULL,
        completed_at = NULL, failed_at = NULL, cancelled_at = NULL, exit_code = NULL, signal = NULL, error = NULL,
        max_attempts = greatest(tasks.max_attempts, tasks.attempt - tasks.interruptions + 1)
      FROM before WHERE tasks.id = before.id
      RETURNING ${taskRowColumns(sql, "tasks")}, before.state AS was_state, before.max_attempts AS was_max_attempts
    ),
    ${changeTail(sql, {
      kind: sql`'retried'::text`,
      detail: sql`jsonb_build_object('from', t.was_state, 'max_attempts_before', t.was_max_attempts, 'max_attempts', t.max_attempts)`,
      actor: sql`${actor}::text`,
    })}`;
  return changedRows(rows).map(
    ({ was_max_attempts: _, ...row }: TaskChangeRow & { was_max_attempts?: number }) => row,
  ) as (TaskChangeRow & {
    was_state: TaskState;
  })[];
}
