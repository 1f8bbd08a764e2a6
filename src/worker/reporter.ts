// What the worker tells its coordinator (its messages are built by src/rpc/messages.ts). A result is
// kept until the coordinator acknowledges it and is re-sent on the next stream after a
// reconnect; hello, heartbeats and started go out once, on the stream of the moment.
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  Outcome,
  type TaskFinished,
  TaskFinishedSchema,
  type TaskRef,
  type WorkerMessage,
} from "../gen/taskqueue/v1/worker_service_pb";
import { usageToProto } from "../rpc/convert";
import { fitFinished, GRPC_DEFAULT_MAX_MESSAGE_BYTES } from "../rpc/message-size";
import {
  finishedMessage,
  type HelloFields,
  heartbeatMessage,
  helloMessage,
  outputMessage,
  startedMessage,
} from "../rpc/messages";
import { attemptKey } from "../task/attempt";
import type { AttemptEvents } from "./attempts";
import type { RunResult } from "./executor";
import type { LogFlush } from "./log-streamer";

export class Reporter implements AttemptEvents {
  /** Results the coordinator has not acknowledged yet, by attempt key. */
  private readonly unacknowledged = new Map<string, TaskFinished>();
  private readonly acknowledgedWaiters: Array<() => void> = [];
  private heartbeatSeq = 0n;
  /**
   * Each attempt's output flushes (live logs), kept until its result is acknowledged: a stream
   * that broke may have lost them, and the next one gets them again before the result. At most
   * TQ_LOG_MAX_BYTES of data per attempt.
   */
  private readonly outputs = new Map<string, WorkerMessage[]>();
  /** Whether the current stream's coordinator takes output (feature live_logs). */
  liveLogs = false;
  /** The largest message the current stream takes: each result is cut to fit it when sent. */
  maxMessageBytes = GRPC_DEFAULT_MAX_MESSAGE_BYTES;

  /**
   * `send` writes on the current stream, if any; what it cannot send is lost with the stream.
   * `onPendingChange` hears every change of `pending`.
   */
  constructor(
    private readonly send: (message: WorkerMessage) => void,
    private readonly onPendingChange: () => void = () => {},
  ) {}

  /** How many results wait for their acknowledgement. */
  get pending(): number {
    return this.unacknowledged.size;
  }

  /** Whether a result of this attempt waits for its acknowledgement. */
  holds(ref: TaskRef): boolean {
    return this.unacknowledged.has(attemptKey(ref.taskId, ref.attempt));
  }

  /**
   * Opens a stream: who we are, every attempt we hold (`running` and unacknowledged), and our
   * wall clock, so that the coordinator can tell how far it is off.
   */
  hello(introduction: HelloFields, running: TaskRef[], wallClock: Date): bigint {
    // Numbered from the heartbeats' sequence: a LeaseConfirmation names one or the other.
    const seq = ++this.heartbeatSeq;
    this.send(helloMessage(introduction, this.held(running), wallClock, seq));
    return seq;
  }

  /** Sends a heartbeat; returns its number (Heartbeat.seq). */
  heartbeat(running: TaskRef[], draining: boolean, full = false): bigint {
    const seq = ++this.heartbeatSeq;
    this.send(heartbeatMessage(seq, this.held(running), draining, full));
    return seq;
  }

  /** On Welcome: the new stream gets every result the last one did not see acknowledged. */
  resend(): void {
    if (this.liveLogs) for (const messages of this.outputs.values()) for (const message of messages) this.send(message);
    else this.outputs.clear();
    for (const finished of this.unacknowledged.values()) this.send(finishedMessage(fitFinished(finished, this.maxMessageBytes)));
  }

  acknowledged(ref: TaskRef): void {
    const key = attemptKey(ref.taskId, ref.attempt);
    this.outputs.delete(key);
    if (!this.unacknowledged.delete(key)) return;
    if (this.unacknowledged.size === 0) for (const resolve of this.acknowledgedWaiters.splice(0)) resolve();
    this.onPendingChange();
  }

  /** Resolves once every result is acknowledged. */
  allAcknowledged(): Promise<void> {
    if (this.unacknowledged.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.acknowledgedWaiters.push(resolve));
  }

  started(ref: TaskRef, pid: number, startedAt: Date): void {
    this.send(startedMessage(ref, pid, startedAt));
  }

  output(ref: TaskRef, flush: LogFlush): void {
    if (!this.liveLogs) return;
    const message = outputMessage(ref, flush);
    const key = attemptKey(ref.taskId, ref.attempt);
    const kept = this.outputs.get(key);
    if (kept) kept.push(message);
    else this.outputs.set(key, [message]);
    this.send(message);
  }

  finished(ref: TaskRef, result: RunResult, stopReason: string | undefined, interrupted: boolean): void {
    this.keep(ranResult(ref, result, stopReason, interrupted));
  }

  notStarted(ref: TaskRef, outcome: "cancelled" | "abandoned", why: string, interrupted: boolean): void {
    this.keep(notStartedResult(ref, outcome, why, interrupted));
  }

  private keep(finished: TaskFinished): void {
    this.unacknowledged.set(attemptKey(finished.ref!.taskId, finished.ref!.attempt), finished);
    this.send(finishedMessage(fitFinished(finished, this.maxMessageBytes)));
    this.onPendingChange();
  }

  /** Unacknowledged results too: their attempts still hold their tasks until recorded. */
  private held(running: TaskRef[]): TaskRef[] {
    return running.concat([...this.unacknowledged.values()].map((f) => f.ref!));
  }
}

// The worker's results, built in one place (the messages themselves: src/rpc/messages.ts).

const OUTCOMES: Record<RunResult["outcome"], Outcome> = {
  exited: Outcome.EXITED,
  spawn_failed: Outcome.SPAWN_FAILED,
  timed_out: Outcome.TIMED_OUT,
  cancelled: Outcome.CANCELLED,
  abandoned: Outcome.ABANDONED,
};

/**
 * The result of an attempt whose command ran. A stopped one says why (the Cancel's reason, or
 * the hand-back's); a handed-back one whether it was interrupted.
 */
function ranResult(ref: TaskRef, result: RunResult, stopReason: string | undefined, interrupted: boolean): TaskFinished {
  const stopped = result.outcome === "cancelled" || result.outcome === "abandoned";
  return create(TaskFinishedSchema, {
    ref,
    outcome: OUTCOMES[result.outcome],
    exitCode: result.exitCode ?? undefined,
    signal: result.signal ?? "",
    stdout: result.stdout,
    stderr: result.stderr,
    stdoutTruncated: result.stdoutTruncated,
    stderrTruncated: result.stderrTruncated,
    stdoutReplaced: result.stdoutReplaced,
    stderrReplaced: result.stderrReplaced,
    error: result.error ?? (stopped ? (stopReason ?? "") : ""),
    startedAt: timestampFromDate(result.startedAt),
    finishedAt: timestampFromDate(result.finishedAt),
    interrupted: result.outcome === "abandoned" && interrupted,
    usage: result.usage ? usageToProto(result.usage) : undefined,
  });
}

/** The result of an attempt whose command never started here. */
function notStartedResult(ref: TaskRef, outcome: "cancelled" | "abandoned", why: string, interrupted: boolean): TaskFinished {
  const now = timestampFromDate(new Date());
  return create(TaskFinishedSchema, {
    ref,
    outcome: OUTCOMES[outcome],
    error: why,
    startedAt: now,
    finishedAt: now,
    interrupted: outcome === "abandoned" && interrupted,
  });
}
