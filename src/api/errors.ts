// Every error the HTTP API answers, mapped in one place. Typed errors carry their status and a
// message written for clients; anything else is logged and answered as an opaque internal
// error with a request id, so internal text (SQL, stack, file paths) never reaches a client.
import { Elysia, NotFoundError, ParseError, ValidationError } from "elysia";
import { type ErrorCode, isDatabaseTimeout, isDatabaseUnavailable, TaskQueueError, unavailable } from "../task/errors";
import { describeValueError } from "../task/explain";
import type { ApiDeps } from "./deps";
import type { ErrorJson, HttpErrorCode } from "./model";
import { noteStatus, requestIdOf } from "./request-log";

/** An error only HTTP has: the body is not JSON or of another media type, or no route matches. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: HttpErrorCode,
    message: string,
    readonly field?: string,
    readonly headers?: Record<string, string>,
  ) {
    super(message);
    this.name = "HttpError";
  }
}

export const invalidJson = (message: string) => new HttpError(400, "invalid_json", message, "body");

export const payloadTooLarge = (limit: number) =>
  new TaskQueueError("payload_too_large", `request body is larger than ${limit} bytes (TQ_MAX_BODY_BYTES)`, "body");

export const unsupportedMediaType = (contentType: string) =>
  new HttpError(
    415,
    "unsupported_media_type",
    `Content-Type ${JSON.stringify(contentType)} is not accepted; send application/json (or no Content-Type)`,
    "Content-Type",
  );

export const methodNotAllowed = (method: string, path: string, allowed: readonly string[]) =>
  new HttpError(405, "method_not_allowed", `${method} is not allowed on ${path}; allowed: ${allowed.join(", ")}`, undefined, {
    allow: allowed.join(", "),
  });

/**
 * Bun.serve's own maxRequestBodySize answers a bare 413 (no body, Connection: close) before the
 * app sees the request, so the roles set it beyond any real body and the app enforces
 * TQ_MAX_BODY_BYTES itself, with the JSON error: errorHandling refuses a declared
 * Content-Length, readJsonBody the bytes actually read, and no route reads a body otherwise.
 */
export const SERVER_MAX_REQUEST_BODY_SIZE = Number.MAX_SAFE_INTEGER;

const databaseTimedOut = () => unavailable("the database did not answer in time; try again shortly");

const STATUS: Record<ErrorCode, number> = {
  invalid_argument: 400,
  unauthenticated: 401,
  permission_denied: 403,
  not_found: 404,
  task_not_found: 404,
  attempt_not_found: 404,
  conflict: 409,
  not_final: 409,
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
export function errorAnswer(
  error: unknown,
  deps: Pick<ApiDeps, "log">,
  where: string,
  requestId: string = Bun.randomUUIDv7(),
): ErrorAnswer {
  // A parser's own error (too large, not JSON) reaches us wrapped in Elysia's ParseError.
  if (error instanceof ParseError && (error.cause instanceof TaskQueueError || error.cause instanceof HttpError)) {
    error = error.cause;
  }
  if (error instanceof TaskQueueError) {
    const typed = answer(STATUS[error.code], error.code, error.message, error.field);
    if (error.code === "unauthenticated") typed.headers = { "www-authenticate": 'Bearer realm="task-queue"' };
    if (error.code === "rate_limited" || error.code === "unavailable") {
      typed.headers = { "retry-after": String(error.retryAfterSeconds ?? 1) };
    }
    return typed;
  }
  if (error instanceof HttpError) {
    const typed = answer(error.status, error.code, error.message, error.field);
    if (error.headers) typed.headers = error.headers;
    return typed;
  }
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
    // A statement or lock timeout: the database is there but too slow or the table locked.
    const timedOut = isDatabaseTimeout(error);
    deps.log.warn({ err: error, where }, timedOut ? "database timed out" : "database unavailable");
    return errorAnswer(timedOut ? databaseTimedOut() : unavailable(), deps, where);
  }
  deps.log.error({ err: error, request_id: requestId, where }, "request failed");
  return { status: 500, body: { error: { code: "internal", message: "internal error", request_id: requestId } } };
}

/** A route of the app, as Elysia lists it (`app.routes`). */
export interface RouteEntry {
  method: string;
  path: string;
}

