// The dashboard's way to the API: the typed client (src/client) on this origin. No token is
// held by the page: the session cookie (HttpOnly) goes with every same-origin request.
import { createClient, type Schemas } from "../../client";

export const api = createClient({ baseUrl: location.origin });
export type { Schemas };

/** The API's error shape, or a stand-in for a failure without one. */
export interface ApiError {
  code: string;
  message: string;
}

export class ApiFailure extends Error {
  constructor(
    readonly status: number,
    readonly error: ApiError,
  ) {
    super(error.message);
  }
}

/** The data of a typed call, or throws ApiFailure with the API's error. */
export async function need<T>(call: Promise<{ data?: T; error?: unknown; response: Response }>): Promise<T> {
  const { data, error, response } = await call;
  if (error !== undefined || data === undefined) throw failure(response.status, error);
  return data;
}

function failure(status: number, body: unknown): ApiFailure {
  const error = (body as { error?: ApiError } | undefined)?.error;
  return new ApiFailure(status, error ?? { code: `http_${status}`, message: `the API answered ${status}` });
}

/**
 * A JSON call to a route the typed client does not know yet (retry and bulk actions land
 * with the CLI's branch; `bun run gen` then types them, and these become api.POST calls).
 */
export async function postJson<T>(path: string, body?: unknown): Promise<T> {
  const response = await fetch(path, {
    method: "POST",
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const text = await response.text();
  const parsed = text ? (JSON.parse(text) as unknown) : undefined;
  if (!response.ok) throw failure(response.status, parsed);
  return parsed as T;
}

export interface Session {
  auth: boolean;
  signed_in: boolean;
  name: string | null;
  scopes: string[];
}

export async function readSession(): Promise<Session> {
  return (await (await fetch("/ui/session", { credentials: "same-origin" })).json()) as Session;
}

export async function signIn(token: string): Promise<Session> {
  return postJson<Session>("/ui/session", { token });
}

export async function signOut(): Promise<void> {
  await postJson("/ui/session/end");
}

export interface BulkResult {
  matched: number;
  changed: number;
  skipped: { id: string; reason: string }[];
}
