// Errors to gRPC status, mapped once for every gRPC handler. Like the HTTP mapping, only
// our typed errors carry their message to the client; anything else is an opaque INTERNAL.
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "../log";
import { type ErrorCode, isDatabaseTimeout, isDatabaseUnavailable, TaskQueueError } from "../task/errors";

const CODES: Record<ErrorCode, grpc.status> = {
  invalid_argument: grpc.status.INVALID_ARGUMENT,
  unauthenticated: grpc.status.UNAUTHENTICATED,
  permission_denied: grpc.status.PERMISSION_DENIED,
  not_found: grpc.status.NOT_FOUND,
  task_not_found: grpc.status.NOT_FOUND,
  attempt_not_found: grpc.status.NOT_FOUND,
  conflict: grpc.status.FAILED_PRECONDITION,
  not_final: grpc.status.FAILED_PRECONDITION,
  payload_too_large: grpc.status.RESOURCE_EXHAUSTED,
  rate_limited: grpc.status.RESOURCE_EXHAUSTED,
  unavailable: grpc.status.UNAVAILABLE,
};

export function toServiceError(error: unknown, log: Logger): Partial<grpc.ServiceError> {
  if (error instanceof TaskQueueError) {
    const details = error.field ? `${error.field}: ${error.message}` : error.message;
    return { code: CODES[error.code], details, message: details };
  }
  // A statement or lock timeout (the database slow, a table locked) is UNAVAILABLE too:
  // nothing was written, and a retry may succeed.
  if (isDatabaseUnavailable(error)) {
    const details = isDatabaseTimeout(error)
      ? "the database did not answer in time; try again shortly"
      : "the database is unavailable; try again shortly";
    return { code: grpc.status.UNAVAILABLE, details, message: details };
  }
  const requestId = Bun.randomUUIDv7();
  log.error({ err: error, requestId }, "internal error in a gRPC handler");
  const details = `internal error (request ${requestId})`;
  return { code: grpc.status.INTERNAL, details, message: details };
}
