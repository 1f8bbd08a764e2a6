// The scheduler role: the HTTP API alone. It persists tasks queued (NOTIFY wakes the
// coordinators) and answers status; it holds no workers, so any number of replicas can run.

import { createApp } from "../api";
import { SERVER_MAX_REQUEST_BODY_SIZE } from "../api/errors";
import { Authenticator } from "../auth/authenticator";
import { checkExposure } from "../auth/exposure";
import { apiSettings, authOptions, type Config, databaseOptions } from "../config";
import { TaskChangeFeed } from "../db/notify";
import { connect, type Sql } from "../db/sql";
import { Submitter } from "../db/submitter";
import type { Logger } from "../log";
import { httpScheme, httpTls } from "../tls";

export class Scheduler {
  private readonly sql: Sql;
  private readonly feed: TaskChangeFeed;
  private readonly app: ReturnType<typeof createApp>;
  private readonly auth: Authenticator;
  /** Writes every task queued: the scheduler has no workers to hand one to. */
  private readonly submitter: Submitter;

  constructor(
    private readonly config: Config,
    databaseUrl: string,
    private readonly log: Logger,
  ) {
    this.sql = connect(databaseUrl, { ...databaseOptions(config), applicationName: "task-queue scheduler" });
    this.feed = new TaskChangeFeed(this.sql);
    this.auth = new Authenticator(this.sql, authOptions(config), log.child({ part: "auth" }));
    this.submitter = new Submitter({ sql: this.sql, agingMs: config.TQ_PRIORITY_AGING_MS });
    this.app = createApp({
      role: "scheduler",
      auth: this.auth,
      settings: apiSettings(config),
      sql: this.sql,
      feed: this.feed,
      log: log.child({ part: "api" }),
      submit: (id, spec, actor) => this.submitter.submit(id, spec, actor),
    });
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
    const url = `${httpScheme(this.config)}://${this.config.TQ_HOST}:${this.app.server?.port ?? this.config.TQ_SCHEDULER_PORT}`;
    this.log.info({ event: "scheduler.started", url }, "scheduler started");
    return url;
  }

  async stop(): Promise<void> {
    await this.app.stop();
    await this.submitter.drained();
    await this.feed.stop();
    this.auth.stop();
    await this.sql.end({ timeout: 5 });
    this.log.info({ event: "scheduler.stopped" }, "scheduler stopped");
  }
}
