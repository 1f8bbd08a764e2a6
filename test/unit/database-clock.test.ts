// src/db/clock.ts: the database's time from samples, never ahead of it: the tightest recent
// sample decides, and old samples are dropped.
import { expect, test } from "bun:test";
import { CLOCK_SAMPLE_KEEP_MS, DatabaseClock } from "../../src/db/clock";
import type { Sql } from "../../src/db/sql";

const noSql = null as unknown as Sql;

test("with no sample the clock says nothing; with samples, the one with the largest offset (the shortest return trip) decides", () => {
  const clock = new DatabaseClock(noSql);
  expect(clock.now()).toBeNull();
  const at = performance.now();
  // Read at database time 1_000_000 and answered at `at`: the database is at least that far on.
  clock.record(1_000_000, at);
  // A slower sample (its reading older by the time it took to come back) says less.
  clock.record(1_000_000 - 5, at);
  const now = clock.now();
  expect(now).not.toBeNull();
  expect(now!).toBeGreaterThanOrEqual(1_000_000);
  expect(now!).toBeLessThan(1_000_000 + (performance.now() - at) + 0.001);
});

test("samples older than the keep window are dropped", () => {
  const clock = new DatabaseClock(noSql);
  const at = performance.now();
  clock.record(5_000_000, at - CLOCK_SAMPLE_KEEP_MS - 1000);
  expect(clock.now()).toBeNull();
  clock.record(2_000_000, at);
  expect(clock.now()!).toBeLessThan(2_000_000 + (performance.now() - at) + 0.001);
});

test("toLocal places a database time on the monotonic clock no earlier than the samples allow", () => {
  const clock = new DatabaseClock(null);
  expect(clock.toLocal(1_000_000)).toBeNull();
  const at = performance.now();
  clock.record(1_000_000, at);
  // The database read 1_000_000 no later than `at`: 1_000_500 comes no sooner than at + 500.
  expect(clock.toLocal(1_000_500)).toBeCloseTo(at + 500, 6);
  clock.record(1_000_000 - 3, at);
  expect(clock.toLocal(1_000_500)).toBeCloseTo(at + 500, 6);
});
