// The dashboard's sign-in: the API token a person signed in with travels in a cookie
// (HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it; Path=/: the
// API's routes get it), and stands in for the Authorization header on every API route
// (src/api/auth.ts). A request that acts (anything but GET and HEAD) on the strength of the
// cookie must also come from a page of this origin (its Origin header names this host):
// SameSite covers today's browsers, the Origin check older ones and same-site subdomains.
import { permissionDenied } from "../task/errors";

export const SESSION_COOKIE = "tq_session";

/** The token in the request's session cookie, or null. */
export function sessionToken(request: Request): string | null {
  const header = request.headers.get("cookie");
  if (!header) return null;
  for (const part of header.split(";")) {
    const at = part.indexOf("=");
    if (at < 0 || part.slice(0, at).trim() !== SESSION_COOKIE) continue;
    try {
      const value = decodeURIComponent(part.slice(at + 1).trim());
      return value === "" ? null : value;
    } catch {
      return null;
    }
  }
  return null;
}

const SAFE_METHODS = new Set(["GET", "HEAD", "OPTIONS"]);

/** Whether a request was sent by a page of this origin (the Origin header names this host). */
export function sameOrigin(request: Request): boolean {
  const origin = request.headers.get("origin");
  if (!origin || origin === "null") return false;
  try {
    return new URL(origin).host === new URL(request.url).host;
  } catch {
    return false;
  }
}

/**
 * The Authorization value a request stands for: its own header, else its session cookie as a
 * bearer token (refused with permission_denied for an action from another origin).
 */
export function authorizationOf(request: Request): string | null {
  const header = request.headers.get("authorization");
  if (header) return header;
  const token = sessionToken(request);
  if (token === null) return null;
  if (!SAFE_METHODS.has(request.method) && !sameOrigin(request)) {
    throw permissionDenied("a request signed in by the dashboard's cookie must come from the dashboard's own origin");
  }
  return `Bearer ${token}`;
}

/** Set-Cookie for a session: the token, for the browser session only (no Max-Age). */
export function sessionCookie(token: string, secure: boolean): string {
  return `${SESSION_COOKIE}=${encodeURIComponent(token)}; Path=/; HttpOnly; SameSite=Strict${secure ? "; Secure" : ""}`;
}

/** Set-Cookie that ends the session. */
export function endedSessionCookie(secure: boolean): string {
  return `${SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0${secure ? "; Secure" : ""}`;
}
