// Authentication for the HTTP API, before anything else is done with a request (no body is
// read, nothing is validated, for a caller without a valid token). Which scope each route
// needs is said here, in one table.
import { Elysia } from "elysia";
import { ANONYMOUS, allows, type Principal, type Scope } from "../auth/tokens";
import { permissionDenied } from "../task/errors";
import { authorizationOf } from "../ui/session";
import type { ApiDeps } from "./deps";

/**
 * Routes anyone may call: liveness, readiness, the API's own description, and the dashboard's
 * page, assets and sign-in (src/ui: what it shows comes from the API's routes, checked here).
 */
const OPEN = [/^\/healthz$/, /^\/readyz$/, /^\/openapi(\/.*)?$/, /^\/ui(\/.*)?$/];

/** The scope a request needs, or null for an open route. */
export function scopeFor(method: string, path: string): Scope | null {
  if (OPEN.some((pattern) => pattern.test(path))) return null;
  if (method === "POST" && /^\/tasks\/[^/]+\/cancel$/.test(path)) return "cancel";
  // A retry runs the command again, as a submit does.
  if (method === "POST" && /^\/tasks\/[^/]+\/retry$/.test(path)) return "submit";
  // A bulk action needs its action's scope, which only the body names: cancel, or submit for
  // a retry (BULK_ACTION_SCOPES, checked by the route once the body is read).
  if (method === "POST" && path === "/tasks/bulk") return "read";
  if (method === "POST" && /^\/(schedule|submit|tasks|tasks\/batch)$/.test(path)) return "submit";
  // Rate limits change what every submitter gets: an administrator's.
  if (method !== "GET" && method !== "HEAD" && /^\/rate-limits(\/[^/]*)?$/.test(path)) return "admin";
  // A queue's settings (limit, pause) are the operator's.
  if ((method === "PATCH" || method === "POST") && /^\/queues\/[^/]+(\/(pause|resume))?$/.test(path)) return "admin";
  // Recurring schedules: every change creates tasks, or stops them from being created.
  if (method !== "GET" && method !== "HEAD" && /^\/schedules(\/[^/]+(\/(pause|resume|trigger))?)?$/.test(path)) return "submit";
  // Every other route reads (an unknown path is answered 404 only to a caller who may read).
  return "read";
}

/** The scope each bulk action needs (POST /tasks/bulk), as its one-task route does. */
export const BULK_ACTION_SCOPES = { cancel: "cancel", retry: "submit" } as const satisfies Record<string, Scope>;

/** Throws permission_denied unless this request's token holds `scope` (for a scope the body decides). */
export function requireScope(request: Request, scope: Scope): void {
  if (!allows(principalOf(request), scope)) throw permissionDenied(`this token does not have the ${scope} scope`);
}

const principals = new WeakMap<Request, Principal>();

/** The name of the API token that made this request, or null when none was checked (an open route or API). */
export function tokenNameOf(request: Request): string | null {
  const principal = principals.get(request);
  return principal && principal !== ANONYMOUS ? principal.name : null;
}

/** Who made this request (after the authentication hook ran). */
export function principalOf(request: Request): Principal {
  return principals.get(request) ?? ANONYMOUS;
}

export function authentication(deps: Pick<ApiDeps, "auth">) {
  // onRequest hooks run for every request of the app, before routing and parsing.
  return new Elysia({ name: "authentication" }).onRequest(async ({ request }) => {
    const scope = scopeFor(request.method, new URL(request.url).pathname);
    if (scope === null) return;
    // The dashboard's session cookie stands in for the header (src/ui/session.ts).
    principals.set(request, await deps.auth.check(authorizationOf(request), scope));
  });
}
