// The schedules and schedule_firings tables. A firing's task is written by insertFirings
// (src/db/insert.ts), in the same statement as its schedule_firings row; everything else about
// schedules is here: their rows, the firing loop's claim (FOR UPDATE SKIP LOCKED, so replicas
// share the due schedules and never plan one twice at once), and the firings without a task
// (missed, skipped, buffered).
import type { CatchUpMode, OverlapPolicy } from "../schedule/rules";
import type { ScheduleDefinition } from "../schedule/spec";
import { TaskQueueError } from "../task/errors";
import type { TaskState } from "../task/state";
import { GUARDS } from "../task/state";
import { states, unnest } from "./encode";
import type { Sql } from "./sql";

export interface ScheduleRow {
  id: string;
  name: string;
  cron: string | null;
  every_ms: number | null;
  time_zone: string;
  template: Record<string, unknown>;
  overlap: OverlapPolicy;
  catch_up_window_ms: number;
  catch_up_mode: CatchUpMode;
  paused: boolean;
  anchor_at: Date;
  next_fire_at: Date | null;
  buffered_fire_at: Date | null;
  missed_unrecorded: number;
  actor: string | null;
  created_at: Date;
  updated_at: Date;
}

export const FIRING_OUTCOMES = ["created", "skipped", "missed", "buffered"] as const;
export type FiringOutcome = (typeof FIRING_OUTCOMES)[number];

export interface FiringRow {
  schedule_id: string;
  fire_at: Date;
  outcome: FiringOutcome;
  task_id: string | null;
  reason: string | null;
  recorded_at: Date;
}

const COLUMNS = `id, name, cron, every_ms::float8 AS every_ms, time_zone, template, overlap,
  catch_up_window_ms::float8 AS catch_up_window_ms, catch_up_mode, paused, anchor_at, next_fire_at,
  buffered_fire_at, missed_unrecorded::float8 AS missed_unrecorded, actor, created_at, updated_at`;

function columns(sql: Sql) {
  return sql.unsafe(COLUMNS) as unknown as ReturnType<Sql["unsafe"]>;
}

function isUniqueViolation(error: unknown): boolean {
  return (error as { code?: string })?.code === "23505";
}

/** The database's clock, for a schedule's anchor and first plan. */
export async function databaseNow(sql: Sql): Promise<Date> {
  const [row] = await sql<{ now: Date }[]>`SELECT date_trunc('milliseconds', clock_timestamp()) AS now`;
  return row!.now;
}

/** Inserts a schedule; a taken name is a conflict. */
export async function insertSchedule(
  sql: Sql,
  row: { id: string; definition: ScheduleDefinition; anchorAt: Date; nextFireAt: Date | null; actor: string | null },
): Promise<ScheduleRow> {
  const d = row.definition;
  try {
    const [created] = await sql<ScheduleRow[]>`
      INSERT INTO schedules (id, name, cron, every_ms, time_zone, template, overlap, catch_up_window_ms, catch_up_mode,
                             paused, anchor_at, next_fire_at, actor)
      VALUES (${row.id}, ${d.name}, ${d.cron}, ${d.everyMs}, ${d.timeZone}, ${sql.json(d.template as never)}, ${d.overlap},
              ${d.catchUp.windowMs}, ${d.catchUp.mode}, ${d.paused}, ${row.anchorAt}, ${row.nextFireAt}, ${row.actor})
      RETURNING ${columns(sql)}`;
    return created!;
  } catch (error) {
    if (isUniqueViolation(error))
      throw new TaskQueueError("conflict", `a schedule named ${JSON.stringify(d.name)} exists`, "name");
    throw error;
  }
}

/** A schedule by id (a UUID) or by name. */
export async function getSchedule(sql: Sql, idOrName: string, lock = false): Promise<ScheduleRow | null> {
  const byId = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(idOrName);
  const rows = await sql<ScheduleRow[]>`
    SELECT ${columns(sql)} FROM schedules WHERE ${byId ? sql`id = ${idOrName}` : sql`name = ${idOrName}`}
    ${lock ? sql`FOR UPDATE` : sql``}`;
  return rows[0] ?? null;
}

