// Every message of the worker stream (WorkerService.Connect), one function each, so that what
// travels on the wire is decided in one place: first what the coordinator sends, then what the
// worker sends.
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type CoordinatorMessage,
  CoordinatorMessageSchema,
  type TaskFinished,
  type TaskRef,
  type WorkerMessage,
  WorkerMessageSchema,
} from "../gen/taskqueue/v1/worker_service_pb";
import type { Task } from "../task/task";
import type { LogFlush } from "../worker/log-streamer";
import { attemptRefToProto, limitsToProto, toTimestamp } from "./convert";
import { type Agreement, FEATURES, OLDEST_SERVED_PROTOCOL, PROTOCOL_VERSION } from "./protocol";

/** One attempt as the wire names it (the fields of TaskRef, in any object that has them). */
type WireRef = Pick<TaskRef, "taskId" | "attempt">;

// --- Coordinator to worker -----------------------------------------------------------------

export interface WelcomeFields {
  workerId: string;
  coordinatorId: string;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  /** To present in Hello when reconnecting. */
  resumeToken: string;
  /** The largest message the coordinator accepts: the worker cuts its results to fit. Unset: gRPC's 4 MiB. */
  maxMessageBytes?: number;
  /** With live_logs: most bytes of output per attempt the coordinator stores (TQ_LOG_MAX_BYTES). */
  logMaxBytes?: bigint;
}

/**
 * The answer to Hello once the worker is registered and reconciled, with the protocol agreed
 * for the stream (a worker before versions ignores those fields).
 */
export function welcomeMessage(fields: WelcomeFields, agreement: Agreement): CoordinatorMessage {
  const protocol = { protocolVersion: agreement.protocolVersion, features: [...agreement.features] };
  return create(CoordinatorMessageSchema, { payload: { case: "welcome", value: { ...fields, ...protocol } } });
}

/**
 * Hands the task's current attempt to the worker that holds it. `startInMs` delays the start
 * of a task handed over before it is due (0: at once), and `dueAtMs` (its run_at, epoch ms)
 * tells the worker which ones are due together; `leaseMs` is what is left of the
 * attempt's lease as it is sent, which the worker counts down on its monotonic clock.
 */
export function assignMessage(
  task: Task,
  startInMs: number,
  leaseMs: number,
  traceparent = task.traceparent,
  dueAtMs = 0,
): CoordinatorMessage {
  return create(CoordinatorMessageSchema, {
    payload: {
      case: "assign",
      value: {
        ref: attemptRefToProto({ taskId: task.id, attempt: task.attempt }),
        command: task.command,
        // The secret values travel only to the worker that runs the task. The parents' exit
        // codes (TQ_PARENT_<ref>_EXIT, written at release) come after the task's own env.
        env: { ...task.env, ...(task.parent_env ?? {}), ...task.secret_env },
        cwd: task.cwd ?? "",
        timeoutMs: task.timeout_ms,
        leaseExpiresAt: toTimestamp(task.lease_expires_at),
        startInMs,
        // Only with a start to wait for: the key that starts the ones due together together.
        dueAtMs: startInMs > 0 ? dueAtMs : 0,
        leaseMs,
        limits: task.limits ? limitsToProto(task.limits) : undefined,
        // The dispatch span's (src/trace), or the one stored with the task when tracing is off here.
        traceparent: traceparent ?? "",
      },
    },
  });
}

/** Tells a worker to stop an attempt (a no-op on its side if it no longer runs it). */
export function cancelMessage(ref: WireRef, reason: string): CoordinatorMessage {
  return create(CoordinatorMessageSchema, { payload: { case: "cancel", value: { ref: attemptRefToProto(ref), reason } } });
}

/** A result is durable (or `stale`: it changed nothing) and the worker may forget it. */
export function ackMessage(ref: WireRef, stale: boolean): CoordinatorMessage {
  return create(CoordinatorMessageSchema, { payload: { case: "ack", value: { ref: attemptRefToProto(ref), stale } } });
}

