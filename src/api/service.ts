// What the API does, as plain functions of ApiDeps: the HTTP controllers and the gRPC
// TaskService call these, so both transports validate and answer alike. They throw
// TaskQueueError for client mistakes; database errors pass through to the transport's mapper.

import { listAttempts } from "../db/attempts";
import { batchHash, claimBatchKey, getBatch } from "../db/batches";
import { addDependencies, getDependencies, type NewEdge, type TaskDependencies } from "../db/dependencies";
import { listTaskEventsAfter, readTaskSince, type TaskEventRow } from "../db/events";
import { insertTasks, type NewTask } from "../db/insert";
import type { Sql } from "../db/sql";
import { existingTaskIds, getTask, listTasks, probeTasks } from "../db/tasks";
import { cancelTask, cancelTasks, retryTask, retryTasks } from "../db/transitions";
import { withWaiting } from "../db/waiting";
import { listLiveWorkers, type WorkerRow } from "../db/workers";
import type { Attempt } from "../task/attempt";
import { refOfId } from "../task/dependencies";
import { conflict, invalidArgument, isDatabaseTimeout, notFinal, notFound, TaskQueueError, unavailable } from "../task/errors";
import { parseRfc3339 } from "../task/rfc3339";
import { parseQueueName } from "../task/routing";
import { isTaskId } from "../task/spec";
import { isFinal, isTaskState, TASK_STATES } from "../task/state";
import type { Submitted, Task, TaskSpec } from "../task/task";
import { normalTraceparent } from "../trace/traceparent";
import { decodeCursor, encodeCursor } from "./cursor";
import type { ApiDeps } from "./deps";
import { applyStrategies, checkFlowSpecs, withFlowWaiting } from "./flow";

export const DEFAULT_PAGE_SIZE = 50;
export const MAX_PAGE_SIZE = 500;
/** How long /readyz waits for the database. */
export const READY_TIMEOUT_MS = 2000;
/**
 * How long /readyz lets the tasks table keep it waiting, by the server's own timeouts. Shorter
 * than READY_TIMEOUT_MS, so that a locked table is told apart from an unreachable database.
 */
export const READY_PROBE_TIMEOUT_MS = 1000;

/**
 * Persists a validated spec under a new id; resolves after commit. A repeat of an earlier
 * request with the same idempotency key returns that task (created: false); the same key with
 * a different request is a conflict.
 */
export async function submitTask(
  deps: ApiDeps,
  spec: TaskSpec,
  actor: string,
  /** The caller's W3C traceparent (REST header, gRPC metadata), if any. */
  traceparent: string | null = null,
): Promise<Submitted> {
  if (spec.dependsOn) {
    // Its edges are written in the insert's transaction: the batch path (which counts and traces it).
    const batch = await submitTasks(deps, [spec], actor, null, true, traceparent);
    const task = batch.tasks[0];
    if (!task) throw new Error("a batch of one answered no task");
    return { task, created: batch.created };
  }
  await checkFlowSpecs(deps, [spec], (_, name) => name);
  const id = Bun.randomUUIDv7();
  const outcome = deps.tracing
    ? await deps.tracing.around("persist", traceparent, { "taskqueue.task_id": id }, (span) =>
        deps.submit(id, spec, actor, span.traceparent),
      )
    : await deps.submit(id, spec, actor, normalTraceparent(traceparent));
  if (outcome.kind === "created") {
    deps.metrics?.submitted();
    const [task] = await applyStrategies(deps, [outcome.task], actor);
    return { task: task ?? outcome.task, created: true };
  }
  if (!outcome.sameRequest) {
    throw conflict(
      `idempotency key ${JSON.stringify(spec.idempotencyKey)} was already used for a different request (task ${outcome.task.id})`,
    );
  }
  return { task: outcome.task, created: false };
}

export interface SubmittedBatch {
  /** One per spec, in order: the new task, or the original one for a replay. */
  tasks: Task[];
  /** Indexes of the tasks returned as they were rather than created. */
  replayed: number[];
  /** Whether this request created any task. */
  created: boolean;
}

