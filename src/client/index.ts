// A typed client of the HTTP API: openapi-fetch over the paths that `bun run gen` generates
// from the OpenAPI document (schema.ts). Each call names a documented path and method, and
// its body, parameters and answers are typed by the document:
//
//   const api = createClient({ baseUrl: "http://127.0.0.1:8080", token });
//   const { data, error } = await api.POST("/tasks", { body: { command: "echo hi" } });
import createFetchClient, { type Client } from "openapi-fetch";
import type { components, operations, paths } from "./schema";

export type { components, operations, paths };
/** The named schemas of the document: Schemas["Task"], Schemas["Error"], ... */
export type Schemas = components["schemas"];

export interface ClientOptions {
  /** A role's HTTP address, e.g. http://127.0.0.1:8080 (coordinator) or :8081 (scheduler). */
  baseUrl: string;
  /** An API token (bun run token create), sent as `Authorization: Bearer <token>`. */
  token?: string;
  /** Defaults to the global fetch. */
  fetch?: typeof fetch;
}

export type TaskQueueClient = Client<paths>;

export function createClient(options: ClientOptions): TaskQueueClient {
  const headers: Record<string, string> = {};
  if (options.token !== undefined) headers.authorization = `Bearer ${options.token}`;
  return createFetchClient<paths>({
    baseUrl: options.baseUrl.replace(/\/+$/, ""),
    headers,
    ...(options.fetch ? { fetch: options.fetch } : {}),
  });
}