/** Asks the worker to take no new work and finish what it runs. No coordinator part sends it yet. */
/**
 * The leases renewed on the strength of the worker's Hello or Heartbeat numbered `seq`, each
 * with the lease it got (its task's lease_ms): the worker counts each from when it sent that
 * message (src/worker/lease-fence.ts). Only to a worker with the lease_confirm feature.
 */
export function leaseMessage(seq: bigint, renewed: readonly { ref: WireRef; leaseMs: number }[]): CoordinatorMessage {
  return create(CoordinatorMessageSchema, {
    payload: {
      case: "lease",
      value: { seq, renewed: renewed.map(({ ref, leaseMs }) => ({ ref: attemptRefToProto(ref), leaseMs })) },
    },
  });
}

export function drainMessage(reason: string): CoordinatorMessage {
  return create(CoordinatorMessageSchema, { payload: { case: "drain", value: { reason } } });
}

// --- Worker to coordinator -----------------------------------------------------------------

/** Who the worker is, as it says in every Hello. */
export interface HelloFields {
  workerId: string;
  name: string;
  slots: number;
  version: string;
  /** From the Welcome of this worker's first stream; empty on the first Hello. */
  resumeToken: string;
  /** TQ_WORKER_QUEUES (empty: every queue) and TQ_WORKER_LABELS. */
  queues?: string[];
  labels?: Record<string, string>;
}

/**
 * The first message on every stream. `inFlight`: the attempts it still runs or holds an
 * unacknowledged result for. `wallClock`: the worker's wall clock now, from which the
 * coordinator measures its skew. It announces this build's protocol and features.
 */
export function helloMessage(fields: HelloFields, inFlight: readonly WireRef[], wallClock: Date, leaseSeq = 0n): WorkerMessage {
  const protocol = { protocolVersion: PROTOCOL_VERSION, minProtocolVersion: OLDEST_SERVED_PROTOCOL, features: [...FEATURES] };
  return create(WorkerMessageSchema, {
    payload: {
      case: "hello",
      value: {
        ...fields,
        ...protocol,
        inFlight: inFlight.map((ref) => attemptRefToProto(ref)),
        wallClock: timestampFromDate(wallClock),
        leaseSeq,
      },
    },
  });
}

/**
 * `running`: the attempts whose leases the coordinator renews (those running and those with an
 * unacknowledged result). `draining`: the worker takes no new work.
 */
export function heartbeatMessage(seq: bigint, running: readonly WireRef[], draining: boolean, full = false): WorkerMessage {
  return create(WorkerMessageSchema, {
    payload: { case: "heartbeat", value: { seq, running: running.map((ref) => attemptRefToProto(ref)), draining, full } },
  });
}

export function startedMessage(ref: WireRef, pid: number, startedAt: Date): WorkerMessage {
  return create(WorkerMessageSchema, {
    payload: { case: "started", value: { ref: attemptRefToProto(ref), pid, startedAt: timestampFromDate(startedAt) } },
  });
}

/** A result, sent when the attempt ends and re-sent after a reconnect until acknowledged. */
export function finishedMessage(finished: TaskFinished): WorkerMessage {
  return create(WorkerMessageSchema, { payload: { case: "finished", value: finished } });
}

/** A flush of a running attempt's output (live logs), kept and re-sent like results until the result is acknowledged. */
export function outputMessage(ref: WireRef, flush: LogFlush): WorkerMessage {
  return create(WorkerMessageSchema, {
    payload: {
      case: "output",
      value: {
        ref: { taskId: ref.taskId, attempt: ref.attempt },
        seq: flush.seq,
        offset: flush.offset,
        stdoutOffset: flush.stdoutOffset,
        stderrOffset: flush.stderrOffset,
        runs: flush.runs,
        data: flush.data,
        final: flush.final,
        cut: flush.cut,
      },
    },
  });
}
