// Inserts of new tasks: each with its first event (and, on the run-now fast path, its first
// attempt), and the dispatch wake-up, in one statement for a whole batch.
import type { Task, TaskSpec } from "../task/task";
import { openAttempts } from "./attempts";
import { changedRows, changeTail, type TaskChangeRow } from "./changes";
import { array, unnest } from "./encode";
import { flowColumns, flowRows } from "./flow";
import type { Sql } from "./sql";
import { selectTasks, taskRowColumns } from "./tasks";

export interface Assignment {
  workerId: string;
  coordinatorId: string;
  /** Lease on the first attempt when the task asks for none (TQ_DEFAULT_LEASE_MS); renewed while the worker reports it. */
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
 * Most tasks one insertTasks statement should carry: what a group commit of submits writes
 * at once (as many as the API's largest batch request by default, TQ_MAX_BATCH).
 */
export const MAX_TASKS_PER_INSERT = 1000;

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
  /** TQ_PRIORITY_AGING_MS of the submitting role: the task's rank uses it. */
  agingMs?: number;
  /**
   * Parents it waits for (src/db/dependencies.ts adds the edges in the same transaction): born
   * `waiting` with this many pending. Never with assignTo.
   */
  parents?: number;
  /** The W3C traceparent to store with it (src/trace): its submit's span, or the caller's. */
  traceparent?: string | null;
}

/** TQ_PRIORITY_AGING_MS's default: a task gains one priority step per second of waiting. */
export const DEFAULT_PRIORITY_AGING_MS = 1000;

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
 * dispatch, in one statement; resolves after commit with one outcome per item, in order. A
 * task whose idempotency key is already taken writes nothing and its outcome is the earlier
 * task (a concurrent repeat waits for the first to commit, through the unique index); so does
 * a repeat of a key earlier in the same call.
 */
export async function insertTasks(sql: Sql, items: readonly NewTask[]): Promise<InsertOutcome[]> {
  if (items.length === 0) return [];
  const hashes = items.map(({ spec }) => (spec.idempotencyKey === null ? null : specHash(spec)));
  const created = await writeTasks(sql, items, hashes);
  const outcomes: (InsertOutcome | undefined)[] = items.map(({ id }) => {
    const task = created.get(id);
    return task ? { kind: "created", task } : undefined;
  });
  if (created.size === items.length) return outcomes as InsertOutcome[];
  if (items.some(({ id, spec }) => spec.firing !== undefined && !created.has(id))) {
    throw new Error("insertTasks was given a firing that was already written; use insertFirings");
  }

  const keys = [...new Set(items.filter(({ id }) => !created.has(id)).map(({ spec }) => spec.idempotencyKey))];
  if (keys.includes(null)) throw new Error("insert wrote nothing for a task without an idempotency key");
  const existing = await sql<Task[]>`
    ${selectTasks(sql)} WHERE tasks.idempotency_key = ANY(${array(sql, keys, "text")})`;
  const byKey = new Map(existing.map((task) => [task.idempotency_key, task]));
  return items.map(({ spec }, i) => {
    const outcome = outcomes[i];
    if (outcome) return outcome;
    const task = byKey.get(spec.idempotencyKey);
    if (!task) throw new Error("insert wrote nothing and no task holds its idempotency key");
    return { kind: "existing", task, sameRequest: task.idempotency_hash === hashes[i] };
  });
}

/**
 * The one insert statement: tasks, their first events (and run-now attempts), the wake-up, and,
 * when any item is a schedule's firing, its schedule_firings row. The firing row is claimed
 * first, ON CONFLICT DO NOTHING on its (schedule_id, fire_at) key, and the task is written only
 * when the claim wrote the row: a fire time makes one task, whoever else fires it at once.
 */
async function writeTasks(
  sql: Sql,
  items: readonly NewTask[],
  hashes: readonly (string | null)[],
): Promise<Map<string, TaskChangeRow>> {
  const firings = items.some(({ spec }) => spec.firing !== undefined);
  const inserted = await sql<(Task & { event_id: string })[]>`
    WITH r AS (
      SELECT * FROM ${unnest(sql, items, {
        id: ["uuid", (t) => t.id],
        command: ["text", (t) => t.spec.command],
        scheduled_at: ["timestamptz", (t) => t.spec.scheduledAt],
        max_attempts: ["integer", (t) => t.spec.maxAttempts],
        timeout_ms: ["integer", (t) => t.spec.timeoutMs],
        env: ["jsonb", (t) => t.spec.env],
        secret_env: ["jsonb", (t) => t.spec.secretEnv],
        cwd: ["text", (t) => t.spec.cwd],
        retry_on_failure: ["boolean", (t) => t.spec.retry.onFailure],
        retry_on_timeout: ["boolean", (t) => t.spec.retry.onTimeout],
        retry_on_lost: ["boolean", (t) => t.spec.retry.onLost],
        retry_backoff_base_ms: ["integer", (t) => t.spec.retry.backoffBaseMs],
        retry_backoff_cap_ms: ["integer", (t) => t.spec.retry.backoffCapMs],
        idempotency_key: ["text", (t) => t.spec.idempotencyKey],
        idempotency_hash: ["text", (_, i) => hashes[i] ?? null],
        actor: ["text", (t) => t.actor ?? null],
        worker_id: ["text", (t) => t.assignTo?.workerId ?? null],
        coordinator_id: ["text", (t) => t.assignTo?.coordinatorId ?? null],
        lease_ms: ["double precision", (t) => (t.assignTo ? Math.max(0, t.spec.leaseMs ?? t.assignTo.leaseMs) : null)],
        task_lease_ms: ["integer", (t) => t.spec.leaseMs ?? null],
        limits: ["jsonb", (t) => t.spec.limits ?? null],
        ...flowColumns,
        queue: ["text", (t) => t.spec.routing?.queue ?? "default"],
        priority: ["integer", (t) => t.spec.routing?.priority ?? 0],
        requires: ["jsonb", (t) => t.spec.routing?.requires ?? []],
        prefers: ["jsonb", (t) => t.spec.routing?.prefers ?? []],
        schedule_timeout_ms: ["integer", (t) => t.spec.routing?.scheduleTimeoutMs ?? 0],
        priority_aging_ms: ["integer", (t) => t.agingMs ?? DEFAULT_PRIORITY_AGING_MS],
        ref: ["text", (t) => t.spec.ref ?? null],
        on_parent_failure: ["text", (t) => (t.parents ? (t.spec.onParentFailure ?? "cancel") : null)],
        parents_pending: ["integer", (t) => t.parents ?? 0],
        schedule_id: ["uuid", (t) => t.spec.firing?.scheduleId ?? null],
        fire_at: ["timestamptz", (t) => t.spec.firing?.fireAt ?? null],
        firing_reason: ["text", (t) => t.spec.firing?.reason ?? null],
        traceparent: ["text", (t) => t.traceparent ?? null],
      })}
    ),
    ${flowRows(sql)}
    ${firings ? firingClaim(sql) : sql``}
    t AS (
      INSERT INTO tasks (id, command, state, scheduled_at, run_at, picked_at, attempt, max_attempts, timeout_ms, env, secret_env, cwd,
                         worker_id, coordinator_id, lease_expires_at,
                         retry_on_failure, retry_on_timeout, retry_on_lost, retry_backoff_base_ms, retry_backoff_cap_ms,
                         idempotency_key, idempotency_hash, limits,
                         queue, priority, requires, prefers, schedule_timeout_ms, priority_aging_ms,
                         ref, on_parent_failure, parents_pending, lease_ms,
                         concurrency_key, concurrency_max, concurrency_strategy, rate_limit, rate_limit_key,
                         schedule_id, fire_at, traceparent)
      SELECT r.id, r.command,
             CASE WHEN r.parents_pending > 0 THEN 'waiting' WHEN fast.worker_id IS NULL THEN 'queued' ELSE 'dispatched' END,
             due.at, due.at,
             CASE WHEN fast.worker_id IS NOT NULL THEN clock_timestamp() END,
             CASE WHEN fast.worker_id IS NULL THEN 0 ELSE 1 END,
             r.max_attempts, r.timeout_ms, coalesce(r.env, '{}'::jsonb), coalesce(r.secret_env, '{}'::jsonb), r.cwd,
             fast.worker_id, fast.coordinator_id,
             CASE WHEN fast.worker_id IS NOT NULL THEN clock_timestamp() + make_interval(secs => r.lease_ms / 1000) END,
             r.retry_on_failure, r.retry_on_timeout, r.retry_on_lost, r.retry_backoff_base_ms, r.retry_backoff_cap_ms,
             r.idempotency_key, r.idempotency_hash, r.limits,
             r.queue, r.priority, r.requires, r.prefers, r.schedule_timeout_ms, r.priority_aging_ms,
             r.ref, r.on_parent_failure, r.parents_pending, r.task_lease_ms,
             r.concurrency_key, r.concurrency_max, r.concurrency_strategy, r.rate_limit, r.rate_limit_key,
             r.schedule_id, r.fire_at, r.traceparent
      FROM r
      -- Truncated, not rounded: timestamptz(3) would round a run-now time up to 0.5 ms into
      -- the future, making the task briefly "not yet due".
      CROSS JOIN LATERAL (SELECT coalesce(r.scheduled_at, date_trunc('milliseconds', clock_timestamp())) AS at) due
      -- The fast path only where the claim would not hold the task back: a paused or limited
      -- queue is the claim's to decide (the caller frees the slot of a task born queued).
      CROSS JOIN LATERAL (
        SELECT r.worker_id, r.coordinator_id
        WHERE r.worker_id IS NOT NULL AND NOT EXISTS (
          SELECT 1 FROM queues q WHERE q.name = r.queue AND (q.paused OR q.concurrency_limit IS NOT NULL))
        UNION ALL SELECT NULL, NULL LIMIT 1
      ) fast
      ${firings ? sql`WHERE r.schedule_id IS NULL OR r.id IN (SELECT task_id FROM f)` : sql``}
      ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
      RETURNING ${taskRowColumns(sql, "tasks")}
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
  return new Map(changedRows(inserted).map((row) => [row.id, row]));
}

function firingClaim(sql: Sql) {
  return sql`f AS (
      INSERT INTO schedule_firings (schedule_id, fire_at, outcome, task_id, reason)
      SELECT r.schedule_id, r.fire_at, 'created', r.id, r.firing_reason FROM r WHERE r.schedule_id IS NOT NULL
      -- A buffered firing (overlap buffer_one) has its row already, without a task: its task is
      -- written once, when the row is still buffered.
      ON CONFLICT (schedule_id, fire_at) DO UPDATE SET outcome = 'created', task_id = excluded.task_id, reason = excluded.reason, recorded_at = clock_timestamp()
        WHERE schedule_firings.outcome = 'buffered'
      RETURNING task_id
    ),`;
}

/**
 * Writes schedule firings' tasks (each spec with its `firing`), in one statement. Resolves with
 * the task created for each item, or null where that fire time had been written before (by
 * another replica, or by this one before a crash).
 */
export async function insertFirings(sql: Sql, items: readonly NewTask[]): Promise<(TaskChangeRow | null)[]> {
  if (items.length === 0) return [];
  if (items.some(({ spec }) => spec.firing === undefined || spec.idempotencyKey !== null)) {
    throw new Error("insertFirings takes firings without idempotency keys");
  }
  const created = await writeTasks(
    sql,
    items,
    items.map(() => null),
  );
  return items.map(({ id }) => created.get(id) ?? null);
}
