// The worker: holds one stream to a coordinator, runs what it is assigned, reports back.
// It dials its coordinator list in order and reconnects with backoff when the stream ends;
// running tasks keep running meanwhile, and results not yet acknowledged are re-sent on the
// next stream. stop() drains: no new work, running tasks finish or are handed back.
import { create } from "@bufbuild/protobuf";
import { timestampFromDate, timestampMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import {
  type Assign,
  type CoordinatorMessage,
  Outcome,
  type TaskFinished,
  TaskFinishedSchema,
  type WorkerMessage,
  WorkerMessageSchema,
  WorkerService,
} from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import { clientConstructor } from "../rpc/definitions";
import { attemptKey } from "../task/attempt";
import { type Execution, execute, type RunResult } from "./executor";

const WorkerClient = clientConstructor(WorkerService);

export interface WorkerOptions {
  id?: string;
  name: string;
  slots: number;
  addresses: string[];
  /** How to dial the coordinators (TLS or not). Defaults to plaintext. */
  credentials?: grpc.ChannelCredentials;
  log: Logger;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  killGraceMs: number;
  drainGraceMs: number;
  maxOutputBytes: number;
  version?: string;
  /** Join token sent to the coordinator (authorization: Bearer). */
  workerToken?: string;
  /** Environment the tasks inherit; the executor strips the worker's own settings from it. */
  baseEnv: Record<string, string | undefined>;
}

interface Running {
  assign: Assign;
  /** null while the attempt waits for its start time (Assign.start_in_ms). */
  execution: Execution | null;
  /** The wait for the start time. */
  hold?: ReturnType<typeof setTimeout>;
  /** Why the coordinator told us to stop it, if it did. */
  stopReason?: string;
}

const OUTCOMES: Record<RunResult["outcome"], Outcome> = {
  exited: Outcome.EXITED,
  spawn_failed: Outcome.SPAWN_FAILED,
  timed_out: Outcome.TIMED_OUT,
  cancelled: Outcome.CANCELLED,
  abandoned: Outcome.ABANDONED,
};

export class Worker {
  private workerId: string;
  private readonly running = new Map<string, Running>();
  /** Results the coordinator has not acknowledged yet, re-sent after a reconnect. */
  private readonly unacked = new Map<string, TaskFinished>();
  private call: grpc.ClientDuplexStream<WorkerMessage, CoordinatorMessage> | null = null;
  private client: grpc.Client | null = null;
  private welcomed = false;
  private stopping = false;
  private draining = false;
  private heartbeat: ReturnType<typeof setInterval> | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private seq = 0n;
  /** From Welcome: proves on reconnecting that we are the worker that took our id. */
  private resumeToken = "";
  private failures = 0;
  /** Where in the coordinator list to start: random, so that workers spread over coordinators. */
  private addressIndex: number;
  /** Runs while disconnected: when it fires, our view of the leases has lapsed. */
  private leaseTimer: ReturnType<typeof setTimeout> | null = null;
  /** The coordinator's heartbeat timeout (the lease), from Welcome. */
  private leaseMs: number;
  private readonly connectedWaiters = new Set<() => void>();
  private readonly waiters = new Set<() => void>();

  constructor(private readonly options: WorkerOptions) {
    this.workerId = options.id ?? Bun.randomUUIDv7();
    this.addressIndex = Math.floor(Math.random() * options.addresses.length);
    this.leaseMs = options.heartbeatTimeoutMs + options.heartbeatIntervalMs;
  }

  get id(): string {
    return this.workerId;
  }

  /** Starts dialing; resolves at once (the worker keeps reconnecting on its own). */
  start(): void {
    this.connect();
  }

  /** Resolves once a coordinator has welcomed this worker. */
  connected(): Promise<void> {
    if (this.welcomed) return Promise.resolve();
    return new Promise((resolve) => this.connectedWaiters.add(resolve));
  }

  get runningCount(): number {
    return this.running.size;
  }

  /**
   * Drains: takes no new work, lets running tasks finish for the drain grace period, then
   * hands the rest back, waits (briefly) for the coordinator to acknowledge the results, and
   * closes the stream.
   */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.draining = true;
    this.releaseHeld("the worker is draining");
    this.sendHeartbeat();
    const grace = this.options.drainGraceMs;
    if (this.running.size > 0) {
      this.options.log.info({ running: this.running.size, graceMs: grace }, "draining: waiting for running tasks");
      const timeout = Bun.sleep(grace).then(() => "timeout" as const);
      if ((await Promise.race([this.idle(), timeout])) === "timeout") {
        this.options.log.warn({ running: this.running.size }, "drain grace over: handing running tasks back");
        for (const [k, entry] of this.running) this.stopEntry(k, entry, "abandoned", "the worker is draining");
        await this.idle();
      }
    }
    // Give the coordinator a moment to acknowledge the last results.
    if (this.unacked.size > 0 && this.welcomed) await Promise.race([this.acked(), Bun.sleep(2000)]);
    this.stopping = true;
    this.clearTimers();
    this.call?.end();
    this.call = null;
    this.client?.close();
    this.client = null;
  }

  /**
   * Exiting at once, without drain: kills every running command's process group, so that
   * none runs on unsupervised while the coordinator requeues it (it finds this worker lost).
   */
  abort(): void {
    for (const entry of this.running.values()) entry.execution?.kill();
  }

  private connect(): void {
    if (this.stopping) return;
    const address = this.options.addresses[this.addressIndex % this.options.addresses.length]!;
    const client = new WorkerClient(address, this.options.credentials ?? grpc.credentials.createInsecure(), {
      // Our own HTTP/2 connection per worker, even when several share a process.
      "grpc.use_local_subchannel_pool": 1,
      "grpc.keepalive_time_ms": Math.max(1000, this.options.heartbeatIntervalMs),
      "grpc.keepalive_timeout_ms": this.options.heartbeatTimeoutMs,
      "grpc.keepalive_permit_without_calls": 1,
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": 2000,
    });
    this.client = client;
    const metadata = new grpc.Metadata();
    if (this.options.workerToken) metadata.set("authorization", `Bearer ${this.options.workerToken}`);
    const call = (
      client as unknown as { connect(metadata: grpc.Metadata): grpc.ClientDuplexStream<WorkerMessage, CoordinatorMessage> }
    ).connect(metadata);
    this.call = call;
    let closed = false;
    const onClosed = (why: string) => {
      if (closed) return;
      closed = true;
      if (this.call === call) this.disconnected(address, why);
      client.close();
    };
    // Messages still buffered from a stream that has failed are dropped: we have already told
    // the next coordinator (in Hello) what we hold, and anything assigned there is requeued.
    call.on("data", (message: CoordinatorMessage) => {
      if (this.call === call && !closed) this.receive(message);
    });
    call.on("error", (error: grpc.ServiceError) => {
      if (error.code === grpc.status.PERMISSION_DENIED && this.call === call) {
        // Our id is held by a worker with another resume token (ours was lost): start afresh.
        // What we still run is superseded there, and is stopped when we report it.
        this.workerId = Bun.randomUUIDv7();
        this.resumeToken = "";
        this.options.log.warn({ id: this.workerId }, "the coordinator refused our worker id; continuing under a new one");
      }
      onClosed(error.details || error.message);
    });
    call.on("end", () => onClosed("stream ended"));
    call.on("close", () => onClosed("stream closed"));
    this.write(
      create(WorkerMessageSchema, {
        payload: {
          case: "hello",
          value: {
            workerId: this.id,
            name: this.options.name,
            slots: this.options.slots,
            version: this.options.version ?? "",
            resumeToken: this.resumeToken,
            inFlight: [...this.running.values()]
              .map(({ assign }) => assign.ref!)
              .concat([...this.unacked.values()].map((f) => f.ref!)),
          },
        },
      }),
      true,
    );
  }

  private disconnected(address: string, why: string): void {
    this.call = null;
    this.client = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
    if (this.stopping) return;
    if (wasWelcomed) this.startLeaseTimer();
    this.failures = wasWelcomed ? 1 : this.failures + 1;
    // Move on to the next coordinator in the list after a failure there.
    this.addressIndex++;
    const backoff = Math.min(5000, 100 * 2 ** Math.min(this.failures - 1, 6));
    const delay = Math.round(backoff / 2 + (Math.random() * backoff) / 2);
    this.options.log.warn({ address, why, retryInMs: delay }, "disconnected from coordinator");
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  private receive(message: CoordinatorMessage): void {
    const payload = message.payload;
    switch (payload.case) {
      case "welcome":
        this.welcomed = true;
        if (payload.value.resumeToken) this.resumeToken = payload.value.resumeToken;
        this.failures = 0;
        // The coordinator's lease on our attempts: its heartbeat timeout plus an interval.
        if (payload.value.heartbeatTimeoutMs > 0) {
          this.leaseMs = payload.value.heartbeatTimeoutMs + payload.value.heartbeatIntervalMs;
        }
        if (this.leaseTimer) clearTimeout(this.leaseTimer);
        this.leaseTimer = null;
        this.options.log.info({ coordinator: payload.value.coordinatorId }, "connected");
        for (const finished of this.unacked.values()) this.write(finishedMessage(finished));
        this.heartbeat = setInterval(() => this.sendHeartbeat(), this.options.heartbeatIntervalMs);
        for (const resolve of this.connectedWaiters) resolve();
        this.connectedWaiters.clear();
        return;
      case "assign":
        this.run(payload.value);
        return;
      case "cancel": {
        const ref = payload.value.ref;
        const running = ref ? this.running.get(attemptKey(ref.taskId, ref.attempt)) : undefined;
        if (!ref || !running) return;
        this.options.log.info({ task: ref.taskId, attempt: ref.attempt, reason: payload.value.reason }, "stopping task");
        running.stopReason ??= payload.value.reason || "cancelled";
        this.stopEntry(attemptKey(ref.taskId, ref.attempt), running, "cancelled", running.stopReason);
        return;
      }
      case "ack": {
        const ref = payload.value.ref;
        if (ref) this.unacked.delete(attemptKey(ref.taskId, ref.attempt));
        this.poke();
        return;
      }
      case "drain":
        this.draining = true;
        this.releaseHeld("the worker is draining");
        this.sendHeartbeat();
        return;
      default:
        return;
    }
  }

  private run(assign: Assign): void {
    const ref = assign.ref;
    if (!ref) return;
    const k = attemptKey(ref.taskId, ref.attempt);
    if (this.running.has(k) || this.unacked.has(k)) return; // a duplicate delivery
    if (this.draining) {
      // Raced with our drain: hand it straight back.
      this.report(abandoned(assign, "the worker is draining"));
      return;
    }
    if (assign.leaseExpiresAt && timestampMs(assign.leaseExpiresAt) < Date.now()) {
      // Held up past its lease (we were frozen, say): it may already run elsewhere.
      this.options.log.warn(
        { task: ref.taskId, attempt: ref.attempt },
        "assignment arrived after its lease lapsed; not running it",
      );
      this.report(abandoned(assign, "the assignment arrived after its lease lapsed"));
      return;
    }
    const entry: Running = { assign, execution: null };
    this.running.set(k, entry);
    if (assign.startInMs <= 0) {
      this.launch(k, entry);
      return;
    }
    // Early hand-over: wait out the time until the task is due. Checked against the
    // monotonic clock, as a timer may fire a fraction of a millisecond early.
    const startAt = performance.now() + assign.startInMs;
    const wait = () => {
      const left = startAt - performance.now();
      if (left > 0) {
        entry.hold = setTimeout(wait, Math.ceil(left));
        return;
      }
      entry.hold = undefined;
      this.launch(k, entry);
    };
    entry.hold = setTimeout(wait, assign.startInMs);
  }

  private launch(k: string, entry: Running): void {
    const { assign } = entry;
    const ref = assign.ref!;
    const execution = execute({
      command: assign.command,
      env: { ...assign.env, TQ_TASK_ID: ref.taskId, TQ_TASK_ATTEMPT: String(ref.attempt) },
      cwd: assign.cwd || undefined,
      timeoutMs: assign.timeoutMs,
      killGraceMs: this.options.killGraceMs,
      maxOutputBytes: this.options.maxOutputBytes,
      baseEnv: this.options.baseEnv,
    });
    entry.execution = execution;
    if (execution.pid !== null) {
      this.write(
        create(WorkerMessageSchema, {
          payload: {
            case: "started",
            value: { ref, pid: execution.pid, startedAt: timestampFromDate(execution.startedAt) },
          },
        }),
      );
    }
    void execution.result.then((result) => {
      this.running.delete(k);
      if (result.outcome !== "exited") {
        this.options.log.info(
          { task: ref.taskId, attempt: ref.attempt, outcome: result.outcome, pid: result.pid },
          "task stopped",
        );
      }
      this.report(
        create(TaskFinishedSchema, {
          ref,
          outcome: OUTCOMES[result.outcome],
          exitCode: result.exitCode ?? undefined,
          signal: result.signal ?? "",
          stdout: result.stdout,
          stderr: result.stderr,
          stdoutTruncated: result.stdoutTruncated,
          stderrTruncated: result.stderrTruncated,
          error: result.error ?? (result.outcome === "cancelled" ? (entry.stopReason ?? "") : ""),
          startedAt: timestampFromDate(result.startedAt),
          finishedAt: timestampFromDate(result.finishedAt),
        }),
      );
      this.poke();
    });
  }

  /**
   * Stops an attempt: a running process is stopped and reports itself when it has exited;
   * one still waiting for its start time never starts and is reported at once.
   */
  private stopEntry(k: string, entry: Running, outcome: "cancelled" | "abandoned", why: string): void {
    if (entry.execution) {
      entry.execution.stop(outcome);
      return;
    }
    clearTimeout(entry.hold);
    this.running.delete(k);
    this.report(notStarted(entry.assign, outcome === "cancelled" ? Outcome.CANCELLED : Outcome.ABANDONED, why));
    this.poke();
  }

  /** Hands back every attempt still waiting for its start time (we take no new work). */
  private releaseHeld(why: string): void {
    for (const [k, entry] of this.running) if (!entry.execution) this.stopEntry(k, entry, "abandoned", why);
  }

  /**
   * Cut off from every coordinator for a lease period, the worker must assume its tasks were
   * requeued and run elsewhere: it stops them, so that two copies do not run for long. Their
   * results (abandoned) are reported when it reconnects, and fenced off there.
   */
  private startLeaseTimer(): void {
    if (this.leaseTimer) clearTimeout(this.leaseTimer);
    this.leaseTimer = setTimeout(() => {
      this.leaseTimer = null;
      if (this.welcomed || this.running.size === 0) return;
      this.options.log.warn(
        { running: this.running.size, leaseMs: this.leaseMs },
        "lease lapsed while disconnected: stopping tasks",
      );
      for (const [k, entry] of this.running)
        this.stopEntry(k, entry, "abandoned", "the lease lapsed while the worker was cut off");
    }, this.leaseMs);
  }

  private report(finished: TaskFinished): void {
    this.unacked.set(attemptKey(finished.ref!.taskId, finished.ref!.attempt), finished);
    this.write(finishedMessage(finished));
  }

  private sendHeartbeat(): void {
    this.write(
      create(WorkerMessageSchema, {
        payload: {
          case: "heartbeat",
          value: {
            seq: ++this.seq,
            // Unacknowledged results too: their attempts still hold their tasks until recorded.
            running: [...this.running.values()]
              .map(({ assign }) => assign.ref!)
              .concat([...this.unacked.values()].map((f) => f.ref!)),
            draining: this.draining,
          },
        },
      }),
    );
  }

  /** Writes on the current stream; before Welcome only Hello goes out. */
  private write(message: WorkerMessage, beforeWelcome = false): void {
    const call = this.call;
    if (!call || (!this.welcomed && !beforeWelcome) || call.writableEnded || call.destroyed) return;
    call.write(message);
  }

  /** Resolves once no task runs. */
  private idle(): Promise<void> {
    return this.until(() => this.running.size === 0);
  }

  /** Resolves once every result is acknowledged. */
  private acked(): Promise<void> {
    return this.until(() => this.unacked.size === 0);
  }

  private until(condition: () => boolean): Promise<void> {
    if (condition()) return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => {
        if (!condition()) return;
        this.waiters.delete(check);
        resolve();
      };
      this.waiters.add(check);
    });
  }

  /** Re-checks what stop() waits for, after running or unacked changed. */
  private poke(): void {
    for (const check of [...this.waiters]) check();
  }

  private clearTimers(): void {
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.leaseTimer) clearTimeout(this.leaseTimer);
    this.heartbeat = null;
    this.reconnectTimer = null;
    this.leaseTimer = null;
  }
}

function finishedMessage(finished: TaskFinished): WorkerMessage {
  return create(WorkerMessageSchema, { payload: { case: "finished", value: finished } });
}

function abandoned(assign: Assign, why: string): TaskFinished {
  return notStarted(assign, Outcome.ABANDONED, why);
}

/** The report of an attempt whose command never started here. */
function notStarted(assign: Assign, outcome: Outcome, why: string): TaskFinished {
  const now = timestampFromDate(new Date());
  return create(TaskFinishedSchema, {
    ref: assign.ref,
    outcome,
    error: why,
    startedAt: now,
    finishedAt: now,
  });
}