const compiledRoutes = new WeakMap<readonly RouteEntry[], { method: string; path: string; pattern: RegExp }[]>();

function compile(routes: readonly RouteEntry[]) {
  let compiled = compiledRoutes.get(routes);
  if (!compiled) {
    compiled = routes.map((route) => ({
      method: route.method.toUpperCase(),
      path: route.path,
      pattern: routePattern(route.path),
    }));
    compiledRoutes.set(routes, compiled);
  }
  return compiled;
}

/** The template of the route that serves `method path` (HEAD as GET), or null when none does. */
export function routeTemplate(routes: readonly RouteEntry[], method: string, path: string): string | null {
  const wanted = method === "HEAD" ? "GET" : method;
  const compiled = compile(routes);
  const exact = compiled.find((route) => route.method === wanted && route.path === path);
  if (exact) return exact.path;
  return compiled.find((route) => route.method === wanted && route.pattern.test(path))?.path ?? null;
}

function routePattern(path: string): RegExp {
  const source = path
    .split("/")
    .map((segment) => {
      if (segment === "*") return ".*";
      if (segment.startsWith(":")) return segment.endsWith("?") ? "[^/]*" : "[^/]+";
      return segment.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    })
    .join("/");
  return new RegExp(`^${source}$`);
}

/**
 * The methods the app serves on `path`, from its own route table (HEAD wherever GET is, as
 * Bun answers it); empty when no route has that path.
 */
export function allowedMethods(routes: readonly RouteEntry[], path: string): string[] {
  const compiled = compile(routes);
  const methods = new Set(compiled.filter((route) => route.pattern.test(path)).map((route) => route.method));
  if (methods.has("GET")) methods.add("HEAD");
  return [...methods].filter((method) => method !== "ALL").sort();
}

export function errorResponse(
  error: unknown,
  deps: Pick<ApiDeps, "log">,
  request: Request,
  routes: () => readonly RouteEntry[] = () => [],
): Response {
  const path = new URL(request.url).pathname;
  if (error instanceof NotFoundError) {
    // A known path asked with a method it does not serve.
    const allowed = allowedMethods(routes(), path);
    if (allowed.length > 0 && !allowed.includes(request.method)) error = methodNotAllowed(request.method, path, allowed);
  }
  const { status, body, headers } = errorAnswer(error, deps, `${request.method} ${path}`, requestIdOf(request));
  noteStatus(request, status);
  return Response.json(body, { status, headers });
}

/**
 * Error mapping and the body size limit for the whole app. The Content-Length check refuses
 * a large body before it is read; readJsonBody guards the bytes actually read, since a
 * chunked body has no Content-Length. `routes` is the finished app's route table, for the
 * Allow header of a 405.
 */
export function errorHandling(deps: Pick<ApiDeps, "log" | "settings">, routes: () => readonly RouteEntry[] = () => []) {
  const limit = deps.settings.maxBodyBytes;
  return new Elysia({ normalize: false })
    .onRequest(({ request }) => {
      const length = request.headers.get("content-length");
      if (length !== null && Number(length) > limit) throw payloadTooLarge(limit);
    })
    .onError({ as: "global" }, ({ error, request }) => errorResponse(error, deps, request, routes));
}

/** The media types a JSON body may be declared as; none at all is accepted too. */
function acceptsAsJson(contentType: string): boolean {
  const essence = contentType.split(";")[0]!.trim().toLowerCase();
  return (
    essence === "" ||
    essence === "application/json" ||
    /^application\/[!#$%&'*.^`|~\w-]+\+json$/.test(essence) ||
    // What curl sends by default with -d: the seed's examples send JSON that way.
    essence === "application/x-www-form-urlencoded"
  );
}

/**
 * Reads a request body as JSON, declared as JSON, as application/x-www-form-urlencoded (the
 * seed's curl examples send JSON so) or not at all; any other media type is a 415, before a
 * byte is read.
 */
export async function readJsonBody(request: Request, limit: number): Promise<unknown> {
  const contentType = request.headers.get("content-type");
  if (contentType !== null && !acceptsAsJson(contentType)) throw unsupportedMediaType(contentType);
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
