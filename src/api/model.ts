// What the HTTP API answers, as TypeBox schemas (the route response schemas, and so the
// OpenAPI document), and the conversions from database rows. Types come from the schemas.

import { type TLiteral, type TSchema, Type } from "@sinclair/typebox";
import type { DependencyRow, TaskDependencies } from "../db/dependencies";
import type { TaskEventRow } from "../db/events";
import type { WorkerRow } from "../db/workers";
import { ATTEMPT_OUTCOMES, type Attempt } from "../task/attempt";
import { parentsWaiting } from "../task/dependencies";
import type { ErrorCode } from "../task/errors";
import { QueueName } from "../task/routing";
import { TASK_STATES } from "../task/state";
import { LIMITS_APPLIED, type Task } from "../task/task";
import { flowTaskFields, flowTaskJson } from "./flow-model";
import { TaskRoutingJson, taskRoutingJson } from "./queues-model";

const Nullable = <T extends TSchema>(schema: T) => Type.Union([schema, Type.Null()]);

const Timestamp = Type.String({
  format: "date-time",
  description: "RFC 3339, UTC, milliseconds.",
  examples: ["2023-04-01T15:04:05.000Z"],
});

/** One literal schema per value, as a tuple: Elysia infers nothing useful from a plain array. */
type Literals<T extends readonly string[]> = { -readonly [K in keyof T]: TLiteral<T[K]> };

/** The limits that held for an attempt, each null when none did. */
export const EffectiveLimitsJson = Type.Object(
  {
    memory_mb: Nullable(Type.Integer({ description: "MiB." })),
    pids: Nullable(Type.Integer()),
    nofile: Nullable(Type.Integer()),
    cpu: Nullable(Type.Number({ description: "CPU cores." })),
  },
  { additionalProperties: false, description: "The limits that held: the task's, clamped to its worker's maxima." },
);

export const TaskStateJson = Type.Union(
  TASK_STATES.map((state) => Type.Literal(state)) as unknown as Literals<typeof TASK_STATES>,
  { description: "queued, dispatched, running, then succeeded, failed, timed_out or cancelled." },
);

const ScheduledAt = Type.String({
  format: "date-time",
  description: "The time the task was asked to run at, exactly as submitted (run now: the submit's time). Never changes.",
  examples: ["2023-04-01T15:04:05.000Z"],
});

const RunAt = Type.String({
  format: "date-time",
  description:
    "When the current or next attempt becomes due: scheduled_at at first, then moved by each retry's backoff. " +
    "Dispatch never starts an attempt before it.",
  examples: ["2023-04-01T15:04:06.000Z"],
});

/** One end of a dependency edge, as GET /tasks/:id shows it. */
export const DependencyJson = Type.Object(
  {
    id: Type.String({ format: "uuid" }),
    ref: Nullable(Type.String({ description: "A parent: the name the child knows it by. A child: its own ref." })),
    state: TaskStateJson,
  },
  { additionalProperties: false },
);

