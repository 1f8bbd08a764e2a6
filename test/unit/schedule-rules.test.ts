// The pure rules of recurring schedules with a fake clock: every function takes `now`, so DST
// transitions and outages of any length are tested at the instants that matter.
import { describe, expect, test } from "bun:test";
import {
  CATCH_UP_CAP,
  checkCron,
  checkTimeZone,
  formatDuration,
  isRepeatedWallTime,
  nextFireTime,
  nextFireTimes,
  parseDuration,
  planFirings,
  type Timing,
} from "../../src/schedule/rules";
import { toScheduleDefinition } from "../../src/schedule/spec";
import { TaskQueueError } from "../../src/task/errors";

const at = (iso: string) => new Date(iso);
const isos = (dates: Date[]) => dates.map((d) => d.toISOString());
const berlin = (cron: string): Timing => ({ kind: "cron", cron, timeZone: "Europe/Berlin" });
const defaults = { maxAttempts: 3, retry: { backoffBaseMs: 100, backoffCapMs: 1000 } };

function fieldOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (error) {
    if (error instanceof TaskQueueError) return error.field;
    throw error;
  }
  return "(no error)";
}

describe("durations", () => {
  test("read the units and write them back", () => {
    expect(parseDuration("90s", "every")).toBe(90_000);
    expect(parseDuration("5m", "every")).toBe(300_000);
    expect(parseDuration("1h30m", "every")).toBe(5_400_000);
    expect(parseDuration("250ms", "every")).toBe(250);
    expect(formatDuration(5_400_000)).toBe("1h30m");
    expect(formatDuration(90_000)).toBe("1m30s");
  });

  test("refuse what is not a duration, naming the field", () => {
    for (const bad of ["", "5", "5 m", "m5", "1y", "-5s", "1h 30m"])
      expect(fieldOf(() => parseDuration(bad, "every"))).toBe("every");
    expect(fieldOf(() => parseDuration("500ms", "every", 1000))).toBe("every");
  });
});

describe("validation", () => {
  test("cron: 5 or 6 fields or a macro; anything else names cron", () => {
    expect(checkCron("*/5 * * * *")).toBe("*/5 * * * *");
    expect(checkCron("*/1 * * * * *")).toBe("*/1 * * * * *");
    expect(checkCron("@hourly")).toBe("@hourly");
    for (const bad of ["* * * *", "61 * * * *", "* * * * * * *", "@sometimes", "not cron"]) {
      expect(fieldOf(() => checkCron(bad))).toBe("cron");
    }
  });

  test("time zones are IANA names", () => {
    expect(checkTimeZone("America/New_York")).toBe("America/New_York");
    expect(fieldOf(() => checkTimeZone("Mars/Olympus"))).toBe("time_zone");
  });

  test("a definition names the field at fault, the template's under task.", () => {
    const base = { name: "n", cron: "* * * * *", task: { command: "true" } };
    expect(fieldOf(() => toScheduleDefinition({ ...base, cron: "99 * * * *" }, defaults))).toBe("cron");
    expect(fieldOf(() => toScheduleDefinition({ ...base, time_zone: "Nowhere/X" }, defaults))).toBe("time_zone");
    expect(fieldOf(() => toScheduleDefinition({ name: "n", every: "5 minutes", task: { command: "true" } }, defaults))).toBe(
      "every",
    );
    expect(fieldOf(() => toScheduleDefinition({ ...base, every: "5m" }, defaults))).toBe("every");
    expect(fieldOf(() => toScheduleDefinition({ name: "n", task: { command: "true" } }, defaults))).toBe("cron");
    expect(fieldOf(() => toScheduleDefinition({ ...base, task: { command: " " } }, defaults))).toBe("task.command");
    expect(fieldOf(() => toScheduleDefinition({ ...base, catch_up: { window: "soon" } }, defaults))).toBe("catch_up.window");
    const ok = toScheduleDefinition({ ...base, overlap: "skip", catch_up: { window: "2h", mode: "all" } }, defaults);
    expect(ok).toMatchObject({ timeZone: "UTC", overlap: "skip", catchUp: { windowMs: 7_200_000, mode: "all" } });
  });
});

