import { describe, expect, test } from "bun:test";
import { TaskQueueError } from "../../src/task/errors";
import {
  type Bucket,
  describeWait,
  expandSchedule,
  formatRate,
  nextTokenInMs,
  parseRate,
  refill,
  take,
  toConcurrencySpec,
  toRateLimitRef,
} from "../../src/task/flow";

describe("parseRate", () => {
  test("reads count/period with units", () => {
    expect(parseRate("100/1m")).toEqual({ count: 100, periodMs: 60_000 });
    expect(parseRate("10/s")).toEqual({ count: 10, periodMs: 1000 });
    expect(parseRate("5/500ms")).toEqual({ count: 5, periodMs: 500 });
    expect(parseRate("3/2h")).toEqual({ count: 3, periodMs: 7_200_000 });
  });
  test("refuses what is not a rate, naming the field", () => {
    for (const bad of ["100", "0/s", "1/0s", "1/w", "-1/s", "1.5/s", "a/s"]) {
      expect(() => parseRate(bad), bad).toThrow(TaskQueueError);
    }
    try {
      parseRate("x", "rate");
    } catch (error) {
      expect((error as TaskQueueError).field).toBe("rate");
    }
  });
  test("formats back in the largest whole unit", () => {
    expect(formatRate({ count: 100, periodMs: 60_000 })).toBe("100/m");
    expect(formatRate({ count: 5, periodMs: 500 })).toBe("5/500ms");
    expect(formatRate({ count: 1, periodMs: 90_000 })).toBe("1/90s");
  });
});

describe("the token bucket, on a fake clock", () => {
  const rate = { count: 10, periodMs: 1000 };
  const burst = 5;

  test("10/s with burst 5 admits 5 at once, then one every 100 ms: 55 over 5 s", () => {
    let bucket: Bucket = { tokens: burst, atMs: 0 };
    const admittedAt: number[] = [];
    // A claim every millisecond, each wanting as many as it can get.
    for (let now = 0; now <= 5000; now++) {
      bucket = refill(bucket, rate, burst, now);
      const taken = take(bucket, 100);
      bucket = taken.bucket;
      for (let i = 0; i < taken.admitted; i++) admittedAt.push(now);
    }
    expect(admittedAt.filter((t) => t === 0)).toHaveLength(5);
    expect(admittedAt).toHaveLength(55);
    const gaps = admittedAt.slice(5).map((t, i) => t - (admittedAt[i + 4] ?? 0));
    expect(gaps.every((gap) => gap === 100)).toBe(true);
  });

  test("refill never goes past the burst, and never runs backwards", () => {
    const full = refill({ tokens: 4, atMs: 0 }, rate, burst, 60_000);
    expect(full.tokens).toBe(burst);
    // A claim whose clock is behind the stored time adds nothing and keeps the later time.
    expect(refill({ tokens: 1, atMs: 1000 }, rate, burst, 900)).toEqual({ tokens: 1, atMs: 1000 });
  });

  test("the next token's time", () => {
    expect(nextTokenInMs({ tokens: 0.5, atMs: 0 }, rate)).toBe(50);
    expect(nextTokenInMs({ tokens: 1, atMs: 0 }, rate)).toBe(0);
    expect(nextTokenInMs({ tokens: 0, atMs: 0 }, { count: 100, periodMs: 60_000 })).toBe(600);
  });
});

describe("keys and templates", () => {
  test("concurrency defaults: max 1, queue", () => {
    expect(toConcurrencySpec({ key: "k" })).toEqual({ key: "k", max: 1, strategy: "queue" });
  });
  test("{schedule} is kept for creation and filled in then", () => {
    const spec = toConcurrencySpec({ key: "nightly-{schedule}" });
    expect(spec.key).toBe("nightly-{schedule}");
    expect(expandSchedule(spec.key, "s1")).toBe("nightly-s1");
    expect(() => expandSchedule(spec.key, null)).toThrow();
  });
  test("a bucket's {key} is the concurrency key", () => {
    expect(toRateLimitRef("smtp:{key}", "c42")).toEqual({ name: "smtp", key: "c42" });
    expect(toRateLimitRef("smtp")).toEqual({ name: "smtp", key: "" });
    expect(() => toRateLimitRef("smtp:{key}")).toThrow(/concurrency key/);
    expect(() => toConcurrencySpec({ key: "{user}" })).toThrow(/unknown placeholder/);
  });
  test("waiting reasons in words", () => {
    expect(describeWait({ kind: "rate_limit", name: "smtp", key: "", nextInMs: 420 })).toBe(
      "waiting: rate limit smtp, next slot in 420 ms",
    );
    expect(describeWait({ kind: "concurrency", key: "k", live: 2, max: 2 })).toBe("waiting: concurrency key k full (2/2 live)");
  });
});
