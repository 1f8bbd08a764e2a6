// The OpenAPI document of the HTTP API, and its reference page. Routes describe themselves
// (their schemas, `detail`, and `responses(...)` from here); @elysiajs/openapi turns them into
// paths, and this file gives the shared schemas their names, so that the document refers to
// each by `$ref` wherever it appears, which is what client generators need. The page is
// Swagger UI from the installed, pinned swagger-ui-dist, served by the role itself: nothing is
// fetched from anywhere else, and its Content-Security-Policy says so to the browser too.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { toOpenAPISchema, withHeaders } from "@elysiajs/openapi";
import { Kind, type TSchema, Type } from "@sinclair/typebox";
import { Elysia } from "elysia";
import pkg from "../../package.json" with { type: "json" };
import { ScheduleCreateInput, SchedulePatchInput } from "../schedule/spec";
import { notFound } from "../task/errors";
import { LabelPreferenceSchema, LabelRequirementSchema } from "../task/routing";
import { BatchInput, BatchItemInput, ScheduleInput, SubmitInput, TaskInput } from "../task/spec";
import { RateLimitInput, RateLimitJson, RateLimitList, RateLimitPatch } from "./flow-model";
import {
  AttemptJson,
  AttemptList,
  BulkFilter,
  BulkInput,
  BulkResult,
  ErrorCodeJson,
  ErrorJson,
  EventJson,
  EventPage,
  HealthJson,
  LogEventJson,
  LogText,
  MetricsText,
  ReadyJson,
  ScheduleResponse,
  StatusJson,
  TaskBatch,
  TaskEventJson,
  TaskJson,
  TaskList,
  TaskStateJson,
  WorkerJson,
  WorkerList,
} from "./model";
import { ConcurrencyKeyJson, ConcurrencyKeyList, OverviewJson } from "./overview-model";
import { QueueJson, QueueList, QueuePatch, WaitingJson } from "./queues-model";
import { FiringJson, ScheduleJson, ScheduleList } from "./schedules";

export const OPENAPI_PATH = "/openapi";
export const OPENAPI_JSON_PATH = `${OPENAPI_PATH}/json`;
const OPENAPI_VERSION = "3.1.0";
const REF_PREFIX = "#/components/schemas/";

/**
 * What the document promises for `POST /schedule`: scheduled_at is required. The route itself
 * checks ScheduleInput, which also takes the seed's schedule_at in its place.
 */
export const ScheduleRequest = Type.Object(
  {
    command: ScheduleInput.properties.command,
    scheduled_at: Type.Optional(ScheduleInput.properties.scheduled_at, false),
    schedule_at: Type.Optional(
      Type.String({
        deprecated: true,
        description:
          "Deprecated alias of scheduled_at, from the original clients: this server accepts a request that sends it " +
          "instead of scheduled_at. When both are sent they must name the same time.",
      }),
    ),
  },
  { additionalProperties: false, description: ScheduleInput.description },
);

/**
 * The named schemas (components.schemas). A schema listed here appears once, under its name,
 * and as a `$ref` everywhere it is used; a route answering a new shape adds it here (a test
 * checks that every body and JSON answer is a `$ref`).
 */
export const NAMED_SCHEMAS: Record<string, TSchema> = {
  Task: TaskJson,
  TaskState: TaskStateJson,
  TaskList,
  TaskBatch,
  TaskEvent: TaskEventJson,
  Attempt: AttemptJson,
  AttemptList,
  Event: EventJson,
  EventPage,
  Status: StatusJson,
  ScheduleResponse,
  Worker: WorkerJson,
  WorkerList,
  Error: ErrorJson,
  ErrorCode: ErrorCodeJson,
  Health: HealthJson,
  Ready: ReadyJson,
  TaskInput,
  SubmitInput,
  ScheduleInput: ScheduleRequest,
  BatchInput,
  BatchItemInput,
  RetryPolicy: TaskInput.properties.retry,
  MetricsText,
  // Live logs (src/api/logs.ts).
  LogText,
  LogEvent: LogEventJson,
  // Retry and bulk actions (POST /tasks/:id/retry, POST /tasks/bulk).
  BulkInput,
  BulkFilter,
  BulkResult,
  // Flow control (src/api/flow.ts, src/task/flow.ts).
  Concurrency: TaskInput.properties.concurrency,
  RateLimit: RateLimitJson,
  RateLimitList,
  RateLimitInput,
  RateLimitPatch,
  // Queues, priorities, labels.
  Queue: QueueJson,
  QueueList,
  QueuePatch,
  Waiting: WaitingJson,
  LabelRequirement: LabelRequirementSchema,
  LabelPreference: LabelPreferenceSchema,
  // Recurring schedules (src/api/schedules.ts).
  Schedule: ScheduleJson,
  ScheduleList,
  ScheduleFiring: FiringJson,
  ScheduleCreateInput,
  SchedulePatchInput,
  // The dashboard's reads (src/api/overview.ts).
  Overview: OverviewJson,
  ConcurrencyKey: ConcurrencyKeyJson,
  ConcurrencyKeyList,
};