describe("next fire times", () => {
  test("cron with seconds, in UTC", () => {
    const timing: Timing = { kind: "cron", cron: "*/1 * * * * *", timeZone: "UTC" };
    expect(isos(nextFireTimes(timing, at("2026-01-01T00:00:00.500Z"), 3))).toEqual([
      "2026-01-01T00:00:01.000Z",
      "2026-01-01T00:00:02.000Z",
      "2026-01-01T00:00:03.000Z",
    ]);
  });

  test("every counts real time from its anchor", () => {
    const timing: Timing = { kind: "every", everyMs: 90_000, anchor: at("2026-03-29T00:00:00Z"), timeZone: "Europe/Berlin" };
    expect(isos(nextFireTimes(timing, at("2026-03-29T00:00:00Z"), 2))).toEqual([
      "2026-03-29T00:01:30.000Z",
      "2026-03-29T00:03:00.000Z",
    ]);
    // Across the spring-forward gap nothing shifts: intervals are real time.
    expect(nextFireTime(timing, at("2026-03-29T00:59:59Z"))?.toISOString()).toBe("2026-03-29T01:00:00.000Z");
  });

  // Europe/Berlin: 2026-03-29 02:00 CET becomes 03:00 CEST (01:00Z); 2026-10-25 03:00 CEST
  // becomes 02:00 CET (01:00Z), so 02:00-03:00 local happens twice.
  test("a local time skipped by spring-forward fires once, at the first valid instant after", () => {
    expect(isos(nextFireTimes(berlin("30 2 * * *"), at("2026-03-28T12:00:00Z"), 2))).toEqual([
      "2026-03-29T01:00:00.000Z", // 03:00 CEST: the first instant after the missing 02:30
      "2026-03-30T00:30:00.000Z", // 02:30 CEST the next day
    ]);
    // Hourly: 02:00 does not exist, and it is not run twice at 03:00.
    expect(isos(nextFireTimes(berlin("0 * * * *"), at("2026-03-28T23:30:00Z"), 3))).toEqual([
      "2026-03-29T00:00:00.000Z", // 01:00 CET
      "2026-03-29T01:00:00.000Z", // 03:00 CEST
      "2026-03-29T02:00:00.000Z", // 04:00 CEST
    ]);
  });

  test("a local time repeated by fall-back fires once, at its first pass", () => {
    expect(isos(nextFireTimes(berlin("30 2 * * *"), at("2026-10-24T12:00:00Z"), 2))).toEqual([
      "2026-10-25T00:30:00.000Z", // 02:30 CEST; 02:30 CET (01:30Z) does not fire
      "2026-10-26T01:30:00.000Z",
    ]);
    expect(isos(nextFireTimes(berlin("0 * * * *"), at("2026-10-24T23:30:00Z"), 3))).toEqual([
      "2026-10-25T00:00:00.000Z", // 02:00 CEST
      // 02:00 CET (01:00Z) is the same wall time again: skipped.
      "2026-10-25T02:00:00.000Z", // 03:00 CET
      "2026-10-25T03:00:00.000Z",
    ]);
    expect(isRepeatedWallTime(at("2026-10-25T01:00:00Z"), "Europe/Berlin")).toBe(true);
    expect(isRepeatedWallTime(at("2026-10-25T00:00:00Z"), "Europe/Berlin")).toBe(false);
  });

  test("a 30-minute DST shift (Australia/Lord_Howe) is handled by the same rule", () => {
    // 2026-04-05 02:00 LHDT (+11) becomes 01:30 LHST (+10:30): 01:30-02:00 repeats.
    const timing: Timing = { kind: "cron", cron: "45 1 * * *", timeZone: "Australia/Lord_Howe" };
    const [first, second] = nextFireTimes(timing, at("2026-04-04T00:00:00Z"), 2);
    expect(first?.toISOString()).toBe("2026-04-04T14:45:00.000Z"); // 01:45 LHDT
    expect(second?.toISOString()).toBe("2026-04-05T15:15:00.000Z"); // 01:45 LHST the next day
  });
});

