// The pure rules of recurring schedules: when a schedule fires next (croner for cron patterns,
// plus our daylight-saving rule), and what a pass of the firing loop does with fire times it
// finds overdue (catch-up). No SQL, no clock of its own: every function takes `now`, so the
// rules are tested with any time, DST transitions included.
import { Cron } from "croner";
import { invalidArgument } from "../task/errors";

export const OVERLAP_POLICIES = ["allow", "skip", "buffer_one", "cancel_previous"] as const;
export type OverlapPolicy = (typeof OVERLAP_POLICIES)[number];
export const CATCH_UP_MODES = ["all", "latest", "none"] as const;
export type CatchUpMode = (typeof CATCH_UP_MODES)[number];

/** Most overdue firings one pass runs or records; older ones beyond it are only counted. */
export const CATCH_UP_CAP = 100;
/**
 * A fire time at most this late when the loop reaches it is on time (a busy loop, a slow
 * commit), not a catch-up: it runs whatever the catch-up mode says.
 */
export const ON_TIME_GRACE_MS = 1000;
/** Shortest `every`. */
export const MIN_EVERY_MS = 1000;
/** Longest `every` and catch-up window: a year. */
export const MAX_DURATION_MS = 366 * 86_400_000;

/** When a schedule fires: a cron pattern in a zone, or a fixed interval from an anchor. */
export type Timing =
  | { kind: "cron"; cron: string; timeZone: string }
  | { kind: "every"; everyMs: number; anchor: Date; timeZone: string };

export interface CatchUp {
  windowMs: number;
  mode: CatchUpMode;
}

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** "90s", "5m", "1h30m", "250ms", "2d" to milliseconds; throws invalidArgument naming `field`. */
export function parseDuration(value: string, field: string, minMs = 0): number {
  const parts = [...value.matchAll(/(\d+)(ms|s|m|h|d)/g)];
  if (value === "" || parts.map((p) => p[0]).join("") !== value) {
    throw invalidArgument(
      field,
      `${field} must be a duration such as "90s", "5m", "1h30m" (units ms, s, m, h, d); got ${JSON.stringify(value)}`,
    );
  }
  const ms = parts.reduce((sum, [, n, unit]) => sum + Number(n) * (UNITS[unit as string] ?? 0), 0);
  if (ms < minMs || ms > MAX_DURATION_MS) {
    throw invalidArgument(field, `${field} must be from ${minMs} ms to 366 days; got ${ms} ms`);
  }
  return ms;
}

/** A duration as parseDuration reads it, in its largest exact units ("1h30m"). */
export function formatDuration(ms: number): string {
  if (ms === 0) return "0s";
  let rest = ms;
  let text = "";
  for (const [unit, size] of [
    ["d", 86_400_000],
    ["h", 3_600_000],
    ["m", 60_000],
    ["s", 1000],
    ["ms", 1],
  ] as const) {
    const n = Math.floor(rest / size);
    if (n > 0) text += `${n}${unit}`;
    rest -= n * size;
  }
  return text;
}

/** Throws invalidArgument("time_zone") unless `zone` is an IANA zone this runtime knows. */
export function checkTimeZone(zone: string): string {
  try {
    new Intl.DateTimeFormat("en-US", { timeZone: zone });
  } catch {
    throw invalidArgument(
      "time_zone",
      `time_zone must be an IANA time zone such as "Europe/Berlin"; got ${JSON.stringify(zone)}`,
    );
  }
  // Intl accepts some aliases croner cannot convert with; ask croner too.
  try {
    new Cron("* * * * *", { timezone: zone, paused: true }).nextRun(new Date(0));
  } catch {
    throw invalidArgument("time_zone", `time_zone ${JSON.stringify(zone)} is not usable`);
  }
  return zone;
}

