// The recurring schedules controller (`/schedules`), on both HTTP ports: the JSON views and the
// routes, which only translate between HTTP and src/schedule/service.ts.
import { Type } from "@sinclair/typebox";
import { Elysia, status } from "elysia";
import { FIRING_OUTCOMES, type FiringRow } from "../db/schedules";
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
import { CatchUpJson, literals, OverlapJson, ScheduleCreateInput, SchedulePatchInput } from "../schedule/spec";
import { SubmitInput } from "../task/spec";
import { principalOf } from "./auth";
import type { ApiDeps } from "./deps";
import { readJsonBody } from "./errors";
import { answer, BODY_ERRORS, documentedResponses, jsonRequestBody, responses } from "./openapi";

const Nullable = <T extends ReturnType<typeof Type.String>>(schema: T) => Type.Union([schema, Type.Null()]);
const Time = (description: string) => Type.String({ description });

export const FiringJson = Type.Object(
  {
    fire_at: Time("The fire time."),
    outcome: Type.Union(literals(FIRING_OUTCOMES), {
      description:
        "created: its task was written (task_id); skipped: the overlap policy dropped it; missed: overdue after downtime " +
        "or a pause and not caught up; buffered: held back until the live task ends (then created).",
    }),
    task_id: Nullable(Type.String({ description: "The task it created." })),
    reason: Nullable(Type.String({ description: "Why it was skipped, missed or buffered." })),
    recorded_at: Time("When the firing was recorded."),
  },
  { additionalProperties: false, description: "One fire time of a schedule and what came of it." },
);

const { secret_env: _secret, ...templateProperties } = SubmitInput.properties;

export const ScheduleJson = Type.Object(
  {
    id: Type.String({ description: "Schedule id (UUID)." }),
    name: Type.String(),
    cron: Nullable(Type.String()),
    every: Nullable(Type.String({ description: 'The interval, as "1h30m".' })),
    time_zone: Type.String(),
    // The full schema for the document and the answer's check, but a plain static type: every
    // task option spelled out twice over (here and in each route's answer) is past what the
    // type checker follows through Elysia's handler types.
    task: Type.Unsafe<{ [option: string]: unknown; secret_env_keys: string[] }>(
      Type.Object(
        {
          ...templateProperties,
          secret_env_keys: Type.Array(Type.String(), {
            description: "Names of the secret variables; values are never returned.",
          }),
        },
        { additionalProperties: false, description: "The task each firing creates (the form of POST /submit)." },
      ),
    ),
    overlap: OverlapJson,
    catch_up: Type.Object(
      { window: Type.String(), mode: CatchUpJson.properties.mode },
      { additionalProperties: false, description: CatchUpJson.description },
    ),
    paused: Type.Boolean(),
    next_fire_at: Nullable(Time("The first fire time not yet planned.")),
    upcoming: Type.Array(Time("A fire time."), { description: "The next 5 fire times." }),
    buffered_fire_at: Nullable(Time("A fire time held back (overlap buffer_one) until the live task ends.")),
    missed_unrecorded: Type.Integer({ description: "Missed fire times beyond the 100 a pass records (counted, not listed)." }),
    firings: Type.Array(FiringJson, {
      description: "The 20 most recent firings, newest first: created, skipped, missed and buffered.",
    }),
    created_at: Time("Created."),
    updated_at: Time("Last changed."),
  },
  { additionalProperties: false, description: "A recurring schedule." },
);
export type ScheduleJson = typeof ScheduleJson.static;

export const ScheduleList = Type.Object(
  {
    schedules: Type.Array(ScheduleJson),
    next_cursor: Type.Union([Type.String(), Type.Null()], { description: "Pass as cursor for the next page; null on the last." }),
  },
  { additionalProperties: false, description: "A page of schedules, newest first." },
);

export const ScheduleIdParams = Type.Object({ id: Type.String({ description: "Schedule id (UUID) or name." }) });
export const ScheduleListQuery = Type.Object({
  limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, description: "Page size. Defaults to 50." })),
  cursor: Type.Optional(Type.String({ description: "next_cursor of the previous page." })),
});

export function firingJson(firing: FiringRow): typeof FiringJson.static {
  return {
    fire_at: firing.fire_at.toISOString(),
    outcome: firing.outcome,
    task_id: firing.task_id,
    reason: firing.reason,
    recorded_at: firing.recorded_at.toISOString(),
  };
}

export function scheduleJson({ schedule, upcoming, firings }: ScheduleView): ScheduleJson {
  const { secret_env: secret, ...template } = schedule.template as Record<string, unknown> & {
    secret_env?: Record<string, string>;
  };
  return {
    id: schedule.id,
    name: schedule.name,
    cron: schedule.cron,
    every: schedule.every_ms === null ? null : formatDuration(schedule.every_ms),
    time_zone: schedule.time_zone,
    task: { ...template, secret_env_keys: Object.keys(secret ?? {}).sort() },
    overlap: schedule.overlap,
    catch_up: { window: formatDuration(schedule.catch_up_window_ms), mode: schedule.catch_up_mode },
    paused: schedule.paused,
    next_fire_at: schedule.next_fire_at?.toISOString() ?? null,
    upcoming: upcoming.map((time) => time.toISOString()),
    buffered_fire_at: schedule.buffered_fire_at?.toISOString() ?? null,
    missed_unrecorded: schedule.missed_unrecorded,
    firings: firings.map(firingJson),
    created_at: schedule.created_at.toISOString(),
    updated_at: schedule.updated_at.toISOString(),
  };
}

