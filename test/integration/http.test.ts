import { afterAll, beforeAll, beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import pino from "pino";
import type { ApiDeps } from "../../src/api/deps";
import { createApp } from "../../src/api/index";
import { HTTP_ERROR_CODES } from "../../src/api/model";
import { apiSettings, loadConfig } from "../../src/config";
import { claimDue } from "../../src/db/claim";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { connect, type Sql } from "../../src/db/sql";
import { getTask } from "../../src/db/tasks";
import { cancelTask, finishAttempt } from "../../src/db/transitions";
import { markWorkerGone, upsertWorker } from "../../src/db/workers";
import { silentLogger } from "../../src/log";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { attemptResult, createTask, newTaskId, openAuth, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let feed: TaskChangeFeed;
let app: ReturnType<typeof createApp>;

function depsFor(sql: Sql, over: Partial<ApiDeps> = {}): ApiDeps {
  return {
    role: "scheduler",
    settings: apiSettings(loadConfig({})),
    sql,
    feed: new TaskChangeFeed(sql),
    log: silentLogger,
    auth: openAuth,
    submit: (id, spec) => insertTask(sql, id, spec),
    ...over,
  };
}

beforeAll(async () => {
  feed = new TaskChangeFeed(db.sql);
  await feed.start();
  app = createApp(depsFor(db.sql, { feed }));
});

afterAll(async () => {
  await feed.stop();
});

beforeEach(async () => {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers, task_batches`;
});

interface Answer {
  status: number;
  headers: Headers;
  text: string;
  // Tests read whatever shape the route documents.
  json: any;
}

interface CallOptions {
  body?: string | ReadableStream<Uint8Array>;
  headers?: Record<string, string>;
  /** Defaults to the shared app. */
  on?: { handle(request: Request): Promise<Response> };
}

/** One request through app.handle. No route may ever answer 500. */
async function call(method: string, path: string, options: CallOptions = {}): Promise<Answer> {
  const headers = { "content-type": "application/json", ...options.headers };
  const request = new Request(`http://localhost${path}`, { method, body: options.body, headers });
  const response = await (options.on ?? app).handle(request);
  const text = await response.text();
  expect(response.status).not.toBe(500);
  let json: unknown = null;
  if (response.headers.get("content-type")?.startsWith("application/json")) json = JSON.parse(text);
  return { status: response.status, headers: response.headers, text, json };
}

const post = (path: string, body: unknown, options: CallOptions = {}) =>
  call("POST", path, { ...options, body: typeof body === "string" ? body : JSON.stringify(body) });

/** A 4xx JSON error naming `field`, with the code and a message matching `message`. */
function expectError(answer: Answer, status: number, code: string, field: string | undefined, message?: RegExp) {
  expect(answer.status).toBe(status);
  expect(answer.json.error.code).toBe(code);
  expect(answer.json.error.field).toBe(field);
  expect(typeof answer.json.error.message).toBe("string");
  if (message) expect(answer.json.error.message).toMatch(message);
}

const TASK_KEYS = [
  "attempt",
  "cancelled_at",
  "command",
  "completed_at",
  "coordinator_id",
  "created_at",
  "cwd",
  "env",
  "error",
  "exit_code",
  "failed_at",
  "id",
  "idempotency_key",
  "interruptions",
  "lease_ms",
  "lease_expires_at",
  "limits",
  "max_attempts",
  "picked_at",
  "prefer",
  "priority",
  "queue",
  "require",
  "retry",
  "run_at",
  "schedule_timeout_ms",
  "schedule_id",
  "fire_at",
  "scheduled_at",
  "secret_env_keys",
  "signal",
  "started_at",
  "state",
  "stderr",
  "stderr_replaced",
  "stderr_truncated",
  "stdout",
  "stdout_replaced",
  "stdout_truncated",
  "timeout_ms",
  "waiting",
  "worker_id",
  "ref",
  "on_parent_failure",
  // Flow control.
  "concurrency",
  "rate_limit",
].sort();

/** What GET /tasks/:id adds to the task (its dependencies, what it waits for). */
const GET_ONLY_KEYS = new Set(["parents", "children"]);

const STATUS_KEYS = [
  "task_id",
  "command",
  "state",
  "scheduled_at",
  "run_at",
  "picked_at",
  "started_at",
  "completed_at",
  "failed_at",
  "created_at",
  "cancelled_at",
  "attempt",
  "exit_code",
  "error",
].sort();

const ISO_MS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

function expectTaskJson(json: any) {
  expect(
    Object.keys(json)
      .filter((key) => !GET_ONLY_KEYS.has(key))
      .sort(),
  ).toEqual(TASK_KEYS);
  expect(json.scheduled_at).toMatch(ISO_MS);
  expect(json.created_at).toMatch(ISO_MS);
}

const success = attemptResult({ stdout: "done\n" });

describe("POST /schedule (seed)", () => {
  test("the seed's curl request, JSON sent as x-www-form-urlencoded, is accepted with 200", async () => {
    const answer = await post("/schedule", '{"command":"your_task_command", "scheduled_at":"2023-04-01T15:04:05Z"}', {
      headers: { "content-type": "application/x-www-form-urlencoded" },
    });
    expect(answer.status).toBe(200);
    expect(Object.keys(answer.json).sort()).toEqual(["command", "scheduled_at", "task_id"]);
    expect(answer.json).toMatchObject({ command: "your_task_command", scheduled_at: "2023-04-01T15:04:05.000Z" });
    const row = await getTask(db.sql, answer.json.task_id);
    expect(row?.state).toBe("queued");
    expect(row?.scheduled_at.toISOString()).toBe("2023-04-01T15:04:05.000Z");
  });

  test("a body with no Content-Type at all is read as JSON too", async () => {
    const request = new Request("http://localhost/schedule", {
      method: "POST",
      body: new TextEncoder().encode('{"command":"x","scheduled_at":"2023-04-01T15:04:05Z"}'),
    });
    expect(request.headers.get("content-type")).toBeNull();
    const response = await app.handle(request);
    expect(response.status).toBe(200);
  });

  test("scheduled_at is echoed normalized to UTC; the legacy schedule_at is accepted", async () => {
    const offset = await post("/schedule", { command: "x", scheduled_at: "2030-06-01T12:00:00.5+02:00" });
    expect(offset.status).toBe(200);
    expect(offset.json.scheduled_at).toBe("2030-06-01T10:00:00.500Z");
    const legacy = await post("/schedule", { command: "x", schedule_at: "2030-06-01T12:00:00Z" });
    expect(legacy.status).toBe(200);
    expect(legacy.json.scheduled_at).toBe("2030-06-01T12:00:00.000Z");
  });

  test("scheduled_at is required and checked", async () => {
    expectError(await post("/schedule", { command: "x" }), 400, "invalid_argument", "scheduled_at", /required/);
    expectError(
      await post("/schedule", { command: "x", scheduled_at: "2023-04-01T15:04:05" }),
      400,
      "invalid_argument",
      "scheduled_at",
      /time zone/,
    );
    expectError(
      await post("/schedule", { command: "x", schedule_at: "2023-02-30T00:00:00Z" }),
      400,
      "invalid_argument",
      "schedule_at",
      /calendar date/,
    );
    expectError(await post("/schedule", { scheduled_at: "2023-04-01T15:04:05Z" }), 400, "invalid_argument", "command");
  });
});

describe("GET /status (seed)", () => {
  test("answers the seed's shape", async () => {
    const scheduled = await post("/schedule", { command: "echo hi", scheduled_at: "2023-04-01T15:04:05Z" });
    const answer = await call("GET", `/status?task_id=${scheduled.json.task_id}`);
    expect(answer.status).toBe(200);
    expect(Object.keys(answer.json).sort()).toEqual(STATUS_KEYS);
    expect(answer.json).toMatchObject({
      task_id: scheduled.json.task_id,
      command: "echo hi",
      state: "queued",
      scheduled_at: "2023-04-01T15:04:05.000Z",
      run_at: "2023-04-01T15:04:05.000Z",
      picked_at: null,
      completed_at: null,
      attempt: 0,
      exit_code: null,
    });
    expect(answer.json.created_at).toMatch(ISO_MS);
  });

  test("shows what happened to the task", async () => {
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 1 }));
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, { ...success, state: "failed", exitCode: 2 });
    const answer = await call("GET", `/status?task_id=${task.id}`);
    expect(answer.json).toMatchObject({
      state: "failed",
      attempt: 1,
      exit_code: 2,
      completed_at: null,
      error: "exhausted 1 attempt: last exit code 2",
    });
    expect(answer.json.picked_at).toMatch(ISO_MS);
    expect(answer.json.failed_at).toMatch(ISO_MS);
  });

  test("missing, malformed and unknown ids", async () => {
    expectError(await call("GET", "/status"), 400, "invalid_argument", "task_id", /required/);
    expectError(await call("GET", "/status?task_id=nope"), 400, "invalid_argument", "task_id", /UUID/);
    expectError(await call("GET", `/status?task_id=${newTaskId()}`), 404, "not_found", undefined, /not found/);
  });
});

