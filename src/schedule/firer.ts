// The firing loop of recurring schedules, run by every scheduler and coordinator replica. Each
// pass locks the schedules due within TQ_SCHEDULE_AHEAD_MS (FOR UPDATE SKIP LOCKED: replicas
// share them), plans their fire times (src/schedule/rules.ts), applies the overlap policy, and
// writes each firing's task (scheduled_at = fire_at, so the dispatcher's early hand-over starts
// it at its time) with its schedule_firings row, in one transaction. Exactly one task per fire
// time holds because the firing row and the task are one statement on a unique key; a replica
// killed mid-pass rolls back and another plans the same fire times again.

import { insertFirings, type NewTask } from "../db/insert";
import {
  advanceSchedules,
  claimDueSchedules,
  type DueSchedule,
  type FiringRecord,
  type LiveTask,
  liveScheduleTasks,
  nextScheduleDueIn,
  recordFirings,
  type ScheduleAdvance,
  type ScheduleRow,
} from "../db/schedules";
import type { Sql } from "../db/sql";
import { cancelTask } from "../db/transitions";
import type { Logger } from "../log";
import type { TaskMetrics } from "../metrics/metrics";
import type { TaskDefaults } from "../task/spec";
import { planFirings, type Timing } from "./rules";
import { firingSpec } from "./spec";

/** Schedules one pass locks at most; more due ones wait for the next pass, which follows at once. */
export const SCHEDULES_PER_PASS = 200;
/** How often a schedule with a buffered firing looks whether its live task ended. */
export const BUFFERED_POLL_MS = 100;

export interface FirerOptions {
  sql: Sql;
  log: Logger;
  taskDefaults: TaskDefaults;
  /** How long before its fire time a firing's task is written (TQ_SCHEDULE_AHEAD_MS). */
  aheadMs: number;
  /** Longest sleep between passes: how soon another replica's new schedule or a buffered firing is seen (TQ_SCHEDULE_POLL_MS). */
  pollMs: number;
  /** Counts each due firing by outcome once its pass committed (taskqueue_schedule_firings_total), with a fired one's lateness. */
  metrics?: TaskMetrics;
}

export function timingOf(schedule: ScheduleRow): Timing {
  return schedule.cron !== null
    ? { kind: "cron", cron: schedule.cron, timeZone: schedule.time_zone }
    : { kind: "every", everyMs: schedule.every_ms ?? 1000, anchor: schedule.anchor_at, timeZone: schedule.time_zone };
}

/** What firing did: the tasks created and the firings recorded without one. */
export interface FiringResult {
  created: { scheduleId: string; fireAt: Date; taskId: string }[];
  recorded: FiringRecord[];
  cancelled: string[];
}

/** What a schedule's fire times come to under its overlap policy, before anything is written. */
export interface FiringDecision {
  items: NewTask[];
  recorded: FiringRecord[];
  /** Live tasks to cancel first (cancel_previous). */
  cancelled: { id: string; actor: string }[];
  /** The firing held back (buffer_one) after this, or null. */
  buffered: Date | null;
}

/**
 * Applies a schedule's fire times (oldest first) under its overlap policy, given its live
 * tasks and the firing it holds back (buffer_one); writes nothing.
 */