/**
 * Persists validated specs as new queued tasks in one statement; resolves after commit.
 * An item whose idempotency key was used before gets the original task; under a batch key
 * (`batchKey`), a repeat of the whole batch gets the original tasks and writes nothing. Any key
 * used before for a different request is a conflict, and then nothing is written.
 */
export async function submitTasks(
  deps: ApiDeps,
  specs: TaskSpec[],
  actor: string,
  batchKey: string | null = null,
  /** One task of POST /tasks (or /submit, SubmitTask): errors name its fields without `tasks[i].`. */
  single = false,
  /** The caller's W3C traceparent: every task of the batch is stored under it (or under its persist span). */
  traceparent: string | null = null,
): Promise<SubmittedBatch> {
  await checkFlowSpecs(deps, specs, (i, name) => (single ? name : `tasks[${i}].${name}`));
  const batch = deps.tracing
    ? await deps.tracing.around("persist", traceparent, { "taskqueue.tasks": specs.length }, (span) =>
        insertBatch(deps, specs, actor, batchKey, single, span.traceparent),
      )
    : await insertBatch(deps, specs, actor, batchKey, single, normalTraceparent(traceparent));
  // Flow control's strategies for full keys, once the batch is committed (src/api/flow.ts).
  const tasks = await applyStrategies(
    deps,
    batch.tasks.map((task, i) => (batch.replayed.includes(i) ? { ...task, concurrency_strategy: null } : task)),
    actor,
  );
  return { ...batch, tasks: tasks.map((task, i) => (batch.replayed.includes(i) ? batch.tasks[i]! : task)) };
}

async function insertBatch(
  deps: ApiDeps,
  specs: TaskSpec[],
  actor: string,
  batchKey: string | null,
  single: boolean,
  traceparent: string | null,
): Promise<SubmittedBatch> {
  const agingMs = deps.settings.priorityAgingMs;
  const items: NewTask[] = specs.map((spec) => ({
    id: Bun.randomUUIDv7(),
    spec,
    actor,
    agingMs,
    traceparent,
    ...(spec.dependsOn ? { parents: spec.dependsOn.length } : {}),
  }));
  const withParents = specs.some((spec) => spec.dependsOn);
  if (batchKey === null && !withParents && specs.every((spec) => spec.idempotencyKey === null)) {
    // Nothing to replay and nothing to conflict: the statement alone, no transaction.
    const outcomes = await insertTasks(deps.sql, items);
    deps.metrics?.submitted(outcomes.length);
    return { tasks: outcomes.map((outcome) => outcome.task), replayed: [], created: true };
  }
  // A transaction, so that a conflict found after the insert writes nothing, and so that the
  // batch key is held until the tasks are committed (a concurrent repeat waits for them).
  const batch = await deps.sql.begin(async (transaction) => {
    // The query functions take a Sql; a transaction answers every query they make.
    const tx = transaction as unknown as Sql;
    const hash = batchHash(specs);
    if (batchKey !== null) {
      const claimed = await claimBatchKey(tx, { key: batchKey, hash, taskIds: items.map((item) => item.id), actor });
      if (!claimed) return replayBatch(tx, batchKey, hash, specs);
    }
    const outcomes = await insertTasks(tx, items);
    const replayed: number[] = [];
    outcomes.forEach((outcome, i) => {
      if (outcome.kind === "created") return;
      if (!outcome.sameRequest) {
        throw new TaskQueueError(
          "conflict",
          `tasks[${i}]: idempotency_key ${JSON.stringify(specs[i]?.idempotencyKey)} was already used for a different ` +
            `request (task ${outcome.task.id}); nothing was written`,
          `tasks[${i}].idempotency_key`,
        );
      }
      replayed.push(i);
    });
    if (withParents) {
      const changed = await attachParents(
        tx,
        specs,
        outcomes.map((outcome) => outcome.task),
        new Set(replayed),
        single,
      );
      // Children whose parents had ended already are released (or ended) by now.
      const tasks = outcomes.map((outcome) => changed.get(outcome.task.id) ?? outcome.task);
      return { tasks, replayed, created: replayed.length < items.length };
    }
    return { tasks: outcomes.map((outcome) => outcome.task), replayed, created: replayed.length < items.length };
  });
  // Counted once committed; a replayed batch created none.
  if (batch.created) deps.metrics?.submitted(batch.tasks.length - batch.replayed.length);
  return batch;
}

