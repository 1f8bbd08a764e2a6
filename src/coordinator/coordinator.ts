// The coordinator role assembled: HTTP API, gRPC (WorkerService + TaskService), the submitter
// with this role's run-now fast path, the dispatch loop, the completer and the rescuer, on one
// database connection pool and one LISTEN connection. main.ts and start.ts only build one and
// call start()/stop().
import { hostname } from "node:os";
import * as grpc from "@grpc/grpc-js";
import { createApp } from "../api";
import type { ApiDeps } from "../api/deps";
import { SERVER_MAX_REQUEST_BODY_SIZE } from "../api/errors";
import { checkReady } from "../api/service";
import { Authenticator } from "../auth/authenticator";
import { checkExposure } from "../auth/exposure";
import {
  apiSettings,
  authOptions,
  type Config,
  databaseOptions,
  leaseTimings,
  retentionSettings,
  scheduleFiring,
  taskDefaults,
  tracingEndpoint,
  workerJoinTokens,
} from "../config";
import { type TaskChange, TaskChangeFeed } from "../db/notify";
import { connect, type Sql } from "../db/sql";
import { type RunNowPlacement, Submitter } from "../db/submitter";
import { ScheduleService } from "../gen/taskqueue/v1/schedule_service_pb";
import { TaskService } from "../gen/taskqueue/v1/task_service_pb";
import { WorkerService } from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import { addDatabaseGauges } from "../metrics/database-gauges";
import { TaskMetrics } from "../metrics/metrics";
import { addRegistryGauges } from "../metrics/registry-gauges";
import { guardMalformed, serverDefinition } from "../rpc/definitions";
import { Health, HealthService } from "../rpc/health";
import { grpcMessageLimits } from "../rpc/message-size";
import { cancelMessage } from "../rpc/messages";
import { addReflection } from "../rpc/reflection";
import { ScheduleFirer } from "../schedule/firer";
import { attemptKey } from "../task/attempt";
import { DEFAULT_QUEUE, isPlainRouting, servesQueue } from "../task/routing";
import type { TaskSpec } from "../task/task";
import { grpcServerCredentials, httpScheme, httpTls } from "../tls";
import { type Tracing, tracingFor } from "../trace/tracing";
import { Completer } from "./completer";
import { Dispatcher } from "./dispatcher";
import { LogWriter } from "./log-writer";
import { Pruner } from "./pruner";
import { WorkerRegistry } from "./registry";
import { Rescuer } from "./rescuer";
import { scheduleServiceHandlers } from "./schedule-service";
import { taskServiceHandlers } from "./task-service";
import { reportWorkerLostHandler } from "./worker-lost";
import { WorkerSessions } from "./worker-sessions";

export interface CoordinatorInfo {
  id: string;
  httpUrl: string;
  grpcAddress: string;
}

export class Coordinator {
  readonly id: string;
  readonly registry: WorkerRegistry;
  private readonly sql: Sql;
  /** Lagging reads (lists) on DATABASE_READ_URL, a replica, when set (README, "Production"). */
  private readonly readSql: Sql | null;
  private readonly feed: TaskChangeFeed;
  private readonly submitter: Submitter;
  private readonly dispatcher: Dispatcher;
  private readonly completer: Completer;
  private readonly logs: LogWriter;
  private readonly rescuer: Rescuer;
  /** Deletes final tasks past TQ_RETENTION; null when retention is off. */
  private readonly pruner: Pruner | null;
  private readonly sessions: WorkerSessions;
  private readonly grpcServer: grpc.Server;
  private readonly health: HealthService;
  private readonly auth: Authenticator;
  private readonly app: ReturnType<typeof createApp>;
  /** This role's own registry (not the all-in-one process's other roles'): GET /metrics. */
  readonly metrics = new TaskMetrics("coordinator");
  /** Null unless OTEL_EXPORTER_OTLP_ENDPOINT is set. */
  private readonly tracing: Tracing | null;
  /** The recurring schedules' firing loop, unless TQ_SCHEDULES=false. */
  private readonly firer: ScheduleFirer | null;
  private unsubscribe: (() => void)[] = [];
  /** Of an attempt, renewed while its worker reports it. */
  private readonly leaseMs: number;
  private httpPort = 0;
  private grpcPort = 0;

