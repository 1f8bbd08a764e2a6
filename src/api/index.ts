// The HTTP API that the scheduler (:8081) and the coordinator (:8080) both serve: one Elysia
// instance per controller, composed by createApp. Handlers only translate between HTTP and
// src/api/service.ts.

import { Elysia, status, t } from "elysia";
import { METRICS_CONTENT_TYPE } from "../metrics/metrics";
import { invalidArgument } from "../task/errors";
import { BatchInput, parseIdempotencyKey, SubmitInput, TaskInput, toBatchSpecs, toScheduleSpec, toTaskSpec } from "../task/spec";
import type { TaskSpec } from "../task/task";
import { uiController } from "../ui/server";
import { authentication, BULK_ACTION_SCOPES, principalOf, requireScope, tokenNameOf } from "./auth";
import type { ApiDeps } from "./deps";
import { errorHandling, type RouteEntry, readJsonBody } from "./errors";
import { rateLimitsController } from "./flow";
import { logEventsResponse, logQuery, readLog } from "./logs";
import {
  AttemptList,
  attemptJson,
  BulkInput,
  BulkResult,
  EventPage,
  eventJson,
  HealthJson,
  HistoryQuery,
  LogEventJson,
  LogsQuery,
  LogText,
  MetricsText,
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
  taskWithDependenciesJson,
  WorkerList,
  workerJson,
} from "./model";
import {
  answer,
  apiDocumentation,
  BODY_ERRORS,
  documentedResponses,
  jsonRequestBody,
  openResponses,
  ResponseHeaders,
  responses,
  ScheduleRequest,
} from "./openapi";
import { overviewController } from "./overview";
import { queuesController } from "./queues";
import { requestLog } from "./request-log";
import { schedulesController } from "./schedules";
import {
  bulkAction,
  cancelTaskOrThrow,
  checkReady,
  getTaskOrThrow,
  listTaskAttempts,
  listTaskHistory,
  listTaskPage,
  listWorkers,
  retryTaskOrThrow,
  submitTask,
  submitTasks,
  taskDependencies,
} from "./service";
import { taskEventsResponse } from "./sse";

export function createApp(deps: ApiDeps) {
  // The finished app's own route table gives a 405 its Allow header.
  let routes: () => readonly RouteEntry[] = () => [];
  const app = new Elysia({ normalize: false })
    // First: its id and clock start before anything else can refuse the request.
    .use(requestLog(deps, tokenNameOf, () => routes()))
    .use(errorHandling(deps, () => routes()))
    .use(authentication(deps))
    .use(apiDocumentation())
    .use(seedController(deps))
    .use(tasksController(deps))
    .use(workersController(deps))
    .use(rateLimitsController(deps))
    .use(queuesController(deps))
    .use(schedulesController(deps))
    .use(overviewController(deps))
    .use(healthController(deps))
    .use(metricsController(deps))
    .use(uiController(deps));
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
  ({ request }: { request: Request }) => readJsonBody(request, deps.settings.maxBodyBytes),
  "json" as const,
];

const created = answer(TaskJson, "The task, created.", ResponseHeaders.location);
const replayed = answer(
  TaskJson,
  "The original task, for a repeated Idempotency-Key: nothing was created.",
  ResponseHeaders.replayed,
);
const keyConflict = { 409: "The Idempotency-Key was used before with a different request (conflict)." };

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

/** Query values arrive as text; the paged lists' schemas want `limit` as a number. */
function limitAsNumber({ query }: { query: Record<string, unknown> }): void {
  if (typeof query.limit === "string" && /^-?\d{1,9}$/.test(query.limit)) query.limit = Number(query.limit);
}

function withKey(spec: TaskSpec, headers: { "idempotency-key"?: string }): TaskSpec {
  return { ...spec, idempotencyKey: parseIdempotencyKey(headers["idempotency-key"]) };
}

type SetHeaders = { headers: Record<string, string | number> };

