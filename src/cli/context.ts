// What every verb of the CLI shares: where the API is and the token (flags, else TQ_URL /
// TQ_TOKEN), the typed client (src/client), the exit codes, and the one translation of an API
// error, a refused connection or a usage mistake into a message naming the problem and its
// exit code.
import { createClient, type Schemas, type TaskQueueClient } from "../client";

/** tq's own exit codes (README, "CLI"). `submit --wait` and `watch` exit with the task's instead (taskExitCode). */
export const EXIT = {
  ok: 0,
  /** Anything unexpected: an answer that is not the API's, an internal error. */
  failure: 1,
  /** A usage mistake: unknown verb or flag, a missing or malformed argument. Nothing was sent. */
  usage: 2,
  /** 404: no such task, schedule, queue. */
  notFound: 3,
  /** 409: the state does not allow it (cancel a finished task, retry one still running, a name taken). */
  conflict: 4,
  /** 401 or 403: no token, a bad one, or one without the scope. */
  auth: 5,
  /** 400, 413, 415: the API refused the input (the message names the field). */
  invalid: 6,
  /** The API could not be reached, or answered 429 or 5xx: try again. */
  unavailable: 7,
} as const;

/** A failure with its exit code and a message for stderr. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
    this.name = "CliError";
  }
}

export const usageError = (message: string) => new CliError(message, EXIT.usage);

export const DEFAULT_URL = "http://127.0.0.1:8080";

export interface GlobalOptions {
  url?: string;
  token?: string;
  json?: boolean;
}

export interface Context {
  url: string;
  token: string | undefined;
  json: boolean;
  api: TaskQueueClient;
  /** Headers for the requests made outside the typed client (the event and log streams). */
  headers: Record<string, string>;
  out: (text: string) => void;
  err: (text: string) => void;
}

/** The CLI's settings, as src/cli/main.ts read them (flags first, then TQ_URL and TQ_TOKEN). */
export function makeContext(options: GlobalOptions): Context {
  const url = (options.url ?? DEFAULT_URL).trim();
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw usageError(`--url / TQ_URL ${JSON.stringify(url)} is not a URL (e.g. ${DEFAULT_URL})`);
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") {
    throw usageError(`--url / TQ_URL must be http:// or https://, not ${parsed.protocol}`);
  }
  const token = options.token?.trim() || undefined;
  const baseUrl = url.replace(/\/+$/, "");
  return {
    url: baseUrl,
    token,
    json: options.json === true,
    api: createClient({ baseUrl, token }),
    headers: token ? { authorization: `Bearer ${token}` } : {},
    out: (text) => process.stdout.write(text.endsWith("\n") ? text : `${text}\n`),
    err: (text) => process.stderr.write(text.endsWith("\n") ? text : `${text}\n`),
  };
}

type ApiError = Schemas["Error"];

/** The exit code for an HTTP status the API answered with. */
export function exitCodeForStatus(status: number): number {
  if (status === 404) return EXIT.notFound;
  if (status === 409) return EXIT.conflict;
  if (status === 401 || status === 403) return EXIT.auth;
  if (status === 400 || status === 413 || status === 415 || status === 422) return EXIT.invalid;
  if (status === 429 || status >= 500) return EXIT.unavailable;
  return EXIT.failure;
}

/** A CliError for an error answer: the API's own message and code, and a hint for the usual auth mistakes. */
export function apiFailure(response: Response, error: unknown): CliError {
  const body = (error as Partial<ApiError> | undefined)?.error;
  let message = body?.message
    ? `${body.message} (${response.status} ${body.code}${body.field ? `, field ${body.field}` : ""})`
    : `the API answered ${response.status} ${response.statusText || ""}`.trim();
  if (response.status === 401) message += "; pass a token with --token or TQ_TOKEN (tq token create)";
  if (response.status === 429 || response.status === 503) {
    const after = response.headers.get("retry-after");
    if (after) message += `; retry in ${after} s`;
  }
  return new CliError(message, exitCodeForStatus(response.status));
}

/**
 * The data of a typed client call, or a CliError. A call the network refused throws from
 * fetch itself; `unreachable` turns that into the message.
 */
export async function call<T>(ctx: Context, request: Promise<{ data?: T; error?: unknown; response: Response }>): Promise<T> {
  let answer: { data?: T; error?: unknown; response: Response };
  try {
    answer = await request;
  } catch (error) {
    throw unreachable(ctx, error);
  }
  if (!answer.response.ok || answer.data === undefined) throw apiFailure(answer.response, answer.error);
  return answer.data;
}

/** A fetch outside the typed client (the streams), with the same errors. */
export async function fetchApi(ctx: Context, path: string, init: RequestInit = {}): Promise<Response> {
  let response: Response;
  try {
    response = await fetch(`${ctx.url}${path}`, { ...init, headers: { ...ctx.headers, ...(init.headers ?? {}) } });
  } catch (error) {
    throw unreachable(ctx, error);
  }
  if (!response.ok) {
    let body: unknown;
    try {
      body = await response.json();
    } catch {
      body = undefined;
    }
    throw apiFailure(response, body);
  }
  return response;
}

export function unreachable(ctx: Context, error: unknown): CliError {
  if (error instanceof CliError) return error;
  const code = (error as { code?: string } | null)?.code;
  const why =
    code === "ConnectionRefused" || code === "ECONNREFUSED" ? "connection refused" : String((error as Error)?.message ?? error);
  return new CliError(`cannot reach the API at ${ctx.url}: ${why} (set --url or TQ_URL)`, EXIT.unavailable);
}
