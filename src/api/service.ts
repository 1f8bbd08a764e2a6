// What the API does, as plain functions of ApiDeps: the HTTP controllers and the gRPC
// TaskService call these, so both transports validate and answer alike. They throw
// TaskQueueError for client mistakes; database errors pass through to the transport's mapper.

import { batchHash, claimBatchKey, getBatch } from "../db/batches";
import type { TaskChange } from "../db/notify";
import { ping, type Sql } from "../db/sql";
import { cancelTask, getTask, getTaskWithLastEvent, insertTasks, listTasks, type TaskWithLastEvent } from "../db/tasks";
import { listLiveWorkers, type WorkerRow } from "../db/workers";
import { conflict, invalidArgument, notFound, TaskQueueError, unavailable } from "../task/errors";
import { decodeCursor, encodeCursor, isTaskId } from "../task/spec";
import { isFinal, isTaskState, TASK_STATES } from "../task/state";
import type { Submitted, Task, TaskSpec } from "../task/task";
import type { ApiDeps } from "./deps";

export const DEFAULT_PAGE_SIZE = 50;
export const MAX_PAGE_SIZE = 500;
/** How long /readyz waits for the database. */
export const READY_TIMEOUT_MS = 2000;

/**
 * Persists a validated spec under a new id; resolves after commit. A repeat of an earlier
 * request with the same idempotency key returns that task (created: false); the same key with
 * a different request is a conflict.
 */
export async function submitTask(deps: ApiDeps, spec: TaskSpec, actor: string): Promise<Submitted> {
  const outcome = await deps.submit(Bun.randomUUIDv7(), spec, actor);
  if (outcome.kind === "created") return { task: outcome.task, created: true };
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
): Promise<SubmittedBatch> {
  const items = specs.map((spec) => ({ id: Bun.randomUUIDv7(), spec, actor }));
  if (batchKey === null && specs.every((spec) => spec.idempotencyKey === null)) {
    // Nothing to replay and nothing to conflict: the statement alone, no transaction.
    const outcomes = await insertTasks(deps.sql, items);
    return { tasks: outcomes.map((outcome) => outcome.task), replayed: [], created: true };
  }
  // A transaction, so that a conflict found after the insert writes nothing, and so that the
  // batch key is held until the tasks are committed (a concurrent repeat waits for them).
  return deps.sql.begin(async (transaction) => {
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
    return { tasks: outcomes.map((outcome) => outcome.task), replayed, created: replayed.length < items.length };
  });
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
  return task;
}

export interface TaskPageQuery {
  state?: string;
  /** 1..500. Defaults to 50. */
  limit?: number;
  cursor?: string;
}

export interface TaskPage {
  /** Newest first. */
  tasks: Task[];
  /** Cursor of the next page; null on the last. */
  nextCursor: string | null;
}

export async function listTaskPage(deps: ApiDeps, query: TaskPageQuery): Promise<TaskPage> {
  const { state, cursor } = query;
  if (state !== undefined && !isTaskState(state)) {
    throw invalidArgument("state", `state must be one of: ${TASK_STATES.join(", ")}`);
  }
  const limit = query.limit ?? DEFAULT_PAGE_SIZE;
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_PAGE_SIZE) {
    throw invalidArgument("limit", `limit must be an integer from 1 to ${MAX_PAGE_SIZE}`);
  }
  const before = cursor === undefined ? undefined : decodeCursor(cursor);
  // One row more than the page tells whether another page follows.
  const rows = await listTasks(deps.sql, { state, limit: limit + 1, before });
  const tasks = rows.slice(0, limit);
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
      return outcome.task;
    case "final":
      throw conflict(`task is already ${outcome.task.state}`);
    case "not_found":
      throw notFound(`task ${id} not found`);
  }
}

export async function listWorkers(deps: ApiDeps): Promise<WorkerRow[]> {
  return listLiveWorkers(deps.sql, deps.config.TQ_HEARTBEAT_TIMEOUT_MS);
}

