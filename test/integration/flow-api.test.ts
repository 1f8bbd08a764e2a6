// Flow control through the HTTP API: the rate limits' routes, the submit checks (400s naming
// the field), the concurrency strategies and the waiting reasons in task views.
import { beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { claimDue } from "../../src/db/claim";
import { recordAttemptStopped } from "../../src/db/transitions";
import { upsertWorker } from "../../src/db/workers";
import { useApiApp } from "../support/api";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const api = useApiApp(db);
const call = api.call;

beforeEach(async () => {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, workers, concurrency_keys, rate_limits, rate_buckets CASCADE`;
});

function expectError(answer: { status: number; json: any }, status: number, field: string, message?: RegExp) {
  expect(answer.status).toBe(status);
  expect(answer.json.error.field).toBe(field);
  if (message) expect(answer.json.error.message).toMatch(message);
}

describe("/rate-limits", () => {
  test("create, read, list, change and delete", async () => {
    const created = await call("POST", "/rate-limits", { name: "smtp", rate: "100/1m", burst: 10 });
    expect(created.status).toBe(201);
    expect(created.headers.get("location")).toBe("/rate-limits/smtp");
    expect(created.json).toMatchObject({ name: "smtp", rate: "100/m", burst: 10 });
    expect(created.json.tokens_per_second).toBeCloseTo(100 / 60, 6);
    expect((await call("GET", "/rate-limits/smtp")).json).toMatchObject({ name: "smtp", burst: 10 });
    expect((await call("GET", "/rate-limits")).json.rate_limits.map((l: { name: string }) => l.name)).toEqual(["smtp"]);
    const changed = await call("PATCH", "/rate-limits/smtp", { rate: "5/s" });
    expect(changed.json).toMatchObject({ rate: "5/s", burst: 10 });
    expect((await call("DELETE", "/rate-limits/smtp")).status).toBe(200);
    expect((await call("GET", "/rate-limits/smtp")).status).toBe(404);
  });

  test("burst defaults to the rate's count; a taken name is a 409", async () => {
    expect((await call("POST", "/rate-limits", { name: "api", rate: "7/s" })).json.burst).toBe(7);
    expect((await call("POST", "/rate-limits", { name: "api", rate: "7/s" })).status).toBe(409);
  });

  const bad: [string, unknown, string, RegExp?][] = [
    ["a rate without a unit", { name: "x", rate: "100" }, "rate", /100\/1m/],
    ["a zero count", { name: "x", rate: "0/s" }, "rate", /at least 1/],
    ["an unknown unit", { name: "x", rate: "5/w" }, "rate"],
    ["a bad name", { name: "no spaces", rate: "1/s" }, "name"],
    ["a zero burst", { name: "x", rate: "1/s", burst: 0 }, "burst"],
    ["an unknown field", { name: "x", rate: "1/s", tokens: 3 }, "tokens"],
  ];
  for (const [what, body, field, message] of bad) {
    test(`POST refuses ${what} with a 400 naming ${field}`, async () => {
      expectError(await call("POST", "/rate-limits", body), 400, field, message);
    });
  }

  test("PATCH refuses an empty change, and a bad rate; unknown names are 404", async () => {
    await call("POST", "/rate-limits", { name: "api", rate: "1/s" });
    expect((await call("PATCH", "/rate-limits/api", {})).status).toBe(400);
    expectError(await call("PATCH", "/rate-limits/api", { rate: "fast" }), 400, "rate");
    expect((await call("PATCH", "/rate-limits/nope", { burst: 2 })).status).toBe(404);
    expect((await call("DELETE", "/rate-limits/nope")).status).toBe(404);
  });
});

describe("submit checks", () => {
  const bad: [string, unknown, string, RegExp?][] = [
    ["an unknown rate limit", { command: "x", rate_limit: "nope" }, "rate_limit", /no rate limit named nope/],
    ["a bad rate limit name", { command: "x", rate_limit: "a b" }, "rate_limit"],
    ["an empty bucket", { command: "x", rate_limit: "smtp:" }, "rate_limit", /empty/],
    ["{key} without a key", { command: "x", rate_limit: "smtp:{key}" }, "rate_limit", /concurrency key/],
    ["{schedule} outside a schedule", { command: "x", concurrency: { key: "{schedule}" } }, "concurrency.key", /schedule/],
    ["an unknown placeholder", { command: "x", concurrency: { key: "{user}" } }, "concurrency.key", /unknown placeholder/],
    ["a zero max", { command: "x", concurrency: { key: "k", max: 0 } }, "concurrency.max"],
    ["an unknown strategy", { command: "x", concurrency: { key: "k", strategy: "drop" } }, "concurrency.strategy"],
    ["an empty key", { command: "x", concurrency: { key: "" } }, "concurrency.key"],
  ];
  for (const [what, body, field, message] of bad) {
    test(`POST /tasks refuses ${what} with a 400 naming ${field}`, async () => {
      await call("POST", "/rate-limits", { name: "smtp", rate: "1/s" });
      expectError(await call("POST", "/tasks", body), 400, field, message);
      expect(await db.sql`SELECT id FROM tasks`).toHaveLength(0);
    });
  }

  test("a batch names the task at fault", async () => {
    const answer = await call("POST", "/tasks/batch", { tasks: [{ command: "x" }, { command: "y", rate_limit: "nope" }] });
    expectError(answer, 400, "tasks[1].rate_limit");
  });

  test("{key} in a bucket is the concurrency key", async () => {
    await call("POST", "/rate-limits", { name: "smtp", rate: "1/s" });
    const answer = await call("POST", "/tasks", { command: "x", concurrency: { key: "c42", max: 3 }, rate_limit: "smtp:{key}" });
    expect(answer.status).toBe(201);
    expect(answer.json).toMatchObject({ concurrency: { key: "c42", max: 3, strategy: "queue" }, rate_limit: "smtp:c42" });
  });
});

describe("strategies and waiting reasons", () => {
  // A live worker, so that routing's "no worker" is not the first reason a task waits for.
  beforeEach(async () => {
    await upsertWorker(db.sql, { id: "w1", name: "w1", coordinatorId: "c1", slots: 4, labels: {}, version: "1" });
  });

  const keyed = (strategy: string) => ({ command: "x", concurrency: { key: "k", max: 1, strategy } });

  test("queue: the second waits, saying its key is full", async () => {
    await call("POST", "/tasks", keyed("queue"));
    await claimDue(db.sql, "c1", ["w1", "w1"], 60_000);
    const second = await call("POST", "/tasks", keyed("queue"));
    expect(second.json.state).toBe("queued");
    const view = await call("GET", `/tasks/${second.json.id}`);
    expect(view.json.waiting).toEqual({ kind: "key_full", message: "waiting: concurrency key k full (1/1 live)" });
  });

  test("cancel_newest: the new one ends cancelled at submit, with the reason", async () => {
    await call("POST", "/tasks", keyed("cancel_newest"));
    await claimDue(db.sql, "c1", ["w1"], 60_000);
    const second = await call("POST", "/tasks", keyed("cancel_newest"));
    expect(second.status).toBe(201);
    expect(second.json.state).toBe("cancelled");
    expect(second.json.error).toMatch(/concurrency key k was full.*cancel_newest/);
    // A key with room takes the next one.
    const other = await call("POST", "/tasks", {
      ...keyed("cancel_newest"),
      concurrency: { key: "other", strategy: "cancel_newest" },
    });
    expect(other.json.state).toBe("queued");
  });

  test("cancel_in_progress: the oldest live one is cancelled, and the new one is claimed once its process is gone", async () => {
    const first = await call("POST", "/tasks", keyed("cancel_in_progress"));
    const [live] = await claimDue(db.sql, "c1", ["w1"], 60_000);
    const second = await call("POST", "/tasks", keyed("cancel_in_progress"));
    expect(second.json.state).toBe("queued");
    expect((await call("GET", `/tasks/${first.json.id}`)).json.state).toBe("cancelled");
    // Its process may still run until the worker reports it stopped: the key stays full.
    expect(await claimDue(db.sql, "c1", ["w2"], 60_000)).toHaveLength(0);
    expect((await call("GET", `/tasks/${second.json.id}`)).json.waiting.kind).toBe("key_full");
    await recordAttemptStopped(db.sql, { taskId: live!.id, attempt: live!.attempt, workerId: "w1" }, "cancelled");
    const claimed = await claimDue(db.sql, "c1", ["w1"], 60_000);
    expect(claimed.map((t) => t.id)).toEqual([second.json.id]);
  });

  test("a task held back by a rate limit says when its next slot comes", async () => {
    await call("POST", "/rate-limits", { name: "smtp", rate: "1/1m", burst: 1 });
    await call("POST", "/tasks", { command: "x", rate_limit: "smtp" });
    await claimDue(db.sql, "c1", ["w1"], 60_000);
    const held = await call("POST", "/tasks", { command: "x", rate_limit: "smtp" });
    expect(await claimDue(db.sql, "c1", ["w1"], 60_000)).toHaveLength(0);
    const view = await call("GET", `/tasks/${held.json.id}`);
    expect(view.json.waiting.kind).toBe("rate_limit");
    const [, ms] = /^waiting: rate limit smtp, next slot in (\d+) ms$/.exec(view.json.waiting.message) ?? [];
    expect(Number(ms)).toBeGreaterThan(50_000);
    expect(Number(ms)).toBeLessThanOrEqual(60_000);
  });
});
