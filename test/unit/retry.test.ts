import { describe, expect, test } from "bun:test";
import {
  backoffMs,
  decideFinish,
  decideLost,
  type FinishDecision,
  finalError,
  mayRetry,
  type RetryFacts,
} from "../../src/task/retry";
import { attemptResult } from "../support/factories";

const facts = (over: Partial<RetryFacts> = {}): RetryFacts => ({
  attempt: 1,
  interruptions: 0,
  max_attempts: 3,
  retry_on_failure: true,
  retry_on_timeout: true,
  retry_on_lost: true,
  retry_backoff_base_ms: 1000,
  retry_backoff_cap_ms: 60_000,
  ...over,
});

const finishedAt = new Date("2030-01-01T00:00:01.500Z");
const failed = attemptResult({ state: "failed", exitCode: 127, error: null, finishedAt });
const timedOut = attemptResult({
  state: "timed_out",
  exitCode: null,
  signal: "SIGTERM",
  error: "timed out after 50 ms",
  finishedAt,
});
/** A random() that always answers `value`. */
const fixed = (value: number) => () => value;

describe("decideFinish", () => {
  test("a success is final whatever the task: completed_at is its finish, the error its own", () => {
    const result = attemptResult({ finishedAt, error: null });
    const decision: FinishDecision = {
      state: "succeeded",
      retryInMs: null,
      completedAt: finishedAt,
      failedAt: null,
      error: null,
      eventKind: "succeeded",
    };
    expect(decideFinish(result, null)).toEqual(decision);
    // Even on the last attempt of a task that retries nothing.
    expect(decideFinish(result, facts({ attempt: 3, retry_on_failure: false }))).toEqual(decision);
    expect(mayRetry(result)).toBe(false);
  });

  test("a failure with attempts left goes back to the queue after the backoff, keeping its own error", () => {
    const result = { ...failed, error: "cwd /nope does not exist" };
    expect(decideFinish(result, facts({ attempt: 2 }), fixed(0))).toEqual({
      state: "queued",
      retryInMs: 1000, // base * 2^(2-1), times 0.5
      completedAt: null,
      failedAt: null,
      error: "cwd /nope does not exist",
      eventKind: "retrying",
    });
    expect(mayRetry(failed)).toBe(true);
  });

  test("a failure on the last attempt is final and says it exhausted them", () => {
    expect(decideFinish(failed, facts({ attempt: 3 }), fixed(0))).toEqual({
      state: "failed",
      retryInMs: null,
      completedAt: null,
      failedAt: finishedAt,
      error: "exhausted 3 attempts: last exit code 127",
      eventKind: "failed",
    });
    expect(decideFinish(failed, facts({ attempt: 1, max_attempts: 1 }))?.error).toBe("exhausted 1 attempt: last exit code 127");
  });

  test("a failure the policy does not retry is final at once, attempts left or not", () => {
    for (const attempt of [1, 3]) {
      expect(decideFinish(failed, facts({ attempt, retry_on_failure: false }))).toMatchObject({
        state: "failed",
        retryInMs: null,
        failedAt: finishedAt,
        error: "exit code 127; the task does not retry failures",
        eventKind: "failed",
      });
    }
    // The timeout flag does not govern failures.
    expect(decideFinish(failed, facts({ retry_on_timeout: false }), fixed(0)).state).toBe("queued");
  });

  test("a timeout follows its own flag and ends in timed_out", () => {
    expect(decideFinish(timedOut, facts(), fixed(0))).toMatchObject({ state: "queued", retryInMs: 500, eventKind: "retrying" });
    expect(decideFinish(timedOut, facts({ attempt: 3 }))).toMatchObject({
      state: "timed_out",
      failedAt: finishedAt,
      error: "exhausted 3 attempts: last timed out after 50 ms",
      eventKind: "timed_out",
    });
    expect(decideFinish(timedOut, facts({ retry_on_timeout: false }))).toMatchObject({
      state: "timed_out",
      error: "timed out after 50 ms; the task does not retry timeouts",
    });
    // The failure flag does not govern timeouts.
    expect(decideFinish(timedOut, facts({ retry_on_failure: false }), fixed(0)).state).toBe("queued");
  });

  test("a signal and a command that could not start are named in the final error", () => {
    const last = facts({ attempt: 3 });
    expect(decideFinish({ ...failed, exitCode: null, signal: "SIGKILL" }, last).error).toBe(
      "exhausted 3 attempts: last signal SIGKILL",
    );
    expect(decideFinish({ ...failed, exitCode: null, error: "no such cwd" }, last).error).toBe(
      "exhausted 3 attempts: last could not start: no such cwd",
    );
  });

  test("a result that may be retried needs its task", () => {
    expect(() => decideFinish(failed, null)).toThrow(/needs its task/);
    expect(() => decideFinish(timedOut, null)).toThrow(/needs its task/);
  });
});

