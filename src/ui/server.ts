// The dashboard at /ui on both HTTP ports: the page (one shell for every /ui path; the
// browser code routes), its assets, and sign-in. Everything the page shows or does goes
// through the API's own routes, with the API's checks, scopes and history: the session
// cookie only carries the token (src/ui/session.ts). Nothing is loaded from elsewhere, and
// the Content-Security-Policy says so to the browser.
import { Elysia } from "elysia";
import type { ApiDeps } from "../api/deps";
import { readJsonBody } from "../api/errors";
import { ANONYMOUS, type Principal, SCOPES } from "../auth/tokens";
import { invalidArgument, notFound, permissionDenied, TaskQueueError } from "../task/errors";
import { uiBundle } from "./bundle";
import { endedSessionCookie, sameOrigin, sessionCookie, sessionToken } from "./session";

export const UI_PATH = "/ui";

const CONTENT_SECURITY_POLICY =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
  "base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const SECURITY_HEADERS = {
  "content-security-policy": CONTENT_SECURITY_POLICY,
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
};

const shell = (version: string) => `<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>task-queue</title>
  <link rel="icon" href="data:,">
  <link rel="stylesheet" href="${UI_PATH}/assets/app.css?v=${version}">
</head>
<body>
  <div id="app"><p class="loading">Loading…</p></div>
  <script type="module" src="${UI_PATH}/assets/app.js?v=${version}"></script>
</body>
</html>
`;

const hidden = { detail: { hide: true } };

/** What GET /ui/session answers: whether sign-in is needed, and who is signed in. */
export interface SessionJson {
  /** Whether the API asks for a token (false in the default dev mode: everyone is let in). */
  auth: boolean;
  signed_in: boolean;
  name: string | null;
  scopes: string[];
}

const isCode = (error: unknown, code: string) => error instanceof TaskQueueError && error.code === code;

async function principalFor(deps: ApiDeps, token: string | null): Promise<Principal | null> {
  try {
    return await deps.auth.check(token === null ? null : `Bearer ${token}`, "read");
  } catch (error) {
    if (isCode(error, "unauthenticated")) return null;
    throw error;
  }
}

function sessionJson(principal: Principal | null, auth: boolean): SessionJson {
  const scopes = principal ? (principal.scopes.has("admin") ? [...SCOPES] : [...principal.scopes]) : [];
  return { auth, signed_in: principal !== null && auth, name: auth ? (principal?.name ?? null) : null, scopes };
}

/** An action on the session must come from a page of this origin (no login or logout CSRF). */
function requireSameOrigin(request: Request): void {
  if (!sameOrigin(request)) throw permissionDenied("the dashboard's sign-in takes requests from its own origin only");
}

export function uiController(deps: ApiDeps) {
  const page = async () =>
    new Response(shell((await uiBundle()).version), {
      headers: { "content-type": "text/html; charset=utf-8", "cache-control": "no-cache", ...SECURITY_HEADERS },
    });
  const secure = (request: Request) => new URL(request.url).protocol === "https:";
  return new Elysia({ name: "dashboard", normalize: false })
    .get(UI_PATH, page, hidden)
    .get(
      `${UI_PATH}/assets/:name`,
      async ({ params, request }) => {
        const asset = (await uiBundle()).assets.get(params.name);
        if (!asset) throw notFound(`no such file: ${UI_PATH}/assets/${params.name}`);
        const gzip = /\bgzip\b/.test(request.headers.get("accept-encoding") ?? "");
        return new Response(gzip ? asset.gzipped : asset.body, {
          headers: {
            "content-type": asset.contentType,
            // The shell names each build's assets by version: a versioned URL never changes.
            "cache-control": new URL(request.url).searchParams.has("v") ? "public, max-age=31536000, immutable" : "no-cache",
            vary: "accept-encoding",
            ...(gzip ? { "content-encoding": "gzip" } : {}),
            ...SECURITY_HEADERS,
          },
        });
      },
      hidden,
    )
    .get(
      `${UI_PATH}/session`,
      async ({ request, set }) => {
        // Without a token at all: let in (auth off) or not.
        const auth = (await principalFor(deps, null)) === null;
        const token = sessionToken(request);
        if (!auth || token === null) return sessionJson(auth ? null : ANONYMOUS, auth);
        const principal = await principalFor(deps, token);
        // A token revoked since sign-in: the session ends.
        if (!principal) set.headers["set-cookie"] = endedSessionCookie(secure(request));
        return sessionJson(principal, auth);
      },
      hidden,
    )
    .post(
      `${UI_PATH}/session`,
      async ({ request, set }) => {
        requireSameOrigin(request);
        const body = (await readJsonBody(request, deps.settings.maxBodyBytes)) as { token?: unknown } | null;
        const token = typeof body?.token === "string" ? body.token.trim() : "";
        if (token === "") throw invalidArgument("token", "token is required: an API token (bun run token create)");
        // Checked as the API checks it: an invalid token is a 401, one without `read` a 403.
        const principal = await deps.auth.check(`Bearer ${token}`, "read");
        set.headers["set-cookie"] = sessionCookie(token, secure(request));
        set.headers["cache-control"] = "no-store";
        return sessionJson(principal, true);
      },
      hidden,
    )
    .post(
      `${UI_PATH}/session/end`,
      ({ request, set }) => {
        requireSameOrigin(request);
        set.headers["set-cookie"] = endedSessionCookie(secure(request));
        return { signed_in: false };
      },
      hidden,
    )
    .get(`${UI_PATH}/*`, page, hidden);
}