/**
 * The edges of a batch's new tasks, their refs resolved to the tasks the batch answers with (a
 * replayed item's is the original task); an id that names no task is a 400 naming it, which
 * rolls the batch back.
 */
async function attachParents(
  tx: Sql,
  specs: TaskSpec[],
  tasks: Task[],
  replayed: ReadonlySet<number>,
  single: boolean,
): Promise<Map<string, Task>> {
  const byRef = new Map<string, Task>();
  specs.forEach((spec, i) => {
    const task = tasks[i];
    if (spec.ref !== undefined && task) byRef.set(spec.ref, task);
  });
  const edges: NewEdge[] = [];
  specs.forEach((spec, i) => {
    const child = tasks[i];
    // A replayed item is the task it was before, with the edges it had.
    if (!spec.dependsOn || !child || replayed.has(i)) return;
    const seen = new Set<string>();
    for (const entry of spec.dependsOn) {
      const parent = byRef.get(entry);
      const parentId = parent?.id ?? entry;
      if (seen.has(parentId)) {
        throw invalidArgument(`tasks[${i}].depends_on`, `tasks[${i}]: depends_on names task ${parentId} twice`);
      }
      seen.add(parentId);
      edges.push({ childId: child.id, parentId, ref: parent ? entry : refOfId(entry) });
    }
  });
  const { missing, changed } = await addDependencies(tx, edges);
  if (missing.length > 0) {
    const unknown = new Set(missing);
    const i = Math.max(
      0,
      specs.findIndex((spec) => spec.dependsOn?.some((entry) => unknown.has(entry))),
    );
    const field = single ? "depends_on" : `tasks[${i}].depends_on`;
    throw invalidArgument(
      field,
      `${single ? "" : `tasks[${i}]: `}depends_on: no task ${missing.sort().join(", ")}; nothing was written`,
    );
  }
  return new Map(changed.map((row) => [row.id, row]));
}

/** A task's parents and children, for GET /tasks/:id. */
export async function taskDependencies(deps: ApiDeps, task: Task): Promise<TaskDependencies> {
  if (!task.on_parent_failure && !task.has_children) return { parents: [], children: [] };
  return getDependencies(deps.sql, task.id);
}

/** The answer to a repeated batch key: the original tasks, or a conflict for another batch. */
async function replayBatch(sql: Sql, key: string, hash: string, specs: TaskSpec[]): Promise<SubmittedBatch> {
  const stored = await getBatch(
    sql,
    key,
    specs.map((spec) => spec.idempotencyKey),
  );
  if (!stored) throw new Error("the batch key was taken but no batch holds it");
  if (stored.requestHash !== hash) {
    throw conflict(
      `Idempotency-Key ${JSON.stringify(key)} was already used for a different batch (of ${stored.tasks.length} tasks); nothing was written`,
    );
  }
  const tasks = stored.tasks.filter((task) => task !== null);
  if (tasks.length !== stored.tasks.length)
    throw notFound(`a task of the batch under Idempotency-Key ${JSON.stringify(key)} no longer exists`);
  return { tasks, replayed: tasks.map((_, i) => i), created: false };
}

function requireTaskId(id: string, field: string): void {
  if (!isTaskId(id)) throw invalidArgument(field, `${field} must be a task id (a UUID)`);
}

/** `field` names the parameter the id came in, for the error. */
export async function getTaskOrThrow(deps: ApiDeps, id: string, field = "id"): Promise<Task> {
  requireTaskId(id, field);
  const task = await getTask(deps.sql, id);
  if (!task) throw notFound(`task ${id} not found`);
  await withWaiting(deps.sql, [task], deps.settings.workerTimeoutMs);
  return withFlowWaiting(deps, task);
}