describe("decideLost", () => {
  test("a lost attempt with attempts left is requeued at once, keeping the task's error", () => {
    expect(decideLost(facts({ attempt: 2 }), "worker lost", "lost")).toEqual({
      state: "queued",
      error: null,
      eventKind: "requeued",
      interrupted: false,
    });
  });

  test("with no attempt left it fails with the reason", () => {
    expect(decideLost(facts({ attempt: 3 }), "worker lost", "lost")).toEqual({
      state: "failed",
      error: "exhausted 3 attempts: last worker lost",
      eventKind: "failed",
      interrupted: false,
    });
  });

  test("a policy that does not retry a lost worker fails it at once", () => {
    expect(decideLost(facts({ retry_on_lost: false }), "worker lost (lease expired)", "lost")).toEqual({
      state: "failed",
      error: "worker lost (lease expired); the task does not retry a lost worker",
      eventKind: "failed",
      interrupted: false,
    });
    // The other flags do not govern a loss.
    expect(decideLost(facts({ retry_on_failure: false, retry_on_timeout: false }), "gone", "lost").state).toBe("queued");
  });

  test("an interrupted attempt is requeued even as the last one, and says it was interrupted", () => {
    expect(decideLost(facts({ attempt: 1, max_attempts: 1 }), "the worker is draining", "interrupted")).toEqual({
      state: "queued",
      error: null,
      eventKind: "requeued",
      interrupted: true,
    });
    // The policy still decides whether an ending without a result is retried at all.
    expect(decideLost(facts({ retry_on_lost: false }), "the worker is draining", "interrupted")).toMatchObject({
      state: "failed",
      interrupted: true,
    });
  });

  test("interrupted attempts do not count: a loss after them still has attempts left", () => {
    // Attempt 3 of max 2, one of the earlier two interrupted: this is the second that counts.
    expect(decideLost(facts({ attempt: 3, interruptions: 1, max_attempts: 2 }), "worker lost", "lost").state).toBe("failed");
    expect(decideLost(facts({ attempt: 3, interruptions: 2, max_attempts: 2 }), "worker lost", "lost").state).toBe("queued");
  });
});

describe("counted attempts in decideFinish", () => {
  test("a failure after an interruption is retried while the counted attempts are below max_attempts", () => {
    expect(decideFinish(failed, facts({ attempt: 2, interruptions: 1, max_attempts: 2 })).state).toBe("queued");
    expect(decideFinish(failed, facts({ attempt: 3, interruptions: 1, max_attempts: 2 })).state).toBe("failed");
  });

  test("the backoff grows with the counted attempts only", () => {
    const fixedHalf = () => 0;
    expect(backoffMs(facts({ attempt: 3, interruptions: 2 }), fixedHalf)).toBe(500);
    expect(backoffMs(facts({ attempt: 3, interruptions: 0 }), fixedHalf)).toBe(2000);
  });
});

describe("backoffMs", () => {
  test("doubles per attempt from the base, within [0.5, 1) of it", () => {
    const at = (attempt: number, random: number) => backoffMs(facts({ attempt }), fixed(random));
    expect([1, 2, 3, 4].map((n) => at(n, 0))).toEqual([500, 1000, 2000, 4000]);
    // random() is below 1, so the factor never reaches 1.
    const high = 1 - Number.EPSILON;
    for (const n of [1, 2, 3, 4]) {
      expect(at(n, high)).toBeLessThan(1000 * 2 ** (n - 1));
      expect(at(n, high)).toBeGreaterThan(0.999 * 1000 * 2 ** (n - 1));
    }
    expect(at(1, 0.5)).toBe(750);
  });

  test("stops at the cap, and the exponent at 30", () => {
    expect(backoffMs(facts({ attempt: 10 }), fixed(0))).toBe(30_000); // min(60 s, 512 s) * 0.5
    const uncapped = facts({ attempt: 100, retry_backoff_base_ms: 1, retry_backoff_cap_ms: Number.MAX_SAFE_INTEGER });
    expect(backoffMs(uncapped, fixed(0))).toBe(2 ** 30 / 2);
  });

  test("a zero base or cap retries at once", () => {
    expect(backoffMs(facts({ retry_backoff_base_ms: 0 }), fixed(0.9))).toBe(0);
    expect(backoffMs(facts({ retry_backoff_cap_ms: 0, attempt: 5 }), fixed(0.9))).toBe(0);
  });

  test("uses Math.random by default, within its bounds", () => {
    for (let i = 0; i < 100; i++) {
      const ms = backoffMs(facts({ attempt: 2 }));
      expect(ms).toBeGreaterThanOrEqual(1000);
      expect(ms).toBeLessThan(2000);
    }
  });
});

test("finalError says why no attempt follows", () => {
  expect(finalError({ max_attempts: 2 }, "exit code 1", true, "failures")).toBe("exhausted 2 attempts: last exit code 1");
  expect(finalError({ max_attempts: 1 }, "exit code 1", true, "failures")).toBe("exhausted 1 attempt: last exit code 1");
  expect(finalError({ max_attempts: 5 }, "worker lost", false, "a lost worker")).toBe(
    "worker lost; the task does not retry a lost worker",
  );
});
