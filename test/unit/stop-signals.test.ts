// The stop-signal policy on its own, with a clock the test moves: repeated SIGTERMs and the
// copies of one interrupt change nothing; a later interrupt stops at once. The "armed" notice
// is a timer of the window's length, on Bun's fake timers here: each test runs them out, so
// none is left armed when it ends.
import { afterEach, beforeEach, expect, jest, test } from "bun:test";
import { type StopSignal, StopSignals } from "../../src/stop-signals";

beforeEach(() => {
  jest.useFakeTimers();
});
afterEach(() => {
  jest.runOnlyPendingTimers();
  jest.useRealTimers();
});

function recorder(windowMs = 500) {
  const calls: string[] = [];
  let now = 0;
  let armed!: () => void;
  const armedOnce = new Promise<void>((resolve) => (armed = resolve));
  const signals = new StopSignals(
    {
      stop: (signal: StopSignal) => calls.push(`stop ${signal}`),
      again: (signal: StopSignal) => calls.push(`again ${signal}`),
      armed: () => {
        calls.push("armed");
        armed();
      },
      now: () => calls.push("now"),
    },
    windowMs,
    () => now,
  );
  return { calls, signals, armedOnce, at: (ms: number) => (now = ms) };
}

test("SIGTERM, however often, stops once and never stops now", () => {
  const { calls, signals, at } = recorder();
  signals.receive("SIGTERM");
  at(1);
  signals.receive("SIGTERM");
  at(10_000);
  signals.receive("SIGTERM");
  expect(calls).toEqual(["stop SIGTERM", "again SIGTERM", "again SIGTERM"]);
});

test("copies of one interrupt are one; an interrupt after the window stops now", () => {
  const { calls, signals, at } = recorder();
  signals.receive("SIGINT");
  at(3);
  signals.receive("SIGINT");
  at(499);
  signals.receive("SIGINT");
  expect(calls).toEqual(["stop SIGINT", "again SIGINT", "again SIGINT"]);
  at(500);
  signals.receive("SIGINT");
  expect(calls.at(-1)).toBe("now");
});

test("an interrupt during a SIGTERM drain is the first interrupt; the next one stops now", () => {
  const { calls, signals, at } = recorder();
  signals.receive("SIGTERM");
  at(100);
  signals.receive("SIGINT");
  at(700);
  signals.receive("SIGINT");
  expect(calls).toEqual(["stop SIGTERM", "again SIGINT", "now"]);
});

test("the first interrupt arms the second once the window has passed, not before", async () => {
  const { calls, signals, armedOnce } = recorder(20);
  signals.receive("SIGINT");
  expect(calls).toEqual(["stop SIGINT"]);
  jest.advanceTimersByTime(19);
  expect(calls).toEqual(["stop SIGINT"]);
  jest.advanceTimersByTime(1);
  await armedOnce;
  expect(calls).toEqual(["stop SIGINT", "armed"]);
});
