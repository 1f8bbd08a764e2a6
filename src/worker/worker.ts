// The worker: holds one stream to a coordinator, runs what it is assigned, reports back.
// It dials its coordinator list in order and reconnects with backoff when the stream ends;
// running tasks keep running meanwhile, and results not yet acknowledged are re-sent on the
// next stream. stop() drains: no new work, running tasks finish or are handed back.
// This file is the loop: the stream, reconnecting, the lease while cut off, and handing each
// message to its part: the attempts held (attempts.ts) or what is sent (reporter.ts).
import { timestampMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { REFUSAL_KEY, REFUSAL_REVOKED } from "../auth/worker-tokens";
import {
  type Assign,
  type CoordinatorMessage,
  type Welcome,
  type WorkerMessage,
  WorkerService,
} from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import { clientConstructor } from "../rpc/definitions";
import { GRPC_DEFAULT_MAX_MESSAGE_BYTES, grpcMessageLimits } from "../rpc/message-size";
import { leaseMsFor } from "../task/lease";
import { Attempts } from "./attempts";
import type { TaskIdentity } from "./identity";
import { createLimiter, type Limiter, type LimitMaxima, type LimitsMode } from "./limits";
import { Reporter } from "./reporter";

const WorkerClient = clientConstructor(WorkerService);

function isRevoked(error: grpc.ServiceError): boolean {
  return error.metadata?.get(REFUSAL_KEY)[0] === REFUSAL_REVOKED;
}

export interface WorkerOptions {
  id?: string;
  name: string;
  slots: number;
  /** The queues it serves (TQ_WORKER_QUEUES); empty or absent: every queue. */
  queues?: readonly string[];
  /** Its labels (TQ_WORKER_LABELS), matched against tasks' require and prefer. */
  labels?: Readonly<Record<string, string>>;
  addresses: string[];
  /** How to dial the coordinators (TLS or not). Defaults to plaintext. */
  credentials?: grpc.ChannelCredentials;
  log: Logger;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  killGraceMs: number;
  drainGraceMs: number;
  maxOutputBytes: number;
  /** The largest gRPC message this worker sends or accepts. Defaults to gRPC's 4 MiB. */
  maxMessageBytes?: number;
  /** Wait before dialing again after a coordinator refused our protocol. Defaults to 30 s. */
  refusedBackoffMs?: number;
  version?: string;
  /**
   * Results kept unacknowledged at which the worker reports itself full (takes no new work
   * until some are acknowledged). Defaults to 1000.
   */
  maxUnacked?: number;
  /** Join token sent to the coordinator (authorization: Bearer). */
  workerToken?: string;
  /**
   * Called once the coordinator has refused this worker's credential as revoked: the worker
   * has killed its tasks (the coordinator requeued them) and stopped. `bun run worker` exits.
   */
  onRevoked?: () => void;
  /** Environment the tasks inherit; the executor strips the worker's own settings from it. */
  baseEnv: Record<string, string | undefined>;
  /** One user per slot to run tasks as (src/worker/identity.ts); unset: tasks run as the worker. */
  identities?: readonly TaskIdentity[];
  /**
   * The wall clock, in ms since the epoch, that the worker says in Hello and judges the lease
   * of an older coordinator's assignment by (tests set one that runs fast). Defaults to Date.now.
   */
  now?: () => number;
  /** How tasks are limited and this worker's maxima (src/worker/limits.ts). Defaults to no limits. */
  limits?: { mode: LimitsMode; maxima: LimitMaxima };
}

type Stream = grpc.ClientDuplexStream<WorkerMessage, CoordinatorMessage>;

/** What the worker's /healthz says (src/worker/health.ts). */
export interface WorkerHealth {
  worker_id: string;
  /** Welcomed by a coordinator on the current stream. */
  connected: boolean;
  /** The coordinator that welcomed us last, or null before the first. */
  coordinator: string | null;
  /** Since the coordinator last acknowledged a result; null before the first. */
  last_ack_age_ms: number | null;
  /** How long the worker has been without a coordinator; 0 while connected. */
  disconnected_ms: number;
  /** Attempts held, waiting for their start time or running. */
  running: number;
  /** Results waiting for the coordinator's acknowledgement. */
  unacknowledged: number;
  draining: boolean;
  /** Too many results are unacknowledged: no new work until some are. */
  full: boolean;
}

export class Worker {
  private workerId: string;
  /**
   * Our credential, from Welcome: proves on reconnecting that we are the worker that took our
   * id, and lets us back in without a join token (src/auth/worker-tokens.ts).
   */
  private resumeToken = "";
  private readonly reporter = new Reporter(
    (message) => this.write(message),
    () => this.checkFull(),
  );
  private readonly attempts: Attempts;
  private readonly limiter: Limiter;
  private stream: Stream | null = null;
  private client: grpc.Client | null = null;
  private welcomed = false;
  /** The coordinator that welcomed us last (still named while we are cut off from it). */
  private coordinatorId: string | null = null;
  /** No new work: the coordinator sent Drain, or stop() began. */
  private draining = false;
  /** No new work for now: too many results wait for their acknowledgement (see checkFull). */
  private full = false;
  /** performance.now() of the last Ack, or null before the first. */
  private lastAckAt: number | null = null;
  /** performance.now() since which no coordinator has welcomed us (we are not connected). */
  private disconnectedSince = performance.now();
  /** stop() has finished: the stream is closed and is not dialed again. */
  private closed = false;
  private heartbeatTimer: ReturnType<typeof setInterval> | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  /** Dials that failed since the last Welcome; the reconnect backoff grows with them. */
  private dialFailures = 0;
  /**
   * Why the last coordinator refused to serve us (FAILED_PRECONDITION: its protocol and ours do
   * not meet); set until the next Welcome. Dialing again soon would only be refused again.
   */
  private refusal: string | null = null;
  /** Where in the coordinator list to dial next: starts random, so that workers spread over coordinators. */
  private addressIndex: number;
  /** The coordinator's lease on our attempts (its heartbeat timeout plus an interval), from Welcome. */
  private leaseMs: number;
  /** Runs while disconnected after a Welcome: when it fires, our view of the leases has lapsed. */
  private cutOffTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly welcomeWaiters = new Set<() => void>();

  private get maxMessageBytes(): number {
    return this.options.maxMessageBytes ?? GRPC_DEFAULT_MAX_MESSAGE_BYTES;
  }
  /** Our wall clock (WorkerOptions.now). */
  private readonly now: () => number;

  constructor(private readonly options: WorkerOptions) {
    this.now = options.now ?? Date.now;
    this.workerId = options.id ?? Bun.randomUUIDv7();
    this.addressIndex = Math.floor(Math.random() * options.addresses.length);
    this.leaseMs = leaseMsFor(options);
    this.limiter = createLimiter({
      mode: options.limits?.mode ?? "none",
      maxima: options.limits?.maxima ?? { memoryMb: 0, pids: 0, nofile: 0, cpu: 0 },
      name: this.workerId,
      log: options.log,
    });
    this.attempts = new Attempts({
      limiter: this.limiter,
      log: options.log,
      killGraceMs: options.killGraceMs,
      maxOutputBytes: options.maxOutputBytes,
      baseEnv: options.baseEnv,
      identities: options.identities,
      events: this.reporter,
      identity: () => ({ workerId: this.workerId, coordinatorId: this.coordinatorId }),
    });
    this.reporter.maxMessageBytes = this.maxMessageBytes;
  }

  get id(): string {
    return this.workerId;
  }

  /** Starts dialing and returns; the worker keeps reconnecting on its own until stop(). */
  start(): void {
    this.connect();
  }

  /** Resolves once a coordinator has welcomed this worker. */
  connected(): Promise<void> {
    if (this.welcomed) return Promise.resolve();
    return new Promise((resolve) => this.welcomeWaiters.add(resolve));
  }

  /** Attempts held, waiting for their start time or running. */
  get runningCount(): number {
    return this.attempts.size;
  }

  /** The worker's state for its /healthz. */
  health(now = performance.now()): WorkerHealth {
    return {
      worker_id: this.workerId,
      connected: this.welcomed,
      coordinator: this.coordinatorId,
      last_ack_age_ms: this.lastAckAt === null ? null : Math.round(now - this.lastAckAt),
      disconnected_ms: this.welcomed ? 0 : Math.round(now - this.disconnectedSince),
      running: this.attempts.size,
      unacknowledged: this.reporter.pending,
      draining: this.draining,
      full: this.full,
    };
  }

  /**
   * Drains: takes no new work, lets running tasks finish for the drain grace period, then
   * hands the rest back, waits (briefly) for the coordinator to acknowledge the results, and
   * closes the stream.
   */
  async stop(): Promise<void> {
    if (this.closed) return;
    this.drain();
    const grace = this.options.drainGraceMs;
    if (this.attempts.size > 0) {
      this.options.log.info(
        { event: "worker.draining", running: this.attempts.size, graceMs: grace },
        "draining: waiting for running tasks",
      );
      const timeout = Bun.sleep(grace).then(() => "timeout" as const);
      if ((await Promise.race([this.attempts.empty(), timeout])) === "timeout") {
        this.options.log.warn({ running: this.attempts.size }, "drain grace over: handing running tasks back");
        this.attempts.abandonAll("the worker is draining", "interrupted");
        await this.attempts.empty();
      }
    }
    // Give the coordinator a moment to acknowledge the last results.
    if (this.reporter.pending > 0 && this.welcomed) await Promise.race([this.reporter.allAcknowledged(), Bun.sleep(2000)]);
    this.closed = true;
    this.clearTimers();
    this.stream?.end();
    this.stream = null;
    this.client?.close();
    this.client = null;
    // Every attempt's cgroup is gone with its attempt; this removes the worker's own directory.
    if (this.attempts.size === 0) this.limiter.close();
  }

  /**
   * Exiting at once, without drain: kills every running command's process group, so that
   * none runs on unsupervised while the coordinator requeues it (it finds this worker lost).
   */
  abort(): void {
    this.attempts.killAll();
  }

  private connect(): void {
    if (this.closed) return;
    const address = this.options.addresses[this.addressIndex % this.options.addresses.length]!;
    const client = new WorkerClient(address, this.options.credentials ?? grpc.credentials.createInsecure(), {
      // Our own HTTP/2 connection per worker, even when several share a process.
      "grpc.use_local_subchannel_pool": 1,
      "grpc.keepalive_time_ms": Math.max(1000, this.options.heartbeatIntervalMs),
      "grpc.keepalive_timeout_ms": this.options.heartbeatTimeoutMs,
      "grpc.keepalive_permit_without_calls": 1,
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": 2000,
      ...grpcMessageLimits(this.maxMessageBytes),
    });
    this.client = client;
    const metadata = new grpc.Metadata();
    if (this.options.workerToken) metadata.set("authorization", `Bearer ${this.options.workerToken}`);
    const stream = (client as unknown as { connect(metadata: grpc.Metadata): Stream }).connect(metadata);
    this.stream = stream;
    let closed = false;
    const onClosed = (why: string) => {
      if (closed) return;
      closed = true;
      if (this.stream === stream) this.disconnected(address, why);
      client.close();
    };
    // Messages still buffered from a stream that has failed are dropped: we have already told
    // the next coordinator (in Hello) what we hold, and anything assigned there is requeued.
    stream.on("data", (message: CoordinatorMessage) => {
      if (this.stream === stream && !closed) this.receive(message);
    });
    stream.on("error", (error: grpc.ServiceError) => {
      if (error.code === grpc.status.UNAUTHENTICATED && this.stream === stream && isRevoked(error)) {
        this.revoked();
        return;
      }
      if (error.code === grpc.status.PERMISSION_DENIED && this.stream === stream) {
        // Our id is held by a worker with another resume token (ours was lost): start afresh.
        // What we still run is superseded there, and is stopped when we report it.
        this.workerId = Bun.randomUUIDv7();
        this.resumeToken = "";
        this.options.log.warn({ id: this.workerId }, "the coordinator refused our worker id; continuing under a new one");
      }
      if (error.code === grpc.status.FAILED_PRECONDITION && this.stream === stream) this.refusal = error.details || error.message;
      onClosed(error.details || error.message);
    });
    stream.on("end", () => onClosed("stream ended"));
    stream.on("close", () => onClosed("stream closed"));
    this.reporter.hello(
      {
        workerId: this.id,
        name: this.options.name,
        slots: this.options.slots,
        version: this.options.version ?? "",
        resumeToken: this.resumeToken,
        queues: [...(this.options.queues ?? [])],
        labels: { ...(this.options.labels ?? {}) },
      },
      this.attempts.refs(),
      new Date(this.now()),
    );
  }

  /**
   * Our credential was revoked: we are shut out, and the coordinator has requeued our tasks,
   * so they are killed here at once rather than left to run a second copy. Nothing is dialed
   * again; the credential and id are forgotten.
   */
  private revoked(): void {
    this.options.log.error(
      { event: "worker.revoked", id: this.workerId, running: this.attempts.size },
      "the coordinator revoked this worker's credential: killing its tasks and stopping",
    );
    this.closed = true;
    this.welcomed = false;
    this.resumeToken = "";
    this.attempts.releaseWaiting("the worker's credential was revoked", "lost");
    this.attempts.killAll();
    this.clearTimers();
    this.stream = null;
    this.client?.close();
    this.client = null;
    this.options.onRevoked?.();
  }

  private disconnected(address: string, why: string): void {
    this.stream = null;
    this.client = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    if (wasWelcomed) this.disconnectedSince = performance.now();
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    if (this.closed) return;
    if (wasWelcomed) this.startCutOffTimer();
    this.dialFailures = wasWelcomed ? 1 : this.dialFailures + 1;
    // Move on to the next coordinator in the list after a failure there.
    this.addressIndex++;
    const backoff = this.refusal
      ? (this.options.refusedBackoffMs ?? 30_000)
      : Math.min(5000, 100 * 2 ** Math.min(this.dialFailures - 1, 6));
    const delay = Math.round(backoff / 2 + (Math.random() * backoff) / 2);
    if (this.refusal) {
      // Not a crash: the process stays up, drains on a signal as ever, and tries again slowly
      // (the next address in the list may be a coordinator that serves us).
      this.options.log.error(
        { event: "worker.refused", address, why: this.refusal, retryInMs: delay },
        "the coordinator cannot serve this worker's protocol version",
      );
    }
    this.options.log.warn({ event: "worker.disconnected", address, why, retryInMs: delay }, "disconnected from coordinator");
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  private receive(message: CoordinatorMessage): void {
    const payload = message.payload;
    switch (payload.case) {
      case "welcome":
        this.welcome(payload.value);
        return;
      case "assign":
        this.assigned(payload.value);
        return;
      case "cancel":
        if (payload.value.ref) this.attempts.cancel(payload.value.ref, payload.value.reason);
        return;
      case "ack":
        this.lastAckAt = performance.now();
        if (payload.value.ref) this.reporter.acknowledged(payload.value.ref);
        return;
      case "drain":
        this.drain();
        return;
      default:
        return;
    }
  }

  private welcome(welcome: Welcome): void {
    this.welcomed = true;
    this.refusal = null;
    if (welcome.resumeToken) this.resumeToken = welcome.resumeToken;
    this.coordinatorId = welcome.coordinatorId || null;
    this.dialFailures = 0;
    if (welcome.heartbeatTimeoutMs > 0) this.leaseMs = leaseMsFor(welcome);
    // Results must fit what this coordinator accepts, as well as our own limit; an older
    // coordinator does not say, and accepts gRPC's default.
    this.reporter.maxMessageBytes = Math.min(this.maxMessageBytes, welcome.maxMessageBytes || GRPC_DEFAULT_MAX_MESSAGE_BYTES);
    if (this.cutOffTimer) clearTimeout(this.cutOffTimer);
    this.cutOffTimer = null;
    this.options.log.info(
      {
        event: "worker.connected",
        coordinator: welcome.coordinatorId,
        protocol: welcome.protocolVersion,
        features: welcome.features,
      },
      "connected",
    );
    this.reporter.resend();
    // A new coordinator learns at once that we take no new work.
    if (this.full) this.heartbeat();
    this.heartbeatTimer = setInterval(() => this.heartbeat(), this.options.heartbeatIntervalMs);
    for (const resolve of this.welcomeWaiters) resolve();
    this.welcomeWaiters.clear();
  }

  private assigned(assign: Assign): void {
    const ref = assign.ref;
    if (!ref) return;
    if (this.attempts.holds(ref) || this.reporter.holds(ref)) return; // a duplicate delivery
    if (this.draining) {
      // Raced with our drain: hand it straight back, not counted against the task.
      this.reporter.notStarted(ref, "abandoned", "the worker is draining", true);
      return;
    }
    if (leaseLapsed(assign, this.now)) {
      // It may already run elsewhere.
      this.options.log.warn(this.attempts.fields(ref), "assignment arrived after its lease lapsed; not running it");
      this.reporter.notStarted(ref, "abandoned", "the assignment arrived after its lease lapsed", false);
      return;
    }
    this.attempts.take(assign);
  }

  /** Takes no new work from now on: hands back what waits for its start time, and says so. */
  private drain(): void {
    this.draining = true;
    this.attempts.releaseWaiting("the worker is draining", "interrupted");
    this.heartbeat();
  }

  private heartbeat(): void {
    this.reporter.heartbeat(this.attempts.refs(), this.draining, this.full);
  }

  /**
   * Backpressure on unacknowledged results: at maxUnacked the worker says in a heartbeat (sent
   * at once) that it is full, and the coordinator gives it no new work until acknowledgements
   * bring it below again. Assignments already on their way still run: the buffer exceeds its
   * bound by at most what was sent before the coordinator heard.
   */
  private checkFull(): void {
    const full = this.reporter.pending >= (this.options.maxUnacked ?? 1000);
    if (full === this.full) return;
    this.full = full;
    if (full) {
      this.options.log.warn(
        { event: "worker.full", unacknowledged: this.reporter.pending },
        "too many results wait for the coordinator's acknowledgement: taking no new work",
      );
    } else {
      this.options.log.info({ event: "worker.not_full", unacknowledged: this.reporter.pending }, "taking work again");
    }
    if (this.welcomed) this.heartbeat();
  }

  /**
   * Cut off from every coordinator for a lease period, the worker must assume its tasks were
   * requeued and run elsewhere: it stops them, so that two copies do not run for long. Their
   * results (abandoned) are reported when it reconnects, and fenced off there.
   */
  private startCutOffTimer(): void {
    if (this.cutOffTimer) clearTimeout(this.cutOffTimer);
    this.cutOffTimer = setTimeout(() => {
      this.cutOffTimer = null;
      if (this.welcomed || this.attempts.size === 0) return;
      this.options.log.warn(
        { running: this.attempts.size, leaseMs: this.leaseMs },
        "lease lapsed while disconnected: stopping tasks",
      );
      this.attempts.abandonAll("the lease lapsed while the worker was cut off", "lost");
    }, this.leaseMs);
  }

  /** Writes on the current stream; before Welcome only Hello goes out. */
  private write(message: WorkerMessage): void {
    const stream = this.stream;
    if (!stream || stream.writableEnded || stream.destroyed) return;
    if (!this.welcomed && message.payload.case !== "hello") return;
    stream.write(message);
  }

  private clearTimers(): void {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.cutOffTimer) clearTimeout(this.cutOffTimer);
    this.heartbeatTimer = null;
    this.reconnectTimer = null;
    this.cutOffTimer = null;
  }
}

/**
 * Whether an assignment's lease ran out before we could take it. `lease_ms` is what was left
 * as the coordinator sent it, on its monotonic clock; we take the assignment at once on
 * receipt, so what is left on ours is the same, and no wall clock is compared with another
 * host's (a worker whose clock runs fast would otherwise refuse every assignment). Zero: it
 * lapsed before it was sent. An older coordinator sends only lease_expires_at, a time by the
 * database's clock, which is all we can compare with our own wall clock.
 */
export function leaseLapsed(assign: Pick<Assign, "leaseMs" | "leaseExpiresAt">, now: () => number): boolean {
  if (assign.leaseMs !== undefined) return assign.leaseMs <= 0;
  return assign.leaseExpiresAt !== undefined && timestampMs(assign.leaseExpiresAt) < now();
}