/** Resolves when the database answers within READY_TIMEOUT_MS; throws unavailable otherwise. */
export async function checkReady(deps: ApiDeps, timeoutMs = READY_TIMEOUT_MS): Promise<void> {
  let timer: Timer | undefined;
  const query = ping(deps.sql);
  // The query may settle after we have answered; its outcome no longer matters then.
  query.catch(() => {});
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(unavailable(`the database did not answer within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    await Promise.race([query, timeout]);
  } catch (error) {
    if (error instanceof TaskQueueError) throw error;
    deps.log.warn({ err: error }, "readiness check failed");
    throw unavailable("the database is not reachable");
  } finally {
    clearTimeout(timer);
  }
}

export interface TaskUpdate {
  task: Task;
  /** The change that led to `task`; null in the first update, the state when watching began. */
  event: TaskChange | null;
  /** The newest task_events id that `task` reflects ("0" when it has none). */
  eventId: string;
}

const eventNumber = (id: string | null): bigint => {
  try {
    return id === null ? 0n : BigInt(id);
  } catch {
    return -1n;
  }
};

function withoutEvent(row: TaskWithLastEvent): Task {
  const { event_id: _id, event_kind: _kind, ...task } = row;
  return task;
}

/**
 * Live state of one task: the current row first, then the row again after each change, until
 * it reaches a final state. Subscribes before the first read, so no change falls between the
 * read and the subscription; notifications for changes the row already shows are skipped.
 * Several changes that arrive together yield one update (the row as it is now).
 *
 * Stop it by aborting `signal` (a pending wait ends at once) or by return() between updates;
 * either releases the subscriptions.
 */
export async function* watchTask(deps: ApiDeps, id: string, signal: AbortSignal): AsyncGenerator<TaskUpdate, void, undefined> {
  requireTaskId(id, "id");
  const pending: TaskChange[] = [];
  let resync = false;
  let wake: (() => void) | null = null;
  const poke = () => {
    const resolve = wake;
    wake = null;
    resolve?.();
  };
  const offResync = deps.feed.onResync(() => {
    resync = true;
    poke();
  });
  let offTask: () => void = () => {};
  signal.addEventListener("abort", poke);
  try {
    offTask = await deps.feed.onTask(id, (change) => {
      pending.push(change);
      poke();
    });
    const first = await getTaskWithLastEvent(deps.sql, id);
    if (!first) throw notFound(`task ${id} not found`);
    let seen = eventNumber(first.event_id);
    let state = first.state;
    yield { task: withoutEvent(first), event: null, eventId: seen.toString() };
    while (!isFinal(state) && !signal.aborted) {
      if (pending.length === 0 && !resync) {
        await new Promise<void>((resolve) => (wake = resolve));
        continue;
      }
      const changes = pending.splice(0).filter((change) => eventNumber(change.event_id) > seen);
      const reread = resync || changes.length > 0;
      resync = false;
      if (!reread) continue;
      const row = await getTaskWithLastEvent(deps.sql, id);
      if (!row) return;
      const rowEvent = eventNumber(row.event_id);
      if (rowEvent <= seen) continue;
      seen = rowEvent;
      state = row.state;
      const task = withoutEvent(row);
      // The notification of the change the row shows, or (after a resync, or when a later
      // change overtook its notification) the same facts read from the row.
      const event = changes.find((change) => eventNumber(change.event_id) === rowEvent) ?? {
        id: task.id,
        state: task.state,
        attempt: task.attempt,
        worker_id: task.worker_id,
        coordinator_id: task.coordinator_id,
        event_id: rowEvent.toString(),
        kind: row.event_kind ?? "",
        due_in_ms: null,
      };
      yield { task, event, eventId: rowEvent.toString() };
    }
  } finally {
    offTask();
    offResync();
    signal.removeEventListener("abort", poke);
  }
}