/** Newest first; one more row than asked tells the caller whether a next page exists. */
export async function listSchedules(sql: Sql, query: { limit: number; before?: string }): Promise<ScheduleRow[]> {
  return sql<ScheduleRow[]>`
    SELECT ${columns(sql)} FROM schedules
    WHERE true ${query.before ? sql`AND id < ${query.before}` : sql``}
    ORDER BY id DESC LIMIT ${query.limit}`;
}

/** Replaces a schedule's definition; `nextFireAt` undefined keeps its plan. */
export async function updateSchedule(
  sql: Sql,
  id: string,
  d: ScheduleDefinition,
  plan: { nextFireAt: Date | null; anchorAt: Date } | undefined,
): Promise<ScheduleRow | null> {
  const rows = await sql<ScheduleRow[]>`
    UPDATE schedules SET cron = ${d.cron}, every_ms = ${d.everyMs}, time_zone = ${d.timeZone},
      template = ${sql.json(d.template as never)}, overlap = ${d.overlap}, catch_up_window_ms = ${d.catchUp.windowMs},
      catch_up_mode = ${d.catchUp.mode}, updated_at = clock_timestamp()
      ${plan ? sql`, next_fire_at = ${plan.nextFireAt}, anchor_at = ${plan.anchorAt}` : sql``}
    WHERE id = ${id}
    RETURNING ${columns(sql)}`;
  return rows[0] ?? null;
}

export async function deleteSchedule(sql: Sql, id: string): Promise<boolean> {
  const rows = await sql`DELETE FROM schedules WHERE id = ${id} RETURNING id`;
  return rows.length > 0;
}

/**
 * Pauses or resumes. A resumed schedule keeps the next_fire_at it had: the fire times that
 * passed while paused are overdue at the next pass, which catches them up (or records them
 * missed) by the schedule's catch-up rule.
 */
export async function setPaused(sql: Sql, id: string, paused: boolean): Promise<ScheduleRow | null> {
  const rows = await sql<ScheduleRow[]>`
    UPDATE schedules SET paused = ${paused}, updated_at = clock_timestamp() WHERE id = ${id}
    RETURNING ${columns(sql)}`;
  return rows[0] ?? null;
}

/** A schedule's firings, newest first. */
export async function listFirings(sql: Sql, scheduleId: string, limit: number): Promise<FiringRow[]> {
  return sql<FiringRow[]>`
    SELECT schedule_id, fire_at, outcome, task_id, reason, recorded_at FROM schedule_firings
    WHERE schedule_id = ${scheduleId} ORDER BY fire_at DESC LIMIT ${limit}`;
}

/** One firing of a schedule. */
export async function getFiring(sql: Sql, scheduleId: string, fireAt: Date): Promise<FiringRow | null> {
  const rows = await sql<FiringRow[]>`
    SELECT schedule_id, fire_at, outcome, task_id, reason, recorded_at FROM schedule_firings
    WHERE schedule_id = ${scheduleId} AND fire_at = ${fireAt}`;
  return rows[0] ?? null;
}

/** Sets (or clears) the firing a buffer_one schedule holds back. */
export async function setBuffered(sql: Sql, id: string, fireAt: Date | null): Promise<void> {
  await sql`UPDATE schedules SET buffered_fire_at = ${fireAt} WHERE id = ${id}`;
}

/** A claimed schedule, with the database's clock at the claim. */
export type DueSchedule = ScheduleRow & { now: Date };

/**
 * Locks up to `limit` unpaused schedules with a fire time due within `aheadMs` (or a buffered
 * firing waiting for its live task to end), skipping those another replica holds. Call in a
 * transaction: the locks last until it ends, and a replica killed meanwhile releases them.
 */
