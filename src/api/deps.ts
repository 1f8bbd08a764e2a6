// What the HTTP API (and the gRPC TaskService, which shares src/api/service.ts) needs from
// the role that serves it.

import type { Principal, Scope } from "../auth/tokens";
import type { Config } from "../config";
import type { InsertOutcome } from "../db/insert";
import type { TaskChangeFeed } from "../db/notify";
import type { Sql } from "../db/sql";
import type { Logger } from "../log";
import type { TaskSpec } from "../task/task";

export interface ApiDeps {
  role: "scheduler" | "coordinator";
  config: Config;
  sql: Sql;
  /** Started by the role; live status (SSE, WatchTask) subscribes to it. */
  feed: TaskChangeFeed;
  log: Logger;
  /**
   * Who is asking, allowed `scope`: throws unauthenticated, permission_denied or rate_limited.
   * (src/auth/authenticator.ts; tests may pass one that lets everyone in.)
   */
  auth: { check(authorization: string | null | undefined, scope: Scope): Promise<Principal> };
  /**
   * Persists a new task and resolves after commit. The scheduler inserts it queued; the
   * coordinator may hand a run-now task to one of its own workers in the same statement.
   * A spec whose idempotency key was used before writes nothing and returns the earlier task.
   */
  submit(id: string, spec: TaskSpec, actor: string): Promise<InsertOutcome>;
}