  constructor(
    private readonly config: Config,
    databaseUrl: string,
    private readonly log: Logger,
  ) {
    this.id = config.TQ_COORDINATOR_ID ?? `${hostname()}:${config.TQ_GRPC_PORT}`;
    this.tracing = tracingFor(tracingEndpoint(config), "coordinator");
    // A worker silent for two intervals may be frozen: it gets no new work meanwhile.
    this.registry = new WorkerRegistry(2 * config.TQ_HEARTBEAT_INTERVAL_MS);
    const lease = leaseTimings(config);
    this.leaseMs = lease.leaseMs;
    this.sql = connect(databaseUrl, { ...databaseOptions(config), applicationName: `task-queue coordinator ${this.id}` });
    this.readSql = config.DATABASE_READ_URL
      ? connect(config.DATABASE_READ_URL, {
          ...databaseOptions(config),
          applicationName: `task-queue coordinator ${this.id} reads`,
        })
      : null;
    this.feed = new TaskChangeFeed(this.sql);
    this.dispatcher = new Dispatcher({
      sql: this.sql,
      registry: this.registry,
      coordinatorId: this.id,
      log: log.child({ part: "dispatcher" }),
      safetyPollMs: config.TQ_SAFETY_POLL_MS,
      leaseMs: lease.leaseMs,
      aheadMs: config.TQ_DISPATCH_AHEAD_MS,
      metrics: this.metrics,
      tracing: this.tracing,
      agingMs: config.TQ_PRIORITY_AGING_MS,
    });
    this.submitter = new Submitter({
      sql: this.sql,
      placeRunNow: (id, spec) => this.placeRunNow(id, spec),
      agingMs: config.TQ_PRIORITY_AGING_MS,
    });
    this.completer = new Completer({
      sql: this.sql,
      registry: this.registry,
      log: log.child({ part: "completer" }),
      coordinatorId: this.id,
      onSlotFreed: (exited) => (exited ? this.dispatcher.slotFreed() : this.dispatcher.wake()),
      maxPending: config.TQ_COMPLETER_MAX_PENDING,
      metrics: this.metrics,
    });
    this.logs = new LogWriter({
      sql: this.sql,
      log: log.child({ part: "logs" }),
      maxBytes: config.TQ_LOG_MAX_BYTES,
      retentionMs: config.TQ_LOG_RETENTION_MS,
    });
    this.sessions = new WorkerSessions({
      sql: this.sql,
      registry: this.registry,
      dispatcher: this.dispatcher,
      completer: this.completer,
      coordinatorId: this.id,
      log: log.child({ part: "sessions" }),
      ...lease,
      joinTokens: workerJoinTokens(config),
      maxMessageBytes: config.TQ_GRPC_MAX_MESSAGE_BYTES,
      logs: this.logs,
      logMaxBytes: config.TQ_LOG_MAX_BYTES,
    });
    this.rescuer = new Rescuer({
      sql: this.sql,
      registry: this.registry,
      coordinatorId: this.id,
      log: log.child({ part: "rescuer" }),
      ...lease,
      onSilent: this.sessions.onSilent,
      onRevoked: this.sessions.onRevoked,
      metrics: this.metrics,
      requeued: () => this.dispatcher.wake(),
    });
    const retention = retentionSettings(config);
    this.pruner = retention
      ? new Pruner({ sql: this.sql, log: log.child({ part: "retention" }), metrics: this.metrics, ...retention })
      : null;
    addRegistryGauges(this.metrics, this.registry);
    addDatabaseGauges(this.metrics, this.sql);
    this.auth = new Authenticator(this.sql, authOptions(config), log.child({ part: "auth" }));
    const firing = scheduleFiring(config);
    this.firer = firing
      ? new ScheduleFirer({
          sql: this.sql,
          log: log.child({ part: "schedules" }),
          taskDefaults: taskDefaults(config),
          metrics: this.metrics,
          ...firing,
        })
      : null;
    const deps: ApiDeps = {
      role: "coordinator",
      auth: this.auth,
      settings: apiSettings(config),
      sql: this.sql,
      ...(this.readSql ? { readSql: this.readSql } : {}),
      feed: this.feed,
      log: log.child({ part: "api" }),
      submit: (id, spec, actor, traceparent) => this.submitter.submit(id, spec, actor, traceparent),
      metrics: this.metrics,
      tracing: this.tracing,
      wakeScheduleFirer: () => this.firer?.wake(),
    };
    this.app = createApp(deps);
    this.grpcServer = new grpc.Server({
      // Our keepalive pings close the connection of a peer gone without a word. Whether a
      // worker is alive is its heartbeats' to say (silent for the timeout: its stream is ended,
      // WorkerSessions.onSilent), so a ping every timeout is enough, not every interval: a ping
      // costs a timer and a frame per worker, on top of the worker's own pings and heartbeats.
      "grpc.keepalive_time_ms": config.TQ_HEARTBEAT_TIMEOUT_MS,
      "grpc.keepalive_timeout_ms": config.TQ_HEARTBEAT_TIMEOUT_MS,
      "grpc.keepalive_permit_without_calls": 1,
      // Workers ping every heartbeat interval; allow it (the default would answer GOAWAY).
      "grpc.http2.min_ping_interval_without_data_ms": Math.min(1000, config.TQ_HEARTBEAT_INTERVAL_MS),
      // Explicit, and told to workers in Welcome: they cut their results to fit it.
      ...grpcMessageLimits(config.TQ_GRPC_MAX_MESSAGE_BYTES),
    });
    this.grpcServer.addService(
      serverDefinition(WorkerService),
      guardMalformed(WorkerService, {
        connect: this.sessions.connect,
        reportWorkerLost: reportWorkerLostHandler({
          sql: this.sql,
          registry: this.registry,
          log: log.child({ part: "sessions" }),
          metrics: this.metrics,
          requeued: () => this.dispatcher.wake(),
        }),
      }),
    );
    this.grpcServer.addService(serverDefinition(TaskService), guardMalformed(TaskService, taskServiceHandlers(deps)));
    this.grpcServer.addService(serverDefinition(ScheduleService), guardMalformed(ScheduleService, scheduleServiceHandlers(deps)));
    // Health and reflection need no token: they tell only what /readyz and the .proto files do.
    const served = [WorkerService, TaskService, ScheduleService];
    this.health = new HealthService({
      services: served.map((service) => service.typeName),
      probe: () => checkReady(deps),
      log: log.child({ part: "health" }),
    });
    this.health.addToServer(this.grpcServer);
    addReflection(this.grpcServer, [...served, Health]);
  }