export const TaskJson = Type.Object(
  {
    id: Type.String({ format: "uuid" }),
    command: Type.String(),
    state: TaskStateJson,
    scheduled_at: ScheduledAt,
    run_at: RunAt,
    created_at: Timestamp,
    picked_at: Nullable(Timestamp),
    started_at: Nullable(Timestamp),
    completed_at: Nullable(Timestamp),
    failed_at: Nullable(Timestamp),
    cancelled_at: Nullable(Timestamp),
    attempt: Type.Integer({ description: "Attempts started so far; the current one while in flight." }),
    interruptions: Type.Integer({
      description:
        "Of those, the attempts that ended interrupted (handed back by a draining worker, or never delivered): " +
        "they do not count, so attempt - interruptions is what max_attempts limits.",
    }),
    max_attempts: Type.Integer(),
    timeout_ms: Type.Integer({ description: "0: no timeout." }),
    env: Type.Record(Type.String(), Type.String()),
    cwd: Nullable(Type.String()),
    worker_id: Nullable(Type.String({ description: "The worker that holds the task, or held its last attempt." })),
    coordinator_id: Nullable(Type.String()),
    exit_code: Nullable(Type.Integer()),
    signal: Nullable(Type.String({ description: "The signal that ended the process, e.g. SIGKILL." })),
    stdout: Nullable(Type.String({ description: "Tail of standard output." })),
    stderr: Nullable(Type.String({ description: "Tail of standard error." })),
    stdout_truncated: Type.Boolean(),
    stderr_truncated: Type.Boolean(),
    stdout_replaced: Type.Boolean({
      description:
        "The worker replaced bytes of the output that text cannot hold (a NUL byte, bytes that are not UTF-8) with U+FFFD.",
    }),
    stderr_replaced: Type.Boolean({
      description:
        "The worker replaced bytes of the output that text cannot hold (a NUL byte, bytes that are not UTF-8) with U+FFFD.",
    }),
    error: Nullable(
      Type.String({
        description:
          "While attempts remain: the last attempt's error (e.g. a timeout). Once failed or timed_out: why no further " +
          'attempt follows, e.g. "exhausted 3 attempts: last exit code 127" (or last signal SIGKILL, timed out after 5000 ms, ' +
          'worker lost, could not start: ...), or "exit code 1; the task does not retry failures".',
        examples: ["exhausted 3 attempts: last exit code 127"],
      }),
    ),
    lease_expires_at: Nullable(
      Type.String({
        format: "date-time",
        description: "While dispatched or running: when the attempt's lease lapses unless its worker reports it.",
      }),
    ),
    lease_ms: Nullable(
      Type.Integer({
        description:
          "Each attempt's lease as the task asked (lease_ms); null: the TQ_DEFAULT_LEASE_MS of the coordinator granting it.",
      }),
    ),
    retry: Type.Object(
      {
        on_failure: Type.Boolean(),
        on_timeout: Type.Boolean(),
        on_lost: Type.Boolean(),
        backoff_base_ms: Type.Integer(),
        backoff_cap_ms: Type.Integer(),
      },
      { additionalProperties: false, description: "What is retried while attempts remain, and the backoff between attempts." },
    ),
    idempotency_key: Nullable(Type.String()),
    secret_env_keys: Type.Array(Type.String(), {
      description: "Names of the secret environment variables; their values are never returned.",
    }),
    limits: Nullable(
      Type.Object(
        {
          memory_mb: Type.Optional(Type.Integer()),
          pids: Type.Optional(Type.Integer()),
          nofile: Type.Optional(Type.Integer()),
          cpu: Type.Optional(Type.Number()),
        },
        {
          additionalProperties: false,
          description: "The limits the task asked for; null when none (each attempt's own record says what applied).",
        },
      ),
    ),
    // Flow control (src/api/flow-model.ts).
    ...flowTaskFields,
    // Routing (src/task/routing.ts).
    ...TaskRoutingJson,
    ref: Nullable(Type.String({ description: "Its ref in the batch that declared it; null outside a DAG batch." })),
    on_parent_failure: Nullable(
      Type.String({ description: "cancel, skip or run (see POST /tasks depends_on); null for a task without parents." }),
    ),
    parents: Type.Optional(
      Type.Array(DependencyJson, {
        description: "GET /tasks/:id only: the tasks it depends on, each with the ref it knows them by (TQ_PARENT_<ref>_EXIT).",
      }),
    ),
    children: Type.Optional(
      Type.Array(DependencyJson, { description: "GET /tasks/:id only: the tasks that depend on it, with their own refs." }),
    ),
    schedule_id: Nullable(
      Type.String({ format: "uuid", description: "The recurring schedule whose firing created the task; null otherwise." }),
    ),
    fire_at: Nullable(Type.String({ format: "date-time", description: "The fire time of that firing (equal to scheduled_at)." })),
  },
  { additionalProperties: false },
);
export type TaskJson = typeof TaskJson.static;

/** The seed's `GET /status` answer, plus attempt, exit_code and error. */
export const StatusJson = Type.Object(
  {
    task_id: Type.String({ format: "uuid" }),
    command: Type.String(),
    state: TaskStateJson,
    scheduled_at: ScheduledAt,
    run_at: RunAt,
    picked_at: Nullable(Timestamp),
    started_at: Nullable(Timestamp),
    completed_at: Nullable(Timestamp),
    failed_at: Nullable(Timestamp),
    created_at: Timestamp,
    cancelled_at: Nullable(Timestamp),
    attempt: Type.Integer(),
    exit_code: Nullable(Type.Integer()),
    error: Nullable(
      Type.String({
        description: 'As in GET /tasks/:id: for a final failure, why, e.g. "exhausted 3 attempts: last exit code 127".',
      }),
    ),
  },
  { additionalProperties: false },
);
export type StatusJson = typeof StatusJson.static;

