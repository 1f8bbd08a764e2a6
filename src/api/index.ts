// The HTTP API that the scheduler (:8081) and the coordinator (:8080) both serve: one Elysia
// instance per controller, composed by createApp. Handlers only translate between HTTP and
// src/api/service.ts.

import { openapi } from "@elysiajs/openapi";
import { Elysia, status, t } from "elysia";
import pkg from "../../package.json" with { type: "json" };
import {
  parseIdempotencyKey,
  ScheduleInput,
  SubmitInput,
  TaskInput,
  toBatchSpecs,
  toScheduleSpec,
  toTaskSpec,
} from "../task/spec";
import type { TaskSpec } from "../task/task";
import { authentication, principalOf } from "./auth";
import type { ApiDeps } from "./deps";
import { errorHandling, type RouteEntry, readJsonBody } from "./errors";
import {
  ErrorJson,
  HealthJson,
  ReadyJson,
  ScheduleResponse,
  StatusJson,
  StatusQuery,
  scheduleResponse,
  statusJson,
  TaskBatch,
  TaskEventJson,
  TaskIdParams,
  TaskJson,
  TaskList,
  TaskListQuery,
  taskJson,
  WorkerList,
  workerJson,
} from "./model";
import { cancelTaskOrThrow, checkReady, getTaskOrThrow, listTaskPage, listWorkers, submitTask, submitTasks } from "./service";
import { taskEventsResponse } from "./sse";

export function createApp(deps: ApiDeps) {
  // The finished app's own route table gives a 405 its Allow header.
  let routes: () => readonly RouteEntry[] = () => [];
  const app = new Elysia({ normalize: false })
    .use(errorHandling(deps, () => routes()))
    .use(authentication(deps))
    .use(
      openapi({
        path: "/openapi",
        specPath: "/openapi/json",
        documentation: {
          info: {
            title: "task-queue",
            version: pkg.version,
            description: "Runs shell commands on a fleet of workers, now or at a set time.",
          },
          components: {
            securitySchemes: {
              bearerAuth: {
                type: "http",
                scheme: "bearer",
                description:
                  "An API token (bun run token create). Scopes: submit (POST /schedule, /submit, /tasks), read (every GET " +
                  "but health), cancel (POST /tasks/:id/cancel), admin (all). Required once any token exists, and always " +
                  "on a role listening beyond loopback; /healthz, /readyz and /openapi stay open.",
              },
            },
          },
          security: [{ bearerAuth: [] }],
          tags: [
            { name: "tasks", description: "Submit, inspect, list, cancel and watch tasks." },
            { name: "seed", description: "The original API, kept compatible." },
            { name: "workers", description: "Workers connected to any coordinator." },
            { name: "health", description: "Liveness and readiness." },
          ],
        },
      }),
    )
    .use(seedController(deps))
    .use(tasksController(deps))
    .use(workersController(deps))
    .use(healthController(deps));
  routes = () => app.routes;
  return app;
}

/**
 * Every JSON body is parsed as JSON whatever its Content-Type (the seed's curl examples send
 * none, so curl says application/x-www-form-urlencoded), within the body size limit. The
 * trailing "json" is never reached (readJsonBody answers or throws); it tells the OpenAPI
 * document that the body is application/json.
 */
const jsonBody = (deps: ApiDeps) => [
  ({ request }: { request: Request }) => readJsonBody(request, deps.config.TQ_MAX_BODY_BYTES),
  "json" as const,
];

const failures = { 400: ErrorJson, 413: ErrorJson, 503: ErrorJson };
const lookupFailures = { 400: ErrorJson, 404: ErrorJson, 503: ErrorJson };

const IdempotencyHeaders = t.Object(
  {
    "idempotency-key": t.Optional(
      t.String({
        description:
          "Makes the submit safe to repeat: a later submit with the same key returns the original task (200, " +
          "header Idempotent-Replayed: true) instead of creating another; the same key with a different request is a 409.",
      }),
    ),
  },
  { additionalProperties: true },
);