// Each named schema carries its name as $id (what Elysia's .model() would give it), so that
// wherever the same object is used, the document can tell it and refer to it instead.
for (const [name, schema] of Object.entries(NAMED_SCHEMAS)) {
  const id = `${REF_PREFIX}${name}`;
  if (schema.$id !== undefined && schema.$id !== id) throw new Error(`schema ${name} already has $id ${schema.$id}`);
  schema.$id = id;
}

/** The values of a schema that is a union of string literals (the document's `enum`), or null. */
function enumValues(schema: TSchema): string[] | null {
  if (schema[Kind] !== "Union" || !Array.isArray(schema.anyOf)) return null;
  const values = (schema.anyOf as TSchema[]).map((member) => member.const);
  return values.every((value) => typeof value === "string") ? values : null;
}

const ENUMS = Object.entries(NAMED_SCHEMAS).flatMap(([name, schema]) => {
  const values = enumValues(schema);
  return values ? [{ ref: `${REF_PREFIX}${name}`, values, description: schema.description as string | undefined }] : [];
});

// ---------------------------------------------------------------------------------------------
// Responses: each route declares its answers once, with responses(...).

/** Error statuses a route may list; auth, internal and database errors are added by responses(). */
export type ErrorStatus = 400 | 401 | 403 | 404 | 409 | 413 | 415 | 429 | 500 | 503;
type CommonStatus = 401 | 403 | 429 | 500 | 503;
type ErrorSchema = typeof ErrorJson;

const ERROR_DESCRIPTIONS: Record<ErrorStatus, string> = {
  400: "The request is invalid (invalid_argument, invalid_json): the error names the field and the rule it broke.",
  401: "No valid API token (unauthenticated).",
  403: "The token does not have the scope this route needs (permission_denied).",
  404: "No such task (not_found).",
  409: "The request conflicts with the task's state (conflict).",
  413: "The body is larger than TQ_MAX_BODY_BYTES (payload_too_large); the message names the limit.",
  415: "The body is neither JSON nor the form type curl sends by default (unsupported_media_type).",
  429: "Too many requests for this token (rate_limited); try again after Retry-After seconds.",
  500: "An internal error (internal); quote its request_id when reporting it.",
  503: "The database is unreachable, too slow or the tasks table locked (unavailable); try again after Retry-After seconds.",
};

const ERROR_HEADERS: Partial<Record<ErrorStatus, Record<string, TSchema>>> = {
  401: { "WWW-Authenticate": Type.String({ description: 'The scheme to authenticate with: Bearer realm="task-queue".' }) },
  429: { "Retry-After": Type.Integer({ minimum: 1, description: "Seconds to wait before the next request." }) },
  503: { "Retry-After": Type.Integer({ minimum: 1, description: "Seconds to wait before trying again." }) },
};

/** Response headers routes declare. */
export const ResponseHeaders = {
  location: { Location: Type.String({ description: "Where the created task is: /tasks/{id}." }) },
  replayed: {
    "Idempotent-Replayed": Type.Literal("true", {
      description: "Present when the Idempotency-Key was used before: the answer is the original task, nothing was created.",
    }),
  },
};

/** A schema as one response: the same schema (and so the same `$ref`), with its own description and headers. */
export function answer<T extends TSchema>(schema: T, description: string, headers?: Record<string, TSchema>): T {
  const clone = Object.create(Object.getPrototypeOf(schema), Object.getOwnPropertyDescriptors(schema)) as T;
  clone.description = description;
  return headers ? withHeaders(clone, headers) : clone;
}

function errorAnswers<E extends ErrorStatus>(statuses: readonly E[], describe: Partial<Record<ErrorStatus, string>>) {
  const out = {} as Record<E, ErrorSchema>;
  for (const status of [...new Set(statuses)].sort((a, b) => a - b)) {
    out[status] = answer(ErrorJson, describe[status] ?? ERROR_DESCRIPTIONS[status], ERROR_HEADERS[status]);
  }
  return out;
}

/** For routes with a JSON body: it may be malformed, too large or of the wrong media type. */
export const BODY_ERRORS = [400, 413, 415] as const;

/**
 * A route's `response` option: its successes, the errors it lists, and those every
 * authenticated route can answer (401, 403, 429, 500, 503), all with the Error schema.
 */