describe("catch-up", () => {
  const everySecond: Timing = { kind: "cron", cron: "*/1 * * * * *", timeZone: "UTC" };
  const now = at("2026-01-01T00:00:10.000Z");
  const horizon = at("2026-01-01T00:00:10.500Z");
  // Down from 00:00:05 to 00:00:10: 00:00:05 .. 00:00:08 are overdue (00:00:09 is within the grace).
  const from = at("2026-01-01T00:00:05.000Z");

  test("mode all runs every overdue fire time within the window", () => {
    const plan = planFirings(everySecond, { windowMs: 3_600_000, mode: "all" }, from, now, horizon);
    expect(isos(plan.run)).toEqual([
      "2026-01-01T00:00:05.000Z",
      "2026-01-01T00:00:06.000Z",
      "2026-01-01T00:00:07.000Z",
      "2026-01-01T00:00:08.000Z",
      "2026-01-01T00:00:09.000Z",
      "2026-01-01T00:00:10.000Z",
    ]);
    expect(plan.missed).toEqual([]);
    expect(plan.next?.toISOString()).toBe("2026-01-01T00:00:11.000Z");
  });

  test("mode latest runs the newest overdue one and records the others missed", () => {
    const plan = planFirings(everySecond, { windowMs: 3_600_000, mode: "latest" }, from, now, horizon);
    expect(isos(plan.run)).toEqual(["2026-01-01T00:00:08.000Z", "2026-01-01T00:00:09.000Z", "2026-01-01T00:00:10.000Z"]);
    expect(isos(plan.missed)).toEqual(["2026-01-01T00:00:05.000Z", "2026-01-01T00:00:06.000Z", "2026-01-01T00:00:07.000Z"]);
  });

  test("mode none runs none of them and records each missed", () => {
    const plan = planFirings(everySecond, { windowMs: 3_600_000, mode: "none" }, from, now, horizon);
    expect(isos(plan.run)).toEqual(["2026-01-01T00:00:09.000Z", "2026-01-01T00:00:10.000Z"]);
    expect(plan.missed).toHaveLength(4);
    expect(plan.missedUnrecorded).toBe(0);
  });

  test("the window bounds what is caught up; older ones are missed", () => {
    const plan = planFirings(everySecond, { windowMs: 2500, mode: "all" }, from, now, horizon);
    expect(isos(plan.run).slice(0, 2)).toEqual(["2026-01-01T00:00:08.000Z", "2026-01-01T00:00:09.000Z"]);
    expect(isos(plan.missed)).toEqual(["2026-01-01T00:00:05.000Z", "2026-01-01T00:00:06.000Z", "2026-01-01T00:00:07.000Z"]);
  });

  test("a long outage is capped: at most 100 run, 100 recorded, the rest counted", () => {
    const dayLater = at("2026-01-02T00:00:05.000Z");
    const all = planFirings(everySecond, { windowMs: 86_400_000 * 2, mode: "all" }, from, dayLater, dayLater);
    const overdue = 86_400 - 1; // every second of the day, less the one within the grace
    expect(all.run.length).toBe(CATCH_UP_CAP + 2);
    expect(all.missed.length).toBe(CATCH_UP_CAP);
    expect(all.run.length - 2 + all.missed.length + all.missedUnrecorded).toBe(overdue);
    const every: Timing = { kind: "every", everyMs: 1000, anchor: from, timeZone: "UTC" };
    const year = at("2027-01-01T00:00:05.000Z");
    const long = planFirings(every, { windowMs: 3_600_000, mode: "latest" }, from, year, year);
    expect(long.missed.length).toBe(CATCH_UP_CAP);
    expect(long.run.length).toBe(3);
    expect(long.next?.toISOString()).toBe("2027-01-01T00:00:06.000Z");
  });

  test("nothing overdue: a pass that runs on time plans only the horizon", () => {
    const plan = planFirings(everySecond, { windowMs: 0, mode: "none" }, at("2026-01-01T00:00:10.000Z"), now, horizon);
    expect(isos(plan.run)).toEqual(["2026-01-01T00:00:10.000Z"]);
    expect(plan.missed).toEqual([]);
  });
});