export const ScheduleResponse = Type.Object(
  { task_id: Type.String({ format: "uuid" }), command: Type.String(), scheduled_at: Timestamp },
  { additionalProperties: false },
);
export type ScheduleResponse = typeof ScheduleResponse.static;

export const TaskBatch = Type.Object(
  {
    tasks: Type.Array(TaskJson, { description: "The batch's tasks, in the order submitted." }),
    replayed: Type.Array(Type.Integer({ minimum: 0 }), {
      description:
        "Indexes (0-based, ascending) of the tasks that were not created by this request but returned as they were: an " +
        "item's idempotency_key was used before, or the whole batch is a repeat under its Idempotency-Key (every index).",
    }),
  },
  { additionalProperties: false },
);
export type TaskBatch = typeof TaskBatch.static;

/** The cursor of the page after this one, in every paged answer. */
const NextCursor = Nullable(Type.String({ description: "Pass as `cursor` for the next page; null on the last page." }));

export const TaskList = Type.Object(
  {
    tasks: Type.Array(TaskJson, { description: "Newest first." }),
    next_cursor: NextCursor,
  },
  { additionalProperties: false },
);
export type TaskList = typeof TaskList.static;

export const AttemptOutcomeJson = Type.Union(
  ATTEMPT_OUTCOMES.map((outcome) => Type.Literal(outcome)) as unknown as Literals<typeof ATTEMPT_OUTCOMES>,
  {
    description:
      "How the attempt ended: succeeded, failed, timed_out (its result), lost (ended without a result: worker lost, " +
      "lease lapsed; counts against max_attempts), interrupted (ended without a result, not counted: handed back by a " +
      "draining worker, or never delivered), stopped (the task was cancelled), stale (its result came after it had " +
      "ended lost, interrupted or stopped; the result is kept here and changed nothing).",
  },
);

export const AttemptJson = Type.Object(
  {
    task_id: Type.String({ format: "uuid" }),
    attempt: Type.Integer({ minimum: 1, description: "1 for the first attempt." }),
    worker_id: Type.String(),
    coordinator_id: Nullable(Type.String()),
    dispatched_at: Timestamp,
    started_at: Nullable(Timestamp),
    finished_at: Nullable(Timestamp),
    pid: Nullable(Type.Integer()),
    exit_code: Nullable(Type.Integer()),
    signal: Nullable(Type.String()),
    error: Nullable(
      Type.String({ description: "Why it ended without an exit code (timeout, could not start, worker lost...)." }),
    ),
    stdout: Nullable(Type.String({ description: "Tail of standard output." })),
    stderr: Nullable(Type.String({ description: "Tail of standard error." })),
    stdout_truncated: Type.Boolean(),
    stderr_truncated: Type.Boolean(),
    stdout_replaced: Type.Boolean({
      description:
        "The worker replaced bytes of the output that text cannot hold (a NUL byte, bytes that are not UTF-8) with U+FFFD.",
    }),
    stderr_replaced: Type.Boolean({
      description:
        "The worker replaced bytes of the output that text cannot hold (a NUL byte, bytes that are not UTF-8) with U+FFFD.",
    }),
    outcome: Type.Union([AttemptOutcomeJson, Type.Null()], { description: "null while the attempt holds its task." }),
    limits_applied: Nullable(
      Type.Union(LIMITS_APPLIED.map((mechanism) => Type.Literal(mechanism)) as unknown as Literals<typeof LIMITS_APPLIED>, {
        description:
          "How the worker enforced the limits: cgroup-v1 or cgroup-v2 (a cgroup per attempt, which stopping the task " +
          "empties), rlimit (per-process limits in the spawned shell) or none. null until the result arrived.",
      }),
    ),
    limits: Nullable(EffectiveLimitsJson),
    cpu_user_us: Nullable(Type.Integer({ description: "User CPU time, microseconds." })),
    cpu_system_us: Nullable(Type.Integer({ description: "System CPU time, microseconds." })),
    peak_memory_bytes: Nullable(
      Type.Integer({
        description:
          "Peak memory: the cgroup's peak charge, else the largest resident set of the command and its waited-for children.",
      }),
    ),
    oom_killed: Nullable(Type.Boolean({ description: "The kernel's OOM killer killed a process of the attempt." })),
  },
  { additionalProperties: false, description: "One attempt of a task." },
);
export type AttemptJson = typeof AttemptJson.static;

