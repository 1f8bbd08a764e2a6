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
  type LeaseConfirmation,
  type Welcome,
  type WorkerMessage,
  WorkerMessageSchema,
  WorkerService,
} from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import { BATCH_MAX_BYTES, StreamBatcher, unbatch } from "../rpc/batch";
import { clientConstructor } from "../rpc/definitions";
import { GRPC_DEFAULT_MAX_MESSAGE_BYTES, grpcMessageLimits } from "../rpc/message-size";
import { attemptKey } from "../task/attempt";
import { fenceKillGraceMs, type HeartbeatTimings, legacyLeaseMsFor } from "../task/lease";
import type { Tracing } from "../trace/tracing";
import { Attempts, type AttemptsOptions } from "./attempts";
import type { TaskIdentity } from "./identity";
import { LeaseFence, StallDetector } from "./lease-fence";
import { createLimiter, type Limiter, type LimitMaxima, type LimitsMode } from "./limits";
import { Reporter } from "./reporter";
import { HostGates } from "./start-gate";
import type { WatchdogState } from "./watchdog";

const WorkerClient = clientConstructor(WorkerService);

function isRevoked(error: grpc.ServiceError): boolean {
  return error.metadata?.get(REFUSAL_KEY)[0] === REFUSAL_REVOKED;
}

export interface WorkerOptions {
  id?: string;
  /** Run spans for traced assignments (src/trace); absent or null: off. */
  tracing?: Tracing | null;
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
  /**
   * The folder where this user's workers on the host share start gates (TQ_WORKER_GATE_DIR,
   * src/worker/start-gate.ts); absent or null: this worker's gates are its own.
   */
  hostGateDir?: string | null;
  /**
   * Live logs: how running tasks' output is flushed to a coordinator that takes it (feature
   * live_logs). Defaults to 64 KiB or 1000 ms (TQ_LOG_FLUSH_BYTES, TQ_LOG_FLUSH_MS).
   */
  logFlush?: { flushBytes: number; maxDelayMs: number };
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
  /**
   * Called, synchronously, whenever what `watchState()` returns changed: the worker's watchdog
   * (src/worker/watchdog.ts) is told at once, before any process of a new attempt can outlive us.
   */
  onWatchedChange?: () => void;
  /** Runs an attempt's command (AttemptsOptions.execute); defaults to the executor. */
  execute?: AttemptsOptions["execute"];
}

