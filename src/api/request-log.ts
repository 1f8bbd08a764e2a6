// The request log: one line per HTTP request (event `http.request`) with its method, route
// template, status, duration, request id and the name of the API token that made it (never
// the token). Health checks log at debug, everything else at info. Every answer carries its
// request id as `X-Request-Id`: the caller's own, when it sent a sane one, or a new UUIDv7.
import { Elysia } from "elysia";
import type { ApiDeps } from "./deps";
import { type RouteEntry, routeTemplate } from "./errors";

interface RequestRecord {
  id: string;
  startedAt: number;
  /** The status the error mapping answered with (Elysia's own `set.status` does not show it). */
  status?: number;
}

const records = new WeakMap<Request, RequestRecord>();

/** A caller's X-Request-Id we pass on: short, and nothing that could forge a log line. */
const SANE_ID = /^[\w.:-]{1,128}$/;

/** Routes a probe calls every few seconds: logged at debug. */
const HEALTH = new Set(["/healthz", "/readyz"]);

/** The id of this request (the one in its X-Request-Id answer header). */
export function requestIdOf(request: Request): string | undefined {
  return records.get(request)?.id;
}

/** The error mapping says which status it answered with. */
export function noteStatus(request: Request, status: number): void {
  const record = records.get(request);
  if (record) record.status = status;
}

/**
 * `routes` is the finished app's route table: a request refused before routing (no token, too
 * large) has no route of Elysia's, and is logged under the template it would have matched.
 */
export function requestLog(
  deps: Pick<ApiDeps, "log">,
  tokenNameOf: (request: Request) => string | null,
  routes: () => readonly RouteEntry[],
) {
  return new Elysia({ name: "request-log" })
    .onRequest(({ request, set }) => {
      const given = request.headers.get("x-request-id");
      const id = given !== null && SANE_ID.test(given) ? given : Bun.randomUUIDv7();
      records.set(request, { id, startedAt: performance.now() });
      set.headers["x-request-id"] = id;
    })
    .onAfterResponse({ as: "global" }, (context) => {
      const record = records.get(context.request);
      if (!record) return;
      const path = new URL(context.request.url).pathname;
      const route = (context as { route?: string }).route ?? routeTemplate(routes(), context.request.method, path);
      const status = record.status ?? (typeof context.set.status === "number" ? context.set.status : 200);
      const line = {
        event: "http.request",
        request_id: record.id,
        method: context.request.method,
        route,
        // Only where no route matched: the template says the rest.
        ...(route === null ? { path } : {}),
        status,
        duration_ms: Math.round((performance.now() - record.startedAt) * 1000) / 1000,
        token: tokenNameOf(context.request),
      };
      if (HEALTH.has(route ?? path)) deps.log.debug(line, "request");
      else deps.log.info(line, "request");
    });
}
