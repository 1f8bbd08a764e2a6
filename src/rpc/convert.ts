// Conversions between the domain types (src/task) and the generated protobuf messages.

import type { JsonObject } from "@bufbuild/protobuf";
import { create } from "@bufbuild/protobuf";
import { type Timestamp, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { TaskEventRow } from "../db/events";
import {
  AttemptSchema,
  type Attempt as PbAttempt,
  AttemptOutcome as PbAttemptOutcome,
  type Task as PbTask,
  type TaskEvent as PbTaskEvent,
  TaskState as PbTaskState,
  TaskEventSchema,
  TaskSchema,
} from "../gen/taskqueue/v1/task_pb";
import { Outcome, type TaskFinished, type TaskRef, TaskRefSchema } from "../gen/taskqueue/v1/worker_service_pb";
import { type Attempt, type AttemptOutcome, type AttemptRef, exitedState, type LossCause } from "../task/attempt";
import { invalidArgument } from "../task/errors";
import { isTaskState, type TaskState } from "../task/state";
import type { AttemptResult, Task } from "../task/task";

const STATE_TO_PROTO: Record<TaskState, PbTaskState> = {
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
    secretEnvKeys: Object.keys(task.secret_env ?? {}).sort(),
  });
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
  | { kind: "stopped"; reason: string };

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
  };
  switch (finished.outcome) {
    case Outcome.EXITED:
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
      return { kind: "stopped", reason: base.error ?? "told to stop" };
    default:
      return {
        kind: "record",
        result: { ...base, state: "failed", error: base.error ?? "the worker reported no outcome" },
      };
  }
}
