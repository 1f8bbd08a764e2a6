// What the schedules API does, as plain functions: the HTTP controller (src/api/schedules.ts)
// and the gRPC ScheduleService (src/rpc/schedule-service.ts) call these, so both validate and
// answer alike. They throw TaskQueueError for client mistakes.
import { decodeCursor, encodeCursor } from "../api/cursor";
import {
  databaseNow,
  deleteSchedule,
  type FiringRow,
  getFiring,
  getSchedule,
  insertSchedule,
  listFirings,
  listSchedules,
  liveScheduleTasks,
  type ScheduleRow,
  setBuffered,
  setPaused,
  updateSchedule,
} from "../db/schedules";
import type { Sql } from "../db/sql";
import { invalidArgument, notFound } from "../task/errors";
import type { TaskDefaults } from "../task/spec";
import { decideFirings, timingOf, writeFirings } from "./firer";
import { nextFireTime, nextFireTimes } from "./rules";
import { patchDefinition, type ScheduleDefinition, toScheduleDefinition } from "./spec";

export interface ScheduleDeps {
  sql: Sql;
  taskDefaults: TaskDefaults;
  /** Tells this role's firing loop to look now (a schedule was created, changed or resumed). */
  wake?: () => void;
}

/** Firings a schedule's view lists, newest first. */
export const RECENT_FIRINGS = 20;
/** Fire times a schedule's view lists ahead. */
export const UPCOMING_FIRE_TIMES = 5;

/** A schedule with what its view shows besides its row. */
export interface ScheduleView {
  schedule: ScheduleRow;
  upcoming: Date[];
  firings: FiringRow[];
}

export function definitionOf(row: ScheduleRow): ScheduleDefinition {
  return {
    name: row.name,
    cron: row.cron,
    everyMs: row.every_ms,
    timeZone: row.time_zone,
    template: row.template,
    overlap: row.overlap,
    catchUp: { windowMs: row.catch_up_window_ms, mode: row.catch_up_mode },
    paused: row.paused,
  };
}

async function view(deps: ScheduleDeps, schedule: ScheduleRow): Promise<ScheduleView> {
  const from = schedule.next_fire_at ? new Date(schedule.next_fire_at.getTime() - 1) : new Date();
  return {
    schedule,
    upcoming: nextFireTimes(timingOf(schedule), from, UPCOMING_FIRE_TIMES),
    firings: await listFirings(deps.sql, schedule.id, RECENT_FIRINGS),
  };
}

async function found(deps: ScheduleDeps, idOrName: string): Promise<ScheduleRow> {
  const schedule = await getSchedule(deps.sql, idOrName);
  if (!schedule) throw notFound(`no schedule ${JSON.stringify(idOrName)}`);
  return schedule;
}

export async function createSchedule(deps: ScheduleDeps, input: unknown, actor: string | null): Promise<ScheduleView> {
  const definition = toScheduleDefinition(input, deps.taskDefaults);
  const now = await databaseNow(deps.sql);
  const id = Bun.randomUUIDv7();
  const nextFireAt = nextFireTime(
    definition.cron !== null
      ? { kind: "cron", cron: definition.cron, timeZone: definition.timeZone }
      : { kind: "every", everyMs: definition.everyMs!, anchor: now, timeZone: definition.timeZone },
    now,
  );
  const schedule = await insertSchedule(deps.sql, { id, definition, anchorAt: now, nextFireAt, actor });
  deps.wake?.();
  return view(deps, schedule);
}

export async function getScheduleView(deps: ScheduleDeps, idOrName: string): Promise<ScheduleView> {
  return view(deps, await found(deps, idOrName));
}

export async function listSchedulePage(
  deps: ScheduleDeps,
  query: { limit?: number; cursor?: string },
): Promise<{ schedules: ScheduleView[]; nextCursor: string | null }> {
  const limit = query.limit ?? 50;
  if (!Number.isInteger(limit) || limit < 1 || limit > 500)
    throw invalidArgument("limit", "limit must be an integer from 1 to 500");
  const before = query.cursor === undefined ? undefined : decodeCursor(query.cursor);
  const rows = await listSchedules(deps.sql, { limit: limit + 1, before });
  const page = rows.slice(0, limit);
  const last = page.at(-1);
  return {
    schedules: await Promise.all(page.map((row) => view(deps, row))),
    nextCursor: rows.length > limit && last ? encodeCursor(last.id) : null,
  };
}

/**
 * Changes a schedule. A new cron, every or time zone plans again from now: the fire times of the
 * old timing that had not come yet are dropped, not missed.
 */
export async function patchSchedule(deps: ScheduleDeps, idOrName: string, input: unknown): Promise<ScheduleView> {
  const current = await found(deps, idOrName);
  const { definition, retimed } = patchDefinition(definitionOf(current), input, deps.taskDefaults);
  let plan: { nextFireAt: Date | null; anchorAt: Date } | undefined;
  if (retimed) {
    const now = await databaseNow(deps.sql);
    const anchorAt = definition.everyMs !== null && current.every_ms !== definition.everyMs ? now : current.anchor_at;
    const timing = timingOf({
      ...current,
      cron: definition.cron,
      every_ms: definition.everyMs,
      time_zone: definition.timeZone,
      anchor_at: anchorAt,
    });
    plan = { nextFireAt: nextFireTime(timing, now), anchorAt };
  }
  const updated = await updateSchedule(deps.sql, current.id, definition, plan);
  if (!updated) throw notFound(`no schedule ${JSON.stringify(idOrName)}`);
  deps.wake?.();
  return view(deps, updated);
}

export async function removeSchedule(deps: ScheduleDeps, idOrName: string): Promise<void> {
  const current = await found(deps, idOrName);
  if (!(await deleteSchedule(deps.sql, current.id))) throw notFound(`no schedule ${JSON.stringify(idOrName)}`);
}

export async function pauseSchedule(deps: ScheduleDeps, idOrName: string, paused: boolean): Promise<ScheduleView> {
  const current = await found(deps, idOrName);
  const updated = await setPaused(deps.sql, current.id, paused);
  if (!updated) throw notFound(`no schedule ${JSON.stringify(idOrName)}`);
  if (!paused) deps.wake?.();
  return view(deps, updated);
}

/**
 * Fires a schedule now (by the database's clock), under its overlap policy, whether paused or
 * not; the fire time is recorded like any other. Resolves with the firing.
 */
export async function triggerSchedule(deps: ScheduleDeps, idOrName: string): Promise<FiringRow> {
  const current = await found(deps, idOrName);
  return deps.sql.begin(async (transaction) => {
    const tx = transaction as unknown as Sql;
    // Locked, so that a pass of the loop does not fire it meanwhile with a stale view of its live tasks.
    const schedule = await getSchedule(tx, current.id, true);
    if (!schedule) throw notFound(`no schedule ${JSON.stringify(idOrName)}`);
    const fireAt = await databaseNow(tx);
    const live = await liveScheduleTasks(tx, [schedule.id]);
    const decision = decideFirings(
      schedule,
      [fireAt],
      live,
      deps.taskDefaults,
      schedule.buffered_fire_at,
      new Map([[fireAt.getTime(), "triggered"]]),
    );
    await writeFirings(tx, [decision]);
    await setBuffered(tx, schedule.id, decision.buffered);
    const firing = await getFiring(tx, schedule.id, fireAt);
    if (!firing) throw new Error("a triggered firing left no row");
    return firing;
  });
}