  async start(): Promise<CoordinatorInfo> {
    const { config } = this;
    await this.auth.start();
    checkExposure(config, "coordinator", this.auth.tokenCount, this.log);
    await this.feed.start();
    this.unsubscribe.push(
      this.feed.onChange((change) => this.onTaskChange(change)),
      this.feed.onResync(() => this.dispatcher.wake(true)),
    );
    this.grpcPort = await new Promise<number>((resolve, reject) =>
      this.grpcServer.bindAsync(`${config.TQ_HOST}:${config.TQ_GRPC_PORT}`, grpcServerCredentials(config), (error, port) =>
        error
          ? reject(new Error(`gRPC cannot listen on ${config.TQ_HOST}:${config.TQ_GRPC_PORT}: ${error.message}`))
          : resolve(port),
      ),
    );
    this.app.listen({
      hostname: config.TQ_HOST,
      port: config.TQ_COORDINATOR_PORT,
      maxRequestBodySize: SERVER_MAX_REQUEST_BODY_SIZE,
      tls: httpTls(config),
    });
    this.httpPort = this.app.server?.port ?? config.TQ_COORDINATOR_PORT;
    this.dispatcher.start();
    this.rescuer.start();
    this.logs.start();
    this.pruner?.start();
    this.firer?.start();
    const info = this.info();
    this.log.info({ event: "coordinator.started", ...info }, "coordinator started");
    return info;
  }

