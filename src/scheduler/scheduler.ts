// The scheduler role: the HTTP API and the recurring schedules' firing loop. It persists tasks
// queued (NOTIFY wakes the coordinators) and answers status; it holds no workers, and replicas
// share the due schedules (src/schedule/firer.ts), so any number of them can run.

import { createApp } from "../api";
import { SERVER_MAX_REQUEST_BODY_SIZE } from "../api/errors";
import { Authenticator } from "../auth/authenticator";
import { checkExposure } from "../auth/exposure";
import { apiSettings, authOptions, type Config, databaseOptions, scheduleFiring, taskDefaults, tracingEndpoint } from "../config";
import { TaskChangeFeed } from "../db/notify";
import { connect, type Sql } from "../db/sql";
import { Submitter } from "../db/submitter";
import type { Logger } from "../log";
import { addDatabaseGauges } from "../metrics/database-gauges";
import { TaskMetrics } from "../metrics/metrics";
import { ScheduleFirer } from "../schedule/firer";
import { httpScheme, httpTls } from "../tls";
import { type Tracing, tracingFor } from "../trace/tracing";

export class Scheduler {
  private readonly sql: Sql;
  /** Lagging reads (lists) on DATABASE_READ_URL, a replica, when set (README, "Production"). */
  private readonly readSql: Sql | null;
  private readonly feed: TaskChangeFeed;
  private readonly app: ReturnType<typeof createApp>;
  private readonly auth: Authenticator;
  /** Writes every task queued: the scheduler has no workers to hand one to. */
  private readonly submitter: Submitter;
  /** This role's own registry: GET /metrics. */
  readonly metrics = new TaskMetrics("scheduler");
  /** Null unless OTEL_EXPORTER_OTLP_ENDPOINT is set. */
  private readonly tracing: Tracing | null;
  /** The recurring schedules' firing loop, unless TQ_SCHEDULES=false. */
  private readonly firer: ScheduleFirer | null;

  constructor(
    private readonly config: Config,
    databaseUrl: string,
    private readonly log: Logger,
  ) {
    this.tracing = tracingFor(tracingEndpoint(config), "scheduler");
    this.sql = connect(databaseUrl, { ...databaseOptions(config), applicationName: "task-queue scheduler" });
    this.readSql = config.DATABASE_READ_URL
      ? connect(config.DATABASE_READ_URL, { ...databaseOptions(config), applicationName: "task-queue scheduler reads" })
      : null;
    this.feed = new TaskChangeFeed(this.sql);
    this.auth = new Authenticator(this.sql, authOptions(config), log.child({ part: "auth" }));
    this.submitter = new Submitter({ sql: this.sql, agingMs: config.TQ_PRIORITY_AGING_MS });
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
    this.app = createApp({
      role: "scheduler",
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
    });
    addDatabaseGauges(this.metrics, this.sql);
  }

  /** Returns the URL it serves. */
  async start(): Promise<string> {
    await this.auth.start();
    checkExposure(this.config, "scheduler", this.auth.tokenCount, this.log);
    await this.feed.start();
    this.app.listen({
      hostname: this.config.TQ_HOST,
      port: this.config.TQ_SCHEDULER_PORT,
      maxRequestBodySize: SERVER_MAX_REQUEST_BODY_SIZE,
      tls: httpTls(this.config),
    });
    this.firer?.start();
    const url = `${httpScheme(this.config)}://${this.config.TQ_HOST}:${this.app.server?.port ?? this.config.TQ_SCHEDULER_PORT}`;
    this.log.info({ event: "scheduler.started", url }, "scheduler started");
    return url;
  }

  async stop(): Promise<void> {
    await this.firer?.stop();
    await this.app.stop();
    await this.submitter.drained();
    await this.feed.stop();
    this.auth.stop();
    await this.readSql?.end({ timeout: 5 });
    await this.sql.end({ timeout: 5 });
    await this.tracing?.stop();
    this.log.info({ event: "scheduler.stopped" }, "scheduler stopped");
  }
}
