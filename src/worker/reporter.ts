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
import { fitFinished, GRPC_DEFAULT_MAX_MESSAGE_BYTES } from "../rpc/message-size";
import { finishedMessage, type HelloFields, heartbeatMessage, helloMessage, startedMessage } from "../rpc/messages";
import { attemptKey } from "../task/attempt";
import type { AttemptEvents } from "./attempts";
import type { RunResult } from "./executor";

export class Reporter implements AttemptEvents {
  /** Results the coordinator has not acknowledged yet, by attempt key. */
  private readonly unacknowledged = new Map<string, TaskFinished>();
  private readonly acknowledgedWaiters: Array<() => void> = [];
  private heartbeatSeq = 0n;
  /** The largest message the current stream takes: each result is cut to fit it when sent. */
  maxMessageBytes = GRPC_DEFAULT_MAX_MESSAGE_BYTES;

  /** `send` writes on the current stream, if any; what it cannot send is lost with the stream. */
  constructor(private readonly send: (message: WorkerMessage) => void) {}

  /** How many results wait for their acknowledgement. */
  get pending(): number {
    return this.unacknowledged.size;
  }

  /** Whether a result of this attempt waits for its acknowledgement. */
  holds(ref: TaskRef): boolean {
    return this.unacknowledged.has(attemptKey(ref.taskId, ref.attempt));
  }

  /** Opens a stream: who we are, and every attempt we hold (`running` and unacknowledged). */
  hello(introduction: HelloFields, running: TaskRef[]): void {
    this.send(helloMessage(introduction, this.held(running)));
  }

  heartbeat(running: TaskRef[], draining: boolean): void {
    this.send(heartbeatMessage(++this.heartbeatSeq, this.held(running), draining));
  }

  /** On Welcome: the new stream gets every result the last one did not see acknowledged. */
  resend(): void {
    for (const finished of this.unacknowledged.values()) this.send(finishedMessage(fitFinished(finished, this.maxMessageBytes)));
  }

  acknowledged(ref: TaskRef): void {
    this.unacknowledged.delete(attemptKey(ref.taskId, ref.attempt));
    if (this.unacknowledged.size === 0) for (const resolve of this.acknowledgedWaiters.splice(0)) resolve();
  }

  /** Resolves once every result is acknowledged. */
  allAcknowledged(): Promise<void> {
    if (this.unacknowledged.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.acknowledgedWaiters.push(resolve));
  }

  started(ref: TaskRef, pid: number, startedAt: Date): void {
    this.send(startedMessage(ref, pid, startedAt));
  }

  finished(ref: TaskRef, result: RunResult, stopReason: string | undefined): void {
    this.keep(ranResult(ref, result, stopReason));
  }

  notStarted(ref: TaskRef, outcome: "cancelled" | "abandoned", why: string): void {
    this.keep(notStartedResult(ref, outcome, why));
  }

  private keep(finished: TaskFinished): void {
    this.unacknowledged.set(attemptKey(finished.ref!.taskId, finished.ref!.attempt), finished);
    this.send(finishedMessage(fitFinished(finished, this.maxMessageBytes)));
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

/** The result of an attempt whose command ran. */
function ranResult(ref: TaskRef, result: RunResult, stopReason: string | undefined): TaskFinished {
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
    error: result.error ?? (result.outcome === "cancelled" ? (stopReason ?? "") : ""),
    startedAt: timestampFromDate(result.startedAt),
    finishedAt: timestampFromDate(result.finishedAt),
  });
}

/** The result of an attempt whose command never started here. */
function notStartedResult(ref: TaskRef, outcome: "cancelled" | "abandoned", why: string): TaskFinished {
  const now = timestampFromDate(new Date());
  return create(TaskFinishedSchema, { ref, outcome: OUTCOMES[outcome], error: why, startedAt: now, finishedAt: now });
}