export interface TaskPageQuery {
  state?: string;
  schedule_id?: string;
  fire_at?: string;
  /** 1..500. Defaults to 50. */
  limit?: number;
  cursor?: string;
  /** Only tasks of this queue. */
  queue?: string;
  /** Only tasks with this concurrency key. */
  key?: string;
  /** Only tasks requiring this label: `name` or `name=value`. */
  label?: string;
  /** Only tasks whose command contains this text. */
  q?: string;
}

export interface TaskPage {
  /** Newest first. */
  tasks: Task[];
  /** Cursor of the next page; null on the last. */
  nextCursor: string | null;
}

function pageSize(value: number | undefined): number {
  const limit = value ?? DEFAULT_PAGE_SIZE;
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_PAGE_SIZE) {
    throw invalidArgument("limit", `limit must be an integer from 1 to ${MAX_PAGE_SIZE}`);
  }
  return limit;
}

/** `name` or `name=value`, as GET /tasks?label= takes it. */
function parseLabelFilter(value: string | undefined): { name: string; value?: string } | undefined {
  if (!value) return undefined;
  const at = value.indexOf("=");
  const name = (at < 0 ? value : value.slice(0, at)).trim();
  if (name === "") throw invalidArgument("label", "label must be name or name=value");
  return at < 0 ? { name } : { name, value: value.slice(at + 1) };
}

/** `withReasons`: fill each task's `waiting` (what a view shows; a bulk action needs only the ids). */
export async function listTaskPage(deps: ApiDeps, query: TaskPageQuery, withReasons = true): Promise<TaskPage> {
  const { state, cursor } = query;
  if (state !== undefined && !isTaskState(state)) {
    throw invalidArgument("state", `state must be one of: ${TASK_STATES.join(", ")}`);
  }
  const limit = pageSize(query.limit);
  const before = cursor === undefined ? undefined : decodeCursor(cursor);
  // One row more than the page tells whether another page follows.
  if (query.queue !== undefined) parseQueueName(query.queue, "queue");
  if (query.schedule_id !== undefined) requireTaskId(query.schedule_id, "schedule_id");
  const fireAt = query.fire_at === undefined ? undefined : parseRfc3339(query.fire_at, "fire_at");
  // A view may read a replica (DATABASE_READ_URL); a bulk action picks what it changes on the
  // primary, so a replica's lag never hides a task it was asked to cover.
  const reader = withReasons ? (deps.readSql ?? deps.sql) : deps.sql;
  const rows = await listTasks(reader, {
    state,
    scheduleId: query.schedule_id,
    fireAt,
    limit: limit + 1,
    before,
    queue: query.queue,
    key: query.key || undefined,
    label: parseLabelFilter(query.label),
    text: query.q || undefined,
  });
  const page = rows.slice(0, limit);
  const tasks = withReasons ? await withWaiting(reader, page, deps.settings.workerTimeoutMs) : page;
  const last = tasks.at(-1);
  return { tasks, nextCursor: rows.length > limit && last ? encodeCursor(last.id) : null };
}

/**
 * Cancels a task that has not finished. An in-flight task is cancelled too: the coordinator
 * holding it sees the notification and stops the process.
 */
export async function cancelTaskOrThrow(deps: ApiDeps, id: string, actor: string): Promise<Task> {
  requireTaskId(id, "id");
  const outcome = await cancelTask(deps.sql, id, actor);
  switch (outcome.kind) {
    case "cancelled":
      deps.metrics?.finished("cancelled");
      return outcome.task;
    case "final":
      throw conflict(`task is already ${outcome.task.state}`);
    case "not_found":
      throw notFound(`task ${id} not found`);
  }
}

/**
 * A client's retry of a finished task (src/db/transitions.ts retryTask holds the rule): queued
 * again now for one more attempt; not_final (409) while it has not finished.
 */
