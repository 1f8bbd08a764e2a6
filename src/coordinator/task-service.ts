// gRPC TaskService: the same operations as the REST routes, through the same service
// functions (src/api/service.ts) and the same validation (src/task/spec.ts).

import { create } from "@bufbuild/protobuf";
import type * as grpc from "@grpc/grpc-js";
import type { ApiDeps } from "../api/deps";
import { logQuery, readLog, tailLog } from "../api/logs";
import {
  cancelTaskOrThrow,
  getTaskOrThrow,
  listTaskAttempts,
  listTaskHistory,
  listTaskPage,
  parseEventId,
  retryTaskOrThrow,
  submitTask,
  taskDependencies,
  watchTask,
} from "../api/service";
import type { Principal, Scope } from "../auth/tokens";
import {
  type CancelTaskRequest,
  CancelTaskResponseSchema,
  type GetTaskRequest,
  GetTaskResponseSchema,
  type ListAttemptsRequest,
  ListAttemptsResponseSchema,
  type ListTaskEventsRequest,
  ListTaskEventsResponseSchema,
  type ListTasksRequest,
  ListTasksResponseSchema,
  type LogChunk,
  LogChunkSchema,
  type RetryTaskRequest,
  RetryTaskResponseSchema,
  type SubmitTaskRequest,
  SubmitTaskResponseSchema,
  type TailLogsRequest,
  type WatchTaskRequest,
  type WatchTaskResponse,
  WatchTaskResponseSchema,
} from "../gen/taskqueue/v1/task_service_pb";
import {
  attemptToProto,
  clientTimestamp,
  eventToProto,
  limitsFromProto,
  stateFromProto,
  taskToProto,
  taskWithDependenciesToProto,
} from "../rpc/convert";
import { toServiceError } from "../rpc/status";
import { invalidArgument } from "../task/errors";
import { parseIdempotencyKey, toTaskSpec } from "../task/spec";

type Unary<Req, Res> = (call: grpc.ServerUnaryCall<Req, Res>, callback: grpc.sendUnaryData<Res>) => void;

/** The caller, by the `authorization: Bearer <token>` metadata, allowed `scope`. */
function authorize(deps: ApiDeps, metadata: grpc.Metadata, scope: Scope): Promise<Principal> {
  const value = metadata.get("authorization")[0];
  return deps.auth.check(typeof value === "string" ? value : undefined, scope);
}

/** Runs a unary handler for a caller allowed `scope`, mapping thrown errors to gRPC status once. */
export function unary<Req, Res>(
  deps: ApiDeps,
  scope: Scope,
  handle: (request: Req, principal: Principal, metadata: grpc.Metadata) => Promise<Res>,
): Unary<Req, Res> {
  return (call, callback) => {
    authorize(deps, call.metadata, scope)
      .then((principal) => handle(call.request, principal, call.metadata))
      .then(
        (response) => callback(null, response),
        (error: unknown) => callback(toServiceError(error, deps.log)),
      );
  };
}

/** The REST full form of a SubmitTaskRequest, so both transports validate alike. */
export function submitInput(request: SubmitTaskRequest): Record<string, unknown> {
  const input: Record<string, unknown> = { command: request.command };
  const scheduledAt = clientTimestamp(request.scheduledAt, "scheduled_at");
  if (scheduledAt) input.scheduled_at = scheduledAt.toISOString();
  if (request.timeoutMs !== 0) input.timeout_ms = request.timeoutMs;
  if (request.maxAttempts !== 0) input.max_attempts = request.maxAttempts;
  if (request.leaseMs !== undefined) input.lease_ms = request.leaseMs;
  if (Object.keys(request.env).length > 0) input.env = request.env;
  if (Object.keys(request.secretEnv).length > 0) input.secret_env = request.secretEnv;
  if (request.cwd !== "") input.cwd = request.cwd;
  const retry = request.retry;
  if (retry) {
    const policy: Record<string, unknown> = {};
    if (retry.onFailure !== undefined) policy.on_failure = retry.onFailure;
    if (retry.onTimeout !== undefined) policy.on_timeout = retry.onTimeout;
    if (retry.onLost !== undefined) policy.on_lost = retry.onLost;
    if (retry.backoffBaseMs !== undefined) policy.backoff_base_ms = retry.backoffBaseMs;
    if (retry.backoffCapMs !== undefined) policy.backoff_cap_ms = retry.backoffCapMs;
    input.retry = policy;
  }
  if (request.limits) input.limits = limitsFromProto(request.limits);
  if (request.queue !== "") input.queue = request.queue;
  if (request.priority !== 0) input.priority = request.priority;
  if (request.require.length > 0) input.require = request.require.map(({ key, op, value }) => ({ key, op, value }));
  if (request.prefer.length > 0) input.prefer = request.prefer.map(({ key, op, value, weight }) => ({ key, op, value, weight }));
  if (request.scheduleTimeoutMs !== 0) input.schedule_timeout_ms = request.scheduleTimeoutMs;
  if (request.dependsOn.length > 0) input.depends_on = request.dependsOn;
  if (request.onParentFailure !== "") input.on_parent_failure = request.onParentFailure;
  if (request.concurrency) {
    const { key, max, strategy } = request.concurrency;
    input.concurrency = { key, ...(max === 0 ? {} : { max }), ...(strategy === "" ? {} : { strategy }) };
  }
  if (request.rateLimit !== "") input.rate_limit = request.rateLimit;
  return input;
}