describe("POST /submit and POST /tasks", () => {
  test("/submit runs a command now: 201 with the task", async () => {
    const before = Date.now();
    const answer = await post("/submit", { command: "echo now" });
    expect(answer.status).toBe(201);
    expectTaskJson(answer.json);
    expect(answer.json).toMatchObject({
      command: "echo now",
      state: "queued",
      attempt: 0,
      max_attempts: 3,
      timeout_ms: 0,
      env: {},
      cwd: null,
      picked_at: null,
    });
    // Due at once: no later than its creation, by the database's clock.
    expect(Date.parse(answer.json.scheduled_at)).toBeLessThanOrEqual(Date.parse(answer.json.created_at));
    expect(Date.parse(answer.json.created_at)).toBeGreaterThan(before - 60_000);
    expect((await getTask(db.sql, answer.json.id))?.command).toBe("echo now");
  });

  test("/submit takes the optional fields but not scheduled_at", async () => {
    const answer = await post("/submit", { command: "env", timeout_ms: 500, max_attempts: 1, env: { A: "b" }, cwd: "/tmp" });
    expect(answer.status).toBe(201);
    expect(answer.json).toMatchObject({ timeout_ms: 500, max_attempts: 1, env: { A: "b" }, cwd: "/tmp" });
    expectError(
      await post("/submit", { command: "x", scheduled_at: "2030-01-01T00:00:00Z" }),
      400,
      "invalid_argument",
      "scheduled_at",
    );
  });

  test("/tasks takes the full form and GET /tasks/:id returns the same task", async () => {
    const created = await post("/tasks", {
      command: "sleep 1",
      scheduled_at: "2031-01-01T00:00:00-05:00",
      timeout_ms: 60_000,
      max_attempts: 5,
      env: { GREETING: "hello world" },
      cwd: "/var/tmp",
    });
    expect(created.status).toBe(201);
    expectTaskJson(created.json);
    expect(created.json).toMatchObject({
      command: "sleep 1",
      state: "queued",
      scheduled_at: "2031-01-01T05:00:00.000Z",
      timeout_ms: 60_000,
      max_attempts: 5,
      env: { GREETING: "hello world" },
      cwd: "/var/tmp",
    });
    const fetched = await call("GET", `/tasks/${created.json.id}`);
    expect(fetched.status).toBe(200);
    // A read also says what the queued task waits for (here: no worker at all); a submit's answer does not look.
    expect(fetched.json.waiting).toEqual({ kind: "no_worker", message: "no worker serves queue default" });
    expect({ ...fetched.json, waiting: null }).toEqual({ ...created.json, parents: [], children: [] });
  });

  const bad: [string, string, number, string, string | undefined, RegExp?][] = [
    ["malformed JSON", '{"command": "x",', 400, "invalid_json", "body", /not valid JSON/],
    ["an empty body", "", 400, "invalid_json", "body", /empty/],
    ["a JSON array", "[]", 400, "invalid_argument", "body", /JSON object/],
    ["JSON null", "null", 400, "invalid_argument", "body", /JSON object/],
    ["a missing command", "{}", 400, "invalid_argument", "command", /required/],
    ["a numeric command", '{"command": 42}', 400, "invalid_argument", "command", /string/],
    ["an empty command", '{"command": ""}', 400, "invalid_argument", "command", /non-empty/],
    ["a blank command", '{"command": "   "}', 400, "invalid_argument", "command", /blank/],
    ["a NUL in the command", '{"command": "echo a\\u0000b"}', 400, "invalid_argument", "command", /NUL/],
    [
      "an unparseable scheduled_at",
      '{"command": "x", "scheduled_at": "next tuesday"}',
      400,
      "invalid_argument",
      "scheduled_at",
      /RFC 3339/,
    ],
    [
      "a scheduled_at without zone",
      '{"command": "x", "scheduled_at": "2023-04-01T15:04:05"}',
      400,
      "invalid_argument",
      "scheduled_at",
      /time zone/,
    ],
    [
      "an impossible date",
      '{"command": "x", "scheduled_at": "2023-02-30T15:04:05Z"}',
      400,
      "invalid_argument",
      "scheduled_at",
      /calendar/,
    ],
    [
      "the year 0000",
      '{"command": "x", "scheduled_at": "0000-12-31T23:59:59Z"}',
      400,
      "invalid_argument",
      "scheduled_at",
      /from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z/,
    ],
    [
      "a backoff cap below its base",
      '{"command": "x", "retry": {"backoff_base_ms": 5000, "backoff_cap_ms": 1000}}',
      400,
      "invalid_argument",
      "retry.backoff_cap_ms",
      /backoff_cap_ms \(1000\) must be at least retry.backoff_base_ms \(5000\)/,
    ],
    [
      "a command over 64 KiB in UTF-8 bytes, though under 65536 characters",
      JSON.stringify({ command: "é".repeat(40_000) }),
      400,
      "invalid_argument",
      "command",
      /at most 65536 bytes \(UTF-8\); it has 80000/,
    ],
    [
      "a cwd over 4096 bytes",
      JSON.stringify({ command: "x", cwd: `/${"€".repeat(2000)}` }),
      400,
      "invalid_argument",
      "cwd",
      /at most 4096 bytes/,
    ],
    [
      "a secret_env value over 32 KiB in bytes",
      JSON.stringify({ command: "x", secret_env: { K: "😀".repeat(9000) } }),
      400,
      "invalid_argument",
      "secret_env.K",
      /at most 32768 bytes/,
    ],
    ["a numeric scheduled_at", '{"command": "x", "scheduled_at": 1680361445}', 400, "invalid_argument", "scheduled_at", /string/],
    ["a string timeout", '{"command": "x", "timeout_ms": "10"}', 400, "invalid_argument", "timeout_ms", /integer/],
    ["a fractional timeout", '{"command": "x", "timeout_ms": 2.5}', 400, "invalid_argument", "timeout_ms", /integer/],
    ["a negative timeout", '{"command": "x", "timeout_ms": -1}', 400, "invalid_argument", "timeout_ms", /from 0/],
    ["zero attempts", '{"command": "x", "max_attempts": 0}', 400, "invalid_argument", "max_attempts", /from 1 to 100/],
    ["a bad env name", '{"command": "x", "env": {"MY-VAR": "1"}}', 400, "invalid_argument", "env", /MY-VAR/],
    ["a numeric env value", '{"command": "x", "env": {"A": 1}}', 400, "invalid_argument", "env.A", /string/],
    ["a NUL in an env value", '{"command": "x", "env": {"A": "\\u0000"}}', 400, "invalid_argument", "env.A", /NUL/],
    ["a relative cwd", '{"command": "x", "cwd": "tmp"}', 400, "invalid_argument", "cwd", /absolute/],
    ["a NUL in cwd", '{"command": "x", "cwd": "/tmp/\\u0000"}', 400, "invalid_argument", "cwd", /NUL/],
    ["an unknown field", '{"command": "x", "colour": 5}', 400, "invalid_argument", "colour", /not a known field/],
  ];

  for (const [name, body, status, code, field, message] of bad) {
    test(`POST /tasks refuses ${name}`, async () => {
      expectError(await post("/tasks", body), status, code, field, message);
    });
  }

  test("invalid UTF-8 is refused as invalid_json", async () => {
    const body = new Uint8Array([0x7b, 0x22, 0xff, 0x22, 0x7d]);
    const response = await app.handle(new Request("http://localhost/tasks", { method: "POST", body }));
    expect(response.status).toBe(400);
    expect(((await response.json()) as any).error).toMatchObject({ code: "invalid_json", field: "body" });
  });

  test("nothing refused reaches the database", async () => {
    for (const [, body] of bad) await post("/tasks", body);
    const rows = await db.sql`SELECT id FROM tasks`;
    expect(rows.length).toBe(0);
  });
});