/** 201 with the new task and its Location, or 200 with the original one for a repeated Idempotency-Key. */
async function submitted(
  deps: ApiDeps,
  spec: TaskSpec,
  request: Request,
  headers: { "idempotency-key"?: string },
  set: SetHeaders,
) {
  const { task, created } = await submitTask(
    deps,
    withKey(spec, headers),
    principalOf(request).name,
    request.headers.get("traceparent"),
  );
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
        const spec = withKey(toScheduleSpec(body, deps.settings.taskDefaults), headers);
        const { task, created } = await submitTask(deps, spec, principalOf(request).name, request.headers.get("traceparent"));
        // The seed's 200 either way; the header tells a replay apart.
        if (!created) set.headers["idempotent-replayed"] = "true";
        return scheduleResponse(task);
      },
      {
        // toScheduleSpec checks the body: it also takes the seed's schedule_at, which the document
        // gives as a deprecated alias of the required scheduled_at.
        parse: jsonBody(deps),
        headers: IdempotencyHeaders,
        response: responses(
          {
            200: answer(
              ScheduleResponse,
              "The task, scheduled (or the original one, for a repeated Idempotency-Key).",
              ResponseHeaders.replayed,
            ),
          },
          [...BODY_ERRORS, 409],
          keyConflict,
        ),
        detail: {
          operationId: "scheduleTask",
          tags: ["seed"],
          summary: "Schedule a command",
          description: "Seed-compatible: answers 200 with the normalized scheduled_at. `schedule_at` is accepted as an alias.",
          requestBody: jsonRequestBody(ScheduleRequest),
        },
      },
    )
    .get("/status", async ({ query }) => statusJson(await getTaskOrThrow(deps, query.task_id, "task_id")), {
      query: StatusQuery,
      response: responses({ 200: answer(StatusJson, "The task's status.") }, [400, 404]),
      detail: { operationId: "getStatus", tags: ["seed"], summary: "Status of a task" },
    });
}