export function decideFirings(
  schedule: ScheduleRow,
  times: readonly Date[],
  live: readonly LiveTask[],
  defaults: TaskDefaults,
  buffered: Date | null,
  /** Why each fire time that is not on time runs (a catch-up, a trigger): its firing row's reason. */
  reasons: ReadonlyMap<number, string> = new Map(),
): FiringDecision {
  const decision: FiringDecision = { items: [], recorded: [], cancelled: [], buffered };
  const { items, recorded } = decision;
  let liveIds = live.map((task) => task.id);
  const actor = `schedule:${schedule.name}`;
  const create = (fireAt: Date, reason = reasons.get(fireAt.getTime())) => {
    const id = Bun.randomUUIDv7();
    items.push({ id, spec: firingSpec(schedule.template, defaults, schedule.id, fireAt, reason), actor });
    liveIds = [id];
  };
  // A buffered firing runs once nothing is live any more.
  if (decision.buffered !== null && liveIds.length === 0) {
    create(decision.buffered, "buffered until the previous task ended");
    decision.buffered = null;
  }
  for (const fireAt of times) {
    if (liveIds.length === 0 || schedule.overlap === "allow") {
      create(fireAt);
      if (schedule.overlap === "allow") liveIds = [];
      continue;
    }
    switch (schedule.overlap) {
      case "skip":
        recorded.push({ scheduleId: schedule.id, fireAt, outcome: "skipped", reason: `task ${liveIds[0]} still live` });
        break;
      case "buffer_one":
        if (decision.buffered === null) {
          decision.buffered = fireAt;
          recorded.push({ scheduleId: schedule.id, fireAt, outcome: "buffered", reason: `waits for task ${liveIds[0]}` });
        } else {
          recorded.push({
            scheduleId: schedule.id,
            fireAt,
            outcome: "skipped",
            reason: `a firing (${decision.buffered.toISOString()}) is already buffered`,
          });
        }
        break;
      case "cancel_previous":
        for (const id of liveIds) if (!items.some((item) => item.id === id)) decision.cancelled.push({ id, actor });
        // A previous firing of this same pass is not written yet: it is dropped, and recorded skipped.
        for (const dropped of items.filter((item) => liveIds.includes(item.id))) {
          recorded.push({
            scheduleId: schedule.id,
            fireAt: dropped.spec.firing!.fireAt,
            outcome: "skipped",
            reason: "cancelled by a later firing",
          });
        }
        for (let i = items.length - 1; i >= 0; i--) if (liveIds.includes(items[i]!.id)) items.splice(i, 1);
        create(fireAt);
        break;
    }
  }
  return decision;
}

/**
 * Writes decisions, in as few statements as there are kinds of write: the cancels first (so an
 * old process group is told to stop before its successor exists), every task with its firing
 * row in one insertFirings, then every firing without a task. Call in the transaction that holds
 * the schedules' locks.
 */
export async function writeFirings(sql: Sql, decisions: readonly FiringDecision[]): Promise<FiringResult> {
  const result: FiringResult = { created: [], recorded: [], cancelled: [] };
  for (const decision of decisions) {
    for (const { id, actor } of decision.cancelled) {
      await cancelTask(sql, id, actor);
      result.cancelled.push(id);
    }
  }
  const items = decisions.flatMap((decision) => decision.items);
  const rows = await insertFirings(sql, items);
  rows.forEach((row, i) => {
    const firing = items[i]!.spec.firing!;
    if (row) result.created.push({ scheduleId: firing.scheduleId, fireAt: firing.fireAt, taskId: row.id });
  });
  result.recorded = decisions.flatMap((decision) => decision.recorded);
  await recordFirings(sql, result.recorded);
  return result;
}

