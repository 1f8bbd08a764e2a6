// What the HTTP API (and the gRPC TaskService, which shares src/api/service.ts) needs from
// the role that serves it.

import type { Principal, Scope } from "../auth/tokens";
import type { InsertOutcome } from "../db/insert";
import type { TaskChangeFeed } from "../db/notify";
import type { Sql } from "../db/sql";
import type { Logger } from "../log";
import type { TaskMetrics } from "../metrics/metrics";
import type { TaskDefaults } from "../task/spec";
import type { TaskSpec } from "../task/task";
import type { Tracing } from "../trace/tracing";

/** The API's limits and defaults, from the configuration (apiSettings in src/config.ts). */
export interface ApiSettings {
  /** Largest request body, in bytes (413 beyond). */
  maxBodyBytes: number;
  /** Most tasks one POST /tasks/batch may hold (413 beyond). */
  maxBatchTasks: number;
  /** What a submitted task gets where it says nothing. */
  taskDefaults: TaskDefaults;
  /** GET /workers lists the workers heard from within this long: the heartbeat timeout. */
  workerTimeoutMs: number;
  /** TQ_PRIORITY_AGING_MS: the rank of the tasks a batch writes (single submits go through the Submitter). */
  priorityAgingMs?: number;
}

export interface ApiDeps {
  role: "scheduler" | "coordinator";
  settings: ApiSettings;
  sql: Sql;
  /**
   * For read queries that may lag the primary a little (task lists, workers, queues): a pool
   * on DATABASE_READ_URL, a streaming replica, when one is configured; else absent and `sql`
   * serves them. A task read by id, and everything written, stays on `sql` (read your writes).
   */
  readSql?: Sql;
  /** Started by the role; live status (SSE, WatchTask) subscribes to it. */
  feed: TaskChangeFeed;
  log: Logger;
  /**
   * Who is asking, allowed `scope`: throws unauthenticated, permission_denied or rate_limited.
   * (src/auth/authenticator.ts; tests may pass one that lets everyone in.)
   */
  auth: { check(authorization: string | null | undefined, scope: Scope): Promise<Principal> };
  /**
   * Persists a new task and resolves after commit: the role's Submitter (src/db/submitter.ts).
   * The scheduler inserts it queued; the coordinator may hand a run-now task to one of its own
   * workers in the same statement. A spec whose idempotency key was used before writes nothing
   * and returns the earlier task.
   */
  submit(id: string, spec: TaskSpec, actor: string, traceparent?: string | null): Promise<InsertOutcome>;
  /** The role's metrics (src/metrics): GET /metrics serves them, submits and cancels count there. */
  metrics?: TaskMetrics;
  /** The role's tracing (src/trace), null or absent when off: submits get a `persist` span. */
  tracing?: Tracing | null;
  /** Wakes this role's schedule firing loop after a schedule was created, changed or resumed (none: it polls). */
  wakeScheduleFirer?: () => void;
}