/** Throws invalidArgument("cron") unless croner reads the pattern (5 or 6 fields, or a macro). */
export function checkCron(pattern: string): string {
  const fields = pattern.trim().split(/\s+/);
  if (!pattern.trim().startsWith("@") && (fields.length < 5 || fields.length > 6)) {
    throw invalidArgument("cron", `cron must have 5 fields (6 with seconds) or be a macro such as @hourly; got ${fields.length}`);
  }
  try {
    const cron = new Cron(pattern, { paused: true });
    if (cron.nextRun(new Date(0)) === null) throw new Error("never fires");
  } catch (error) {
    throw invalidArgument("cron", `cron ${JSON.stringify(pattern)} is not valid: ${(error as Error).message}`);
  }
  return pattern;
}

const crons = new Map<string, Cron>();

/** One parsed Cron per pattern and zone (parsing is most of what a next-time costs). */
function cronFor(timing: Extract<Timing, { kind: "cron" }>): Cron {
  const key = `${timing.timeZone}\u0000${timing.cron}`;
  let cron = crons.get(key);
  if (!cron) {
    if (crons.size > 10_000) crons.clear();
    cron = new Cron(timing.cron, { timezone: timing.timeZone, paused: true });
    crons.set(key, cron);
  }
  return cron;
}

const wallFormats = new Map<string, Intl.DateTimeFormat>();

/** The local wall-clock time of `at` in `zone`, to the second. */
function wallTime(at: Date, zone: string): string {
  let format = wallFormats.get(zone);
  if (!format) {
    format = new Intl.DateTimeFormat("en-CA", {
      timeZone: zone,
      hourCycle: "h23",
      year: "numeric",
      month: "2-digit",
      day: "2-digit",
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
    });
    wallFormats.set(zone, format);
  }
  return format.format(at);
}

/** Every shift of a zone's offset there is (DST is an hour almost everywhere; Lord Howe's is 30 minutes). */
const SHIFTS_MS = [30 * 60_000, 60 * 60_000, 120 * 60_000];

/**
 * Whether `at` is the second pass of a wall-clock time that the zone repeats (the hour after
 * clocks go back): the same local time already happened up to two hours earlier.
 */
export function isRepeatedWallTime(at: Date, zone: string): boolean {
  const wall = wallTime(at, zone);
  return SHIFTS_MS.some((shift) => wallTime(new Date(at.getTime() - shift), zone) === wall);
}

/**
 * The first fire time strictly after `after`. Cron follows croner in the zone, and then our
 * rule for daylight saving: a local time skipped when clocks go forward fires once, at the first
 * valid instant after it (croner moves it there; it never fires twice, as the next hour's firing
 * at the same instant is the same fire time); a local time repeated when clocks go back fires
 * once, at its first pass. An `every` interval counts real time from its anchor, so DST does not
 * touch it.
 */
export function nextFireTime(timing: Timing, after: Date): Date | null {
  if (timing.kind === "every") {
    const since = after.getTime() - timing.anchor.getTime();
    const n = since < 0 ? 0 : Math.floor(since / timing.everyMs) + 1;
    return new Date(timing.anchor.getTime() + n * timing.everyMs);
  }
  const cron = cronFor(timing);
  let from = after;
  // A repeated hour has at most 3600 (seconds) candidates to pass over.
  for (let i = 0; i < 10_000; i++) {
    const next = cron.nextRun(from);
    if (next === null) return null;
    if (!isRepeatedWallTime(next, timing.timeZone)) return next;
    from = next;
  }
  return null;
}

/** The next `count` fire times after `after`. */
export function nextFireTimes(timing: Timing, after: Date, count: number): Date[] {
  const times: Date[] = [];
  let from = after;
  while (times.length < count) {
    const next = nextFireTime(timing, from);
    if (next === null) break;
    times.push(next);
    from = next;
  }
  return times;
}

/**
 * Where to start walking the fire times from `from` so that the 2 * CATCH_UP_CAP last ones before
 * `until` are still walked, and how many fire times the jump passes over (for cron, estimated
 * from the spacing of those it keeps: croner cannot count without walking).
 */
