// The scheduler role: the HTTP API alone. It persists tasks queued (NOTIFY wakes the
// coordinators) and answers status; it holds no workers, so any number of replicas can run.
import type { Config } from "../config";
import { connect, type Sql } from "../db/sql";
import { TaskChangeFeed } from "../db/notify";
import { insertTask } from "../db/tasks";
import { createApp } from "../api";
import type { Logger } from "../log";

export class Scheduler {
  private readonly sql: Sql;
  private readonly feed: TaskChangeFeed;
  private readonly app: ReturnType<typeof createApp>;

  constructor(
    private readonly config: Config,
    databaseUrl: string,
    private readonly log: Logger,
  ) {
    this.sql = connect(databaseUrl, { max: config.TQ_DB_POOL_SIZE, applicationName: "task-queue scheduler" });
    this.feed = new TaskChangeFeed(this.sql);
    this.app = createApp({
      role: "scheduler",
      config,
      sql: this.sql,
      feed: this.feed,
      log: log.child({ part: "api" }),
      submit: (id, spec) => insertTask(this.sql, id, spec),
    });
  }

  /** Returns the URL it serves. */
  async start(): Promise<string> {
    await this.feed.start();
    this.app.listen({
      hostname: this.config.TQ_HOST,
      port: this.config.TQ_SCHEDULER_PORT,
      maxRequestBodySize: this.config.TQ_MAX_BODY_BYTES,
    });
    const url = `http://${this.config.TQ_HOST}:${this.app.server?.port ?? this.config.TQ_SCHEDULER_PORT}`;
    this.log.info({ url }, "scheduler started");
    return url;
  }

  async stop(): Promise<void> {
    await this.app.stop();
    await this.feed.stop();
    await this.sql.end({ timeout: 5 });
    this.log.info("scheduler stopped");
  }
}
