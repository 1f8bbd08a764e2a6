// Typed errors with a stable code, mapped once per transport (src/api/errors.ts for HTTP,
// src/rpc/status.ts for gRPC). Their messages are written for clients; anything else that
// is thrown is reported as an opaque internal error.

export type ErrorCode =
  | "invalid_argument"
  | "unauthenticated"
  | "permission_denied"
  | "not_found"
  // Live logs (GET /tasks/:id/logs, TailLogs): the contract between helpers names these two.
  | "task_not_found"
  | "attempt_not_found"
  | "conflict"
  | "not_final"
  | "payload_too_large"
  | "rate_limited"
  | "unavailable";

export class TaskQueueError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    /** The request field the error is about, when there is one. */
    readonly field?: string,
    /** For rate_limited and unavailable: when to try again (Retry-After). */
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
    this.name = "TaskQueueError";
  }
}

export const invalidArgument = (field: string, message: string) => new TaskQueueError("invalid_argument", message, field);

export const notFound = (message: string) => new TaskQueueError("not_found", message);

export const conflict = (message: string) => new TaskQueueError("conflict", message);

/** A retry of a task that has not finished (a conflict with its state, with its own code). */
export const notFinal = (message: string) => new TaskQueueError("not_final", message);

export const unauthenticated = (message: string) => new TaskQueueError("unauthenticated", message);

export const permissionDenied = (message: string) => new TaskQueueError("permission_denied", message);

export const rateLimited = (retryAfterSeconds: number) =>
  new TaskQueueError(
    "rate_limited",
    `too many requests for this token; retry in ${retryAfterSeconds} s`,
    undefined,
    retryAfterSeconds,
  );

/** Seconds a client is told to wait (Retry-After) before trying again after a 503. */
export const UNAVAILABLE_RETRY_AFTER_SECONDS = 1;

export const unavailable = (message = "the database is unavailable; try again shortly") =>
  new TaskQueueError("unavailable", message, undefined, UNAVAILABLE_RETRY_AFTER_SECONDS);

/**
 * PostgreSQL: query_canceled (a statement_timeout, or a cancel), lock_not_available (a
 * lock_timeout). The statement and its transaction were rolled back: nothing was written.
 */
const TIMEOUT_ERROR_CODES = new Set(["57014", "55P03"]);

const CONNECTION_ERROR_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "ENOTFOUND",
  "EAI_AGAIN",
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
  "CONNECT_TIMEOUT",
  "CONNECTION_CONNECT_TIMEOUT",
  // The client's own deadline passed (ConnectOptions.queryTimeoutMs): the query may or may not
  // have run, as with a reset link.
  "QUERY_TIMEOUT",
  // read_only_sql_transaction: the server is a standby now (demoted in a failover); the
  // connection is dropped and the next one finds the primary.
  "25006",
  // PostgreSQL: admin shutdown, crash shutdown, cannot connect now, too many connections.
  "57P01",
  "57P02",
  "57P03",
  "53300",
  "08000",
  "08003",
  "08006",
  "08001",
  "08004",
]);

function errorCode(error: unknown): string | undefined {
  if (typeof error !== "object" || error === null) return undefined;
  const code = (error as { code?: unknown }).code;
  return typeof code === "string" ? code : undefined;
}

/** True when a statement gave up waiting for the database: its statement or lock timeout. */
export function isDatabaseTimeout(error: unknown): boolean {
  const code = errorCode(error);
  return code !== undefined && TIMEOUT_ERROR_CODES.has(code);
}

/**
 * True when an error means the database cannot serve us now: it cannot be reached, or a
 * statement timed out (answered as 503 / UNAVAILABLE, with Retry-After). Neither is any one
 * request's or item's fault, so a batch that meets one fails whole rather than item by item.
 */
export function isDatabaseUnavailable(error: unknown): boolean {
  const code = errorCode(error);
  return code !== undefined && (CONNECTION_ERROR_CODES.has(code) || TIMEOUT_ERROR_CODES.has(code));
}

/**
 * SQLSTATE classes of errors that say nothing about the values written: the database is away
 * or busy (08 connection, 40 serialization or deadlock, 53 resources, 57 operator intervention,
 * such as a statement timeout, 58 system). Writing the same values later may well succeed.
 */
const TRANSIENT_SQLSTATE_CLASSES = new Set(["08", "40", "53", "57", "58"]);

/**
 * True when a write failed for a reason that is not the values it carried (isDatabaseUnavailable,
 * a timeout, a deadlock, a lock not granted): the batch is retried whole later, rather than
 * written item by item to find the one the database refuses.
 */
export function isTransientDatabaseError(error: unknown): boolean {
  if (isDatabaseUnavailable(error)) return true;
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code !== "string" || !/^[0-9A-Z]{5}$/.test(code)) return false;
  return TRANSIENT_SQLSTATE_CLASSES.has(code.slice(0, 2)) || code === "55P03";
}