export const AttemptList = Type.Object(
  { attempts: Type.Array(AttemptJson, { description: "Every attempt, first to last." }) },
  { additionalProperties: false },
);
export type AttemptList = typeof AttemptList.static;

export const EventJson = Type.Object(
  {
    id: Type.String({ description: "task_events id (a bigint, as text); increases with every event." }),
    at: Timestamp,
    kind: Type.String({
      description:
        "submitted, submitted+dispatched, dispatched, started, succeeded, failed, timed_out, retrying (a failed or timed-out " +
        "attempt that is retried: detail.outcome, detail.run_at), requeued (an attempt lost or interrupted, retried at " +
        "once: detail.cause is lost or interrupted), cancelled, " +
        "stale (a result that came too late), stopped (the worker stopped an attempt as told).",
    }),
    state: TaskStateJson,
    attempt: Type.Integer({ description: "The attempt the event is about (0 before the first dispatch)." }),
    worker_id: Nullable(Type.String()),
    actor: Nullable(Type.String({ description: "The API token (by name) that asked for the change." })),
    detail: Nullable(Type.Record(Type.String(), Type.Unknown(), { description: "What else the event knows, by kind." })),
  },
  { additionalProperties: false, description: "One row of the task's history; state is the task's state after it." },
);
export type EventJson = typeof EventJson.static;

export const EventPage = Type.Object(
  {
    events: Type.Array(EventJson, { description: "Oldest first." }),
    next_cursor: NextCursor,
  },
  { additionalProperties: false },
);
export type EventPage = typeof EventPage.static;

/** One SSE message of `GET /tasks/:id/events`: the task now, and the event the message is about. */
export const TaskEventJson = Type.Object(
  {
    ...TaskJson.properties,
    event: Nullable(EventJson),
  },
  {
    additionalProperties: false,
    description:
      "The task as read with the event, and the event itself (its own kind, state, attempt and time). event is null " +
      "in the first message of a stream opened without Last-Event-ID, which is the state when the stream opened.",
  },
);
export type TaskEventJson = typeof TaskEventJson.static;

export const WorkerJson = Type.Object(
  {
    id: Type.String(),
    name: Type.String(),
    coordinator_id: Type.String(),
    state: Type.Union([Type.Literal("connected"), Type.Literal("draining")]),
    slots: Type.Integer(),
    running: Type.Integer({ description: "Tasks the worker holds (dispatched or running)." }),
    labels: Type.Record(Type.String(), Type.String()),
    version: Type.String(),
    connected_at: Timestamp,
    last_heartbeat_at: Timestamp,
    clock_skew_ms: Nullable(
      Type.Integer({
        description:
          "The worker's wall clock minus its coordinator's when it joined, in ms (positive: the worker runs ahead); " +
          "null when the worker did not say its time. Leases travel as durations, so skew does not fail tasks, " +
          "but it skews the times the worker reports.",
      }),
    ),
  },
  { additionalProperties: false },
);
export type WorkerJson = typeof WorkerJson.static;

export const WorkerList = Type.Object({ workers: Type.Array(WorkerJson) }, { additionalProperties: false });
export type WorkerList = typeof WorkerList.static;

/** Every code an HTTP error answer carries: the typed errors' codes and those only HTTP has. */
export const HTTP_ERROR_CODES = [
  "invalid_argument",
  "invalid_json",
  "unauthenticated",
  "permission_denied",
  "not_found",
  "task_not_found",
  "attempt_not_found",
  "method_not_allowed",
  "conflict",
  "not_final",
  "payload_too_large",
  "unsupported_media_type",
  "rate_limited",
  "unavailable",
  "internal",
] as const;
export type HttpErrorCode = (typeof HTTP_ERROR_CODES)[number];
/** Fails to compile when a typed error code is missing from HTTP_ERROR_CODES. */
export type EveryErrorCodeListed = [Exclude<ErrorCode, HttpErrorCode>] extends [never] ? true : never;
true satisfies EveryErrorCodeListed;