function tasksController(deps: ApiDeps) {
  const { taskDefaults: defaults, maxBatchTasks } = deps.settings;
  return new Elysia({ normalize: false })
    .post("/submit", ({ body, headers, set, request }) => submitted(deps, toTaskSpec(body, defaults), request, headers, set), {
      parse: jsonBody(deps),
      body: SubmitInput,
      headers: IdempotencyHeaders,
      response: responses({ 201: created, 200: replayed }, [...BODY_ERRORS, 409], keyConflict),
      detail: { operationId: "runTask", tags: ["tasks"], summary: "Run a command now" },
    })
    .post("/tasks", ({ body, headers, set, request }) => submitted(deps, toTaskSpec(body, defaults), request, headers, set), {
      parse: jsonBody(deps),
      body: TaskInput,
      headers: IdempotencyHeaders,
      response: responses({ 201: created, 200: replayed }, [...BODY_ERRORS, 409], keyConflict),
      detail: {
        operationId: "submitTask",
        tags: ["tasks"],
        summary: "Submit a task",
        description: "Runs now, or at scheduled_at.",
      },
    })
    .post(
      "/tasks/batch",
      async ({ body, headers, request, set }) => {
        const specs = toBatchSpecs(body, defaults, maxBatchTasks);
        const batchKey = parseIdempotencyKey(headers["idempotency-key"]);
        const batch = await submitTasks(
          deps,
          specs,
          principalOf(request).name,
          batchKey,
          false,
          request.headers.get("traceparent"),
        );
        const answer = { tasks: batch.tasks.map(taskJson), replayed: batch.replayed };
        if (batch.created) return status(201, answer);
        set.headers["idempotent-replayed"] = "true";
        return status(200, answer);
      },
      {
        // toBatchSpecs checks the body, naming the task at fault (`tasks[3].command`).
        parse: jsonBody(deps),
        headers: BatchIdempotencyHeaders,
        response: responses(
          {
            201: answer(TaskBatch, "The tasks, created, in the order submitted."),
            200: answer(
              TaskBatch,
              "The original tasks, for a repeated Idempotency-Key: nothing was created.",
              ResponseHeaders.replayed,
            ),
          },
          [...BODY_ERRORS, 409],
          {
            ...keyConflict,
            413: "The body is larger than TQ_MAX_BODY_BYTES, or the batch holds more than TQ_MAX_BATCH tasks (payload_too_large).",
          },
        ),
        detail: {
          operationId: "submitTasks",
          requestBody: jsonRequestBody(BatchInput),
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
        transform: limitAsNumber,
        query: TaskListQuery,
        response: responses({ 200: answer(TaskList, "A page of tasks, newest first.") }, [400]),
        detail: {
          operationId: "listTasks",
          tags: ["tasks"],
          summary: "List tasks",
          description: "Newest first, filtered by state, paged by cursor.",
        },
      },
    )
    .get(
      "/tasks/:id",
      async ({ params }) => {
        const task = await getTaskOrThrow(deps, params.id);
        return taskWithDependenciesJson(task, await taskDependencies(deps, task));
      },
      {
        params: TaskIdParams,
        response: responses({ 200: answer(TaskJson, "The task, with its parents and children.") }, [400, 404]),
        detail: { operationId: "getTask", tags: ["tasks"], summary: "Get a task" },
      },
    )
    .post(
      "/tasks/:id/cancel",
      async ({ params, request }) => taskJson(await cancelTaskOrThrow(deps, params.id, principalOf(request).name)),
      {
        params: TaskIdParams,
        response: responses({ 200: answer(TaskJson, "The task, cancelled.") }, [400, 404, 409], {
          409: "The task already finished (conflict).",
        }),
        detail: {
          operationId: "cancelTask",
          tags: ["tasks"],
          summary: "Cancel a task",
          description: "Cancels a queued or in-flight task (its process is stopped); 409 when it already finished.",
        },
      },
    )
    .post(
      "/tasks/:id/retry",
      async ({ params, request }) => taskJson(await retryTaskOrThrow(deps, params.id, principalOf(request).name)),
      {
        params: TaskIdParams,
        response: responses({ 200: answer(TaskJson, "The task, queued again.") }, [400, 404, 409], {
          409: "The task has not finished (not_final).",
        }),
        detail: {
          operationId: "retryTask",
          tags: ["tasks"],
          summary: "Retry a finished task",
          description:
            "Queues a task in a final state (succeeded, failed, timed_out, cancelled) again, due now, for one more " +
            "attempt: its max_attempts rises only as far as that attempt needs. Recorded in its history as `retried` " +
            "with the token's name. 409 not_final while it has not finished. Needs the submit scope.",
        },
      },
    )
    .post(
      "/tasks/bulk",
      async ({ body, request }) => {
        requireScope(request, BULK_ACTION_SCOPES[body.action]);
        if ((body.ids === undefined) === (body.filter === undefined)) {
          throw invalidArgument("ids", "give exactly one of ids or filter");
        }
        const target = body.ids !== undefined ? { ids: body.ids } : { filter: body.filter ?? {} };
        return bulkAction(deps, body.action, target, principalOf(request).name);
      },
      {
        parse: jsonBody(deps),
        body: BulkInput,
        response: responses({ 200: answer(BulkResult, "What was done.") }, [...BODY_ERRORS]),
        detail: {
          operationId: "bulkTasks",
          tags: ["tasks"],
          summary: "Cancel or retry many tasks",
          description:
            'Body: {"action": "cancel"|"retry", "ids": [...]} or {"action": ..., "filter": {<the filters of GET /tasks>}}. ' +
            "Each task is cancelled or retried by the rule of its one-task route (a retry needs the submit scope, a cancel " +
            "the cancel scope); those it does not apply to are skipped with a reason (the first 100 listed). Over a filter, " +
            "every matching task, newest first, 500 per statement.",
        },
      },
    )
    .get(
      "/tasks/:id/attempts",
      async ({ params }) => ({ attempts: (await listTaskAttempts(deps, params.id)).map(attemptJson) }),
      {
        params: TaskIdParams,
        response: responses({ 200: answer(AttemptList, "The task's attempts, first to last.") }, [400, 404]),
        detail: {
          operationId: "listTaskAttempts",
          tags: ["tasks"],
          summary: "List a task's attempts",
          description:
            "Every attempt, first to last, each with its worker, dispatched/started/finished times, pid, exit code, signal, " +
            "error, output tails and outcome (null while it holds the task). Empty before the first dispatch.",
        },
      },
    )
    .get(
      "/tasks/:id/history",
      async ({ params, query }) => {
        const page = await listTaskHistory(deps, params.id, query);
        return { events: page.events.map(eventJson), next_cursor: page.nextCursor };
      },
      {
        transform: limitAsNumber,
        params: TaskIdParams,
        query: HistoryQuery,
        response: responses({ 200: answer(EventPage, "A page of the task's events, oldest first.") }, [400, 404]),
        detail: {
          operationId: "listTaskHistory",
          tags: ["tasks"],
          summary: "List a task's history",
          description: "Every task_events row of the task, oldest first, paged by cursor (follow next_cursor).",
        },
      },
    )
    .get(
      "/tasks/:id/events",
      ({ params, headers, request, server }) =>
        taskEventsResponse(deps, params.id, request, { server, lastEventId: headers["last-event-id"] }),
      {
        params: TaskIdParams,
        headers: t.Object(
          {
            "last-event-id": t.Optional(
              t.String({
                description:
                  "Resume after this event (the id: of the last message received; EventSource sends it when it reconnects).",
              }),
            ),
          },
          { additionalProperties: true },
        ),
        detail: {
          operationId: "watchTask",
          tags: ["tasks"],
          summary: "Watch a task",
          description:
            "Server-sent events, each `event: task` with `id:` its task_events id and data a TaskEventJson: the task as " +
            "read with the event, and the event itself (its own id, at, kind, state, attempt, worker_id, actor, detail). " +
            "Without Last-Event-ID the first message is the current state (event null, id the newest event); then one " +
            "message per event, none skipped, until the event that made the task final, and the stream ends. With " +
            "Last-Event-ID: every event after that id in order, then live the same way, with no gap and no repeat; when " +
            "the task is final and nothing follows the id, the answer is 204 (EventSource then stops reconnecting). " +
            "A `: keepalive` comment comes every 15 s.",
          responses: documentedResponses(
            {
              200: {
                description: "An event stream of TaskEvent messages.",
                content: { "text/event-stream": { schema: TaskEventJson } },
              },
              204: { description: "Last-Event-ID names the task's final event or later: nothing follows." },
            },
            [400, 404],
          ),
        },
      },
    )
    .get(
      "/tasks/:id/logs",
      async ({ params, query, headers, request, server }) => {
        const q = logQuery(params.id, query);
        if (query.follow === "1" || query.follow === "true")
          return logEventsResponse(deps, params.id, q, request, { server, lastEventId: headers["last-event-id"] });
        const read = await readLog(deps, params.id, q);
        return new Response(read.bytes, {
          headers: {
            "content-type": "text/plain; charset=utf-8",
            "cache-control": "no-cache",
            "tq-log-attempt": String(read.attempt),
            "tq-log-offset": String(read.offset),
            "tq-log-next-offset": String(read.nextOffset),
            "tq-log-complete": String(read.complete),
            "tq-log-truncated": String(read.truncated),
          },
        });
      },
      {
        params: TaskIdParams,
        query: LogsQuery,
        headers: t.Object(
          {
            "last-event-id": t.Optional(
              t.String({ description: "With follow=1: resume from this offset (the id: of the last log message received)." }),
            ),
          },
          { additionalProperties: true },
        ),
        detail: {
          operationId: "getTaskLogs",
          tags: ["tasks"],
          summary: "Read or follow a task's output",
          description:
            "What an attempt of the task wrote to stdout and stderr, stored while it runs (src/db/logs.ts), from a byte " +
            "offset. Without follow: the bytes stored from `offset` on, as text/plain, with headers tq-log-attempt, " +
            "tq-log-offset, tq-log-next-offset (read again from here), tq-log-complete (the attempt has ended and everything " +
            "it wrote is stored) and tq-log-truncated (bytes cut by TQ_LOG_MAX_BYTES). With follow=1: server-sent events, each " +
            '`event: log` with `id:` the offset after it and data {"stream","offset","data"} (UTF-8 text), live until the ' +
            'attempt has ended and everything is sent, then `event: end` with data {"attempt","state","exit_code",' +
            '"truncated"} and the stream closes. Last-Event-ID resumes from that offset. For stream=both, offsets count the ' +
            "two streams merged in the order written. A task not run yet is followed until its first attempt.",
          responses: documentedResponses(
            {
              200: {
                description: "The bytes (text/plain), or with follow=1 an event stream.",
                headers: {
                  "tq-log-attempt": { schema: { type: "integer" } },
                  "tq-log-offset": { schema: { type: "integer" } },
                  "tq-log-next-offset": { schema: { type: "integer" } },
                  "tq-log-complete": { schema: { type: "boolean" } },
                  "tq-log-truncated": { schema: { type: "integer" } },
                },
                content: { "text/plain": { schema: LogText }, "text/event-stream": { schema: LogEventJson } },
              },
            },
            [400, 404],
          ),
        },
      },
    );
}

function workersController(deps: ApiDeps) {
  return new Elysia({ normalize: false }).get("/workers", async () => ({ workers: (await listWorkers(deps)).map(workerJson) }), {
    response: responses({ 200: answer(WorkerList, "Live workers, on every coordinator.") }, []),
    detail: { operationId: "listWorkers", tags: ["workers"], summary: "Live workers" },
  });
}

function healthController(deps: ApiDeps) {
  return new Elysia({ normalize: false })
    .get("/healthz", () => ({ status: "ok" as const, role: deps.role }), {
      response: openResponses({ 200: answer(HealthJson, "The process answers.") }, []),
      detail: { operationId: "healthz", tags: ["health"], summary: "Liveness: the process answers", security: [] },
    })
    .get(
      "/readyz",
      async () => {
        await checkReady(deps);
        return { status: "ready" as const };
      },
      {
        response: openResponses({ 200: answer(ReadyJson, "The database answered.") }, [503]),
        detail: { operationId: "readyz", tags: ["health"], summary: "Readiness: the database answers within 2 s", security: [] },
      },
    );
}

/** GET /metrics: the role's Prometheus metrics (src/metrics), for a `read` token like every GET. */
function metricsController(deps: ApiDeps) {
  return new Elysia({ normalize: false }).get(
    "/metrics",
    async () =>
      new Response(deps.metrics ? await deps.metrics.scrape() : "", { headers: { "content-type": METRICS_CONTENT_TYPE } }),
    {
      detail: {
        operationId: "getMetrics",
        tags: ["metrics"],
        summary: "Prometheus metrics",
        description:
          "This role's counters, histograms and gauges in the Prometheus text format (names `taskqueue_*`, each " +
          "labelled with the role). Needs a `read` token once tokens exist; Prometheus sends one as `authorization`.",
        responses: documentedResponses(
          { 200: { description: "The metrics, as text.", content: { "text/plain": { schema: MetricsText } } } },
          [],
        ),
      },
    },
  );
}