/** Query values arrive as text; the list schema wants `limit` as a number. */
function limitAsNumber({ query }: { query: Record<string, unknown> }): void {
  if (typeof query.limit === "string" && /^-?\d{1,9}$/.test(query.limit)) query.limit = Number(query.limit);
}

export function schedulesController(deps: ApiDeps) {
  const service = { sql: deps.sql, taskDefaults: deps.settings.taskDefaults, wake: deps.wakeScheduleFirer };
  const body = [({ request }: { request: Request }) => readJsonBody(request, deps.settings.maxBodyBytes), "json" as const];
  const one = (description: string) => responses({ 200: answer(ScheduleJson, description) }, [400, 404]);
  return new Elysia({ normalize: false })
    .post(
      "/schedules",
      async ({ body, request, set }) => {
        const created = scheduleJson(await createSchedule(service, body, principalOf(request).name));
        set.headers.location = `/schedules/${created.id}`;
        return status(201, created);
      },
      {
        // createSchedule checks the body (naming the field: cron, time_zone, every, task.command).
        parse: body,
        response: responses({ 201: answer(ScheduleJson, "The schedule, created.") }, [...BODY_ERRORS, 409], {
          409: "A schedule with this name exists (conflict).",
        }),
        detail: {
          operationId: "createSchedule",
          tags: ["schedules"],
          summary: "Create a recurring schedule",
          description:
            "Fires at each time of `cron` (in `time_zone`) or every `every`, creating the task `task` with scheduled_at and " +
            "fire_at set to the fire time: exactly one task per fire time, however many replicas fire schedules.",
          requestBody: jsonRequestBody(ScheduleCreateInput),
        },
      },
    )
    .get(
      "/schedules",
      async ({ query }) => {
        const page = await listSchedulePage(service, query);
        return { schedules: page.schedules.map(scheduleJson), next_cursor: page.nextCursor };
      },
      {
        transform: limitAsNumber,
        query: ScheduleListQuery,
        response: responses({ 200: answer(ScheduleList, "A page of schedules, newest first.") }, [400]),
        detail: { operationId: "listSchedules", tags: ["schedules"], summary: "List schedules" },
      },
    )
    .get("/schedules/:id", async ({ params }) => scheduleJson(await getScheduleView(service, params.id)), {
      params: ScheduleIdParams,
      response: one("The schedule, its next 5 fire times and its recent firings."),
      detail: { operationId: "getSchedule", tags: ["schedules"], summary: "Get a schedule" },
    })
    .patch("/schedules/:id", async ({ params, body }) => scheduleJson(await patchSchedule(service, params.id, body)), {
      params: ScheduleIdParams,
      parse: body,
      response: responses({ 200: answer(ScheduleJson, "The schedule, changed.") }, [...BODY_ERRORS, 404]),
      detail: {
        operationId: "updateSchedule",
        tags: ["schedules"],
        summary: "Change a schedule",
        description: "Fields left out stay. A new cron, every or time_zone plans again from now.",
        requestBody: jsonRequestBody(SchedulePatchInput),
      },
    })
    .delete(
      "/schedules/:id",
      async ({ params }) => {
        await removeSchedule(service, params.id);
        return new Response(null, { status: 204 });
      },
      {
        params: ScheduleIdParams,
        detail: {
          operationId: "deleteSchedule",
          tags: ["schedules"],
          summary: "Delete a schedule",
          description: "Its firings go with it; the tasks it created stay (with their schedule_id).",
          responses: documentedResponses({ 204: { description: "Deleted." } }, [400, 404]),
        },
      },
    )
    .post("/schedules/:id/pause", async ({ params }) => scheduleJson(await pauseSchedule(service, params.id, true)), {
      params: ScheduleIdParams,
      response: one("The schedule, paused."),
      detail: { operationId: "pauseSchedule", tags: ["schedules"], summary: "Pause a schedule" },
    })
    .post("/schedules/:id/resume", async ({ params }) => scheduleJson(await pauseSchedule(service, params.id, false)), {
      params: ScheduleIdParams,
      response: one("The schedule, resumed."),
      detail: {
        operationId: "resumeSchedule",
        tags: ["schedules"],
        summary: "Resume a schedule",
        description: "Fire times that passed while paused are caught up or recorded missed, by its catch_up rule.",
      },
    })
    .post("/schedules/:id/trigger", async ({ params }) => firingJson(await triggerSchedule(service, params.id)), {
      params: ScheduleIdParams,
      response: responses({ 200: answer(FiringJson, "The firing: now, under the overlap policy.") }, [400, 404]),
      detail: { operationId: "triggerSchedule", tags: ["schedules"], summary: "Fire a schedule now" },
    });
}