describe("body size limit", () => {
  // The smallest limit the configuration allows, to probe both sides of it.
  const limit = 1024;
  let small: ReturnType<typeof createApp>;
  beforeAll(() => {
    small = createApp(depsFor(db.sql, { feed, settings: apiSettings(loadConfig({ TQ_MAX_BODY_BYTES: String(limit) })) }));
  });
  const bodyOf = (size: number) => {
    const body = JSON.stringify({ command: "x".repeat(size - '{"command":""}'.length) });
    expect(body.length).toBe(size);
    return body;
  };

  test("a body of exactly the limit is accepted, one byte more is 413", async () => {
    expect((await post("/tasks", bodyOf(limit), { on: small })).status).toBe(201);
    expectError(await post("/tasks", bodyOf(limit + 1), { on: small }), 413, "payload_too_large", "body", /1024 bytes/);
  });

  test("a declared Content-Length over the limit is refused before the body is read", async () => {
    const answer = await post("/tasks", '{"command":"x"}', { on: small, headers: { "content-length": String(limit + 1) } });
    expectError(answer, 413, "payload_too_large", "body");
    expectError(
      await post("/schedule", bodyOf(limit * 2), { on: small, headers: { "content-length": String(limit * 2) } }),
      413,
      "payload_too_large",
      "body",
    );
  });

  test("a chunked body without Content-Length is cut off at the limit", async () => {
    let sent = 0;
    const chunk = new TextEncoder().encode(" ".repeat(256));
    // An endless body: the server must stop reading rather than buffer it.
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('{"command":"x"'));
      },
      pull(controller) {
        sent += chunk.byteLength;
        controller.enqueue(chunk);
      },
    });
    const request = new Request("http://localhost/submit", {
      method: "POST",
      body,
      headers: { "content-type": "application/json" },
    });
    expect(request.headers.get("content-length")).toBeNull();
    const response = await small.handle(request);
    expect(response.status).toBe(413);
    expect(((await response.json()) as any).error.code).toBe("payload_too_large");
    expect(sent).toBeLessThan(limit * 4);
  });

  test("the default limit is 1 MiB", async () => {
    const env = Object.fromEntries(Array.from({ length: 30 }, (_, i) => [`V${i}`, "y".repeat(32 * 1024)]));
    const large = JSON.stringify({ command: "env", env });
    expect(large.length).toBeGreaterThan(900 * 1024);
    expect(large.length).toBeLessThan(1024 * 1024);
    expect((await post("/tasks", large)).status).toBe(201);
    expectError(await post("/tasks", "x".repeat(1024 * 1024 + 1)), 413, "payload_too_large", "body");
  });

  test("with a larger body limit, an environment execve would refuse (E2BIG) is a 400 naming the limit", async () => {
    const roomy = createApp(
      depsFor(db.sql, { feed, settings: apiSettings(loadConfig({ TQ_MAX_BODY_BYTES: String(16 * 1024 * 1024) })) }),
    );
    // 256 x 32 KiB: every entry within its own limits, 8 MiB together.
    const env = Object.fromEntries(Array.from({ length: 256 }, (_, i) => [`V${i}`, "y".repeat(32 * 1024)]));
    const answer = await post("/tasks", { command: "env", env }, { on: roomy });
    expectError(answer, 400, "invalid_argument", "env", /at most 1048576 bytes/);
    const rows = await db.sql`SELECT id FROM tasks WHERE command = 'env' AND env ? 'V255'`;
    expect(rows.length).toBe(0);
  });
});

describe("GET /tasks/:id", () => {
  test("malformed and unknown ids", async () => {
    expectError(await call("GET", "/tasks/not-a-uuid"), 400, "invalid_argument", "id", /UUID/);
    expectError(await call("GET", "/tasks/01890a5d-ac96-774b-bcce-b302099a805"), 400, "invalid_argument", "id");
    expectError(await call("GET", `/tasks/${newTaskId()}`), 404, "not_found", undefined, /not found/);
  });

  test("shows the output of the task's current attempt, which only the attempt row stores", async () => {
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 2 }));
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(
      db.sql,
      { taskId: task.id, attempt: 1, workerId: "w1" },
      { ...success, state: "failed", exitCode: 2, stdout: "one\n" },
    );
    expect((await call("GET", `/tasks/${task.id}`)).json).toMatchObject({ state: "queued", attempt: 1, stdout: "one\n" });
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(db.sql, { taskId: task.id, attempt: 2, workerId: "w1" }, { ...success, stdoutTruncated: true });
    const answer = await call("GET", `/tasks/${task.id}`);
    expect(answer.json).toMatchObject({ state: "succeeded", attempt: 2, stdout: "done\n", stdout_truncated: true });
    const [row] = await db.sql`SELECT stdout, stdout_truncated FROM tasks WHERE id = ${task.id}`;
    expect(row).toEqual({ stdout: null, stdout_truncated: false });
  });
});

