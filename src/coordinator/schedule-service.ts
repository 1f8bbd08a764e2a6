// gRPC ScheduleService: the same operations as the /schedules routes, through the same service
// functions (src/schedule/service.ts) and validation (src/schedule/spec.ts). Authenticated in
// each handler like TaskService: reads need read, changes need submit.
import { create, fromJson, type JsonValue } from "@bufbuild/protobuf";
import type * as grpc from "@grpc/grpc-js";
import type { ApiDeps } from "../api/deps";
import type { FiringRow } from "../db/schedules";
import {
  type CreateScheduleRequest,
  CreateScheduleResponseSchema,
  type DeleteScheduleRequest,
  DeleteScheduleResponseSchema,
  type GetScheduleRequest,
  GetScheduleResponseSchema,
  type ListSchedulesRequest,
  ListSchedulesResponseSchema,
  type PauseScheduleRequest,
  PauseScheduleResponseSchema,
  type ResumeScheduleRequest,
  ResumeScheduleResponseSchema,
  type Schedule,
  type ScheduleFiring,
  ScheduleFiringSchema,
  ScheduleSchema,
  type TriggerScheduleRequest,
  TriggerScheduleResponseSchema,
  type UpdateScheduleRequest,
  UpdateScheduleResponseSchema,
} from "../gen/taskqueue/v1/schedule_service_pb";
import { type SubmitTaskRequest, SubmitTaskRequestSchema } from "../gen/taskqueue/v1/task_service_pb";
import { toTimestamp } from "../rpc/convert";
import { formatDuration } from "../schedule/rules";
import {
  createSchedule,
  getScheduleView,
  listSchedulePage,
  patchSchedule,
  pauseSchedule,
  removeSchedule,
  type ScheduleView,
  triggerSchedule,
} from "../schedule/service";
import { invalidArgument } from "../task/errors";
import { submitInput, unary } from "./task-service";

/** The REST task form of a schedule's template: SubmitTask's, without scheduled_at. */
function templateInput(task: SubmitTaskRequest | undefined): Record<string, unknown> {
  if (!task) throw invalidArgument("task", "task is required");
  const input = submitInput(task);
  if (input.scheduled_at !== undefined)
    throw invalidArgument("task.scheduled_at", "a schedule's task takes its time from the schedule");
  return input;
}

function catchUpInput(catchUp: { window: string; mode: string } | undefined) {
  if (!catchUp) return undefined;
  return { ...(catchUp.window ? { window: catchUp.window } : {}), ...(catchUp.mode ? { mode: catchUp.mode } : {}) };
}

function firingToProto(firing: FiringRow): ScheduleFiring {
  return create(ScheduleFiringSchema, {
    fireAt: toTimestamp(firing.fire_at),
    outcome: firing.outcome,
    taskId: firing.task_id ?? "",
    reason: firing.reason ?? "",
    recordedAt: toTimestamp(firing.recorded_at),
  });
}

export function scheduleToProto({ schedule, upcoming, firings }: ScheduleView): Schedule {
  const { secret_env: secret, ...template } = schedule.template as Record<string, unknown> & { secret_env?: object };
  return create(ScheduleSchema, {
    id: schedule.id,
    name: schedule.name,
    cron: schedule.cron ?? "",
    every: schedule.every_ms === null ? "" : formatDuration(schedule.every_ms),
    timeZone: schedule.time_zone,
    // The stored form uses the proto's own field names (command, timeout_ms, retry.on_failure, ...).
    task: fromJson(SubmitTaskRequestSchema, template as JsonValue, { ignoreUnknownFields: true }),
    secretEnvKeys: Object.keys(secret ?? {}).sort(),
    overlap: schedule.overlap,
    catchUp: { window: formatDuration(schedule.catch_up_window_ms), mode: schedule.catch_up_mode },
    paused: schedule.paused,
    nextFireAt: toTimestamp(schedule.next_fire_at),
    upcoming: upcoming.map((time) => toTimestamp(time)!),
    bufferedFireAt: toTimestamp(schedule.buffered_fire_at),
    missedUnrecorded: BigInt(schedule.missed_unrecorded),
    firings: firings.map(firingToProto),
    createdAt: toTimestamp(schedule.created_at),
    updatedAt: toTimestamp(schedule.updated_at),
  });
}

export function scheduleServiceHandlers(deps: ApiDeps): grpc.UntypedServiceImplementation {
  const service = { sql: deps.sql, taskDefaults: deps.settings.taskDefaults, wake: deps.wakeScheduleFirer };
  return {
    createSchedule: unary(deps, "submit", async (request: CreateScheduleRequest, principal) => {
      const input = {
        name: request.name,
        ...(request.cron ? { cron: request.cron } : {}),
        ...(request.every ? { every: request.every } : {}),
        ...(request.timeZone ? { time_zone: request.timeZone } : {}),
        task: templateInput(request.task),
        ...(request.overlap ? { overlap: request.overlap } : {}),
        ...(request.catchUp ? { catch_up: catchUpInput(request.catchUp) } : {}),
        paused: request.paused,
      };
      const view = await createSchedule(service, input, principal.name);
      return create(CreateScheduleResponseSchema, { schedule: scheduleToProto(view) });
    }),
    getSchedule: unary(deps, "read", async (request: GetScheduleRequest) =>
      create(GetScheduleResponseSchema, { schedule: scheduleToProto(await getScheduleView(service, request.id)) }),
    ),
    listSchedules: unary(deps, "read", async (request: ListSchedulesRequest) => {
      const page = await listSchedulePage(service, {
        limit: request.limit === 0 ? undefined : request.limit,
        cursor: request.cursor === "" ? undefined : request.cursor,
      });
      return create(ListSchedulesResponseSchema, {
        schedules: page.schedules.map(scheduleToProto),
        nextCursor: page.nextCursor ?? "",
      });
    }),
    updateSchedule: unary(deps, "submit", async (request: UpdateScheduleRequest) => {
      const input = {
        ...(request.cron !== undefined ? { cron: request.cron } : {}),
        ...(request.every !== undefined ? { every: request.every } : {}),
        ...(request.timeZone !== undefined ? { time_zone: request.timeZone } : {}),
        ...(request.task ? { task: templateInput(request.task) } : {}),
        ...(request.overlap !== undefined ? { overlap: request.overlap } : {}),
        ...(request.catchUp ? { catch_up: catchUpInput(request.catchUp) } : {}),
      };
      return create(UpdateScheduleResponseSchema, { schedule: scheduleToProto(await patchSchedule(service, request.id, input)) });
    }),
    deleteSchedule: unary(deps, "submit", async (request: DeleteScheduleRequest) => {
      await removeSchedule(service, request.id);
      return create(DeleteScheduleResponseSchema, {});
    }),
    pauseSchedule: unary(deps, "submit", async (request: PauseScheduleRequest) =>
      create(PauseScheduleResponseSchema, { schedule: scheduleToProto(await pauseSchedule(service, request.id, true)) }),
    ),
    resumeSchedule: unary(deps, "submit", async (request: ResumeScheduleRequest) =>
      create(ResumeScheduleResponseSchema, { schedule: scheduleToProto(await pauseSchedule(service, request.id, false)) }),
    ),
    triggerSchedule: unary(deps, "submit", async (request: TriggerScheduleRequest) =>
      create(TriggerScheduleResponseSchema, { firing: firingToProto(await triggerSchedule(service, request.id)) }),
    ),
  };
}