export async function retryTaskOrThrow(deps: ApiDeps, id: string, actor: string): Promise<Task> {
  requireTaskId(id, "id");
  const outcome = await retryTask(deps.sql, id, actor);
  switch (outcome.kind) {
    case "retried":
      return outcome.task;
    case "not_final":
      throw notFinal(
        `task is ${outcome.task.state}: only a finished task (succeeded, failed, timed_out, cancelled) can be retried`,
      );
    case "not_found":
      throw notFound(`task ${id} not found`);
  }
}

export type BulkAction = "cancel" | "retry";

/** Which tasks a bulk action is over: ids, or the filters of GET /tasks (its page fields ignored). */
export type BulkTarget = { ids: readonly string[] } | { filter: Omit<TaskPageQuery, "limit" | "cursor"> };

export interface BulkOutcome {
  /** Tasks the ids or the filter named (ids unknown included). */
  matched: number;
  changed: number;
  /** Why a task named was left alone: not_found, not_final (retry), already_final (cancel); at most BULK_SKIPPED_SHOWN. */
  skipped: { id: string; reason: "not_found" | "not_final" | "already_final" }[];
}

/** At most this many ids in a bulk request's `ids`. */
export const MAX_BULK_IDS = 1000;
/** At most this many skipped tasks are listed in a bulk answer. */
export const BULK_SKIPPED_SHOWN = 100;
/** Tasks changed per statement of a bulk action over a filter. */
const BULK_PAGE = 500;

/**
 * Cancels or retries many tasks, by the same rules as one (cancelTasks and retryTasks in
 * src/db/transitions.ts), a page at a time: every task the filter matches when its page is
 * read, newest first. Each page is its own statement: a failure midway leaves the pages
 * before it done, and repeating the request is safe (a task already changed is skipped).
 */
export async function bulkAction(deps: ApiDeps, action: BulkAction, target: BulkTarget, actor: string): Promise<BulkOutcome> {
  const outcome: BulkOutcome = { matched: 0, changed: 0, skipped: [] };
  const apply = async (ids: string[], known: ReadonlySet<string> | null) => {
    const changed = action === "cancel" ? await cancelTasks(deps.sql, ids, actor) : await retryTasks(deps.sql, ids, actor);
    if (action === "cancel") for (const _ of changed) deps.metrics?.finished("cancelled");
    outcome.matched += ids.length;
    outcome.changed += changed.length;
    const done = new Set(changed.map((row) => row.id));
    const rest = ids.filter((id) => !done.has(id));
    if (rest.length === 0 || outcome.skipped.length >= BULK_SKIPPED_SHOWN) return;
    // Those that exist (a filter's always do, unless deleted meanwhile) were in the wrong state.
    const existing = known ?? (await existingTaskIds(deps.sql, rest));
    for (const id of rest) {
      if (outcome.skipped.length >= BULK_SKIPPED_SHOWN) break;
      const reason = !existing.has(id) ? "not_found" : action === "retry" ? "not_final" : "already_final";
      outcome.skipped.push({ id, reason });
    }
  };
  if ("ids" in target) {
    if (target.ids.length === 0) throw invalidArgument("ids", "ids must name at least one task");
    if (target.ids.length > MAX_BULK_IDS)
      throw invalidArgument("ids", `ids may name at most ${MAX_BULK_IDS} tasks; use a filter for more`);
    for (const [i, id] of target.ids.entries()) requireTaskId(id, `ids[${i}]`);
    await apply([...new Set(target.ids)], null);
    return outcome;
  }
  let cursor: string | undefined;
  do {
    const page = await listTaskPage(deps, { ...target.filter, limit: BULK_PAGE, cursor }, false);
    const ids = page.tasks.map((task) => task.id);
    if (ids.length > 0) await apply(ids, new Set(ids));
    cursor = page.nextCursor ?? undefined;
  } while (cursor !== undefined);
  return outcome;
}

export async function listWorkers(deps: ApiDeps): Promise<WorkerRow[]> {
  return listLiveWorkers(deps.readSql ?? deps.sql, deps.settings.workerTimeoutMs);
}