describe("POST /tasks/:id/cancel", () => {
  test("cancels a queued task, then 409 naming its state", async () => {
    const task = await createTask(db.sql, taskSpec());
    const answer = await call("POST", `/tasks/${task.id}/cancel`);
    expect(answer.status).toBe(200);
    expectTaskJson(answer.json);
    expect(answer.json).toMatchObject({ id: task.id, state: "cancelled" });
    expect(answer.json.cancelled_at).toMatch(ISO_MS);
    expectError(await call("POST", `/tasks/${task.id}/cancel`), 409, "conflict", undefined, /already cancelled/);
  });

  test("cancels a running task (its coordinator stops the process)", async () => {
    const task = await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const answer = await call("POST", `/tasks/${task.id}/cancel`);
    expect(answer.status).toBe(200);
    expect(answer.json).toMatchObject({ state: "cancelled", worker_id: "w1", attempt: 1 });
  });

  test("a finished task answers 409 with its state", async () => {
    const task = await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, success);
    expectError(await call("POST", `/tasks/${task.id}/cancel`), 409, "conflict", undefined, /^task is already succeeded$/);
    expect((await getTask(db.sql, task.id))?.state).toBe("succeeded");
  });

  test("malformed and unknown ids", async () => {
    expectError(await call("POST", "/tasks/42/cancel"), 400, "invalid_argument", "id");
    expectError(await call("POST", `/tasks/${newTaskId()}/cancel`), 404, "not_found", undefined);
  });
});

describe("GET /tasks", () => {
  test("pages newest first over several pages", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 7; i++) ids.push((await createTask(db.sql, taskSpec({ command: `echo ${i}` }))).id);
    const newestFirst = [...ids].reverse();
    const seen: string[] = [];
    let cursor: string | null = null;
    const sizes: number[] = [];
    do {
      const query: string = cursor === null ? "/tasks?limit=3" : `/tasks?limit=3&cursor=${cursor}`;
      const page = await call("GET", query);
      expect(page.status).toBe(200);
      expect(Object.keys(page.json).sort()).toEqual(["next_cursor", "tasks"]);
      for (const task of page.json.tasks) expectTaskJson(task);
      seen.push(...page.json.tasks.map((t: { id: string }) => t.id));
      sizes.push(page.json.tasks.length);
      cursor = page.json.next_cursor;
    } while (cursor !== null);
    expect(sizes).toEqual([3, 3, 1]);
    expect(seen).toEqual(newestFirst);
  });

  test("a page that ends exactly at the last task has no next cursor", async () => {
    for (let i = 0; i < 4; i++) await createTask(db.sql, taskSpec());
    const first = await call("GET", "/tasks?limit=2");
    const second = await call("GET", `/tasks?limit=2&cursor=${first.json.next_cursor}`);
    expect(second.json.tasks).toHaveLength(2);
    expect(second.json.next_cursor).toBeNull();
  });

  test("defaults to 50 and filters by state", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 55; i++) ids.push((await createTask(db.sql, taskSpec())).id);
    await cancelTask(db.sql, ids[3]!);
    await cancelTask(db.sql, ids[40]!);
    const all = await call("GET", "/tasks");
    expect(all.json.tasks).toHaveLength(50);
    expect(typeof all.json.next_cursor).toBe("string");
    const cancelled = await call("GET", "/tasks?state=cancelled");
    expect(cancelled.json.tasks.map((t: { id: string }) => t.id)).toEqual([ids[40], ids[3]]);
    expect(cancelled.json.next_cursor).toBeNull();
    const none = await call("GET", "/tasks?state=running");
    expect(none.json).toEqual({ tasks: [], next_cursor: null });
  });

  test("invalid state, limit and cursor name their parameter", async () => {
    expectError(await call("GET", "/tasks?state=done"), 400, "invalid_argument", "state", /one of: waiting, queued/);
    expectError(await call("GET", "/tasks?state="), 400, "invalid_argument", "state");
    expectError(await call("GET", "/tasks?limit=0"), 400, "invalid_argument", "limit", /from 1 to 500/);
    expectError(await call("GET", "/tasks?limit=501"), 400, "invalid_argument", "limit", /from 1 to 500/);
    expectError(await call("GET", "/tasks?limit=ten"), 400, "invalid_argument", "limit", /integer/);
    expectError(await call("GET", "/tasks?limit=2.5"), 400, "invalid_argument", "limit", /integer/);
    expectError(await call("GET", "/tasks?cursor=garbage!"), 400, "invalid_argument", "cursor", /cursor/);
    expectError(await call("GET", `/tasks?cursor=${newTaskId()}`), 400, "invalid_argument", "cursor");
  });
});

describe("retries keep the requested time", () => {
  test("scheduled_at stays byte-identical through every retry while run_at moves; the final error says why", async () => {
    const body = '{"command":"exit 3","scheduled_at":"2023-04-01T17:04:05.123+02:00"}';
    const scheduled = await post("/schedule", body);
    expect(scheduled.status).toBe(200);
    const submitted = scheduled.json.scheduled_at;
    expect(submitted).toBe("2023-04-01T15:04:05.123Z");
    const id = scheduled.json.task_id;
    const runAts: string[] = [];
    for (let attempt = 1; attempt <= 3; attempt++) {
      // The default backoff (1 s, doubling) is due later than now; the claim waits for run_at.
      await db.sql`UPDATE tasks SET run_at = now() - interval '1 millisecond' WHERE id = ${id} AND state = 'queued'`;
      const [claimed] = await claimDue(db.sql, "c1", ["w1"], 30_000);
      expect(claimed?.attempt).toBe(attempt);
      await finishAttempt(db.sql, { taskId: id, attempt, workerId: "w1" }, { ...success, state: "failed", exitCode: 3 });
      const status = await call("GET", `/status?task_id=${id}`);
      expect(status.json.scheduled_at).toBe(submitted);
      runAts.push(status.json.run_at);
      const task = await call("GET", `/tasks/${id}`);
      expect(task.json.scheduled_at).toBe(submitted);
      expect(task.json.run_at).toBe(status.json.run_at);
    }
    expect(Date.parse(runAts[0]!)).toBeGreaterThan(Date.parse(submitted));
    const final = await call("GET", `/status?task_id=${id}`);
    expect(final.json).toMatchObject({
      state: "failed",
      attempt: 3,
      exit_code: 3,
      error: "exhausted 3 attempts: last exit code 3",
    });
    const listed = await call("GET", "/tasks");
    expect(listed.json.tasks[0]).toMatchObject({ id, scheduled_at: submitted, run_at: final.json.run_at });
  });
});

