// The API behind the dashboard: GET /overview and /concurrency-keys, the task list's new
// filters, the sign-in cookie and its CSRF rule, on real PostgreSQL; and the plans of the
// dashboard's reads on 100,000 tasks (each on an index, none a pass over every row where a
// range or a page is asked).
import { afterAll, beforeAll, beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import type { ApiDeps } from "../../src/api/deps";
import { createApp } from "../../src/api/index";
import { Authenticator } from "../../src/auth/authenticator";
import { hashToken, newToken } from "../../src/auth/tokens";
import { apiSettings, authOptions, loadConfig } from "../../src/config";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { concurrencyKeysInUse, countTasksByQueueAndState, latencyPerMinute, throughputPerMinute } from "../../src/db/overview";
import { listTasks } from "../../src/db/tasks";
import { silentLogger } from "../../src/log";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { newTaskId, openAuth, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let feed: TaskChangeFeed;

function appWith(auth: ApiDeps["auth"]) {
  return createApp({
    role: "scheduler",
    settings: apiSettings(loadConfig({})),
    sql: db.sql,
    feed,
    log: silentLogger,
    auth,
    submit: (id, spec, actor) => insertTask(db.sql, id, spec, { actor }),
  });
}

async function call(app: ReturnType<typeof appWith>, path: string, init: RequestInit = {}) {
  const response = await app.handle(new Request(`http://localhost${path}`, init));
  const text = await response.text();
  return { status: response.status, headers: response.headers, json: text ? JSON.parse(text) : null };
}

beforeAll(async () => {
  feed = new TaskChangeFeed(db.sql);
  await feed.start();
});
afterAll(async () => {
  await feed.stop();
});

describe("reads", () => {
  const app = () => appWith(openAuth);
  beforeEach(async () => {
    await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers`;
  });

  test("GET /overview counts tasks by state and queue, and charts the last hour by minute", async () => {
    const ids = [newTaskId(), newTaskId(), newTaskId()];
    await insertTask(db.sql, ids[0]!, taskSpec({ command: "echo a" }));
    await insertTask(db.sql, ids[1]!, taskSpec({ command: "echo b" }));
    await insertTask(db.sql, ids[2]!, taskSpec({ command: "echo c" }));
    await db.sql`UPDATE tasks SET queue = 'reports' WHERE id = ${ids[2]!}`;
    await db.sql`UPDATE tasks SET state = 'succeeded' WHERE id = ${ids[0]!}`;
    // One attempt that started 250 ms after its task was created and succeeded, this minute.
    await db.sql`
      INSERT INTO task_attempts (task_id, attempt, worker_id, dispatched_at, started_at, finished_at, outcome)
      SELECT id, 1, 'w', created_at, created_at + interval '250 ms', clock_timestamp(), 'succeeded' FROM tasks WHERE id = ${ids[0]!}`;
    const { status, json } = await call(app(), "/overview");
    expect(status).toBe(200);
    expect(json.states).toMatchObject({ queued: 2, succeeded: 1, running: 0, failed: 0 });
    expect(json.queues).toEqual([
      expect.objectContaining({ queue: "default", total: 2, states: expect.objectContaining({ queued: 1, succeeded: 1 }) }),
      expect.objectContaining({ queue: "reports", total: 1, states: expect.objectContaining({ queued: 1 }) }),
    ]);
    expect(json.throughput).toHaveLength(60);
    expect(json.throughput.at(-1)).toMatchObject({ succeeded: 1, failed: 0, other: 0 });
    expect(json.throughput.slice(0, -1).every((m: any) => m.succeeded === 0)).toBe(true);
    expect(json.latency).toEqual([expect.objectContaining({ started: 1, p50_ms: 250, p95_ms: 250, max_ms: 250 })]);
    expect(json.slots).toEqual({ workers: 0, total: 0, used: 0, free: 0 });
    expect(Number(json.last_event_id)).toBeGreaterThan(0);
  });

  test("GET /overview/events sends the overview at once, as server-sent events", async () => {
    const stop = new AbortController();
    const response = await appWith(openAuth).handle(new Request("http://localhost/overview/events", { signal: stop.signal }));
    expect(response.headers.get("content-type")).toContain("text/event-stream");
    const reader = response.body!.getReader();
    const { value } = await reader.read();
    const text = new TextDecoder().decode(value);
    expect(text).toStartWith("event: overview\ndata: ");
    expect(JSON.parse(text.slice(text.indexOf("data: ") + 6)).throughput).toHaveLength(60);
    stop.abort();
    await reader.cancel();
  });

  test("GET /tasks filters by concurrency key, required label and text in the command", async () => {
    const [keyed, labelled, texty] = [newTaskId(), newTaskId(), newTaskId()];
    await insertTask(db.sql, keyed, taskSpec({ command: "echo keyed" }));
    await insertTask(db.sql, labelled, taskSpec({ command: "echo labelled" }));
    await insertTask(db.sql, texty, taskSpec({ command: "grep 100%_done /var/log" }));
    await db.sql`UPDATE tasks SET concurrency_key = 'tenant-7', concurrency_max = 2 WHERE id = ${keyed}`;
    await db.sql`UPDATE tasks SET requires = '[{"key":"gpu","op":"=","value":"1"}]' WHERE id = ${labelled}`;
    const ids = async (query: string) => (await call(app(), `/tasks?${query}`)).json.tasks.map((t: any) => t.id);
    expect(await ids("key=tenant-7")).toEqual([keyed]);
    expect(await ids("label=gpu")).toEqual([labelled]);
    expect(await ids("label=gpu%3D1")).toEqual([labelled]);
    expect(await ids("label=gpu%3D2")).toEqual([]);
    expect(await ids("q=ECHO")).toEqual([labelled, keyed]);
    // % and _ stand for themselves.
    expect(await ids("q=100%25_")).toEqual([texty]);
    expect(await ids("q=%25d")).toEqual([]);
    expect((await call(app(), "/tasks?label=%3D1")).json.error).toMatchObject({ code: "invalid_argument", field: "label" });
    const keys = await call(app(), "/concurrency-keys");
    expect(keys.json).toEqual({ keys: [{ key: "tenant-7", max: 2, live: 0, queued: 1 }] });
  });
});

describe("sign-in", () => {
  const admin = newToken().token;
  const reader = newToken().token;
  let auth: Authenticator;
  let app: ReturnType<typeof appWith>;
  beforeAll(async () => {
    const config = loadConfig({ TQ_API_TOKENS: `ops:admin:${hashToken(admin)},viewer:read:${hashToken(reader)}` });
    auth = new Authenticator(db.sql, authOptions(config), silentLogger);
    await auth.start();
    app = appWith(auth);
  });
  afterAll(() => auth.stop());

  const json = (body: unknown, headers: Record<string, string> = {}) => ({
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
  });
  const cookieOf = (token: string) => `tq_session=${encodeURIComponent(token)}`;

  test("the page and its session answer are open; what it shows is not", async () => {
    expect((await call(app, "/ui/session")).json).toEqual({ auth: true, signed_in: false, name: null, scopes: [] });
    const page = await app.handle(new Request("http://localhost/ui/tasks?state=failed"));
    expect(page.status).toBe(200);
    expect(page.headers.get("content-security-policy")).toContain("default-src 'none'");
    expect(await page.text()).toContain("/ui/assets/app.js?v=");
    expect((await call(app, "/overview")).status).toBe(401);
  });

  test("sign-in sets an HttpOnly SameSite=Strict cookie, only from this origin and for a valid token", async () => {
    expect((await call(app, "/ui/session", json({ token: admin }))).status).toBe(403);
    expect((await call(app, "/ui/session", json({ token: admin }, { origin: "http://evil.example" }))).status).toBe(403);
    const wrong = await call(app, "/ui/session", json({ token: "tq_nope" }, { origin: "http://localhost" }));
    expect(wrong.status).toBe(401);
    expect(wrong.headers.get("set-cookie")).toBeNull();
    const missing = await call(app, "/ui/session", json({}, { origin: "http://localhost" }));
    expect(missing.json.error).toMatchObject({ code: "invalid_argument", field: "token" });
    const ok = await call(app, "/ui/session", json({ token: admin }, { origin: "http://localhost" }));
    expect(ok.status).toBe(200);
    expect(ok.json).toMatchObject({ auth: true, signed_in: true, name: "ops" });
    expect(ok.headers.get("set-cookie")).toBe(`${cookieOf(admin)}; Path=/; HttpOnly; SameSite=Strict`);
    const session = await call(app, "/ui/session", { headers: { cookie: cookieOf(reader) } });
    expect(session.json).toEqual({ auth: true, signed_in: true, name: "viewer", scopes: ["read"] });
    const ended = await call(app, "/ui/session/end", { method: "POST", headers: { origin: "http://localhost" } });
    expect(ended.headers.get("set-cookie")).toContain("Max-Age=0");
  });

  test("the cookie signs in reads, and actions from this origin only; a read token cannot act", async () => {
    expect((await call(app, "/overview", { headers: { cookie: cookieOf(admin) } })).status).toBe(200);
    const submit = (token: string, headers: Record<string, string>) =>
      call(app, "/tasks", json({ command: "true" }, { cookie: cookieOf(token), ...headers }));
    expect((await submit(admin, {})).status).toBe(403);
    expect((await submit(admin, { origin: "http://localhost.evil.example" })).status).toBe(403);
    const created = await submit(admin, { origin: "http://localhost" });
    expect(created.status).toBe(201);
    expect((await submit(reader, { origin: "http://localhost" })).json.error.code).toBe("permission_denied");
    // The history names the token behind the cookie.
    const history = await call(app, `/tasks/${created.json.id}/history`, { headers: { cookie: cookieOf(admin) } });
    expect(history.json.events[0]).toMatchObject({ kind: "submitted", actor: "ops" });
    // A header, as the CLI sends it, needs no Origin.
    const bearer = await call(app, "/tasks", json({ command: "true" }, { authorization: `Bearer ${admin}` }));
    expect(bearer.status).toBe(201);
  });
});

describe("plans on 100,000 tasks", () => {
  beforeAll(async () => {
    await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers`;
    // 100,000 finished tasks over the last 10 days, a tenth with a concurrency key, each with
    // its attempt; then 50 queued.
    await db.sql`
      INSERT INTO tasks (id, command, state, scheduled_at, run_at, created_at, queue, concurrency_key, concurrency_max)
      SELECT gen_random_uuid(), 'echo ' || n, CASE WHEN n % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
             t, t, t, 'q' || (n % 5), CASE WHEN n % 10 = 0 THEN 'key-' || (n % 100) END, 1
      FROM generate_series(1, 100000) n, LATERAL (SELECT clock_timestamp() - n * interval '8 seconds' AS t) s`;
    await db.sql`
      INSERT INTO task_attempts (task_id, attempt, worker_id, dispatched_at, started_at, finished_at, outcome)
      SELECT id, 1, 'w', created_at, created_at + interval '10 ms', created_at + interval '1 s', state FROM tasks`;
    await db.sql`
      INSERT INTO tasks (id, command, state, scheduled_at, run_at, queue, concurrency_key, concurrency_max)
      SELECT gen_random_uuid(), 'echo queued', 'queued', clock_timestamp(), clock_timestamp(), 'q1', 'key-1', 1 FROM generate_series(1, 50)`;
    await db.sql`VACUUM ANALYZE tasks`;
    await db.sql`VACUUM ANALYZE task_attempts`;
  }, 120_000);

  const plan = async (query: PromiseLike<unknown>) => {
    const rows = await db.sql`EXPLAIN (FORMAT TEXT) ${query as never}`;
    return rows.map((row) => String(row["QUERY PLAN"])).join("\n");
  };

  test("the hour's throughput and latency read a range of their index", async () => {
    const throughput = await plan(throughputPerMinute(db.sql, 60));
    expect(throughput).toContain("task_attempts_finished_idx");
    expect(throughput).not.toContain("Seq Scan on task_attempts");
    const latency = await plan(latencyPerMinute(db.sql, 60));
    expect(latency).toContain("task_attempts_started_idx");
    expect(latency).not.toContain("Seq Scan");
  });

  test("a page of the list, filtered or not, stops at the page on an index", async () => {
    const newest = await plan(listTasks(db.sql, { limit: 51 }));
    expect(newest).toContain("Limit");
    expect(newest).toContain("Index Scan Backward using tasks_pkey");
    const byKey = await plan(listTasks(db.sql, { limit: 51, key: "key-7" }));
    expect(byKey).toContain("tasks_concurrency_key_idx");
    expect(byKey).not.toContain("Seq Scan");
    const byState = await plan(listTasks(db.sql, { limit: 51, state: "failed", queue: "q0" }));
    expect(byState).not.toContain("Seq Scan");
  });

  test("the keys in use read the partial indexes of unfinished keyed tasks", async () => {
    const keys = await plan(concurrencyKeysInUse(db.sql, 500));
    expect(keys).toMatch(/tasks_concurrency_(live|queued)_idx/);
    expect(keys).not.toContain("Seq Scan");
    expect([...(await concurrencyKeysInUse(db.sql, 500))]).toEqual([{ key: "key-1", max: 1, live: 0, queued: 50 }]);
  });

  test("the counts by queue and state are one pass over the (queue, state) index or the table", async () => {
    const counts = await plan(countTasksByQueueAndState(db.sql));
    expect(counts).not.toContain("Nested Loop");
    const rows = await countTasksByQueueAndState(db.sql);
    expect(rows.reduce((sum, row) => sum + row.tasks, 0)).toBe(100_050);
  });
});