/**
 * Resolves when the tasks table can be read and written within READY_PROBE_TIMEOUT_MS (and the
 * whole check, a wait for a pooled connection included, took less than READY_TIMEOUT_MS);
 * throws unavailable otherwise. So a table locked by a migration or by hand, which stalls
 * every submit and list, makes the role unready rather than leaving it looking healthy.
 */
export async function checkReady(deps: ApiDeps, timeoutMs = READY_TIMEOUT_MS): Promise<void> {
  let timer: Timer | undefined;
  const query = probeTasks(deps.sql, Math.min(READY_PROBE_TIMEOUT_MS, timeoutMs));
  // The query may settle after we have answered; its outcome no longer matters then.
  query.catch(() => {});
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () =>
        reject(
          unavailable(
            `the database did not answer within ${timeoutMs} ms (no primary reachable: down, cut off, or a failover under way)`,
          ),
        ),
      timeoutMs,
    );
  });
  try {
    await Promise.race([query, timeout]);
  } catch (error) {
    if (error instanceof TaskQueueError) throw error;
    deps.log.warn({ err: error }, "readiness check failed");
    if (isDatabaseTimeout(error)) throw unavailable("the tasks table is locked or the database is too slow to answer");
    throw unavailable(notReadyReason(error));
  } finally {
    clearTimeout(timer);
  }
}

/** Why the database cannot serve us, for /readyz: what a failover looks like from here. */
function notReadyReason(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  if (code === "25006") return "the database is a read-only standby now (demoted in a failover); waiting for the new primary";
  if (code === "57P01" || code === "57P02") return "the database is shutting down or crashed (a failover may be under way)";
  if (code === "57P03") return "the database is starting up or in recovery (a failover may be under way)";
  if (code === "QUERY_TIMEOUT") return "the database stopped answering (cut off, or a failover under way)";
  // Nothing of the server's or the driver's own text (addresses, codes) goes to clients.
  return "the database is not reachable";
}

/** Every attempt of a task, first to last (none before its first dispatch). */
export async function listTaskAttempts(deps: ApiDeps, id: string, field = "id"): Promise<Attempt[]> {
  requireTaskId(id, field);
  const attempts = await listAttempts(deps.sql, id);
  if (attempts.length === 0 && !(await getTask(deps.sql, id))) throw notFound(`task ${id} not found`);
  return attempts;
}

export interface HistoryPage {
  /** Oldest first. */
  events: TaskEventRow[];
  /** Cursor of the next page; null on the last. */
  nextCursor: string | null;
}

/** The opaque history cursor: base64url of the last event id of the page. */
const encodeEventCursor = (eventId: string) => Buffer.from(`event:${eventId}`, "utf8").toString("base64url");

function decodeEventCursor(cursor: string): string {
  const text = /^[A-Za-z0-9_-]{1,64}$/.test(cursor) ? Buffer.from(cursor, "base64url").toString("utf8") : "";
  const match = /^event:(\d{1,19})$/.exec(text);
  if (!match || encodeEventCursor(match[1]!) !== cursor) {
    throw invalidArgument("cursor", "cursor is not valid; pass next_cursor from the previous page unchanged");
  }
  return match[1]!;
}

/** Every task_events row of a task, oldest first, paged by cursor. */
export async function listTaskHistory(
  deps: ApiDeps,
  id: string,
  query: Omit<TaskPageQuery, "state">,
  field = "id",
): Promise<HistoryPage> {
  requireTaskId(id, field);
  const limit = pageSize(query.limit);
  const after = query.cursor === undefined ? "0" : decodeEventCursor(query.cursor);
  const rows = await listTaskEventsAfter(deps.sql, id, after, limit + 1);
  // Every task has its submitted event: no rows at all means no task.
  if (rows.length === 0 && !(await getTask(deps.sql, id))) throw notFound(`task ${id} not found`);
  const events = rows.slice(0, limit);
  const last = events.at(-1);
  return { events, nextCursor: rows.length > limit && last ? encodeEventCursor(last.id) : null };
}

const eventNumber = (id: string): bigint => {
  try {
    return BigInt(id);
  } catch {
    return -1n;
  }
};