/** One pass over the due schedules; resolves with how many fire times it handled. */
export async function firePass(
  options: Pick<FirerOptions, "sql" | "log" | "taskDefaults" | "aheadMs" | "metrics">,
): Promise<number> {
  const { sql, log, taskDefaults, aheadMs } = options;
  let handled = 0;
  // What the committed pass did, for the metrics (a pass rolled back counts nothing).
  const passes: { fired: FiringResult; missed: FiringRecord[] }[] = [];
  await sql.begin(async (transaction) => {
    const tx = transaction as unknown as Sql;
    const due: DueSchedule[] = await claimDueSchedules(tx, aheadMs, SCHEDULES_PER_PASS);
    if (due.length === 0) return;
    const live = await liveScheduleTasks(
      tx,
      due.filter((schedule) => schedule.overlap !== "allow" || schedule.buffered_fire_at !== null).map((schedule) => schedule.id),
    );
    const advances: ScheduleAdvance[] = [];
    const decisions: FiringDecision[] = [];
    const missed: FiringRecord[] = [];
    for (const schedule of due) {
      const now = schedule.now;
      const horizon = new Date(now.getTime() + aheadMs);
      const plan =
        schedule.next_fire_at !== null && schedule.next_fire_at.getTime() <= horizon.getTime()
          ? planFirings(
              timingOf(schedule),
              { windowMs: schedule.catch_up_window_ms, mode: schedule.catch_up_mode },
              schedule.next_fire_at,
              now,
              horizon,
            )
          : { run: [], caughtUp: [], missed: [], missedUnrecorded: 0, next: schedule.next_fire_at };
      for (const fireAt of plan.missed) {
        missed.push({
          scheduleId: schedule.id,
          fireAt,
          outcome: "missed",
          reason: `overdue by more than the catch-up rule runs (mode ${schedule.catch_up_mode})`,
        });
      }
      const decision = decideFirings(
        schedule,
        plan.run,
        live.filter((task) => task.schedule_id === schedule.id),
        taskDefaults,
        schedule.buffered_fire_at,
        new Map(plan.caughtUp.map((time) => [time.getTime(), `caught up (mode ${schedule.catch_up_mode})`])),
      );
      decisions.push(decision);
      handled += plan.run.length + plan.missed.length;
      advances.push({
        id: schedule.id,
        nextFireAt: plan.next,
        bufferedFireAt: decision.buffered,
        missedUnrecorded: plan.missedUnrecorded,
      });
    }
    await recordFirings(tx, missed);
    const fired = await writeFirings(tx, decisions);
    await advanceSchedules(tx, advances);
    passes.push({ fired, missed });
    for (const task of fired.created) {
      log.info(
        { event: "schedule.fired", schedule_id: task.scheduleId, fire_at: task.fireAt.toISOString(), task_id: task.taskId },
        "schedule fired",
      );
    }
    for (const record of [...missed, ...fired.recorded]) {
      log.info(
        {
          event: `schedule.${record.outcome}`,
          schedule_id: record.scheduleId,
          fire_at: record.fireAt.toISOString(),
          reason: record.reason,
        },
        `schedule firing ${record.outcome}`,
      );
    }
  });
  const { metrics } = options;
  if (metrics) for (const pass of passes) countFirings(metrics, pass);
  return handled;
}

/** A fired firing's lateness runs from its fire time to its task's commit (0 when written ahead). */
function countFirings(metrics: TaskMetrics, { fired, missed }: { fired: FiringResult; missed: FiringRecord[] }): void {
  const now = Date.now();
  for (const task of fired.created) metrics.scheduleFired("fired", (now - task.fireAt.getTime()) / 1000);
  for (const record of [...missed, ...fired.recorded]) {
    // A buffered firing is not over yet: it is counted fired (or skipped) when its task is written.
    if (record.outcome === "skipped" || record.outcome === "missed") metrics.scheduleFired(record.outcome);
  }
}

/** The loop: a pass, then sleep until the next schedule is due within aheadMs (at most pollMs). */
export class ScheduleFirer {
  private timer: ReturnType<typeof setTimeout> | null = null;
  private busy: Promise<void> | null = null;
  private running = false;
  private again = false;

  constructor(private readonly options: FirerOptions) {}

  start(): void {
    this.running = true;
    this.wake();
  }

  async stop(): Promise<void> {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    await this.busy;
  }

  /** Runs a pass now (after a schedule was created, resumed or changed here). */
  wake(): void {
    if (!this.running) return;
    if (this.busy) {
      this.again = true;
      return;
    }
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.busy = this.pass().finally(() => {
      this.busy = null;
    });
  }

  private async pass(): Promise<void> {
    const { log, pollMs, aheadMs, sql } = this.options;
    let delay = pollMs;
    try {
      const handled = await firePass(this.options);
      const next = await nextScheduleDueIn(sql);
      delay = next.ms === null ? pollMs : next.ms - aheadMs;
      // A buffered firing waits for its live task to end, which no one announces here.
      if (next.buffered) delay = Math.min(delay, BUFFERED_POLL_MS);
      // Nothing handled but something due: another replica holds it; look again shortly.
      if (handled === 0) delay = Math.max(delay, 10);
      delay = Math.min(Math.max(0, delay), pollMs);
    } catch (error) {
      log.warn({ event: "schedule.pass_failed", err: error }, "schedule firing pass failed; retrying");
    }
    if (!this.running) return;
    if (this.again) {
      this.again = false;
      delay = 0;
    }
    this.timer = setTimeout(() => {
      this.timer = null;
      this.wake();
    }, delay);
  }
}
