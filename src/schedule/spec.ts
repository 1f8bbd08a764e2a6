// What a client may ask of a recurring schedule, and the one place that validates it. The task
// template is the run-now task form (SubmitInput, src/task/spec.ts), checked by toTaskSpec at
// creation and built again at each firing, so every task option flows into a schedule unchanged.
import { type Static, type TLiteral, Type } from "@sinclair/typebox";
import { invalidArgument } from "../task/errors";
import { checkSchema } from "../task/explain";
import { SubmitInput, type TaskDefaults, toTaskSpec } from "../task/spec";
import type { TaskSpec } from "../task/task";
import {
  CATCH_UP_MODES,
  type CatchUp,
  type CatchUpMode,
  checkCron,
  checkTimeZone,
  MIN_EVERY_MS,
  OVERLAP_POLICIES,
  type OverlapPolicy,
  parseDuration,
} from "./rules";

export const MAX_SCHEDULE_NAME_BYTES = 200;

/** One literal schema per value, as a tuple: Elysia infers nothing useful from a plain array. */
type Literals<T extends readonly string[]> = { -readonly [K in keyof T]: TLiteral<T[K]> };
export function literals<const T extends readonly string[]>(values: T): Literals<T> {
  return values.map((value) => Type.Literal(value)) as unknown as Literals<T>;
}

const Name = Type.String({
  minLength: 1,
  maxLength: MAX_SCHEDULE_NAME_BYTES,
  pattern: "^[A-Za-z0-9][A-Za-z0-9._:-]*$",
  description: "Unique name: letters, digits and . _ : - (starting with a letter or digit), at most 200 characters.",
  examples: ["nightly-report"],
});
const CronField = Type.String({
  minLength: 1,
  maxLength: 200,
  description:
    "Cron pattern (croner): 5 fields (minute hour day month weekday), or 6 with seconds first, or a macro " +
    "(@yearly, @monthly, @weekly, @daily, @hourly). Exactly one of cron and every.",
  examples: ["*/5 * * * *"],
});
const Every = Type.String({
  minLength: 2,
  maxLength: 40,
  description:
    'Fixed interval ("90s", "5m", "1h30m"; at least 1s), counted from the schedule\'s creation. Exactly one of cron and every.',
  examples: ["90s"],
});
const TimeZone = Type.String({
  minLength: 1,
  maxLength: 64,
  description: "IANA time zone the cron pattern is read in. Defaults to UTC.",
  examples: ["Europe/Berlin"],
});
export const OverlapJson = Type.Union(literals(OVERLAP_POLICIES), {
  description:
    "When a fire time comes while the previous firing's task is still live: allow (run it anyway), skip (record it " +
    "skipped), buffer_one (hold one firing back until the live task ends; more are skipped), cancel_previous (cancel " +
    "the live task, whose process group is killed, and run). Defaults to allow.",
});
export const CatchUpJson = Type.Object(
  {
    window: Type.Optional(
      Type.String({ maxLength: 40, description: 'How far back overdue fire times are caught up ("1h"). Defaults to 1h.' }),
    ),
    mode: Type.Optional(
      Type.Union(literals(CATCH_UP_MODES), {
        description:
          "Fire times overdue after downtime or a pause: all (run each within the window, at most 100), latest (run " +
          "the newest), none (run none). Every one not run is recorded missed. Defaults to latest.",
      }),
    ),
  },
  { additionalProperties: false, description: "What to do with fire times that passed while nothing could fire them." },
);

const strict = { additionalProperties: false } as const;

/** `POST /schedules`, gRPC CreateSchedule. */
export const ScheduleCreateInput = Type.Object(
  {
    name: Name,
    cron: Type.Optional(CronField),
    every: Type.Optional(Every),
    time_zone: Type.Optional(TimeZone),
    task: SubmitInput,
    overlap: Type.Optional(OverlapJson),
    catch_up: Type.Optional(CatchUpJson),
    paused: Type.Optional(Type.Boolean({ description: "Create it paused. Defaults to false." })),
  },
  { ...strict, description: "A recurring schedule: when it fires, and the task each firing creates." },
);
export type ScheduleCreateInput = Static<typeof ScheduleCreateInput>;