export const ErrorCodeJson = Type.Union(
  HTTP_ERROR_CODES.map((code) => Type.Literal(code)) as unknown as Literals<typeof HTTP_ERROR_CODES>,
  { description: "What went wrong, stable for clients to act on; the message says it in words." },
);

export const ErrorJson = Type.Object(
  {
    error: Type.Object({
      code: ErrorCodeJson,
      message: Type.String(),
      field: Type.Optional(Type.String({ description: "The request field the error is about." })),
      request_id: Type.Optional(Type.String({ description: "Quote it when reporting an internal error." })),
    }),
  },
  { additionalProperties: false },
);
export type ErrorJson = typeof ErrorJson.static;

export const HealthJson = Type.Object(
  { status: Type.Literal("ok"), role: Type.Union([Type.Literal("scheduler"), Type.Literal("coordinator")]) },
  { additionalProperties: false },
);
export type HealthJson = typeof HealthJson.static;

export const ReadyJson = Type.Object({ status: Type.Literal("ready") }, { additionalProperties: false });
export type ReadyJson = typeof ReadyJson.static;

export const TaskIdParams = Type.Object({ id: Type.String({ format: "uuid", description: "Task id (UUID)." }) });

/** GET /tasks/:id/logs (src/api/logs.ts checks the values). */
export const LogsQuery = Type.Object({
  stream: Type.Optional(
    Type.Union([Type.Literal("stdout"), Type.Literal("stderr"), Type.Literal("both")], {
      description: "Which output: stdout, stderr or both merged in the order written. Defaults to both.",
    }),
  ),
  offset: Type.Optional(Type.String({ pattern: "^[0-9]{1,15}$", description: "Byte offset to start from. Defaults to 0." })),
  attempt: Type.Optional(
    Type.String({ pattern: "^[0-9]{1,9}$", description: "Which attempt (1, 2, ...). Defaults to the latest." }),
  ),
  follow: Type.Optional(
    Type.Union([Type.Literal("0"), Type.Literal("1"), Type.Literal("true"), Type.Literal("false")], {
      description: "1: server-sent events, live until the attempt ends.",
    }),
  ),
});

/** The body of GET /tasks/:id/logs without follow. */
export const LogText = Type.String({
  description: "The bytes the attempt wrote from the offset on, as stored (text/plain; charset=utf-8).",
});

/** The data of one `event: log` or `event: end` of GET /tasks/:id/logs?follow=1. */
export const LogEventJson = Type.Union([
  Type.Object({
    stream: Type.Union([Type.Literal("stdout"), Type.Literal("stderr")]),
    offset: Type.Integer({ description: "Offset of the text's first byte." }),
    data: Type.String({ description: "The bytes as UTF-8 text." }),
  }),
  Type.Object({
    attempt: Type.Integer(),
    state: Type.String({ description: "The task's state." }),
    exit_code: Type.Union([Type.Integer(), Type.Null()]),
    truncated: Type.Integer({ description: "Bytes cut by TQ_LOG_MAX_BYTES." }),
  }),
]);

export const StatusQuery = Type.Object({ task_id: Type.String({ format: "uuid", description: "Task id (UUID)." }) });

/** The query of every paged list: its size and where it starts. */
const pageQuery = {
  limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, description: "Page size. Defaults to 50." })),
  cursor: Type.Optional(Type.String({ description: "next_cursor of the previous page." })),
};

export const HistoryQuery = Type.Object(pageQuery);

export const TaskListQuery = Type.Object({
  state: Type.Optional(TaskStateJson),
  queue: Type.Optional({ ...QueueName, description: "Only tasks of this queue." }),
  schedule_id: Type.Optional(Type.String({ format: "uuid", description: "Only the tasks this recurring schedule created." })),
  fire_at: Type.Optional(
    Type.String({
      description: "Only the task of this fire time (RFC 3339), with schedule_id.",
      examples: ["2026-12-01T12:00:00Z"],
    }),
  ),
  // The dashboard's filters (src/ui): a concurrency key, a required label, text in the command.
  key: Type.Optional(
    Type.String({ maxLength: 512, description: "Only tasks with this concurrency key (as expanded at creation)." }),
  ),
  label: Type.Optional(
    Type.String({
      maxLength: 256,
      description: "Only tasks that require this worker label: `name` (any rule on it) or `name=value`.",
      examples: ["gpu", "region=eu"],
    }),
  ),
  q: Type.Optional(
    Type.String({
      maxLength: 256,
      description:
        "Only tasks whose command contains this text (case-insensitive). Read newest first until a page is full, so " +
        "combine it with other filters on a large table.",
    }),
  ),
  ...pageQuery,
});

