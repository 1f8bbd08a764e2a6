// Conversions between the domain types (src/task) and the generated protobuf messages.

import type { JsonObject } from "@bufbuild/protobuf";
import { create } from "@bufbuild/protobuf";
import { type Timestamp, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { flowTaskJson } from "../api/flow-model";
import type { DependencyRow, TaskDependencies } from "../db/dependencies";
import type { TaskEventRow } from "../db/events";
import {
  AttemptSchema,
  AttemptUsageSchema,
  type Attempt as PbAttempt,
  AttemptOutcome as PbAttemptOutcome,
  type AttemptUsage as PbAttemptUsage,
  type Task as PbTask,
  type TaskEvent as PbTaskEvent,
  type TaskLimits as PbTaskLimits,
  TaskState as PbTaskState,
  TaskDependencySchema,
  TaskEventSchema,
  TaskLimitsSchema,
  TaskSchema,
  WaitingSchema,
} from "../gen/taskqueue/v1/task_pb";
import { Outcome, type TaskFinished, type TaskRef, TaskRefSchema } from "../gen/taskqueue/v1/worker_service_pb";
import { type Attempt, type AttemptOutcome, type AttemptRef, exitedState, type LossCause } from "../task/attempt";
import { parentsWaiting } from "../task/dependencies";
import { invalidArgument } from "../task/errors";
import { isTaskState, type TaskState } from "../task/state";
import {
  type AttemptResult,
  type AttemptUsage,
  type EffectiveLimits,
  LIMITS_APPLIED,
  type LimitsApplied,
  type Task,
  type TaskLimits,
} from "../task/task";

const STATE_TO_PROTO: Record<TaskState, PbTaskState> = {
  waiting: PbTaskState.WAITING,
  queued: PbTaskState.QUEUED,
  dispatched: PbTaskState.DISPATCHED,
  running: PbTaskState.RUNNING,
  succeeded: PbTaskState.SUCCEEDED,
  failed: PbTaskState.FAILED,
  timed_out: PbTaskState.TIMED_OUT,
  cancelled: PbTaskState.CANCELLED,
};

const STATE_FROM_PROTO = new Map<PbTaskState, TaskState>(
  Object.entries(STATE_TO_PROTO).map(([name, value]) => [value, name as TaskState]),
);

export function stateToProto(state: TaskState): PbTaskState {
  return STATE_TO_PROTO[state];
}

/** undefined for UNSPECIFIED or an unknown number. */
export function stateFromProto(state: PbTaskState): TaskState | undefined {
  return STATE_FROM_PROTO.get(state);
}

export const toTimestamp = (date: Date | null): Timestamp | undefined => (date ? timestampFromDate(date) : undefined);
export const fromTimestamp = (timestamp: Timestamp | undefined): Date | null => (timestamp ? timestampDate(timestamp) : null);

/** google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z. */
const MIN_SECONDS = -62_135_596_800n;
const MAX_SECONDS = 253_402_300_799n;

/**
 * A client's Timestamp as a Date, refused (invalid_argument naming `field`) when it breaks the
 * type's rules: nanos in 0..999,999,999 and seconds within years 1-9999. timestampDate would
 * carry out-of-range nanos into the seconds (2e9 nanos: 2 s later).
 */
export function clientTimestamp(timestamp: Timestamp | undefined, field: string): Date | null {
  if (!timestamp) return null;
  if (!Number.isInteger(timestamp.nanos) || timestamp.nanos < 0 || timestamp.nanos > 999_999_999) {
    throw invalidArgument(field, `${field}.nanos must be from 0 to 999999999; it is ${timestamp.nanos}`);
  }
  if (timestamp.seconds < MIN_SECONDS || timestamp.seconds > MAX_SECONDS) {
    throw invalidArgument(
      field,
      `${field}.seconds must be from ${MIN_SECONDS} to ${MAX_SECONDS} (0001-01-01 to 9999-12-31); it is ${timestamp.seconds}`,
    );
  }
  return timestampDate(timestamp);
}

export function taskToProto(task: Task): PbTask {
  return create(TaskSchema, {
    id: task.id,
    command: task.command,
    state: stateToProto(task.state),
    scheduledAt: toTimestamp(task.scheduled_at),
    runAt: toTimestamp(task.run_at),
    createdAt: toTimestamp(task.created_at),
    pickedAt: toTimestamp(task.picked_at),
    startedAt: toTimestamp(task.started_at),
    completedAt: toTimestamp(task.completed_at),
    failedAt: toTimestamp(task.failed_at),
    cancelledAt: toTimestamp(task.cancelled_at),
    attempt: task.attempt,
    interruptions: task.interruptions,
    maxAttempts: task.max_attempts,
    timeoutMs: task.timeout_ms,
    env: task.env,
    cwd: task.cwd ?? "",
    workerId: task.worker_id ?? "",
    exitCode: task.exit_code ?? undefined,
    signal: task.signal ?? "",
    stdout: task.stdout ?? "",
    stderr: task.stderr ?? "",
    stdoutTruncated: task.stdout_truncated,
    stderrTruncated: task.stderr_truncated,
    stdoutReplaced: task.stdout_replaced,
    stderrReplaced: task.stderr_replaced,
    error: task.error ?? "",
    retry: {
      onFailure: task.retry_on_failure,
      onTimeout: task.retry_on_timeout,
      onLost: task.retry_on_lost,
      backoffBaseMs: task.retry_backoff_base_ms,
      backoffCapMs: task.retry_backoff_cap_ms,
    },
    idempotencyKey: task.idempotency_key ?? "",
    leaseExpiresAt: toTimestamp(task.lease_expires_at),
    ...(task.lease_ms === null ? {} : { leaseMs: task.lease_ms }),
    secretEnvKeys: Object.keys(task.secret_env ?? {}).sort(),
    limits: task.limits ? limitsToProto(task.limits) : undefined,
    queue: task.queue ?? "default",
    priority: task.priority,
    require: (task.requires ?? []).map((r) => ({ key: r.key, op: r.op, value: r.value })),
    prefer: (task.prefers ?? []).map((p) => ({ key: p.key, op: p.op, value: p.value, weight: p.weight })),
    scheduleTimeoutMs: task.schedule_timeout_ms ?? 0,
    waiting: task.waiting ?? undefined,
    ref: task.ref ?? "",
    onParentFailure: task.on_parent_failure ?? "",
    ...flowToProto(task),
    scheduleId: task.schedule_id ?? "",
    fireAt: toTimestamp(task.fire_at ?? null),
  });
}

/** A task with its dependencies and what it waits for, as GetTask answers. */
export function taskWithDependenciesToProto(task: Task, dependencies: TaskDependencies): PbTask {
  const message = taskToProto(task);
  const edge = (row: DependencyRow) =>
    create(TaskDependencySchema, { id: row.id, ref: row.ref ?? "", state: stateToProto(row.state) });
  message.parents = dependencies.parents.map(edge);
  message.children = dependencies.children.map(edge);
  const waiting = task.waiting ?? parentsWaiting(task, dependencies.parents);
  if (waiting) message.waiting = create(WaitingSchema, waiting);
  return message;
}

/** Limits as the wire carries them: a missing or null one is unset. */
/** A task's flow control fields, as the REST view spells them (src/api/flow-model.ts). */
function flowToProto(task: Task) {
  const { concurrency, rate_limit } = flowTaskJson(task);
  return { concurrency: concurrency ?? undefined, rateLimit: rate_limit ?? "" };
}

export function limitsToProto(limits: TaskLimits | EffectiveLimits): PbTaskLimits {
  return create(TaskLimitsSchema, {
    memoryMb: limits.memory_mb ?? undefined,
    pids: limits.pids ?? undefined,
    nofile: limits.nofile ?? undefined,
    cpu: limits.cpu ?? undefined,
  });
}

/** A wire TaskLimits as the API spells it (the fields set, and only those), for validation by src/task/spec.ts. */
export function limitsFromProto(limits: PbTaskLimits): TaskLimits {
  const out: TaskLimits = {};
  if (limits.memoryMb !== undefined) out.memory_mb = limits.memoryMb;
  if (limits.pids !== undefined) out.pids = limits.pids;
  if (limits.nofile !== undefined) out.nofile = limits.nofile;
  if (limits.cpu !== undefined) out.cpu = limits.cpu;
  return out;
}

export function usageToProto(usage: AttemptUsage): PbAttemptUsage {
  return create(AttemptUsageSchema, {
    limitsApplied: usage.limitsApplied,
    limits: limitsToProto(usage.limits),
    cpuUserUs: usage.cpuUserUs === null ? undefined : BigInt(Math.max(0, Math.round(usage.cpuUserUs))),
    cpuSystemUs: usage.cpuSystemUs === null ? undefined : BigInt(Math.max(0, Math.round(usage.cpuSystemUs))),
    peakMemoryBytes: usage.peakMemoryBytes === null ? undefined : BigInt(Math.max(0, Math.round(usage.peakMemoryBytes))),
    oomKilled: usage.oomKilled,
  });
}

/** A worker's usage report; an unknown mechanism name reads as "none". */
export function usageFromProto(usage: PbAttemptUsage): AttemptUsage {
  const limits = limitsFromProto(usage.limits ?? create(TaskLimitsSchema));
  const applied = (LIMITS_APPLIED as readonly string[]).includes(usage.limitsApplied)
    ? (usage.limitsApplied as LimitsApplied)
    : "none";
  const num = (value: bigint | undefined) => (value === undefined ? null : Number(value));
  return {
    limitsApplied: applied,
    limits: {
      memory_mb: limits.memory_mb ?? null,
      pids: limits.pids ?? null,
      nofile: limits.nofile ?? null,
      cpu: limits.cpu ?? null,
    },
    cpuUserUs: num(usage.cpuUserUs),
    cpuSystemUs: num(usage.cpuSystemUs),
    peakMemoryBytes: num(usage.peakMemoryBytes),
    oomKilled: usage.oomKilled,
  };
}

/** An attempt row's usage, or null when none was recorded. */
export function attemptUsage(attempt: Attempt): AttemptUsage | null {
  if (attempt.limits_applied === null) return null;
  const num = (value: string | number | null) => (value === null ? null : Number(value));
  return {
    limitsApplied: attempt.limits_applied,
    limits: attempt.limits ?? { memory_mb: null, pids: null, nofile: null, cpu: null },
    cpuUserUs: num(attempt.cpu_user_us),
    cpuSystemUs: num(attempt.cpu_system_us),
    peakMemoryBytes: num(attempt.peak_memory_bytes),
    oomKilled: attempt.oom_killed ?? false,
  };
}

const OUTCOME_TO_PROTO: Record<AttemptOutcome, PbAttemptOutcome> = {
  succeeded: PbAttemptOutcome.SUCCEEDED,
  failed: PbAttemptOutcome.FAILED,
  timed_out: PbAttemptOutcome.TIMED_OUT,
  lost: PbAttemptOutcome.LOST,
  interrupted: PbAttemptOutcome.INTERRUPTED,
  stopped: PbAttemptOutcome.STOPPED,
  stale: PbAttemptOutcome.STALE,
};

export function attemptToProto(attempt: Attempt): PbAttempt {
  return create(AttemptSchema, {
    taskId: attempt.task_id,
    attempt: attempt.attempt,
    workerId: attempt.worker_id,
    coordinatorId: attempt.coordinator_id ?? "",
    dispatchedAt: toTimestamp(attempt.dispatched_at),
    startedAt: toTimestamp(attempt.started_at),
    finishedAt: toTimestamp(attempt.finished_at),
    pid: attempt.pid ?? undefined,
    exitCode: attempt.exit_code ?? undefined,
    signal: attempt.signal ?? "",
    error: attempt.error ?? "",
    stdout: attempt.stdout ?? "",
    stderr: attempt.stderr ?? "",
    stdoutTruncated: attempt.stdout_truncated,
    stderrTruncated: attempt.stderr_truncated,
    stdoutReplaced: attempt.stdout_replaced,
    stderrReplaced: attempt.stderr_replaced,
    outcome: attempt.outcome === null ? PbAttemptOutcome.UNSPECIFIED : OUTCOME_TO_PROTO[attempt.outcome],
    usage: ((usage) => (usage ? usageToProto(usage) : undefined))(attemptUsage(attempt)),
  });
}

export function eventToProto(event: TaskEventRow): PbTaskEvent {
  return create(TaskEventSchema, {
    id: event.id,
    taskId: event.task_id,
    kind: event.kind,
    state: isTaskState(event.state) ? stateToProto(event.state) : PbTaskState.UNSPECIFIED,
    attempt: event.attempt,
    workerId: event.worker_id ?? "",
    at: toTimestamp(event.at),
    actor: event.actor ?? "",
    // jsonb: JSON values only.
    detail: (event.detail ?? undefined) as JsonObject | undefined,
  });
}

/** A TaskRef from a worker's stream names an attempt of that worker. */
export function attemptRefFromProto(ref: Pick<TaskRef, "taskId" | "attempt">, workerId: string): AttemptRef {
  return { taskId: ref.taskId, attempt: ref.attempt, workerId };
}

/** The TaskRef of an attempt, for the stream of the worker that holds it. */
export function attemptRefToProto(ref: Pick<AttemptRef, "taskId" | "attempt">): TaskRef {
  return create(TaskRefSchema, { taskId: ref.taskId, attempt: ref.attempt });
}

/** What a worker's TaskFinished asks the coordinator to do with the attempt. */
export type FinishAction =
  | { kind: "record"; result: AttemptResult }
  /**
   * The worker handed the task back: requeue it, `interrupted` (not counted against
   * max_attempts) when the worker says so (drain), else `lost` (it found the lease lapsed).
   */
  | { kind: "requeue"; reason: string; cause: LossCause }
  /** The worker stopped it as told (cancelled or superseded): the task does not change. */
  | { kind: "stopped"; reason: string; usage: AttemptUsage | null };

export function finishAction(finished: TaskFinished): FinishAction {
  const base = {
    exitCode: finished.exitCode ?? null,
    signal: finished.signal || null,
    stdout: finished.stdout,
    stderr: finished.stderr,
    stdoutTruncated: finished.stdoutTruncated,
    stderrTruncated: finished.stderrTruncated,
    stdoutReplaced: finished.stdoutReplaced,
    stderrReplaced: finished.stderrReplaced,
    error: finished.error || null,
    startedAt: fromTimestamp(finished.startedAt),
    finishedAt: fromTimestamp(finished.finishedAt) ?? new Date(),
    usage: finished.usage ? usageFromProto(finished.usage) : null,
  };
  switch (finished.outcome) {
    case Outcome.EXITED:
      // An attempt the OOM killer reached failed, whatever its shell's exit code says.
      if (base.usage?.oomKilled) return { kind: "record", result: { ...base, state: "failed" } };
      return { kind: "record", result: { ...base, state: exitedState(base.exitCode, base.signal) } };
    case Outcome.TIMED_OUT:
      return { kind: "record", result: { ...base, state: "timed_out" } };
    case Outcome.ABANDONED:
      return {
        kind: "requeue",
        reason: base.error ?? "handed back by the worker",
        cause: finished.interrupted ? "interrupted" : "lost",
      };
    case Outcome.CANCELLED:
      return { kind: "stopped", reason: base.error ?? "told to stop", usage: base.usage };
    default:
      return {
        kind: "record",
        result: { ...base, state: "failed", error: base.error ?? "the worker reported no outcome" },
      };
  }
}