function jumpBefore(timing: Timing, from: Date, until: Date): { to: Date; skipped: number } {
  if (timing.kind === "every") {
    const n = Math.floor((until.getTime() - from.getTime()) / timing.everyMs);
    const skip = Math.max(0, n - 2 * CATCH_UP_CAP);
    return { to: new Date(from.getTime() + skip * timing.everyMs), skipped: skip };
  }
  const previous = cronFor(timing).previousRuns(2 * CATCH_UP_CAP, until);
  const oldest = previous.at(-1);
  if (!oldest || oldest.getTime() <= from.getTime() || previous.length < 2 * CATCH_UP_CAP) return { to: from, skipped: 0 };
  const spacing = (until.getTime() - oldest.getTime()) / previous.length;
  return { to: oldest, skipped: Math.max(0, Math.round((oldest.getTime() - from.getTime()) / spacing)) };
}

/** What one pass does with the fire times from a schedule's next_fire_at up to its horizon. */
export interface FiringPlan {
  /** Fire times to run (on time, or caught up), oldest first. */
  run: Date[];
  /** Of those, the overdue ones the catch-up rule runs. */
  caughtUp: Date[];
  /** Fire times not run: recorded as missed, oldest first (at most CATCH_UP_CAP). */
  missed: Date[];
  /** Missed fire times beyond the cap: counted, not recorded. */
  missedUnrecorded: number;
  /** The first fire time after the horizon: the schedule's new next_fire_at. */
  next: Date | null;
}

/**
 * Plans the fire times from `from` (the schedule's next_fire_at, inclusive) up to `horizon`
 * (now plus how early the loop creates a task). A fire time at most ON_TIME_GRACE_MS before
 * `now`, or in the future, is on time and runs. Older ones are overdue (downtime, a pause): those
 * older than the catch-up window are missed; within it, mode `all` runs them (the newest
 * CATCH_UP_CAP), `latest` runs only the newest, `none` runs none. Every overdue fire time not
 * run is missed: recorded (the newest CATCH_UP_CAP), the rest counted, never dropped silently.
 */
export function planFirings(timing: Timing, catchUp: CatchUp, from: Date, now: Date, horizon: Date): FiringPlan {
  const onTimeFrom = now.getTime() - ON_TIME_GRACE_MS;
  const windowFrom = now.getTime() - catchUp.windowMs;
  const overdue: Date[] = [];
  const onTime: Date[] = [];
  let overdueCount = 0;
  let at: Date | null = from;
  // An outage of a year on a per-second schedule is 31 million fire times: jump over the ones
  // that no mode could run or record (all but the newest 2 * CATCH_UP_CAP overdue) instead of
  // walking them all, and count them.
  if (at.getTime() < onTimeFrom) {
    const jump = jumpBefore(timing, at, new Date(onTimeFrom));
    overdueCount += jump.skipped;
    at = jump.to;
  }
  let steps = 0;
  while (at !== null && at.getTime() <= horizon.getTime()) {
    if (at.getTime() >= onTimeFrom) onTime.push(at);
    else {
      overdueCount++;
      overdue.push(at);
      // Keep at least the newest 2 * CATCH_UP_CAP: what any mode can run or record.
      if (overdue.length > CATCH_UP_CAP * 4) overdue.splice(0, CATCH_UP_CAP * 2);
    }
    at = nextFireTime(timing, at);
    if (++steps > 1_000_000) break;
  }
  const inWindow = overdue.filter((time) => time.getTime() >= windowFrom);
  let caughtUp: Date[] = [];
  if (catchUp.mode === "all") caughtUp = inWindow.slice(-CATCH_UP_CAP);
  else if (catchUp.mode === "latest") caughtUp = inWindow.slice(-1);
  const ran = new Set(caughtUp.map((time) => time.getTime()));
  const notRun = overdue.filter((time) => !ran.has(time.getTime()));
  const missed = notRun.slice(-CATCH_UP_CAP);
  return {
    run: [...caughtUp, ...onTime],
    caughtUp,
    missed,
    missedUnrecorded: overdueCount - caughtUp.length - missed.length,
    next: at,
  };
}
