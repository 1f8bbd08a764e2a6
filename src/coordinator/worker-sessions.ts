// The worker sessions (WorkerService.Connect): one bidirectional stream per worker. The worker
// says Hello; we check who it is (a join token in the stream's metadata, or the credential it
// was given for its id: src/auth/worker-tokens.ts), register it, give back the tasks the database thinks it holds but it does not,
// and answer Welcome. From then on the dispatcher pushes Assign and the completer answers
// reports with Ack. The end of a stream (or silence past the heartbeat timeout, which ends it)
// only takes the worker out of dispatch: a reset connection leaves a live worker running its
// tasks, so what it held is requeued at once only on confirmed death (its watchdog's report,
// src/coordinator/worker-lost.ts), otherwise when its leases lapse (src/coordinator/rescuer.ts),
// or at its next Hello.
import { timestampMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { bearerToken, hashToken } from "../auth/tokens";
import { type JoinToken, matchJoinToken, newWorkerCredential, REFUSAL_KEY, REFUSAL_REVOKED } from "../auth/worker-tokens";
import type { Sql } from "../db/sql";
import { renewLeases, requeueWorkerTasks } from "../db/transitions";
import { insertCredential, useCredential } from "../db/worker-credentials";
import { markWorkerGone, setWorkerDraining, upsertWorker } from "../db/workers";
import {
  type CoordinatorMessage,
  CoordinatorMessageSchema,
  type Hello,
  type WorkerMessage,
} from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import { BATCH_MAX_BYTES, StreamBatcher, unbatch } from "../rpc/batch";
import { attemptRefFromProto } from "../rpc/convert";
import { MalformedMessage } from "../rpc/definitions";
import { GRPC_DEFAULT_MAX_MESSAGE_BYTES } from "../rpc/message-size";
import { cancelMessage, leaseMessage, welcomeMessage } from "../rpc/messages";
import { type Agreement, agreeWithWorker, ProtocolMismatch } from "../rpc/protocol";
import { attemptKey } from "../task/attempt";
import { workerRouting } from "../task/routing";
import type { Completer } from "./completer";
import type { Dispatcher } from "./dispatcher";
import type { LogWriter } from "./log-writer";
import type { WorkerConnection, WorkerRegistry } from "./registry";

/** Written with messages, or with the bytes of a batch (src/rpc/batch.ts). */
export type WorkerStream = grpc.ServerDuplexStream<WorkerMessage, CoordinatorMessage | Uint8Array>;

export interface WorkerSessionsOptions {
  sql: Sql;
  registry: WorkerRegistry;
  dispatcher: Dispatcher;
  completer: Completer;
  coordinatorId: string;
  log: Logger;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  /** Lease of an attempt, renewed at Hello for what the worker holds. */
  leaseMs: number;
  /** How long a new stream may take to say Hello. Defaults to 10 s. */
  helloTimeoutMs?: number;
  /**
   * Join tokens a new worker must carry one of (authorization: Bearer); none: any stream may
   * join. A worker presenting a valid credential for its id needs none.
   */
  joinTokens?: readonly JoinToken[];
  /** The largest message the gRPC server accepts, told to workers in Welcome. Defaults to gRPC's 4 MiB. */
  maxMessageBytes?: number;
  /** A worker whose clock is off ours by more than this is logged. Defaults to CLOCK_SKEW_WARN_MS. */
  clockSkewWarnMs?: number;
  /** Our wall clock, for measuring a worker's skew. Defaults to Date.now. */
  now?: () => number;
  /** Stores live output (feature live_logs); unset: output messages are dropped. */
  logs?: LogWriter;
  /** TQ_LOG_MAX_BYTES, told to workers in Welcome. Defaults to 8 MiB. */
  logMaxBytes?: number;
  /** The worker protocols served. Defaults to this build's range (src/rpc/protocol.ts). */
  protocols?: { oldest: number; newest: number };
}

/** How a stream got in: with the named join token, with no join token required, or not yet. */
type Admission = { joinedWith: string | null } | null;

const MAX_ID = 200;

/**
 * The clock skew (ms) past which a joining worker is logged (coordinator.worker_clock_skew).
 * Leases travel as durations and dueness is the database's, so skew does not fail tasks; it
 * skews the times the worker reports (started_at, finished_at), which is what is warned of.
 */
export const CLOCK_SKEW_WARN_MS = 1000;

export class WorkerSessions {
  private readonly streams = new Set<WorkerStream>();
  private readonly ending = new Set<Promise<void>>();
  private readonly calls = new WeakMap<WorkerConnection, WorkerStream>();
  /** The batcher of each stream whose worker reads batches (feature batch). */
  private readonly batchers = new WeakMap<WorkerStream, StreamBatcher<typeof CoordinatorMessageSchema>>();
  private closed = false;

  constructor(private readonly options: WorkerSessionsOptions) {}

  /** The grpc-js handler for WorkerService.Connect. */
  readonly connect = (call: WorkerStream): void => {
    if (this.closed) {
      endWithStatus(call, grpc.status.UNAVAILABLE, "coordinator is shutting down");
      return;
    }
    const admission = this.admit(call);
    this.streams.add(call);
    let session: WorkerConnection | null = null;
    let ended = false;
    const helloTimer = setTimeout(() => {
      if (!session) fail(grpc.status.DEADLINE_EXCEEDED, "no Hello within the deadline");
    }, this.options.helloTimeoutMs ?? 10_000);

    const fail = (code: grpc.status, message: string) => {
      this.options.log.warn({ worker: session?.id, code, message }, "closing worker stream");
      endWithStatus(call, code, message);
    };

    const end = (reason: string) => {
      if (ended) return;
      ended = true;
      clearTimeout(helloTimer);
      this.streams.delete(call);
      if (session) {
        this.options.registry.streamEnded(session);
        this.track(this.lost(session, reason));
      }
    };

    call.on("data", (message: WorkerMessage | MalformedMessage) => {
      if (ended) return;
      if (message instanceof MalformedMessage) return fail(grpc.status.INVALID_ARGUMENT, `malformed message: ${message.reason}`);
      const payload = message.payload;
      if (!session) {
        if (payload.case !== "hello") return fail(grpc.status.FAILED_PRECONDITION, "the first message must be Hello");
        // Without a join token, only a Hello that presents a credential is looked at further;
        // nothing is sent to the stream and nothing is written for it.
        if (!admission && !payload.value.resumeToken) {
          this.options.log.warn({ peer: call.getPeer() }, "refused a worker stream without a join token or credential");
          return fail(grpc.status.UNAUTHENTICATED, "a worker token is required (authorization: Bearer <TQ_WORKER_TOKEN>)");
        }
        const problem = helloProblem(payload.value);
        if (problem) return fail(grpc.status.INVALID_ARGUMENT, problem);
        let agreement: Agreement;
        try {
          agreement = agreeWithWorker(payload.value, this.options.protocols);
        } catch (error) {
          if (!(error instanceof ProtocolMismatch)) throw error;
          return fail(grpc.status.FAILED_PRECONDITION, error.message);
        }
        clearTimeout(helloTimer);
        const skewMs = this.clockSkew(payload.value);
        // Claimed synchronously so that messages arriving during registration are kept.
        session = this.connection(call, payload.value, agreement);
        this.calls.set(session, call);
        void this.register(session, payload.value, admission, skewMs, agreement).then(
          (outcome) => {
            if (outcome === "taken")
              fail(grpc.status.PERMISSION_DENIED, "this worker id belongs to another worker; start with a new id");
            else if (outcome === "revoked") refuseRevoked(call);
            else if (outcome === "unauthenticated")
              fail(grpc.status.UNAUTHENTICATED, "a worker token is required (authorization: Bearer <TQ_WORKER_TOKEN>)");
          },
          (error) => {
            this.options.log.warn({ err: error, worker: payload.value.workerId }, "registering a worker failed");
            fail(grpc.status.UNAVAILABLE, "could not register the worker; retry");
          },
        );
        return;
      }
      // Back from a silence that kept work away from it: look for work for it.
      if (this.options.registry.heard(session)) this.options.dispatcher.wake();
      // A batch's messages are handled one by one, in order, as if each had come alone.
      for (const inner of unbatch(message)) {
        if (ended) return;
        if (inner.payload.case === "batch") return fail(grpc.status.INVALID_ARGUMENT, "a batch must not hold a batch");
        report(session, inner.payload);
      }
    });
    const report = (session: WorkerConnection, payload: WorkerMessage["payload"]) => {
      switch (payload.case) {
        case "heartbeat": {
          const registry = this.options.registry;
          const wasFull = session.full;
          registry.heartbeat(session, payload.value.running, payload.value.full, payload.value.seq);
          // No longer full: its free slots count again.
          if (wasFull && !payload.value.full) this.options.dispatcher.wake();
          if (payload.value.draining && registry.drain(session)) {
            void setWorkerDraining(this.options.sql, session.id, this.options.coordinatorId).catch(() => {});
          }
          return;
        }
        case "started":
          return this.options.completer.started(session, payload.value);
        case "finished": {
          // Recorded only after the output that came before it on the stream: an ended attempt's
          // log is complete, and its stored chunks are not refused by the fence of its end.
          const ref = payload.value.ref;
          const written = ref ? this.options.logs?.whenWritten(ref.taskId, ref.attempt) : null;
          if (!written) return this.options.completer.finished(session, payload.value);
          void written.then(() => this.options.completer.finished(session, payload.value));
          return;
        }
        case "output":
          return this.options.logs?.add(session.id, payload.value);
        case "hello":
          return fail(grpc.status.FAILED_PRECONDITION, "Hello was already received on this stream");
        default:
          return;
      }
    };
    call.on("end", () => {
      end("stream ended");
      call.end();
    });
    call.on("error", (error) => end(`stream error: ${error.message}`));
    call.on("close", () => end("stream closed"));
    call.on("cancelled", () => end("stream cancelled"));
  };

  /**
   * Declares a silent worker dead for dispatch: ends its stream, and leaves its attempts to its
   * watchdog's report or their leases (silence proves nothing: the worker may be cut off and
   * still running them, and it fences them itself before their leases run out). Any
   * coordinator's rescuer requeues them once their leases have lapsed; a reconnect in time
   * renews them.
   */
  readonly onSilent = (worker: WorkerConnection): void => {
    this.options.log.warn(
      { event: "sessions.worker_silent", worker: worker.id },
      "worker missed its heartbeats; declaring it dead (its tasks keep their leases)",
    );
    worker.close("heartbeat timeout");
  };

  /** Ends the stream of a worker whose credential was revoked; it kills its tasks, and its watchdog reports them. */
  readonly onRevoked = (worker: WorkerConnection): void => {
    const call = this.calls.get(worker);
    this.options.log.warn(
      { event: "sessions.worker_revoked", worker: worker.id },
      "worker credential revoked; closing its stream",
    );
    if (call) refuseRevoked(call);
    else worker.close("worker credential revoked");
  };

  /** Ends every stream (shutdown); workers reconnect to another coordinator or to us later. */
  async stop(): Promise<void> {
    this.closed = true;
    for (const worker of this.options.registry.all()) worker.close("coordinator shutting down");
    for (const call of this.streams) {
      this.batchers.get(call)?.flush();
      call.end();
    }
    await Promise.all(this.ending);
  }

  private connection(call: WorkerStream, hello: Hello, agreement: Agreement): WorkerConnection {
    const log = this.options.log;
    const join = {
      id: hello.workerId,
      name: hello.name || hello.workerId,
      slots: hello.slots,
      held: hello.inFlight,
      features: agreement.features,
      routing: workerRouting(hello.queues, hello.labels),
      seq: hello.leaseSeq,
    };
    const writable = () => !call.destroyed && !call.writableEnded;
    // A worker that reads batches gets what one turn wrote to it as one message (src/rpc/batch.ts).
    const batcher = agreement.features.has("batch")
      ? new StreamBatcher(
          CoordinatorMessageSchema,
          (encoded) => {
            if (writable()) call.write(encoded);
          },
          BATCH_MAX_BYTES,
          // Our messages to a worker come from one synchronous loop each (a dispatch pass, the
          // Acks of a commit): no need to wait for the turn's end before an Assign leaves.
          "microtask",
        )
      : null;
    if (batcher) this.batchers.set(call, batcher);
    return this.options.registry.open(join, {
      write(message) {
        if (!writable()) return;
        if (batcher) batcher.push(message);
        else call.write(message);
      },
      close(reason) {
        log.info({ worker: join.id, reason }, "ending worker stream");
        batcher?.flush();
        endWithStatus(call, grpc.status.UNAVAILABLE, reason);
      },
    });
  }

  /**
   * The worker's wall clock in its Hello minus ours as we read it (positive: it runs ahead),
   * logged past the warning threshold; null when it did not say. The Hello's time in transit
   * counts against the worker, by a few milliseconds.
   */
  private clockSkew(hello: Hello): number | null {
    if (!hello.wallClock) return null;
    const measured = Math.round(timestampMs(hello.wallClock) - (this.options.now ?? Date.now)());
    if (!Number.isFinite(measured)) return null;
    // The column is an integer: a clock off by more than 24 days is shown as that much.
    const skewMs = Math.max(-(2 ** 31 - 1), Math.min(2 ** 31 - 1, measured));
    const warnMs = this.options.clockSkewWarnMs ?? CLOCK_SKEW_WARN_MS;
    if (Math.abs(skewMs) > warnMs) {
      this.options.log.warn(
        { event: "coordinator.worker_clock_skew", worker: hello.workerId, skewMs, warnMs },
        "the worker's clock is off the coordinator's; the times it reports are skewed by as much",
      );
    }
    return skewMs;
  }

  /** The join token a new stream carries, if one is required; null when it carries none accepted. */
  private admit(call: WorkerStream): Admission {
    const tokens = this.options.joinTokens ?? [];
    if (tokens.length === 0) return { joinedWith: null };
    const value = call.metadata.get("authorization")[0];
    const joinedWith = matchJoinToken(tokens, bearerToken(typeof value === "string" ? value : undefined));
    return joinedWith === null ? null : { joinedWith };
  }

  /**
   * Registers a worker, unless its id is taken by another worker ("taken"), its credential
   * was revoked ("revoked"), or it came without a join token and without a valid credential
   * ("unauthenticated"); nothing is changed then.
   */
  private async register(
    connection: WorkerConnection,
    hello: Hello,
    admission: Admission,
    clockSkewMs: number | null,
    agreement: Agreement,
  ): Promise<"registered" | "taken" | "revoked" | "unauthenticated"> {
    const { sql, registry, coordinatorId } = this.options;
    // The credential stays the same across reconnects, so that a Welcome lost on the way does
    // not lock the worker out of its own id.
    let resumeToken = hello.resumeToken;
    if (resumeToken) {
      const check = await useCredential(sql, connection.id, hashToken(resumeToken));
      if (check === "revoked") return "revoked";
      // A joined worker whose id has no credential row yet (the database was reset, say) is
      // left to upsertWorker's check of the resume hash, as before credentials.
      if (check === "wrong") return admission ? "taken" : "unauthenticated";
      if (check === "unknown") {
        if (!admission) return "unauthenticated";
        if (!(await insertCredential(sql, { workerId: connection.id, secretHash: hashToken(resumeToken), ...admission })))
          return "taken";
      }
    } else {
      if (!admission) return "unauthenticated";
      resumeToken = newWorkerCredential();
      if (!(await insertCredential(sql, { workerId: connection.id, secretHash: hashToken(resumeToken), ...admission })))
        return "taken";
    }
    const registered = await upsertWorker(sql, {
      id: connection.id,
      name: connection.name,
      coordinatorId,
      slots: connection.slots,
      labels: hello.labels,
      queues: hello.queues.length === 0 ? null : hello.queues,
      version: hello.version,
      presentedHash: hello.resumeToken ? hashToken(hello.resumeToken) : null,
      resumeHash: hashToken(resumeToken),
      clockSkewMs,
    });
    if (!registered) return "taken";
    // An older stream of the same worker is over: its end must not requeue what this one holds.
    const previous = registry.get(connection.id);
    if (previous) {
      registry.remove(previous);
      previous.close("replaced by a new stream from the same worker");
    }
    // Of what the worker says it holds, the attempts that still hold their task keep running
    // under a renewed lease; the rest (superseded while it was frozen or cut off, or cancelled
    // meanwhile) it is told to stop. What the database says it holds but the worker does not
    // know of (its assignment never reached it: the coordinator that sent it stopped or
    // crashed first) goes back to the queue, interrupted: it never ran, and it does not count.
    const held = hello.inFlight.map((ref) => attemptRefFromProto(ref, connection.id));
    const renewed = await renewLeases(sql, held, this.options.leaseMs);
    const requeued = await requeueWorkerTasks(sql, connection.id, "not held by the worker after reconnecting", "interrupted", [
      ...connection.inFlight.keys(),
    ]);
    if (requeued.length > 0) this.options.log.warn({ worker: connection.id, tasks: requeued.length }, "requeued tasks");
    // Only now may the dispatcher see it: work assigned before the reconciliation above would
    // have been requeued by it while the worker ran it.
    if (connection.ended) return "registered";
    registry.add(connection);
    connection.send(
      welcomeMessage(
        {
          workerId: connection.id,
          coordinatorId,
          heartbeatIntervalMs: this.options.heartbeatIntervalMs,
          heartbeatTimeoutMs: this.options.heartbeatTimeoutMs,
          resumeToken,
          maxMessageBytes: this.options.maxMessageBytes ?? GRPC_DEFAULT_MAX_MESSAGE_BYTES,
          logMaxBytes: BigInt(this.options.logMaxBytes ?? 8 * 1024 * 1024),
        },
        agreement,
      ),
    );
    const confirmed: { ref: (typeof hello.inFlight)[number]; leaseMs: number }[] = [];
    for (const ref of hello.inFlight) {
      const leaseMs = renewed.get(attemptKey(ref.taskId, ref.attempt));
      if (leaseMs === undefined) connection.send(cancelMessage(ref, "the attempt no longer holds its task"));
      else confirmed.push({ ref, leaseMs });
    }
    // The renewals above, counted by the worker from when it sent its Hello.
    if (hello.leaseSeq !== 0n && connection.features.has("lease_confirm"))
      connection.send(leaseMessage(hello.leaseSeq, confirmed));
    this.options.log.info(
      {
        event: "coordinator.worker_joined",
        worker: connection.id,
        name: connection.name,
        slots: connection.slots,
        protocol: agreement.protocolVersion,
        features: [...agreement.features],
      },
      "worker joined",
    );
    this.options.dispatcher.wake();
    return "registered";
  }

  /**
   * A stream ended. Not proof of death: the worker may be alive behind a reset connection,
   * running its tasks, and will reconnect and say in Hello what it holds. So it only leaves
   * dispatch and is marked gone; its attempts are requeued at once only on confirmed death
   * (its watchdog's ReportWorkerLost), else when their leases lapse, which any coordinator's
   * rescuer requeues (a gone worker's at once when they lapse).
   */
  private async lost(connection: WorkerConnection, reason: string): Promise<void> {
    // Not registered (it ended during registration, or a newer stream replaced it): what it
    // held is reconciled by that stream's Hello, or lapses with its leases.
    if (!this.options.registry.remove(connection)) return;
    // Shutting down: the workers keep running their tasks and reconnect (to another
    // coordinator, or to our successor), saying in Hello what they hold.
    if (this.closed) return;
    const { sql, coordinatorId, log } = this.options;
    log.info(
      { event: "coordinator.worker_unconfirmed", worker: connection.id, reason, held: connection.inFlight.size },
      "worker stream ended: no new work for it; its tasks wait for its watchdog's report or their leases",
    );
    for (let attempt = 0; ; attempt++) {
      try {
        // Already registered through another coordinator (a reconnect that outran our
        // noticing the old stream end): nothing to mark.
        await markWorkerGone(sql, connection.id, coordinatorId);
        return;
      } catch (error) {
        if (attempt >= 2 || this.closed) {
          log.warn({ err: error, worker: connection.id }, "marking a worker gone failed");
          return;
        }
        await Bun.sleep(200 * (attempt + 1));
      }
    }
  }

  private track(promise: Promise<void>): void {
    this.ending.add(promise);
    void promise.finally(() => this.ending.delete(promise));
  }
}

/** Ends a worker stream with a status (grpc-js sends the status of an emitted error). */
function endWithStatus(call: WorkerStream, code: grpc.status, details: string, metadata?: grpc.Metadata): void {
  if (call.destroyed || call.writableEnded) return;
  call.emit("error", Object.assign(new Error(details), { code, details, ...(metadata ? { metadata } : {}) }));
}

/** Refuses a worker whose credential is revoked, saying so in a trailer so that it stops. */
function refuseRevoked(call: WorkerStream): void {
  const metadata = new grpc.Metadata();
  metadata.set(REFUSAL_KEY, REFUSAL_REVOKED);
  endWithStatus(call, grpc.status.UNAUTHENTICATED, "this worker's credential was revoked", metadata);
}

function helloProblem(hello: Hello): string | null {
  if (!hello.workerId || hello.workerId.length > MAX_ID) return `worker_id must be 1 to ${MAX_ID} characters`;
  if (hello.name.length > MAX_ID) return `name must be at most ${MAX_ID} characters`;
  if (hello.slots < 1 || hello.slots > 1024) return "slots must be between 1 and 1024";
  if (hello.inFlight.length > 1024) return "in_flight lists more attempts than a worker can hold";
  return null;
}