export const BulkInput = Type.Object(
  {
    action: Type.Union([Type.Literal("cancel"), Type.Literal("retry")], {
      description: "cancel (needs the cancel scope) or retry (needs submit), each by the rule of its one-task route.",
    }),
    ids: Type.Optional(
      Type.Array(Type.String({ format: "uuid" }), { minItems: 1, maxItems: 1000, description: "The tasks, by id (1 to 1000)." }),
    ),
    // The filters of GET /tasks, without its page fields.
    filter: Type.Optional(
      Type.Omit(TaskListQuery, ["limit", "cursor"], {
        additionalProperties: false,
        description: "The same filters as GET /tasks (every task they match, not one page).",
      }),
    ),
  },
  { additionalProperties: false, description: "One of ids or filter." },
);
export type BulkInput = typeof BulkInput.static;
/** Which tasks a bulk action is over, by the filters of GET /tasks. */
export const BulkFilter = BulkInput.properties.filter;

export const BulkResult = Type.Object(
  {
    matched: Type.Integer({ description: "Tasks the ids or the filter named." }),
    changed: Type.Integer({ description: "Tasks cancelled or queued again." }),
    skipped: Type.Array(
      Type.Object(
        {
          id: Type.String(),
          reason: Type.Union([Type.Literal("not_found"), Type.Literal("not_final"), Type.Literal("already_final")], {
            description: "not_found; not_final: a retry of a task not finished; already_final: a cancel of a finished task.",
          }),
        },
        { additionalProperties: false },
      ),
      { description: "The tasks left alone and why, at most 100." },
    ),
  },
  { additionalProperties: false },
);
export type BulkResult = typeof BulkResult.static;

const iso = (date: Date) => date.toISOString();
const isoOrNull = (date: Date | null) => (date === null ? null : date.toISOString());

export function taskJson(task: Task): TaskJson {
  return {
    id: task.id,
    command: task.command,
    state: task.state,
    scheduled_at: iso(task.scheduled_at),
    run_at: iso(task.run_at),
    created_at: iso(task.created_at),
    picked_at: isoOrNull(task.picked_at),
    started_at: isoOrNull(task.started_at),
    completed_at: isoOrNull(task.completed_at),
    failed_at: isoOrNull(task.failed_at),
    cancelled_at: isoOrNull(task.cancelled_at),
    attempt: task.attempt,
    interruptions: task.interruptions,
    max_attempts: task.max_attempts,
    timeout_ms: task.timeout_ms,
    env: task.env,
    cwd: task.cwd,
    worker_id: task.worker_id,
    coordinator_id: task.coordinator_id,
    lease_expires_at: isoOrNull(task.lease_expires_at),
    lease_ms: task.lease_ms,
    retry: {
      on_failure: task.retry_on_failure,
      on_timeout: task.retry_on_timeout,
      on_lost: task.retry_on_lost,
      backoff_base_ms: task.retry_backoff_base_ms,
      backoff_cap_ms: task.retry_backoff_cap_ms,
    },
    idempotency_key: task.idempotency_key,
    secret_env_keys: Object.keys(task.secret_env ?? {}).sort(),
    limits: task.limits ?? null,
    ...taskRoutingJson(task),
    ref: task.ref ?? null,
    on_parent_failure: task.on_parent_failure ?? null,
    schedule_id: task.schedule_id ?? null,
    fire_at: task.fire_at ? iso(task.fire_at) : null,
    exit_code: task.exit_code,
    signal: task.signal,
    stdout: task.stdout,
    stderr: task.stderr,
    stdout_truncated: task.stdout_truncated,
    stderr_truncated: task.stderr_truncated,
    stdout_replaced: task.stdout_replaced,
    stderr_replaced: task.stderr_replaced,
    error: task.error,
    ...flowTaskJson(task),
  };
}