describe("GET /tasks/:id/attempts", () => {
  test("lists every attempt in order with its worker, exit code and its own times", async () => {
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 3 }));
    expect((await call("GET", `/tasks/${task.id}/attempts`)).json).toEqual({ attempts: [] });
    const startedAt = (attempt: number) => new Date(Date.UTC(2030, 0, 1, 0, 0, attempt));
    for (let attempt = 1; attempt <= 3; attempt++) {
      const [claimed] = await claimDue(db.sql, "c1", [`w${attempt}`], 30_000);
      expect(claimed?.attempt).toBe(attempt);
      await finishAttempt(
        db.sql,
        { taskId: task.id, attempt, workerId: `w${attempt}` },
        { ...success, state: "failed", exitCode: 10 + attempt, startedAt: startedAt(attempt) },
      );
    }
    const answer = await call("GET", `/tasks/${task.id}/attempts`);
    expect(answer.status).toBe(200);
    const attempts = answer.json.attempts as any[];
    expect(attempts.map((a) => [a.attempt, a.worker_id, a.exit_code, a.outcome])).toEqual([
      [1, "w1", 11, "failed"],
      [2, "w2", 12, "failed"],
      [3, "w3", 13, "failed"],
    ]);
    expect(attempts.map((a) => a.started_at)).toEqual([1, 2, 3].map((n) => startedAt(n).toISOString()));
    for (const a of attempts) {
      expect(a.dispatched_at).toMatch(ISO_MS);
      expect(a.finished_at).toMatch(ISO_MS);
      expect(a).toMatchObject({ task_id: task.id, coordinator_id: "c1", stdout: "done\n", stdout_truncated: false });
    }
    // The task row shows the last attempt only.
    expect((await call("GET", `/tasks/${task.id}`)).json.started_at).toBe(startedAt(3).toISOString());
  });

  test("malformed and unknown ids", async () => {
    expectError(await call("GET", "/tasks/nope/attempts"), 400, "invalid_argument", "id");
    expectError(await call("GET", `/tasks/${newTaskId()}/attempts`), 404, "not_found", undefined);
  });
});

describe("GET /tasks/:id/history", () => {
  test("pages every event oldest first, with kind, state, attempt, worker and actor", async () => {
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 2 }));
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, { ...success, state: "failed", exitCode: 1 });
    await claimDue(db.sql, "c1", ["w2"], 30_000);
    await cancelTask(db.sql, task.id, "alice");
    const seen: any[] = [];
    let cursor: string | null = null;
    let pages = 0;
    do {
      const answer: Answer = await call("GET", `/tasks/${task.id}/history?limit=2${cursor ? `&cursor=${cursor}` : ""}`);
      expect(answer.status).toBe(200);
      expect(answer.json.events.length).toBeLessThanOrEqual(2);
      seen.push(...answer.json.events);
      cursor = answer.json.next_cursor;
      pages++;
    } while (cursor !== null);
    expect(pages).toBe(3);
    expect(seen.map((e) => [e.kind, e.state, e.attempt, e.worker_id])).toEqual([
      ["submitted", "queued", 0, null],
      ["dispatched", "dispatched", 1, "w1"],
      ["retrying", "queued", 1, "w1"],
      ["dispatched", "dispatched", 2, "w2"],
      ["cancelled", "cancelled", 2, "w2"],
    ]);
    const ids = seen.map((e) => BigInt(e.id));
    for (let i = 1; i < ids.length; i++) expect(ids[i]!).toBeGreaterThan(ids[i - 1]!);
    expect(seen[2].detail).toMatchObject({ outcome: "failed", exit_code: 1 });
    expect(seen[4].actor).toBe("alice");
    for (const e of seen) expect(e.at).toMatch(ISO_MS);
    const all = await call("GET", `/tasks/${task.id}/history`);
    expect(all.json.events).toHaveLength(5);
    expect(all.json.next_cursor).toBeNull();
  });

  test("bad ids, limits and cursors name their parameter", async () => {
    const task = await createTask(db.sql, taskSpec());
    expectError(await call("GET", "/tasks/nope/history"), 400, "invalid_argument", "id");
    expectError(await call("GET", `/tasks/${newTaskId()}/history`), 404, "not_found", undefined);
    expectError(await call("GET", `/tasks/${task.id}/history?limit=0`), 400, "invalid_argument", "limit");
    expectError(await call("GET", `/tasks/${task.id}/history?cursor=bogus`), 400, "invalid_argument", "cursor");
  });
});

describe("GET /workers", () => {
  test("lists live workers with the tasks they hold", async () => {
    await upsertWorker(db.sql, {
      id: "w1",
      name: "alpha",
      coordinatorId: "c1",
      slots: 4,
      labels: { zone: "a" },
      version: "1.2.3",
      clockSkewMs: -1500,
    });
    await upsertWorker(db.sql, { id: "w2", name: "beta", coordinatorId: "c1", slots: 2, labels: {}, version: "1.2.3" });
    await markWorkerGone(db.sql, "w2", "c1");
    await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const answer = await call("GET", "/workers");
    expect(answer.status).toBe(200);
    expect(answer.json.workers).toHaveLength(1);
    const [worker] = answer.json.workers;
    expect(worker).toMatchObject({
      id: "w1",
      name: "alpha",
      coordinator_id: "c1",
      state: "connected",
      slots: 4,
      running: 1,
      labels: { zone: "a" },
      version: "1.2.3",
      clock_skew_ms: -1500,
    });
    expect(worker.connected_at).toMatch(ISO_MS);
    expect(worker.last_heartbeat_at).toMatch(ISO_MS);
  });
});

describe("health and documentation", () => {
  test("/healthz names the role; /readyz checks the database", async () => {
    expect((await call("GET", "/healthz")).json).toEqual({ status: "ok", role: "scheduler" });
    const coordinator = createApp(depsFor(db.sql, { feed, role: "coordinator" }));
    expect((await call("GET", "/healthz", { on: coordinator })).json).toEqual({ status: "ok", role: "coordinator" });
    const ready = await call("GET", "/readyz");
    expect(ready.status).toBe(200);
    expect(ready.json).toEqual({ status: "ready" });
  });

  test("/openapi/json is an OpenAPI 3 document of every route", async () => {
    const answer = await call("GET", "/openapi/json");
    expect(answer.status).toBe(200);
    const doc = answer.json;
    expect(doc.openapi).toMatch(/^3\./);
    expect(doc.info).toMatchObject({ title: "task-queue", version: (await Bun.file("package.json").json()).version });
    expect(Object.keys(doc.paths).sort()).toEqual(
      [
        "/concurrency-keys",
        "/healthz",
        "/metrics",
        "/overview",
        "/overview/events",
        "/rate-limits",
        "/rate-limits/{name}",
        "/queues",
        "/queues/{name}",
        "/queues/{name}/pause",
        "/queues/{name}/resume",
        "/readyz",
        "/schedule",
        "/schedules",
        "/schedules/{id}",
        "/schedules/{id}/pause",
        "/schedules/{id}/resume",
        "/schedules/{id}/trigger",
        "/status",
        "/submit",
        "/tasks",
        "/tasks/batch",
        "/tasks/bulk",
        "/tasks/{id}",
        "/tasks/{id}/attempts",
        "/tasks/{id}/cancel",
        "/tasks/{id}/events",
        "/tasks/{id}/logs",
        "/tasks/{id}/history",
        "/tasks/{id}/retry",
        "/workers",
      ].sort(),
    );
    expect(doc.paths["/tasks"].post.requestBody.content["application/json"].schema).toEqual({
      $ref: "#/components/schemas/TaskInput",
    });
    expect(doc.components.schemas.TaskInput.required).toEqual(["command"]);
    expect(doc.paths["/schedule"].post.responses["200"]).toBeDefined();
    expect(doc.paths["/tasks/{id}/events"].get.responses["200"].content["text/event-stream"]).toBeDefined();
  });

  test("/openapi serves the documentation page", async () => {
    const answer = await call("GET", "/openapi");
    expect(answer.status).toBe(200);
    expect(answer.headers.get("content-type")).toContain("text/html");
    expect(answer.text).toContain("/openapi/swagger-ui-bundle.js");
  });

  test("an unknown route is a JSON 404", async () => {
    expectError(await call("GET", "/nope"), 404, "not_found", undefined, /GET \/nope/);
    expectError(await call("DELETE", "/tasks/x/y"), 404, "not_found", undefined);
  });
});