export function taskServiceHandlers(deps: ApiDeps): grpc.UntypedServiceImplementation {
  return {
    submitTask: unary(deps, "submit", async (request: SubmitTaskRequest, principal, metadata) => {
      const spec = toTaskSpec(submitInput(request), deps.settings.taskDefaults);
      spec.idempotencyKey = parseIdempotencyKey(request.idempotencyKey, "idempotency_key");
      const { task, created } = await submitTask(deps, spec, principal.name, traceparentOf(metadata));
      return create(SubmitTaskResponseSchema, { task: taskToProto(task), created });
    }),
    getTask: unary(deps, "read", async (request: GetTaskRequest) => {
      const task = await getTaskOrThrow(deps, request.id);
      return create(GetTaskResponseSchema, {
        task: taskWithDependenciesToProto(task, await taskDependencies(deps, task)),
      });
    }),
    listTasks: unary(deps, "read", async (request: ListTasksRequest) => {
      const state = request.state === 0 ? undefined : stateFromProto(request.state);
      if (request.state !== 0 && state === undefined) throw invalidArgument("state", `unknown state ${request.state}`);
      const page = await listTaskPage(deps, {
        state,
        limit: request.limit === 0 ? undefined : request.limit,
        cursor: request.cursor === "" ? undefined : request.cursor,
        ...(request.queue === "" ? {} : { queue: request.queue }),
        schedule_id: request.scheduleId === "" ? undefined : request.scheduleId,
        fire_at: clientTimestamp(request.fireAt, "fire_at")?.toISOString(),
      });
      return create(ListTasksResponseSchema, { tasks: page.tasks.map(taskToProto), nextCursor: page.nextCursor ?? "" });
    }),
    cancelTask: unary(deps, "cancel", async (request: CancelTaskRequest, principal) =>
      create(CancelTaskResponseSchema, { task: taskToProto(await cancelTaskOrThrow(deps, request.id, principal.name)) }),
    ),
    retryTask: unary(deps, "submit", async (request: RetryTaskRequest, principal) =>
      create(RetryTaskResponseSchema, { task: taskToProto(await retryTaskOrThrow(deps, request.id, principal.name)) }),
    ),
    listAttempts: unary(deps, "read", async (request: ListAttemptsRequest) =>
      create(ListAttemptsResponseSchema, {
        attempts: (await listTaskAttempts(deps, request.taskId, "task_id")).map(attemptToProto),
      }),
    ),
    listTaskEvents: unary(deps, "read", async (request: ListTaskEventsRequest) => {
      const page = await listTaskHistory(
        deps,
        request.taskId,
        { limit: request.limit === 0 ? undefined : request.limit, cursor: request.cursor === "" ? undefined : request.cursor },
        "task_id",
      );
      return create(ListTaskEventsResponseSchema, { events: page.events.map(eventToProto), nextCursor: page.nextCursor ?? "" });
    }),
    tailLogs: (call: grpc.ServerWritableStream<TailLogsRequest, LogChunk>) => {
      const controller = new AbortController();
      call.on("cancelled", () => controller.abort());
      call.on("close", () => controller.abort());
      void (async () => {
        try {
          await authorize(deps, call.metadata, "read");
          const r = call.request;
          const query = logQuery(r.taskId, { stream: r.stream || "both", offset: String(r.offset), attempt: r.attempt });
          if (!r.follow) {
            const read = await readLog(deps, r.taskId, query);
            // One message per stream run would need the pieces; the bytes go as stored, in order.
            call.write(
              create(LogChunkSchema, {
                stream: query.stream === "both" ? "" : query.stream,
                offset: BigInt(read.offset),
                data: read.bytes,
                nextOffset: BigInt(read.nextOffset),
                end: read.complete,
                attempt: read.attempt,
                truncated: BigInt(read.truncated),
              }),
            );
          } else {
            for await (const item of tailLog(deps, r.taskId, query, controller.signal)) {
              if (item.kind === "log") {
                call.write(
                  create(LogChunkSchema, {
                    stream: item.piece.stream,
                    offset: BigInt(item.piece.offset),
                    data: item.piece.data,
                    nextOffset: BigInt(item.nextOffset),
                  }),
                );
              } else {
                call.write(
                  create(LogChunkSchema, {
                    end: true,
                    attempt: item.attempt,
                    state: item.state,
                    exitCode: item.exitCode ?? undefined,
                    truncated: BigInt(item.truncated),
                  }),
                );
              }
            }
          }
          call.end();
        } catch (error) {
          if (!controller.signal.aborted) call.emit("error", Object.assign(new Error(), toServiceError(error, deps.log)));
        }
      })();
    },
    watchTask: (call: grpc.ServerWritableStream<WatchTaskRequest, WatchTaskResponse>) => {
      const controller = new AbortController();
      call.on("cancelled", () => controller.abort());
      call.on("close", () => controller.abort());
      void (async () => {
        try {
          await authorize(deps, call.metadata, "read");
          const after = call.request.afterEventId;
          const options = { afterEventId: after === "" ? undefined : parseEventId(after, "after_event_id") };
          for await (const update of watchTask(deps, call.request.id, controller.signal, options)) {
            call.write(
              create(WatchTaskResponseSchema, {
                task: taskToProto(update.task),
                event: update.event ? eventToProto(update.event) : undefined,
              }),
            );
          }
          call.end();
        } catch (error) {
          // grpc-js ends the stream with the status of an emitted error.
          if (!controller.signal.aborted) call.emit("error", Object.assign(new Error(), toServiceError(error, deps.log)));
        }
      })();
    },
  };
}

/** The caller's W3C traceparent, sent as gRPC metadata (as OpenTelemetry's gRPC propagation does). */
function traceparentOf(metadata: grpc.Metadata): string | null {
  const [value] = metadata.get("traceparent");
  return typeof value === "string" ? value : null;
}