const BatchIdempotencyHeaders = t.Object(
  {
    "idempotency-key": t.Optional(
      t.String({
        description:
          "Makes the whole batch safe to repeat: a later batch with the same key returns the original tasks (200, header " +
          "Idempotent-Replayed: true, every index in `replayed`) and creates nothing; the same key with a different batch " +
          "is a 409. Batch keys are their own namespace, apart from tasks' idempotency keys.",
      }),
    ),
  },
  { additionalProperties: true },
);

function withKey(spec: TaskSpec, headers: { "idempotency-key"?: string }): TaskSpec {
  return { ...spec, idempotencyKey: parseIdempotencyKey(headers["idempotency-key"]) };
}

type ResponseHeaders = { headers: Record<string, string | number> };

/** 201 with the new task and its Location, or 200 with the original one for a repeated Idempotency-Key. */
async function submitted(
  deps: ApiDeps,
  spec: TaskSpec,
  request: Request,
  headers: { "idempotency-key"?: string },
  set: ResponseHeaders,
) {
  const { task, created } = await submitTask(deps, withKey(spec, headers), principalOf(request).name);
  if (created) {
    set.headers.location = `/tasks/${task.id}`;
    return status(201, taskJson(task));
  }
  set.headers["idempotent-replayed"] = "true";
  return status(200, taskJson(task));
}

/** The seed's routes, answered in its shapes. */
function seedController(deps: ApiDeps) {
  return new Elysia({ normalize: false })
    .post(
      "/schedule",
      async ({ body, headers, request, set }) => {
        const spec = withKey(toScheduleSpec(body, deps.config), headers);
        const { task, created } = await submitTask(deps, spec, principalOf(request).name);
        // The seed's 200 either way; the header tells a replay apart.
        if (!created) set.headers["idempotent-replayed"] = "true";
        return scheduleResponse(task);
      },
      {
        parse: jsonBody(deps),
        body: ScheduleInput,
        headers: IdempotencyHeaders,
        response: { 200: ScheduleResponse, ...failures, 409: ErrorJson },
        detail: {
          tags: ["seed"],
          summary: "Schedule a command",
          description: "Seed-compatible: answers 200 with the normalized scheduled_at. `schedule_at` is accepted as an alias.",
        },
      },
    )
    .get("/status", async ({ query }) => statusJson(await getTaskOrThrow(deps, query.task_id, "task_id")), {
      query: StatusQuery,
      response: { 200: StatusJson, ...lookupFailures },
      detail: { tags: ["seed"], summary: "Status of a task" },
    });
}