export function responses<const S extends Record<number, TSchema>, const E extends ErrorStatus>(
  success: S,
  errors: readonly E[],
  describe: Partial<Record<ErrorStatus, string>> = {},
): S & Record<E | CommonStatus, ErrorSchema> {
  return { ...success, ...errorAnswers([...errors, 401, 403, 429, 500, 503] as (E | CommonStatus)[], describe) };
}

/** The same for routes anyone may call (no 401, 403 or 429). */
export function openResponses<const S extends Record<number, TSchema>, const E extends ErrorStatus>(
  success: S,
  errors: readonly E[],
): S & Record<E | 500, ErrorSchema> {
  return { ...success, ...errorAnswers([...errors, 500] as (E | 500)[], {}) };
}

/**
 * OpenAPI response objects for a route whose answer Elysia does not see as a schema (a
 * stream): its `detail.responses`, with the same error responses as responses().
 */
type ResponseObject = {
  description: string;
  headers?: Record<string, { schema: object }>;
  /** Absent for an answer without a body (204). */
  content?: Record<string, { schema: object }>;
};

export function documentedResponses(
  success: Record<number, ResponseObject>,
  errors: readonly ErrorStatus[],
): Record<string, ResponseObject> {
  const out: Record<string, ResponseObject> = { ...success };
  for (const [status, schema] of Object.entries(errorAnswers([...errors, 401, 403, 429, 500, 503], {}))) {
    const headers = ERROR_HEADERS[Number(status) as ErrorStatus];
    out[status] = {
      description: schema.description ?? "",
      ...(headers ? { headers: Object.fromEntries(Object.entries(headers).map(([name, h]) => [name, { schema: h }])) } : {}),
      content: { "application/json": { schema: ErrorJson } },
    };
  }
  return out;
}

/** A `detail.requestBody` for a route that checks its body itself (so Elysia does not). */
export function jsonRequestBody(schema: TSchema) {
  return { required: true, description: schema.description, content: { "application/json": { schema } } };
}

// ---------------------------------------------------------------------------------------------
// The document.

const documentation = {
  info: {
    title: "task-queue",
    version: pkg.version,
    description: "Runs shell commands on a fleet of workers, now or at a set time.",
  },
  // Both roles serve the same API and document; `bun start` puts the scheduler on :8081 and the
  // coordinator on :8080 of 127.0.0.1.
  servers: [{ url: "/", description: "The role serving this document: a scheduler or a coordinator." }],
  security: [{ bearerAuth: [] }],
  tags: [
    { name: "tasks", description: "Submit, inspect, list, cancel and watch tasks." },
    { name: "seed", description: "The original API, kept compatible." },
    { name: "workers", description: "Workers connected to any coordinator." },
    { name: "health", description: "Liveness and readiness." },
    { name: "metrics", description: "Prometheus metrics of the role." },
    { name: "dashboard", description: "The reads behind the dashboard at /ui: the overview, live." },
  ],
  securitySchemes: {
    bearerAuth: {
      type: "http",
      scheme: "bearer",
      description:
        "An API token (bun run token create). Scopes: submit (POST /schedule, /submit, /tasks), read (every GET " +
        "but health), cancel (POST /tasks/:id/cancel), admin (all). Required once a token has been created " +
        "(revoking them all does not lift it; bun run token open-api does), and always on a role listening " +
        "beyond loopback; /healthz, /readyz and /openapi stay open.",
    },
  },
};

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };
const isObject = (value: unknown): value is JsonObject => typeof value === "object" && value !== null && !Array.isArray(value);

function sameValues(a: Json, b: readonly string[]): boolean {
  return Array.isArray(a) && a.length === b.length && a.every((value, i) => value === b[i]);
}

/**
 * Replaces every use of a named schema by its `$ref`: an object schema is known by its $id,
 * an enum (which @elysiajs/openapi rewrites, dropping the $id) by its list of values.
 */
function referenceNamed(node: Json, root = false): Json {
  if (Array.isArray(node)) return node.map((item) => referenceNamed(item));
  if (!isObject(node)) return node;
  if (!root) {
    const id = node.$id;
    if (typeof id === "string" && id.startsWith(REF_PREFIX)) {
      // A nullable use of a named schema: @elysiajs/openapi merged it into `type: [..., "null"]`.
      const nullable = Array.isArray(node.type) && node.type.includes("null");
      return nullable ? { anyOf: [{ $ref: id }, { type: "null" }] } : { $ref: id };
    }
    const named = node.type === "string" && ENUMS.find((e) => sameValues(node.enum ?? null, e.values));
    if (named) return { $ref: named.ref };
  }
  const out: JsonObject = {};
  for (const [key, value] of Object.entries(node)) if (key !== "$id") out[key] = referenceNamed(value);
  return out;
}