  info(): CoordinatorInfo {
    return {
      id: this.id,
      httpUrl: `${httpScheme(this.config)}://${this.config.TQ_HOST}:${this.httpPort}`,
      grpcAddress: `${this.config.TQ_HOST}:${this.grpcPort}`,
    };
  }

  /** Stops taking work and connections; workers keep their tasks and reconnect elsewhere. */
  async stop(): Promise<void> {
    // First, so that load balancers watching gRPC health send nothing new meanwhile.
    this.health.stop();
    for (const unsubscribe of this.unsubscribe) unsubscribe();
    this.unsubscribe = [];
    await this.firer?.stop();
    await this.rescuer.stop();
    await this.pruner?.stop();
    await this.dispatcher.stop();
    await this.app.stop();
    await this.sessions.stop();
    // Streams were ended above; a client that does not hang up is cut off after a moment.
    const forced = setTimeout(() => this.grpcServer.forceShutdown(), 2000);
    await new Promise<void>((resolve) => this.grpcServer.tryShutdown(() => resolve()));
    clearTimeout(forced);
    await this.submitter.drained();
    // Before the completer: results wait for their output, and go to the completer once it is written.
    await this.logs.stop();
    await this.completer.stop();
    await this.feed.stop();
    this.auth.stop();
    await this.readSql?.end({ timeout: 5 });
    await this.sql.end({ timeout: 5 });
    await this.tracing?.stop();
    this.log.info({ event: "coordinator.stopped", id: this.id }, "coordinator stopped");
  }

  /**
   * The run-now fast path: when one of our workers has a free slot, the task is written already
   * dispatched to it and pushed at once, saving the claim round trip; otherwise it is queued.
   */
  private placeRunNow(id: string, spec: TaskSpec): RunNowPlacement | null {
    if (!this.dispatcher.active) return null;
    // Routing and priorities are the claim's to decide: only a plain task takes the fast path.
    if (spec.routing !== undefined && !isPlainRouting(spec.routing)) return null;
    const worker = this.registry.reserveFreeSlot(id, 1);
    if (!worker) return null;
    if (!servesQueue(worker.routing, spec.routing?.queue ?? DEFAULT_QUEUE)) {
      this.registry.release(worker, id, 1);
      return null;
    }
    // Before the insert that grants the lease: what the Assign says is left of it is never more.
    const grantedAt = performance.now();
    return {
      assignTo: { workerId: worker.id, coordinatorId: this.id, leaseMs: this.leaseMs },
      // The worker may have left while we were inserting (its lost-worker requeue ran before
      // our commit and did not see this task): then assign() gives the attempt back.
      assigned: (task) => this.dispatcher.assign(worker.id, task, grantedAt),
      release: () => void this.registry.release(worker, id, 1),
    };
  }

  private onTaskChange(change: TaskChange): void {
    this.dispatcher.onTaskChange(change);
    // A cancel made through any replica: if the attempt runs on one of our workers, stop it.
    // (If this notification is missed, the rescuer's lease renewal finds the attempt.)
    if (change.state === "cancelled" && change.worker_id) {
      const worker = this.registry.get(change.worker_id);
      if (worker?.inFlight.has(attemptKey(change.id, change.attempt))) {
        worker.send(cancelMessage({ taskId: change.id, attempt: change.attempt }, "cancelled"));
      }
    }
  }
}