/** GET /tasks/:id: the task with its parents, children and what it waits for. */
export function taskWithDependenciesJson(task: Task, dependencies: TaskDependencies): TaskJson {
  const edge = ({ id, ref, state }: DependencyRow) => ({ id, ref, state });
  return {
    ...taskJson(task),
    parents: dependencies.parents.map(edge),
    children: dependencies.children.map(edge),
    // A task blocked on its parents says so in the one `waiting` field every rule fills.
    waiting: task.waiting ?? parentsWaiting(task, dependencies.parents),
  };
}

export function statusJson(task: Task): StatusJson {
  return {
    task_id: task.id,
    command: task.command,
    state: task.state,
    scheduled_at: iso(task.scheduled_at),
    run_at: iso(task.run_at),
    picked_at: isoOrNull(task.picked_at),
    started_at: isoOrNull(task.started_at),
    completed_at: isoOrNull(task.completed_at),
    failed_at: isoOrNull(task.failed_at),
    created_at: iso(task.created_at),
    cancelled_at: isoOrNull(task.cancelled_at),
    attempt: task.attempt,
    exit_code: task.exit_code,
    error: task.error,
  };
}

export function scheduleResponse(task: Task): ScheduleResponse {
  return { task_id: task.id, command: task.command, scheduled_at: iso(task.scheduled_at) };
}

export function attemptJson(attempt: Attempt): AttemptJson {
  return {
    task_id: attempt.task_id,
    attempt: attempt.attempt,
    worker_id: attempt.worker_id,
    coordinator_id: attempt.coordinator_id,
    dispatched_at: iso(attempt.dispatched_at),
    started_at: isoOrNull(attempt.started_at),
    finished_at: isoOrNull(attempt.finished_at),
    pid: attempt.pid,
    exit_code: attempt.exit_code,
    signal: attempt.signal,
    error: attempt.error,
    stdout: attempt.stdout,
    stderr: attempt.stderr,
    stdout_truncated: attempt.stdout_truncated,
    stderr_truncated: attempt.stderr_truncated,
    stdout_replaced: attempt.stdout_replaced,
    stderr_replaced: attempt.stderr_replaced,
    outcome: attempt.outcome,
    limits_applied: attempt.limits_applied ?? null,
    limits: attempt.limits ?? null,
    cpu_user_us: bigintOrNull(attempt.cpu_user_us),
    cpu_system_us: bigintOrNull(attempt.cpu_system_us),
    peak_memory_bytes: bigintOrNull(attempt.peak_memory_bytes),
    oom_killed: attempt.oom_killed ?? null,
  };
}

/** A bigint column (text from postgres.js) as a number: microseconds and bytes stay below 2^53. */
function bigintOrNull(value: string | number | null | undefined): number | null {
  return value === null || value === undefined ? null : Number(value);
}

export function eventJson(event: TaskEventRow): EventJson {
  return {
    id: event.id,
    at: iso(event.at),
    kind: event.kind,
    // The column only ever holds task states.
    state: event.state as EventJson["state"],
    attempt: event.attempt,
    worker_id: event.worker_id,
    actor: event.actor,
    detail: event.detail,
  };
}

export function taskEventJson(task: Task, event: TaskEventRow | null): TaskEventJson {
  return { ...taskJson(task), event: event === null ? null : eventJson(event) };
}

export function workerJson(worker: WorkerRow): WorkerJson {
  return {
    id: worker.id,
    name: worker.name,
    coordinator_id: worker.coordinator_id,
    // listLiveWorkers never returns a gone worker.
    state: worker.state === "draining" ? "draining" : "connected",
    slots: worker.slots,
    running: worker.running,
    labels: worker.labels,
    version: worker.version,
    connected_at: iso(worker.connected_at),
    last_heartbeat_at: iso(worker.last_heartbeat_at),
    clock_skew_ms: worker.clock_skew_ms,
  };
}

// --- metrics (branch `metrics`) ---

export const MetricsText = Type.String({
  description:
    "The Prometheus text exposition format (version 0.0.4) of this role's metrics: see the README's \"Metrics and traces\".",
});