describe("failures", () => {
  test("a database outage answers 503 quickly, without internal text", async () => {
    // A pool per request: postgres.js backs off between failed connects across its whole pool
    // (up to 20 s), and this test is about the answer, not about that schedule.
    const pools: Sql[] = [];
    const outage = {
      handle(request: Request) {
        const down = connect("postgres://x@127.0.0.1:1/x", { connectTimeout: 1, max: 1 });
        pools.push(down);
        return createApp(depsFor(down)).handle(request);
      },
    };
    try {
      const id = newTaskId();
      const started = performance.now();
      const answers = [
        await call("GET", `/tasks/${id}`, { on: outage }),
        await call("GET", "/readyz", { on: outage }),
        await call("GET", "/tasks", { on: outage }),
        await call("GET", `/status?task_id=${id}`, { on: outage }),
        await post("/tasks", { command: "x" }, { on: outage }),
        await post("/schedule", { command: "x", scheduled_at: "2030-01-01T00:00:00Z" }, { on: outage }),
        await call("POST", `/tasks/${id}/cancel`, { on: outage }),
        await call("GET", `/tasks/${id}/events`, { on: outage }),
        await call("GET", "/workers", { on: outage }),
      ];
      // Connection refused is immediate; the bound only catches a hang.
      expect(performance.now() - started).toBeLessThan(4000);
      for (const answer of answers) {
        expectError(answer, 503, "unavailable", undefined);
        expect(answer.text).not.toMatch(/ECONNREFUSED|127\.0\.0\.1|postgres|connect/i);
        expect(Number(answer.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
      }
      // A bad request is still answered as such: validation comes before the database.
      expectError(await call("GET", "/tasks/nope", { on: outage }), 400, "invalid_argument", "id");
    } finally {
      await Promise.all(pools.map((pool) => pool.end({ timeout: 1 })));
    }
  });

  test("a locked tasks table answers 503 with Retry-After within the lock timeout, and /readyz says 503", async () => {
    const strict = connect(db.url, { max: 4, lockTimeoutMs: 200, statementTimeoutMs: 1000 });
    const locked = createApp(depsFor(strict, { feed }));
    const locker = await db.sql.reserve();
    try {
      expect((await call("GET", "/readyz", { on: locked })).status).toBe(200);
      await locker`BEGIN`;
      await locker`LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE`;
      const started = performance.now();
      const answers = [
        await post("/tasks", { command: "echo lost?" }, { on: locked }),
        await call("GET", "/tasks", { on: locked }),
        await call("GET", `/tasks/${newTaskId()}`, { on: locked }),
        await call("GET", "/readyz", { on: locked }),
      ];
      // Without the timeouts each would wait for the lock for as long as it is held.
      expect(performance.now() - started).toBeLessThan(4 * 1500);
      for (const answer of answers) {
        expectError(answer, 503, "unavailable", undefined);
        expect(Number(answer.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
        expect(answer.text).not.toMatch(/55P03|57014|canceling/);
      }
      // A table that is readable but not writable (a SHARE lock: CREATE INDEX without
      // CONCURRENTLY) stalls every submit: not ready either.
      await locker`ROLLBACK`;
      await locker`BEGIN`;
      await locker`LOCK TABLE tasks IN SHARE MODE`;
      expect((await call("GET", "/tasks", { on: locked })).status).toBe(200);
      expectError(await call("GET", "/readyz", { on: locked }), 503, "unavailable", undefined);
      await locker`ROLLBACK`;
      expect((await call("GET", "/readyz", { on: locked })).status).toBe(200);
      const listed = (await call("GET", "/tasks", { on: locked })).json.tasks.map((t: { command: string }) => t.command);
      expect(listed).not.toContain("echo lost?");
    } finally {
      await locker`ROLLBACK`;
      locker.release();
      await strict.end();
    }
  });

  test("an unexpected error is an opaque 500 with a request id, and is logged", async () => {
    const lines: string[] = [];
    const log = pino({ level: "error" }, { write: (line: string) => lines.push(line) });
    const broken = createApp(
      depsFor(db.sql, {
        feed,
        log,
        submit: async () => {
          throw new Error("secret detail: relation tasks_shadow does not exist");
        },
      }),
    );
    const response = await broken.handle(new Request("http://localhost/submit", { method: "POST", body: '{"command":"x"}' }));
    expect(response.status).toBe(500);
    const text = await response.text();
    expect(text).not.toContain("secret");
    const body = JSON.parse(text);
    expect(body.error).toMatchObject({ code: "internal", message: "internal error" });
    expect(body.error.request_id).toMatch(/^[0-9a-f-]{36}$/);
    const logged = lines.map((line) => JSON.parse(line));
    expect(logged).toHaveLength(1);
    expect(logged[0]).toMatchObject({ request_id: body.error.request_id, where: "POST /submit" });
    expect(logged[0].err.message).toContain("secret detail");
  });
});

describe("Idempotency-Key", () => {
  test("a repeated submit returns the original task with 200; the first is 201", async () => {
    const headers = { "idempotency-key": "order-42" };
    const first = await post("/tasks", { command: "echo once" }, { headers });
    expect(first.status).toBe(201);
    expect(first.json.idempotency_key).toBe("order-42");
    const again = await post("/tasks", { command: "echo once" }, { headers });
    expect(again.status).toBe(200);
    expect(again.headers.get("idempotent-replayed")).toBe("true");
    expect(again.json.id).toBe(first.json.id);
    const viaSchedule = await post(
      "/schedule",
      { command: "echo s", scheduled_at: "2030-01-01T00:00:00Z" },
      { headers: { "idempotency-key": "s-1" } },
    );
    const scheduleAgain = await post(
      "/schedule",
      { command: "echo s", scheduled_at: "2030-01-01T00:00:00Z" },
      { headers: { "idempotency-key": "s-1" } },
    );
    expect(scheduleAgain.json.task_id).toBe(viaSchedule.json.task_id);
    // The seed's 200 and shape both times; only the header tells the replay apart.
    expect(viaSchedule.status).toBe(200);
    expect(viaSchedule.headers.get("idempotent-replayed")).toBeNull();
    expect(scheduleAgain.status).toBe(200);
    expect(scheduleAgain.headers.get("idempotent-replayed")).toBe("true");
    expect(scheduleAgain.json).toEqual(viaSchedule.json);
    const count = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
    expect(count[0]?.n).toBe(2);
  });

  test("the same key with a different request is a 409 naming the original task", async () => {
    const headers = { "idempotency-key": "k-9" };
    const first = await post("/submit", { command: "echo a" }, { headers });
    const other = await post("/submit", { command: "echo b" }, { headers });
    expectError(other, 409, "conflict", undefined, /already used for a different request/);
    expect(other.json.error.message).toContain(first.json.id);
  });

  test("concurrent repeats create one task", async () => {
    const headers = { "idempotency-key": "burst" };
    const answers = await Promise.all(Array.from({ length: 8 }, () => post("/submit", { command: "echo burst" }, { headers })));
    expect(answers.filter((a) => a.status === 201)).toHaveLength(1);
    expect(answers.filter((a) => a.status === 200)).toHaveLength(7);
    expect(new Set(answers.map((a) => a.json.id)).size).toBe(1);
  });

  test("a malformed key is a 400 naming the header, and writes nothing", async () => {
    const answer = await post("/submit", { command: "echo x" }, { headers: { "idempotency-key": "has spaces" } });
    expectError(answer, 400, "invalid_argument", "Idempotency-Key", /visible ASCII/);
    const long = await post("/submit", { command: "echo x" }, { headers: { "idempotency-key": "k".repeat(300) } });
    expectError(long, 400, "invalid_argument", "Idempotency-Key", /at most 255/);
    const count = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
    expect(count[0]?.n).toBe(0);
  });
});

describe("POST /tasks/batch", () => {
  test("creates every task in one go, in order", async () => {
    const answer = await post("/tasks/batch", {
      tasks: [{ command: "echo 1" }, { command: "echo 2", scheduled_at: "2099-01-01T00:00:00Z", env: { A: "1" } }],
    });
    expect(answer.status).toBe(201);
    expect(answer.json.tasks.map((t: { command: string }) => t.command)).toEqual(["echo 1", "echo 2"]);
    for (const task of answer.json.tasks) expectTaskJson(task);
    expect(answer.json.tasks[1]).toMatchObject({ state: "queued", env: { A: "1" }, scheduled_at: "2099-01-01T00:00:00.000Z" });
    const events = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM task_events WHERE kind = 'submitted'`;
    expect(events[0]?.n).toBe(2);
  });

  test("one bad task rejects the batch, naming it; nothing is written", async () => {
    const answer = await post("/tasks/batch", { tasks: [{ command: "echo ok" }, { command: "" }] });
    expect(answer.status).toBe(400);
    expect(answer.json.error.field).toMatch(/^tasks(\[1\]|\/1|\.1)/);
    const bad = await post("/tasks/batch", {
      tasks: [{ command: "echo ok" }, { command: "x", scheduled_at: "2023-04-01T15:04:05" }],
    });
    expectError(bad, 400, "invalid_argument", "tasks[1].scheduled_at", /time zone/);
    const empty = await post("/tasks/batch", { tasks: [] });
    expectError(empty, 400, "invalid_argument", "tasks", /tasks is empty; a batch holds 1 to 1000 tasks/);
    const count = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
    expect(count[0]?.n).toBe(0);
  });

  test("more tasks than TQ_MAX_BATCH is a 413 naming the limit", async () => {
    const tasks = Array.from({ length: 1001 }, (_, i) => ({ command: `echo ${i}` }));
    const answer = await post("/tasks/batch", { tasks });
    expectError(answer, 413, "payload_too_large", "tasks", /at most 1000 tasks \(TQ_MAX_BATCH\)/);
  });
});

describe("POST /tasks/batch idempotency", () => {
  const countTasks = async () => (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`)[0]?.n;
  const ids = (answer: Answer) => answer.json.tasks.map((t: { id: string }) => t.id);
  const batch = { tasks: [{ command: "echo 1" }, { command: "echo 2", scheduled_at: "2099-01-01T00:00:00Z" }] };

  test("a repeat under the same Idempotency-Key returns the same tasks with 200 and creates nothing", async () => {
    const headers = { "idempotency-key": "batch-1" };
    const first = await post("/tasks/batch", batch, { headers });
    expect(first.status).toBe(201);
    expect(first.headers.get("idempotent-replayed")).toBeNull();
    expect(first.json.replayed).toEqual([]);
    const again = await post("/tasks/batch", batch, { headers });
    expect(again.status).toBe(200);
    expect(again.headers.get("idempotent-replayed")).toBe("true");
    expect(ids(again)).toEqual(ids(first));
    expect(again.json.replayed).toEqual([0, 1]);
    for (const task of again.json.tasks) expectTaskJson(task);
    expect(await countTasks()).toBe(2);
    // Without the key the same batch is new work.
    expect((await post("/tasks/batch", batch)).status).toBe(201);
    expect(await countTasks()).toBe(4);
  });

  test("the same key with a different batch is a 409 and writes nothing", async () => {
    const headers = { "idempotency-key": "batch-2" };
    await post("/tasks/batch", batch, { headers });
    const longer = { tasks: [...batch.tasks, { command: "echo 3" }] };
    expectError(await post("/tasks/batch", longer, { headers }), 409, "conflict", undefined, /different batch \(of 2 tasks\)/);
    const changed = { tasks: [{ command: "echo 1" }, { command: "echo two" }] };
    expectError(await post("/tasks/batch", changed, { headers }), 409, "conflict", undefined, /batch-2/);
    expect(await countTasks()).toBe(2);
  });

  test("concurrent repeats of a keyed batch create each task once", async () => {
    const headers = { "idempotency-key": "batch-burst" };
    const answers = await Promise.all(Array.from({ length: 8 }, () => post("/tasks/batch", batch, { headers })));
    expect(answers.filter((a) => a.status === 201)).toHaveLength(1);
    expect(answers.filter((a) => a.status === 200)).toHaveLength(7);
    expect(new Set(answers.map((a) => ids(a).join()))).toHaveLength(1);
    expect(await countTasks()).toBe(2);
  });

  test("per-item keys: an item whose key was used returns the original task and is listed in replayed", async () => {
    const single = await post("/tasks", { command: "echo 2" }, { headers: { "idempotency-key": "item-b" } });
    expect(single.status).toBe(201);
    const items = {
      tasks: [
        { command: "echo 1", idempotency_key: "item-a" },
        { command: "echo 2", idempotency_key: "item-b" },
        { command: "echo 3" },
      ],
    };
    const first = await post("/tasks/batch", items);
    expect(first.status).toBe(201);
    expect(first.json.replayed).toEqual([1]);
    expect(first.json.tasks[1].id).toBe(single.json.id);
    expect(first.json.tasks.map((t: { idempotency_key: string | null }) => t.idempotency_key)).toEqual([
      "item-a",
      "item-b",
      null,
    ]);
    expect(await countTasks()).toBe(3);
    // Every keyed item is replayed; the unkeyed one is new.
    const again = await post("/tasks/batch", items);
    expect(again.status).toBe(201);
    expect(again.json.replayed).toEqual([0, 1]);
    expect(ids(again).slice(0, 2)).toEqual(ids(first).slice(0, 2));
    expect(await countTasks()).toBe(4);
    // All items replayed: nothing created, so 200 and the header.
    const keyedOnly = await post("/tasks/batch", { tasks: items.tasks.slice(0, 2) });
    expect(keyedOnly.status).toBe(200);
    expect(keyedOnly.headers.get("idempotent-replayed")).toBe("true");
    expect(keyedOnly.json.replayed).toEqual([0, 1]);
  });

  test("a batch key with per-item keys replays the tasks its items resolved to", async () => {
    await post("/tasks", { command: "echo old" }, { headers: { "idempotency-key": "item-old" } });
    const body = { tasks: [{ command: "echo old", idempotency_key: "item-old" }, { command: "echo new" }] };
    const headers = { "idempotency-key": "batch-mixed" };
    const first = await post("/tasks/batch", body, { headers });
    expect(first.json.replayed).toEqual([0]);
    const again = await post("/tasks/batch", body, { headers });
    expect(again.status).toBe(200);
    expect(ids(again)).toEqual(ids(first));
    expect(await countTasks()).toBe(2);
  });

  test("an item key used for a different request is a 409 naming the item, and nothing of the batch is written", async () => {
    await post("/tasks", { command: "echo original" }, { headers: { "idempotency-key": "taken" } });
    const answer = await post("/tasks/batch", {
      tasks: [{ command: "echo fresh" }, { command: "echo other", idempotency_key: "taken" }],
    });
    expectError(answer, 409, "conflict", "tasks[1].idempotency_key", /already used for a different request/);
    expect(await countTasks()).toBe(1);
    // The same key twice in one batch for different requests, too.
    const twice = await post("/tasks/batch", {
      tasks: [
        { command: "echo a", idempotency_key: "dup" },
        { command: "echo b", idempotency_key: "dup" },
      ],
    });
    expectError(twice, 409, "conflict", "tasks[1].idempotency_key");
    expect(await countTasks()).toBe(1);
    // A rolled-back batch leaves its batch key free.
    const headers = { "idempotency-key": "batch-after-conflict" };
    expectError(
      await post("/tasks/batch", { tasks: [{ command: "echo other", idempotency_key: "taken" }] }, { headers }),
      409,
      "conflict",
      "tasks[0].idempotency_key",
    );
    expect((await post("/tasks/batch", batch, { headers })).status).toBe(201);
  });

  test("keys are checked like the header's, naming the item", async () => {
    const answer = await post("/tasks/batch", { tasks: [{ command: "echo x", idempotency_key: "has spaces" }] });
    expectError(answer, 400, "invalid_argument", "tasks[0].idempotency_key", /visible ASCII/);
    const long = await post("/tasks/batch", { tasks: [{ command: "echo x", idempotency_key: "k".repeat(256) }] });
    expectError(long, 400, "invalid_argument", "tasks[0].idempotency_key", /at most 255 bytes/);
    const header = await post("/tasks/batch", batch, { headers: { "idempotency-key": "k".repeat(256) } });
    expectError(header, 400, "invalid_argument", "Idempotency-Key", /at most 255 bytes/);
    expect(await countTasks()).toBe(0);
  });
});

describe("errors a client can act on", () => {
  test("a body of another media type is 415 naming Content-Type; JSON, +json, the form type and none are read", async () => {
    for (const type of ["text/plain", "multipart/form-data; boundary=x", "application/xml", "garbage"]) {
      const answer = await post("/tasks", { command: "echo typed" }, { headers: { "content-type": type } });
      expectError(answer, 415, "unsupported_media_type", "Content-Type", /application\/json/);
    }
    expect(await db.sql`SELECT id FROM tasks`).toHaveLength(0);
    for (const type of [
      "application/json",
      "Application/JSON; charset=utf-8",
      "application/merge-patch+json",
      "application/x-www-form-urlencoded",
    ]) {
      expect((await post("/submit", { command: "echo typed" }, { headers: { "content-type": type } })).status).toBe(201);
    }
    const bare = await app.handle(
      new Request("http://localhost/submit", { method: "POST", body: new Blob(['{"command":"x"}']) }),
    );
    expect(bare.headers.get("content-type")).toContain("json");
    expect(bare.status).toBe(201);
  });

  test("a known path with a wrong method is 405 with Allow from the app's routes", async () => {
    const tasks = await call("DELETE", "/tasks");
    expectError(tasks, 405, "method_not_allowed", undefined, /DELETE is not allowed on \/tasks; allowed: GET, HEAD, POST/);
    expect(tasks.headers.get("allow")).toBe("GET, HEAD, POST");
    expect((await call("PUT", "/schedule")).headers.get("allow")).toBe("POST");
    // /tasks/batch is also /tasks/:id, which GET serves.
    expect((await call("PUT", "/tasks/batch")).headers.get("allow")).toBe("GET, HEAD, POST");
    expect((await call("POST", `/tasks/${newTaskId()}`)).headers.get("allow")).toBe("GET, HEAD");
    expect((await call("GET", `/tasks/${newTaskId()}/cancel`)).headers.get("allow")).toBe("POST");
    expect((await call("PATCH", "/healthz")).status).toBe(405);
    // The table is the app's own: a route added to it is allowed at once.
    const extended = createApp(depsFor(db.sql, { feed })).delete("/tasks", () => "gone");
    expect((await call("PUT", "/tasks", { on: extended })).headers.get("allow")).toBe("DELETE, GET, HEAD, POST");
  });

  test("201 carries the new task's Location; a replay's 200 does not", async () => {
    for (const path of ["/submit", "/tasks"]) {
      const created = await post(path, { command: "echo here" });
      expect(created.status).toBe(201);
      expect(created.headers.get("location")).toBe(`/tasks/${created.json.id}`);
      const fetched = await call("GET", created.headers.get("location")!);
      expect(fetched.json.id).toBe(created.json.id);
    }
    const headers = { "idempotency-key": "located" };
    await post("/tasks", { command: "echo here" }, { headers });
    const replay = await post("/tasks", { command: "echo here" }, { headers });
    expect(replay.status).toBe(200);
    expect(replay.headers.get("location")).toBeNull();
  });

  test("every valid RFC 3339 time is accepted and kept to the millisecond", async () => {
    const cases: [string, string][] = [
      ["2016-12-31T23:59:60Z", "2017-01-01T00:00:00.000Z"],
      ["2016-12-31T23:59:60.5Z", "2017-01-01T00:00:00.500Z"],
      ["2017-01-01T00:59:60+01:00", "2017-01-01T00:00:00.000Z"],
      ["1969-07-20T20:17:40Z", "1969-07-20T20:17:40.000Z"],
      ["0050-03-01T12:00:00Z", "0050-03-01T12:00:00.000Z"],
      ["0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z"],
      ["9999-12-31T23:59:59.999999999Z", "9999-12-31T23:59:59.999Z"],
      ["2030-01-01t09:00:00z", "2030-01-01T09:00:00.000Z"],
      ["2030-01-01T09:00:00.123456789123-05:30", "2030-01-01T14:30:00.123Z"],
    ];
    for (const [input, stored] of cases) {
      const answer = await post("/tasks", { command: "echo when", scheduled_at: input });
      expect({ input, status: answer.status }).toEqual({ input, status: 201 });
      expect({ input, at: answer.json.scheduled_at }).toEqual({ input, at: stored });
      // Read back from the database, not only echoed.
      const read = await call("GET", `/tasks/${answer.json.id}`);
      expect({ input, at: read.json.scheduled_at }).toEqual({ input, at: stored });
    }
    const seed = await post("/schedule", { command: "echo when", scheduled_at: "1900-01-01T00:00:00Z" });
    expect(seed.status).toBe(200);
    expect((await call("GET", `/status?task_id=${seed.json.task_id}`)).json.scheduled_at).toBe("1900-01-01T00:00:00.000Z");
    expectError(
      await post("/tasks", { command: "x", scheduled_at: "2016-12-31T12:59:60Z" }),
      400,
      "invalid_argument",
      "scheduled_at",
      /not a time of day/,
    );
  });

  test("the error codes are listed for clients", async () => {
    const doc = await call("GET", "/openapi/json");
    const text = JSON.stringify(doc.json);
    for (const code of HTTP_ERROR_CODES) expect(text).toContain(code);
  });
});