/** `PATCH /schedules/:id`: any field of the create form but the name; what is left out stays. */
export const SchedulePatchInput = Type.Object(
  {
    cron: Type.Optional(CronField),
    every: Type.Optional(Every),
    time_zone: Type.Optional(TimeZone),
    task: Type.Optional(SubmitInput),
    overlap: Type.Optional(OverlapJson),
    catch_up: Type.Optional(CatchUpJson),
  },
  { ...strict, description: "Changes to a schedule; a new cron or every replaces the other and plans from now." },
);
export type SchedulePatchInput = Static<typeof SchedulePatchInput>;

/** A validated schedule definition, as stored. */
export interface ScheduleDefinition {
  name: string;
  cron: string | null;
  everyMs: number | null;
  timeZone: string;
  /** The task form as sent (validated): built into a TaskSpec at each firing. */
  template: Record<string, unknown>;
  overlap: OverlapPolicy;
  catchUp: CatchUp;
  paused: boolean;
}

export const DEFAULT_CATCH_UP: CatchUp = { windowMs: 3_600_000, mode: "latest" };

function timing(body: { cron?: string; every?: string; time_zone?: string }, required: boolean) {
  if (body.cron !== undefined && body.every !== undefined) throw invalidArgument("every", "send cron or every, not both");
  if (required && body.cron === undefined && body.every === undefined) {
    throw invalidArgument("cron", 'one of cron ("*/5 * * * *") or every ("90s") is required');
  }
  return {
    cron: body.cron === undefined ? undefined : checkCron(body.cron),
    everyMs: body.every === undefined ? undefined : parseDuration(body.every, "every", MIN_EVERY_MS),
    timeZone: body.time_zone === undefined ? undefined : checkTimeZone(body.time_zone),
  };
}

function catchUp(body: Static<typeof CatchUpJson> | undefined, base: CatchUp): CatchUp {
  if (body === undefined) return base;
  return {
    windowMs: body.window === undefined ? base.windowMs : parseDuration(body.window, "catch_up.window"),
    mode: (body.mode ?? base.mode) as CatchUpMode,
  };
}

/** Checks the template as a submit would; errors name the field under `task.`. */
export function checkTemplate(template: unknown, defaults: TaskDefaults): Record<string, unknown> {
  try {
    toTaskSpec(template, defaults);
  } catch (error) {
    const field = (error as { field?: string }).field;
    if (field !== undefined) throw invalidArgument(`task.${field}`, `task: ${(error as Error).message}`);
    throw error;
  }
  return template as Record<string, unknown>;
}

/** Validates a create request; throws invalidArgument naming the field. */
export function toScheduleDefinition(input: unknown, defaults: TaskDefaults): ScheduleDefinition {
  const body = checkSchema(ScheduleCreateInput, input);
  const when = timing(body, true);
  return {
    name: body.name,
    cron: when.cron ?? null,
    everyMs: when.everyMs ?? null,
    timeZone: when.timeZone ?? "UTC",
    template: checkTemplate(body.task, defaults),
    overlap: body.overlap ?? "allow",
    catchUp: catchUp(body.catch_up, DEFAULT_CATCH_UP),
    paused: body.paused ?? false,
  };
}

/** Validates a patch against the stored definition; returns the new definition and whether the timing changed. */
export function patchDefinition(
  current: ScheduleDefinition,
  input: unknown,
  defaults: TaskDefaults,
): { definition: ScheduleDefinition; retimed: boolean } {
  const body = checkSchema(SchedulePatchInput, input);
  const when = timing(body, false);
  const retimed = when.cron !== undefined || when.everyMs !== undefined || when.timeZone !== undefined;
  const definition: ScheduleDefinition = {
    ...current,
    ...(when.cron !== undefined ? { cron: when.cron, everyMs: null } : {}),
    ...(when.everyMs !== undefined ? { everyMs: when.everyMs, cron: null } : {}),
    ...(when.timeZone !== undefined ? { timeZone: when.timeZone } : {}),
    ...(body.task !== undefined ? { template: checkTemplate(body.task, defaults) } : {}),
    ...(body.overlap !== undefined ? { overlap: body.overlap } : {}),
    catchUp: catchUp(body.catch_up, current.catchUp),
  };
  return { definition, retimed };
}

/** The task a firing creates: the template, due at the fire time, marked with its schedule. */
export function firingSpec(
  template: unknown,
  defaults: TaskDefaults,
  scheduleId: string,
  fireAt: Date,
  reason?: string,
): TaskSpec {
  return {
    ...toTaskSpec(template, defaults),
    scheduledAt: fireAt,
    firing: { scheduleId, fireAt, ...(reason ? { reason } : {}) },
  };
}