export async function claimDueSchedules(sql: Sql, aheadMs: number, limit: number): Promise<DueSchedule[]> {
  return sql<DueSchedule[]>`
    SELECT ${columns(sql)}, clock_timestamp() AS now FROM schedules
    WHERE NOT paused
      AND (next_fire_at <= clock_timestamp() + make_interval(secs => ${aheadMs / 1000}) OR buffered_fire_at IS NOT NULL)
    ORDER BY next_fire_at
    LIMIT ${limit}
    FOR UPDATE SKIP LOCKED`;
}

/**
 * Milliseconds until the earliest unpaused schedule's next fire time (0 if due; null when there
 * is none), and whether any holds a buffered firing.
 */
export async function nextScheduleDueIn(sql: Sql): Promise<{ ms: number | null; buffered: boolean }> {
  // Clamped here: greatest(0, NULL) is 0 in SQL, which with no schedule at all read as "one
  // due now" and ran the firing loop every 10 ms on an idle system.
  const [row] = await sql<{ ms: number | null; buffered: boolean | null }[]>`
    SELECT (extract(epoch FROM min(next_fire_at) - clock_timestamp()) * 1000)::float8 AS ms,
           bool_or(buffered_fire_at IS NOT NULL) AS buffered
    FROM schedules WHERE NOT paused`;
  const ms = row?.ms ?? null;
  return { ms: ms === null ? null : Math.max(0, ms), buffered: row?.buffered ?? false };
}

export interface LiveTask {
  id: string;
  schedule_id: string;
  state: TaskState;
}

/** The live (queued or in flight) tasks of these schedules, oldest first. */
export async function liveScheduleTasks(sql: Sql, scheduleIds: readonly string[]): Promise<LiveTask[]> {
  if (scheduleIds.length === 0) return [];
  return sql<LiveTask[]>`
    SELECT id, schedule_id, state FROM tasks
    WHERE schedule_id = ANY(${scheduleIds}::uuid[]) AND state IN (${states(sql, GUARDS.cancel)})
    ORDER BY id`;
}

export interface FiringRecord {
  scheduleId: string;
  fireAt: Date;
  outcome: Exclude<FiringOutcome, "created">;
  reason: string;
}

/** Records firings without a task; a fire time already recorded stays as it was. */
export async function recordFirings(sql: Sql, records: readonly FiringRecord[]): Promise<void> {
  if (records.length === 0) return;
  await sql`
    INSERT INTO schedule_firings (schedule_id, fire_at, outcome, reason)
    SELECT r.schedule_id, r.fire_at, r.outcome, r.reason FROM ${unnest(sql, records, {
      schedule_id: ["uuid", (r) => r.scheduleId],
      fire_at: ["timestamptz", (r) => r.fireAt],
      outcome: ["text", (r) => r.outcome],
      reason: ["text", (r) => r.reason],
    })}
    ON CONFLICT (schedule_id, fire_at) DO NOTHING`;
}

export interface ScheduleAdvance {
  id: string;
  nextFireAt: Date | null;
  bufferedFireAt: Date | null;
  missedUnrecorded: number;
}

/** Moves claimed schedules' plans on, in one statement. */
export async function advanceSchedules(sql: Sql, advances: readonly ScheduleAdvance[]): Promise<void> {
  if (advances.length === 0) return;
  await sql`
    UPDATE schedules s SET next_fire_at = r.next_fire_at, buffered_fire_at = r.buffered_fire_at,
      missed_unrecorded = s.missed_unrecorded + r.missed_unrecorded
    FROM ${unnest(sql, advances, {
      id: ["uuid", (a) => a.id],
      next_fire_at: ["timestamptz", (a) => a.nextFireAt],
      buffered_fire_at: ["timestamptz", (a) => a.bufferedFireAt],
      missed_unrecorded: ["bigint", (a) => a.missedUnrecorded],
    })}
    WHERE s.id = r.id`;
}