function tasksController(deps: ApiDeps) {
  return new Elysia({ normalize: false })
    .post("/submit", ({ body, headers, set, request }) => submitted(deps, toTaskSpec(body, deps.config), request, headers, set), {
      parse: jsonBody(deps),
      body: SubmitInput,
      headers: IdempotencyHeaders,
      response: { 201: TaskJson, 200: TaskJson, ...failures, 409: ErrorJson },
      detail: { tags: ["tasks"], summary: "Run a command now" },
    })
    .post("/tasks", ({ body, headers, set, request }) => submitted(deps, toTaskSpec(body, deps.config), request, headers, set), {
      parse: jsonBody(deps),
      body: TaskInput,
      headers: IdempotencyHeaders,
      response: { 201: TaskJson, 200: TaskJson, ...failures, 409: ErrorJson },
      detail: { tags: ["tasks"], summary: "Submit a task", description: "Runs now, or at scheduled_at." },
    })
    .post(
      "/tasks/batch",
      async ({ body, headers, request, set }) => {
        const specs = toBatchSpecs(body, deps.config, deps.config.TQ_MAX_BATCH);
        const batchKey = parseIdempotencyKey(headers["idempotency-key"]);
        const batch = await submitTasks(deps, specs, principalOf(request).name, batchKey);
        const answer = { tasks: batch.tasks.map(taskJson), replayed: batch.replayed };
        if (batch.created) return status(201, answer);
        set.headers["idempotent-replayed"] = "true";
        return status(200, answer);
      },
      {
        parse: jsonBody(deps),
        headers: BatchIdempotencyHeaders,
        response: { 201: TaskBatch, 200: TaskBatch, ...failures, 409: ErrorJson },
        detail: {
          tags: ["tasks"],
          summary: "Submit many tasks",
          description:
            'Body: {"tasks": [<full form of POST /tasks, plus an optional idempotency_key>, ...]}, 1 to TQ_MAX_BATCH (1000) ' +
            "tasks, written in one statement: all or none. An item whose idempotency_key was used before is answered with " +
            "the original task, and its index is listed in `replayed`; 201 when any task was created, else 200 with " +
            "Idempotent-Replayed: true. No Location: a batch creates many resources.",
        },
      },
    )
    .get(
      "/tasks",
      async ({ query }) => {
        const page = await listTaskPage(deps, query);
        return { tasks: page.tasks.map(taskJson), next_cursor: page.nextCursor };
      },
      {
        // Query values arrive as text; the schema wants the number.
        transform({ query }) {
          const raw = query as Record<string, unknown>;
          if (typeof raw.limit === "string" && /^-?\d{1,9}$/.test(raw.limit)) raw.limit = Number(raw.limit);
        },
        query: TaskListQuery,
        response: { 200: TaskList, 400: ErrorJson, 503: ErrorJson },
        detail: { tags: ["tasks"], summary: "List tasks", description: "Newest first, filtered by state, paged by cursor." },
      },
    )
    .get("/tasks/:id", async ({ params }) => taskJson(await getTaskOrThrow(deps, params.id)), {
      params: TaskIdParams,
      response: { 200: TaskJson, ...lookupFailures },
      detail: { tags: ["tasks"], summary: "Get a task" },
    })
    .post(
      "/tasks/:id/cancel",
      async ({ params, request }) => taskJson(await cancelTaskOrThrow(deps, params.id, principalOf(request).name)),
      {
        params: TaskIdParams,
        response: { 200: TaskJson, 409: ErrorJson, ...lookupFailures },
        detail: {
          tags: ["tasks"],
          summary: "Cancel a task",
          description: "Cancels a queued or in-flight task (its process is stopped); 409 when it already finished.",
        },
      },
    )
    .get("/tasks/:id/events", ({ params, request, server }) => taskEventsResponse(deps, params.id, request, { server }), {
      params: TaskIdParams,
      detail: {
        tags: ["tasks"],
        summary: "Watch a task",
        description:
          "Server-sent events: the current state first, then every change until a final state, then the stream ends. " +
          "Each message is `event: task` with `id:` the task_events id; a `: keepalive` comment comes every 15 s.",
        responses: {
          200: {
            description: "An event stream of TaskEventJson messages.",
            content: { "text/event-stream": { schema: TaskEventJson as object } },
          },
          400: { description: "Malformed id." },
          404: { description: "Unknown task." },
        },
      },
    });
}

function workersController(deps: ApiDeps) {
  return new Elysia({ normalize: false }).get("/workers", async () => ({ workers: (await listWorkers(deps)).map(workerJson) }), {
    response: { 200: WorkerList, 503: ErrorJson },
    detail: { tags: ["workers"], summary: "Live workers" },
  });
}

function healthController(deps: ApiDeps) {
  return new Elysia({ normalize: false })
    .get("/healthz", () => ({ status: "ok" as const, role: deps.role }), {
      response: { 200: HealthJson },
      detail: { tags: ["health"], summary: "Liveness: the process answers", security: [] },
    })
    .get(
      "/readyz",
      async () => {
        await checkReady(deps);
        return { status: "ready" as const };
      },
      {
        response: { 200: ReadyJson, 503: ErrorJson },
        detail: { tags: ["health"], summary: "Readiness: the database answers within 2 s", security: [] },
      },
    );
}