/** Response headers as OpenAPI wants them: the description beside the schema, not in it. */
function describeHeaders(paths: JsonObject): void {
  for (const item of Object.values(paths)) {
    for (const operation of Object.values(item as JsonObject)) {
      for (const response of Object.values(((operation as JsonObject).responses ?? {}) as JsonObject)) {
        const headers = (response as JsonObject).headers;
        if (!isObject(headers)) continue;
        for (const [name, header] of Object.entries(headers)) {
          const { description, ...schema } = (header as JsonObject).schema as JsonObject;
          headers[name] = { ...(description === undefined ? {} : { description }), schema };
        }
      }
    }
  }
}

/** The whole document for the routes of `app` (the app this plugin is used by). */
export function openApiDocument(app: Parameters<typeof toOpenAPISchema>[0]): JsonObject {
  const generated = toOpenAPISchema(app, undefined, undefined, undefined, OPENAPI_VERSION);
  const schemas: JsonObject = {};
  for (const [name, schema] of Object.entries(JSON.parse(JSON.stringify(generated.components.schemas)) as JsonObject)) {
    schemas[name] = referenceNamed(schema, true);
  }
  // @elysiajs/openapi drops an enum's description; its values are the schema's own.
  for (const { ref, values, description } of ENUMS) {
    schemas[ref.slice(REF_PREFIX.length)] = { type: "string", enum: values, ...(description ? { description } : {}) };
  }
  const paths = referenceNamed(JSON.parse(JSON.stringify(generated.paths)) as Json) as JsonObject;
  describeHeaders(paths);
  const { securitySchemes, ...rest } = documentation;
  return { openapi: OPENAPI_VERSION, ...rest, paths, components: { schemas, securitySchemes } };
}

// ---------------------------------------------------------------------------------------------
// The reference page.

const SWAGGER_UI_DIR = dirname(Bun.resolveSync("swagger-ui-dist/package.json", import.meta.dir));
const ASSETS: Record<string, string> = {
  "swagger-ui.css": "swagger-ui.css",
  "swagger-ui-bundle.js": "swagger-ui-bundle.js",
  "favicon-32x32.png": "favicon-32x32.png",
};
const SWAGGER_UI_VERSION: string = JSON.parse(readFileSync(join(SWAGGER_UI_DIR, "package.json"), "utf8")).version;
const ASSET_QUERY = `?v=${SWAGGER_UI_VERSION}`;

// Runs in the page: the document is found next to this script, so a proxy's path prefix is kept.
const INIT_SCRIPT = `"use strict";
const documentUrl = new URL("json", document.currentScript.src).href;
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: documentUrl,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
  });
});
`;

const page = (base: string) => `<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>${documentation.info.title} API reference</title>
  <link rel="icon" type="image/png" href="${base}/favicon-32x32.png${ASSET_QUERY}">
  <link rel="stylesheet" href="${base}/swagger-ui.css${ASSET_QUERY}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="${base}/swagger-ui-bundle.js${ASSET_QUERY}"></script>
  <script src="${base}/init.js${ASSET_QUERY}"></script>
</body>
</html>
`;

/** Only this origin: the page can load nothing from elsewhere, nor send a token elsewhere. */
const CONTENT_SECURITY_POLICY =
  "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; " +
  "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const hidden = { detail: { hide: true } };

/** Serves the document at /openapi/json and its reference page at /openapi (and /openapi/). */
export function apiDocumentation() {
  let document: JsonObject | null = null;
  const html = page(OPENAPI_PATH);
  const htmlResponse = () =>
    new Response(html, {
      headers: {
        "content-type": "text/html; charset=utf-8",
        "content-security-policy": CONTENT_SECURITY_POLICY,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
      },
    });
  // Once used by the app, the plugin's global routes are the app's.
  const plugin = new Elysia({ name: "api-documentation" }).model(NAMED_SCHEMAS);
  return plugin
    .get(
      OPENAPI_JSON_PATH,
      // Built on the first request, when every route of the app is registered.
      () => {
        document ??= openApiDocument(plugin);
        return document;
      },
      hidden,
    )
    .get(OPENAPI_PATH, htmlResponse, hidden)
    .get(`${OPENAPI_PATH}/`, htmlResponse, hidden)
    .get(
      `${OPENAPI_PATH}/init.js`,
      () => new Response(INIT_SCRIPT, { headers: { "content-type": "text/javascript; charset=utf-8" } }),
      hidden,
    )
    .get(
      `${OPENAPI_PATH}/:asset`,
      ({ params }) => {
        const file = ASSETS[params.asset];
        if (file === undefined) throw notFound(`no such file: ${OPENAPI_PATH}/${params.asset}`);
        return new Response(Bun.file(join(SWAGGER_UI_DIR, file)), {
          headers: { "cache-control": "public, max-age=86400", "x-content-type-options": "nosniff" },
        });
      },
      hidden,
    );
}