export interface TaskUpdate {
  /** The task as it is now (read with the event, or after it). */
  task: Task;
  /**
   * The history row this update is about, with its own kind, state, attempt and time; null in
   * the first update of a watch from now, which is the state when watching began.
   */
  event: TaskEventRow | null;
  /** The update's id: the event's id, or for the first update the newest event of the task ("0": none). */
  eventId: string;
}

/** Events read per round trip while watching (a replay of more takes several). */
const WATCH_PAGE = 500;

/** A task_events id given by a client (Last-Event-ID, after_event_id): digits, at most a bigint. */
export function parseEventId(value: string, field: string): string {
  if (!/^\d{1,19}$/.test(value) || BigInt(value) > 9223372036854775807n) {
    throw invalidArgument(field, `${field} must be an event id (the id of an event this API sent)`);
  }
  return BigInt(value).toString();
}

/**
 * Whether a watch resumed after `afterEventId` has anything to send: an event after it, or a
 * task not yet final. Throws for a bad or unknown id.
 */
export async function canFollow(deps: ApiDeps, id: string, afterEventId: string): Promise<boolean> {
  requireTaskId(id, "id");
  const read = await readTaskSince(deps.sql, id, afterEventId, 1);
  if (!read) throw notFound(`task ${id} not found`);
  return read.events.length > 0 || !isFinal(read.task.state);
}

/**
 * Live history of one task, until it reaches a final state. From now (no `afterEventId`): the
 * current row first (event null), then one update per task_events row written after it. With
 * `afterEventId`: every event after that id, in order, then live the same way: a client that
 * reconnects with the last id it saw misses nothing and sees nothing twice. Each update
 * carries its event and the task as read with it. The watch ends after the event that put the
 * task in a final state (a replay that starts after it yields nothing).
 *
 * Subscribes before the first read, so no change falls between the read and the
 * subscription; each wake reads the row and the events after the last one sent in one
 * statement. Stop it by aborting `signal` (a pending wait ends at once) or by return()
 * between updates; either releases the subscriptions.
 */
export async function* watchTask(
  deps: ApiDeps,
  id: string,
  signal: AbortSignal,
  options: { afterEventId?: string } = {},
): AsyncGenerator<TaskUpdate, void, undefined> {
  requireTaskId(id, "id");
  let pending = false;
  let wake: (() => void) | null = null;
  let seen = options.afterEventId === undefined ? null : BigInt(options.afterEventId);
  let known = false;
  const poke = () => {
    const resolve = wake;
    wake = null;
    resolve?.();
  };
  const offResync = deps.feed.onResync(() => {
    pending = true;
    poke();
  });
  let offTask: () => void = () => {};
  signal.addEventListener("abort", poke);
  try {
    offTask = await deps.feed.onTask(id, (change) => {
      if (seen !== null && eventNumber(change.event_id) <= seen) return;
      pending = true;
      poke();
    });
    if (seen === null) {
      const first = await readTaskSince(deps.sql, id, "0", 0);
      if (!first) throw notFound(`task ${id} not found`);
      seen = BigInt(first.lastEventId);
      known = true;
      yield { task: first.task, event: null, eventId: first.lastEventId };
      if (isFinal(first.task.state)) return;
    }
    while (!signal.aborted) {
      pending = false;
      const read = await readTaskSince(deps.sql, id, seen.toString(), WATCH_PAGE);
      if (!read) {
        if (!known) throw notFound(`task ${id} not found`);
        return;
      }
      known = true;
      for (const event of read.events) {
        seen = BigInt(event.id);
        yield { task: read.task, event, eventId: event.id };
        if (isTaskState(event.state) && isFinal(event.state)) return;
      }
      if (read.events.length === WATCH_PAGE) continue;
      if (isFinal(read.task.state)) return;
      while (!pending && !signal.aborted) await new Promise<void>((resolve) => (wake = resolve));
    }
  } finally {
    offTask();
    offResync();
    signal.removeEventListener("abort", poke);
  }
}
