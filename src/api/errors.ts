// Every error the HTTP API answers, mapped in one place. Typed errors carry their status and a
// message written for clients; anything else is logged and answered as an opaque internal
// error with a request id, so internal text (SQL, stack, file paths) never reaches a client.
import { Elysia, NotFoundError, ParseError, ValidationError } from "elysia";
import { type ErrorCode, isDatabaseUnavailable, TaskQueueError, unavailable } from "../task/errors";
import { describeValueError } from "../task/spec";
import type { ApiDeps } from "./deps";
import type { ErrorJson, HttpErrorCode } from "./model";

/** An error only HTTP has: the body is not JSON, or no route matches. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: HttpErrorCode,
    message: string,
    readonly field?: string,
  ) {
    super(message);
    this.name = "HttpError";
  }
}

export const invalidJson = (message: string) => new HttpError(400, "invalid_json", message, "body");

export const payloadTooLarge = (limit: number) =>
  new TaskQueueError("payload_too_large", `request body is larger than ${limit} bytes`, "body");

const STATUS: Record<ErrorCode, number> = {
  invalid_argument: 400,
  unauthenticated: 401,
  permission_denied: 403,
  not_found: 404,
  conflict: 409,
  payload_too_large: 413,
  rate_limited: 429,
  unavailable: 503,
};

export interface ErrorAnswer {
  status: number;
  body: ErrorJson;
  headers?: Record<string, string>;
}

const answer = (status: number, code: HttpErrorCode, message: string, field?: string): ErrorAnswer => ({
  status,
  body: { error: field === undefined ? { code, message } : { code, message, field } },
});

/**
 * The status and body for an error. Unknown errors are logged here with the request id they
 * are answered with; `where` says what was being done (method and path).
 */
export function errorAnswer(error: unknown, deps: Pick<ApiDeps, "log">, where: string): ErrorAnswer {
  // A parser's own error (too large, not JSON) reaches us wrapped in Elysia's ParseError.
  if (error instanceof ParseError && (error.cause instanceof TaskQueueError || error.cause instanceof HttpError)) {
    error = error.cause;
  }
  if (error instanceof TaskQueueError) {
    const typed = answer(STATUS[error.code], error.code, error.message, error.field);
    if (error.code === "unauthenticated") typed.headers = { "www-authenticate": 'Bearer realm="task-queue"' };
    if (error.code === "rate_limited") typed.headers = { "retry-after": String(error.retryAfterSeconds ?? 1) };
    return typed;
  }
  if (error instanceof HttpError) return answer(error.status, error.code, error.message, error.field);
  if (error instanceof ValidationError && error.type !== "response") {
    const first = error.valueError;
    if (first) {
      const { field, message } = describeValueError(first, error.type);
      return answer(400, "invalid_argument", message, field);
    }
    return answer(400, "invalid_argument", `the request ${error.type} is invalid`, error.type);
  }
  if (error instanceof ParseError) return answer(400, "invalid_json", "request body is not valid JSON", "body");
  if (error instanceof NotFoundError) return answer(404, "not_found", `no route for ${where}`);
  if (isDatabaseUnavailable(error)) {
    deps.log.warn({ err: error, where }, "database unavailable");
    const { message } = unavailable();
    return answer(503, "unavailable", message);
  }
  const requestId = Bun.randomUUIDv7();
  deps.log.error({ err: error, request_id: requestId, where }, "request failed");
  return { status: 500, body: { error: { code: "internal", message: "internal error", request_id: requestId } } };
}

export function errorResponse(error: unknown, deps: Pick<ApiDeps, "log">, request: Request): Response {
  const where = `${request.method} ${new URL(request.url).pathname}`;
  const { status, body, headers } = errorAnswer(error, deps, where);
  return Response.json(body, { status, headers });
}

/**
 * Error mapping and the body size limit for the whole app. The Content-Length check refuses
 * a large body before it is read; readJsonBody guards the bytes actually read, since a
 * chunked body has no Content-Length.
 */
export function errorHandling(deps: Pick<ApiDeps, "log" | "config">) {
  const limit = deps.config.TQ_MAX_BODY_BYTES;
  return new Elysia({ normalize: false })
    .onRequest(({ request }) => {
      const length = request.headers.get("content-length");
      if (length !== null && Number(length) > limit) throw payloadTooLarge(limit);
    })
    .onError({ as: "global" }, ({ error, request }) => errorResponse(error, deps, request));
}

/**
 * Reads a request body as JSON whatever its Content-Type: the seed's curl examples send JSON
 * as application/x-www-form-urlencoded.
 */
export async function readJsonBody(request: Request, limit: number): Promise<unknown> {
  const chunks: Uint8Array[] = [];
  let size = 0;
  if (request.body) {
    const reader = request.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > limit) {
        await reader.cancel().catch(() => {});
        throw payloadTooLarge(limit);
      }
      chunks.push(value);
    }
  }
  if (size === 0) throw invalidJson("request body is empty; expected a JSON object");
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(Buffer.concat(chunks));
  } catch {
    throw invalidJson("request body is not valid UTF-8");
  }
  try {
    return JSON.parse(text);
  } catch (error) {
    const reason = error instanceof SyntaxError ? `: ${error.message}` : "";
    throw invalidJson(`request body is not valid JSON${reason}`);
  }
}