/** Written with messages, or with the bytes of a batch (src/rpc/batch.ts). */
type Stream = grpc.ClientDuplexStream<WorkerMessage | Uint8Array, CoordinatorMessage>;

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
  /** The current stream's batcher, once its coordinator's Welcome names the batch feature. */
  private batcher: StreamBatcher<typeof WorkerMessageSchema> | null = null;
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
  /**
   * The coordinator's heartbeat timings, from Welcome (ours until then): the lease margins are
   * counted with them.
   */
  private timings: HeartbeatTimings;
  /** Each held attempt's lease on our own clock (src/worker/lease-fence.ts). */
  private fence: LeaseFence;
  private readonly stall: StallDetector;
  /** Checks for our own stalls and for leases about to run out. */
  private tickTimer: ReturnType<typeof setInterval> | null = null;
  /** The current coordinator confirms renewals (lease_confirm); without it we count a legacy lease. */
  private confirms = false;
  /**
   * After a stall: no attempt starts until a coordinator has confirmed the leases of a
   * Hello or Heartbeat sent after it (`seq`, sent at `sentAt`; null until sent). Null: not
   * reconciling.
   */
  private reconcile: { seq: bigint | null; sentAt: number | null } | null = null;
  private readonly welcomeWaiters = new Set<() => void>();
  /** The current coordinator's TQ_LOG_MAX_BYTES when it takes live logs (live_logs), else null. */
  private logMaxBytes: number | null = null;
  /** The coordinator address dialed last. */
  private address: string | null = null;

  private get maxMessageBytes(): number {
    return this.options.maxMessageBytes ?? GRPC_DEFAULT_MAX_MESSAGE_BYTES;
  }
  /** Our wall clock (WorkerOptions.now). */
  private readonly now: () => number;

  constructor(private readonly options: WorkerOptions) {
    this.now = options.now ?? Date.now;
    this.workerId = options.id ?? Bun.randomUUIDv7();
    this.addressIndex = Math.floor(Math.random() * options.addresses.length);
    this.timings = { heartbeatIntervalMs: options.heartbeatIntervalMs, heartbeatTimeoutMs: options.heartbeatTimeoutMs };
    this.fence = new LeaseFence({ ...this.timings, killGraceMs: options.killGraceMs });
    this.stall = new StallDetector(options.heartbeatIntervalMs, performance.now());
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
      tracing: options.tracing,
      gate: (key, receivedAt) => this.gate(key, receivedAt),
      hostGates: this.hostGates(options),
      leaseHolds: (key, until) => this.fence.trusted(key, until),
      logStreaming: () =>
        this.logMaxBytes === null
          ? null
          : { maxBytes: this.logMaxBytes, flushBytes: 64 * 1024, maxDelayMs: 1000, ...options.logFlush },
      onForget: (key) => this.fence.forget(key),
      changed: options.onWatchedChange,
      execute: options.execute,
    });
    this.reporter.maxMessageBytes = this.maxMessageBytes;
  }

  get id(): string {
    return this.workerId;
  }

  /** The host gates of TQ_WORKER_GATE_DIR, or null (none set, or the folder cannot be used: logged). */
  private hostGates(options: WorkerOptions): HostGates | null {
    if (!options.hostGateDir) return null;
    const gates = HostGates.open(options.hostGateDir);
    if (typeof gates !== "string") return gates;
    options.log.warn(
      { event: "worker.host_gates_off", path: options.hostGateDir, reason: gates },
      "start gates are not shared with the host's other workers: each worker lets its own tasks go at their time",
    );
    return null;
  }

  /** Starts dialing and returns; the worker keeps reconnecting on its own until stop(). */
  start(): void {
    this.tickTimer = setInterval(
      () => this.tick(),
      Math.max(10, Math.min(250, Math.floor(this.options.heartbeatIntervalMs / 4))),
    );
    this.connect();
  }

  /** Resolves once a coordinator has welcomed this worker. */
  connected(): Promise<void> {
    if (this.welcomed) return Promise.resolve();
    return new Promise((resolve) => this.welcomeWaiters.add(resolve));
  }

  /** What the watchdog must know to stop our tasks and report them if we die (src/worker/watchdog.ts). */
  watchState(): WatchdogState {
    return {
      worker_id: this.workerId,
      credential: this.resumeToken,
      address: this.address,
      attempts: this.attempts.processes(),
    };
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
      if ((await within(this.attempts.empty(), grace)) === "timeout") {
        this.options.log.warn({ running: this.attempts.size }, "drain grace over: handing running tasks back");
        this.attempts.abandonAll("the worker is draining", "interrupted");
        await this.attempts.empty();
      }
    }
    // Give the coordinator a moment to acknowledge the last results.
    if (this.reporter.pending > 0 && this.welcomed) await within(this.reporter.allAcknowledged(), 2000);
    this.closed = true;
    this.clearTimers();
    this.batcher?.flush();
    this.batcher = null;
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
    this.address = address;
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
      // A batch's messages one by one, in order, as if each had come alone: at the moment the
      // batch came, so that an Assign's start time and lease count from its arrival, not from
      // however long the ones before it in the batch took.
      const arrivedAt = performance.now();
      for (const inner of unbatch(message)) {
        if (this.stream !== stream || closed) return;
        this.receive(inner, arrivedAt);
      }
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
        this.options.onWatchedChange?.();
        this.options.log.warn({ id: this.workerId }, "the coordinator refused our worker id; continuing under a new one");
      }
      if (error.code === grpc.status.FAILED_PRECONDITION && this.stream === stream) this.refusal = error.details || error.message;
      onClosed(error.details || error.message);
    });
    stream.on("end", () => onClosed("stream ended"));
    stream.on("close", () => onClosed("stream closed"));
    const sentAt = performance.now();
    const seq = this.reporter.hello(
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
    this.sentNumbered(seq, sentAt);
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
    this.batcher = null;
    this.client?.close();
    this.client = null;
    this.options.onRevoked?.();
  }

  private disconnected(address: string, why: string): void {
    this.stream = null;
    this.batcher = null;
    this.client = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    if (wasWelcomed) this.disconnectedSince = performance.now();
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    if (this.closed) return;
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

  /** `arrivedAt`: performance.now() when the message (or the batch it came in) arrived. */
  private receive(message: CoordinatorMessage, arrivedAt: number): void {
    const payload = message.payload;
    switch (payload.case) {
      case "welcome":
        this.welcome(payload.value);
        return;
      case "assign":
        this.assigned(payload.value, arrivedAt);
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
      case "lease":
        this.leaseConfirmed(payload.value);
        return;
      default:
        return;
    }
  }

  private welcome(welcome: Welcome): void {
    this.welcomed = true;
    this.refusal = null;
    if (welcome.resumeToken) this.resumeToken = welcome.resumeToken;
    this.options.onWatchedChange?.();
    this.coordinatorId = welcome.coordinatorId || null;
    this.dialFailures = 0;
    if (welcome.heartbeatTimeoutMs > 0 && welcome.heartbeatIntervalMs > 0) {
      this.timings = { heartbeatIntervalMs: welcome.heartbeatIntervalMs, heartbeatTimeoutMs: welcome.heartbeatTimeoutMs };
      this.fence.timings = this.timings;
    }
    this.confirms = welcome.features.includes("lease_confirm");
    const liveLogs = welcome.features.includes("live_logs");
    this.logMaxBytes = liveLogs ? Number(welcome.logMaxBytes) : null;
    this.reporter.liveLogs = liveLogs;
    // Results must fit what this coordinator accepts, as well as our own limit; an older
    // coordinator does not say, and accepts gRPC's default.
    this.reporter.maxMessageBytes = Math.min(this.maxMessageBytes, welcome.maxMessageBytes || GRPC_DEFAULT_MAX_MESSAGE_BYTES);
    const stream = this.stream;
    this.batcher =
      stream && welcome.features.includes("batch")
        ? new StreamBatcher(
            WorkerMessageSchema,
            (encoded) => {
              if (this.stream === stream && !stream.writableEnded && !stream.destroyed) stream.write(encoded);
            },
            Math.min(BATCH_MAX_BYTES, this.reporter.maxMessageBytes),
          )
        : null;
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
    // A stall noticed while this stream was being set up: reconcile on it now.
    if (this.reconcile && !this.confirms) this.cannotReconcile();
    else if (this.reconcile && this.reconcile.seq === null) this.heartbeat();
    for (const resolve of this.welcomeWaiters) resolve();
    this.welcomeWaiters.clear();
  }

  private assigned(assign: Assign, arrivedAt: number): void {
    const ref = assign.ref;
    if (!ref) return;
    if (this.attempts.holds(ref) || this.reporter.holds(ref)) return; // a duplicate delivery
    if (this.draining) {
      // Raced with our drain: hand it straight back, not counted against the task.
      this.reporter.notStarted(ref, "abandoned", "the worker is draining", true);
      return;
    }
    // A stall noticed first: an Assign read after one may have waited in our buffers through it.
    this.tick();
    if (leaseLapsed(assign, this.now)) {
      // It may already run elsewhere.
      this.options.log.warn(this.attempts.fields(ref), "assignment arrived after its lease lapsed; not running it");
      this.reporter.notStarted(ref, "abandoned", "the assignment arrived after its lease lapsed", false);
      return;
    }
    // Counted from receipt until a confirmation replaces it; an older coordinator sends no
    // lease_ms, and its lease is the legacy one.
    this.fence.granted(attemptKey(ref.taskId, ref.attempt), assign.leaseMs ?? legacyLeaseMsFor(this.timings), arrivedAt);
    this.attempts.take(assign, arrivedAt);
  }

  /** Takes no new work from now on: hands back what waits for its start time, and says so. */
  private drain(): void {
    this.draining = true;
    this.attempts.releaseWaiting("the worker is draining", "interrupted");
    this.heartbeat();
  }

  private heartbeat(): void {
    const sentAt = performance.now();
    const refs = this.attempts.refs();
    const seq = this.reporter.heartbeat(refs, this.draining, this.full);
    this.sentNumbered(seq, sentAt);
    // A coordinator that confirms nothing renews what a heartbeat reports, with the legacy
    // lease: counted from the send while we are connected to it (not after).
    if (this.welcomed && !this.confirms) {
      const leaseMs = legacyLeaseMsFor(this.timings);
      this.fence.confirm(
        seq,
        refs.map((ref) => ({ key: attemptKey(ref.taskId, ref.attempt), leaseMs })),
      );
    }
  }

  /** A numbered Hello or Heartbeat went out (on the current stream, if any). */
  private sentNumbered(seq: bigint, sentAt: number): void {
    this.fence.sent(seq, sentAt);
    if (this.reconcile && this.reconcile.seq === null && (this.welcomed || this.stream)) this.reconcile = { seq, sentAt };
  }

  /**
   * A coordinator renewed leases on the strength of our message numbered `seq`: each renewed
   * attempt's lease now counts from that message's send. While reconciling after a stall, the
   * first confirmation of a message sent after it decides what was held back: an attempt
   * reported in it starts if renewed and is refused if not; one taken after it was sent is
   * reported in another heartbeat first (it may have waited in our buffers through the stall).
   */
  private leaseConfirmed(confirmation: LeaseConfirmation): void {
    const renewed = confirmation.renewed.flatMap(({ ref, leaseMs }) =>
      ref ? [{ key: attemptKey(ref.taskId, ref.attempt), leaseMs }] : [],
    );
    const moved = this.fence.confirm(confirmation.seq, renewed) ?? new Set<string>();
    const reconcile = this.reconcile;
    if (!reconcile || reconcile.seq === null || reconcile.sentAt === null || confirmation.seq < reconcile.seq) return;
    let uncovered = 0;
    for (const { key, ref, receivedAt } of this.attempts.parked()) {
      if (receivedAt > reconcile.sentAt) {
        uncovered++;
        continue;
      }
      if (moved.has(key) && this.fence.trusted(key, performance.now())) {
        this.attempts.resumeParked(key, "start");
      } else {
        this.options.log.warn(
          { event: "worker.assignment_refused", ...this.attempts.fields(ref), reason: "not renewed after a stall" },
          "an assignment held back after a stall was not renewed: not starting it",
        );
        this.attempts.resumeParked(key, "refuse");
      }
    }
    if (uncovered === 0) {
      this.reconcile = null;
      this.options.log.info({ event: "worker.reconciled" }, "leases confirmed after the stall: starting work again");
      return;
    }
    this.reconcile = { seq: null, sentAt: null };
    if (this.welcomed) this.heartbeat();
  }

  /**
   * Whether an attempt about to start may: its lease must still hold by our count (refused
   * otherwise), and while reconciling after a stall it waits for the confirmation.
   */
  private gate(key: string, receivedAt: number): "start" | "hold" | "refuse" {
    this.tick();
    const now = performance.now();
    if (!this.fence.trusted(key, now)) {
      const [taskId = "", attempt = "0"] = key.split(":");
      this.options.log.warn(
        {
          event: "worker.assignment_refused",
          ...this.attempts.fields({ taskId, attempt: Number(attempt) } as Parameters<Attempts["fields"]>[0]),
          reason: "lease not trusted",
          heldMs: Math.round(now - receivedAt),
        },
        "an assignment's lease can no longer be trusted: not starting it",
      );
      return "refuse";
    }
    if (this.reconcile) return "hold";
    return "start";
  }

  /**
   * Every few ms: a gap longer than a heartbeat interval since the last tick is our own stall
   * (frozen, or the event loop blocked), after which nothing starts until a coordinator has
   * confirmed our leases; an attempt whose lease is about to run out by our count is fenced.
   */
  private tick(): void {
    const now = performance.now();
    const gap = this.stall.tick(now);
    if (gap !== null) this.stalled(gap);
    for (const key of this.fence.due(now)) {
      const lease = this.fence.leaseOf(key);
      this.fence.forget(key);
      const ref = this.attempts.refs().find((r) => attemptKey(r.taskId, r.attempt) === key);
      if (!ref) continue;
      this.options.log.warn(
        {
          event: "worker.lease_fenced",
          ...this.attempts.fields(ref),
          lease_ms: lease?.leaseMs,
          fence_grace_ms: fenceKillGraceMs(this.timings, this.options.killGraceMs),
          connected: this.welcomed,
        },
        "the attempt's lease is about to run out unconfirmed: stopping it",
      );
      this.attempts.fence(
        key,
        "the attempt's lease ran out on the worker before a coordinator confirmed its renewal",
        fenceKillGraceMs(this.timings, this.options.killGraceMs),
      );
    }
  }

  private stalled(gapMs: number): void {
    this.options.log.warn(
      { event: "worker.stall_detected", gapMs: Math.round(gapMs), held: this.attempts.size, connected: this.welcomed },
      "this worker stalled: starting nothing until a coordinator confirms its leases",
    );
    // Already reconciling on a message sent before this stall: its confirmation still vouches
    // for what was taken before that message, and what came after (in this stall too) is
    // reported in one more round. Starting over would never finish under frequent stalls.
    if (this.reconcile?.seq != null) return;
    this.reconcile = { seq: null, sentAt: null };
    if (this.welcomed && !this.confirms) this.cannotReconcile();
    else if (this.welcomed) this.heartbeat();
  }

  /**
   * Without confirmations (a coordinator of an older build) nothing would end a
   * reconciliation: what was held back is refused, as its lease cannot be trusted.
   */
  private cannotReconcile(): void {
    this.reconcile = null;
    for (const { key, ref } of this.attempts.parked()) {
      this.options.log.warn(
        { event: "worker.assignment_refused", ...this.attempts.fields(ref), reason: "stalled; no lease confirmations" },
        "an assignment held back after a stall cannot be confirmed: not starting it",
      );
      this.attempts.resumeParked(key, "refuse");
    }
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

  /** Writes on the current stream; before Welcome only Hello goes out. */
  private write(message: WorkerMessage): void {
    const stream = this.stream;
    if (!stream || stream.writableEnded || stream.destroyed) return;
    if (!this.welcomed && message.payload.case !== "hello") return;
    if (this.batcher) this.batcher.push(message);
    else stream.write(message);
  }

  private clearTimers(): void {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.tickTimer) clearInterval(this.tickTimer);
    this.heartbeatTimer = null;
    this.reconnectTimer = null;
    this.tickTimer = null;
  }
}

/** Waits for `done` at most `ms`; the timer is cleared either way, so that a stopped worker leaves none behind. */
async function within(done: Promise<void>, ms: number): Promise<"done" | "timeout"> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), ms)));
  try {
    return await Promise.race([done.then(() => "done" as const), timeout]);
  } finally {
    clearTimeout(timer);
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
