// The routing options and the queues API through app.handle: what is accepted, what is a 400
// naming the field, and what the task views and GET /queues show.
import { beforeEach, expect, setDefaultTimeout, test } from "bun:test";
import { scopeFor } from "../../src/api/auth";
import { ConfigError, loadConfig, workerRoutingConfig } from "../../src/config";
import { useApiApp } from "../support/api";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const api = useApiApp(db);
const call = api.call;

beforeEach(async () => {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers`;
  await db.sql`DELETE FROM queues WHERE name <> 'default'`;
});

test.each([
  [{ queue: "has space" }, "queue"],
  [{ queue: "" }, "queue"],
  [{ priority: 101 }, "priority"],
  [{ priority: -101 }, "priority"],
  [{ priority: 1.5 }, "priority"],
  [{ require: [{ key: "gpu", op: "~", value: "1" }] }, "require"],
  [{ require: [{ key: "gpu", op: "=" }] }, "require[0].value"],
  [{ require: [{ key: "gpu", op: "exists", value: "1" }] }, "require[0].value"],
  [{ require: [{ key: "mem_gb", op: ">=", value: "lots" }] }, "require[0].value"],
  [{ require: [{ key: "bad key", op: "exists" }] }, "require[0].key"],
  [{ prefer: [{ key: "region", op: "=", value: "eu" }] }, "prefer"],
  [{ prefer: [{ key: "region", op: "=", value: "eu", weight: 0 }] }, "prefer"],
  [{ schedule_timeout_ms: -1 }, "schedule_timeout_ms"],
])("POST /tasks %j is a 400 naming %s", async (extra, field) => {
  const { status, json } = await call("POST", "/tasks", { command: "true", ...extra });
  expect(status).toBe(400);
  expect(json.error.code).toBe("invalid_argument");
  expect(String(json.error.field)).toStartWith(field);
});

test("a task's routing is stored and shown; GET /tasks filters by queue", async () => {
  const body = {
    command: "true",
    queue: "gpu-jobs",
    priority: -7,
    require: [
      { key: "gpu", op: "=", value: "1" },
      { key: "ssd", op: "exists" },
    ],
    prefer: [{ key: "region", op: "=", value: "eu", weight: 5 }],
    schedule_timeout_ms: 60_000,
  };
  const created = await call("POST", "/tasks", body);
  expect(created.status).toBe(201);
  const { json: shown } = await call("GET", `/tasks/${created.json.id}`);
  expect(shown).toMatchObject({ ...body, waiting: { kind: "no_worker", message: "no worker serves queue gpu-jobs" } });
  await call("POST", "/tasks", { command: "true" });
  const { json: listed } = await call("GET", "/tasks?queue=gpu-jobs");
  expect(listed.tasks.map((t: { id: string }) => t.id)).toEqual([created.json.id]);
  expect((await call("GET", "/tasks?queue=no%20such")).status).toBe(400);
  const plain = (await call("GET", "/tasks")).json.tasks.find((t: { queue: string }) => t.queue === "default");
  expect(plain).toMatchObject({ priority: 0, require: [], prefer: [], schedule_timeout_ms: 0 });
});

test("queues: PATCH creates and limits, pause and resume, GET lists depth; bad input is a 400", async () => {
  const patched = await call("PATCH", "/queues/reports", { concurrency_limit: 3 });
  expect(patched).toMatchObject({ status: 200, json: { name: "reports", concurrency_limit: 3, paused: false, running: 0 } });
  expect((await call("POST", "/queues/reports/pause")).json.paused).toBe(true);
  await call("POST", "/tasks", { command: "true", queue: "reports" });
  const { json } = await call("GET", "/queues");
  expect(json.queues.find((q: { name: string }) => q.name === "reports")).toMatchObject({
    paused: true,
    concurrency_limit: 3,
    depth: { queued: 1, running: 0 },
  });
  expect((await call("POST", "/queues/reports/resume")).json.paused).toBe(false);
  expect((await call("PATCH", "/queues/reports", { concurrency_limit: null })).json.concurrency_limit).toBeNull();
  const bad = await call("PATCH", "/queues/reports", { concurrency_limit: -1 });
  expect(bad.status).toBe(400);
  expect(bad.json.error.field).toStartWith("concurrency_limit");
  expect((await call("PATCH", "/queues/reports", { limit: 1 })).status).toBe(400);
  const badName = await call("POST", "/queues/bad%20name/pause");
  expect(badName.status).toBe(400);
  expect(badName.json.error.field).toBe("name");
});

test("queue changes need the admin scope, reads the read scope", () => {
  expect(scopeFor("PATCH", "/queues/a")).toBe("admin");
  expect(scopeFor("POST", "/queues/a/pause")).toBe("admin");
  expect(scopeFor("POST", "/queues/a/resume")).toBe("admin");
  expect(scopeFor("GET", "/queues")).toBe("read");
});

test("TQ_WORKER_QUEUES and TQ_WORKER_LABELS are validated at start", () => {
  expect(workerRoutingConfig(loadConfig({ TQ_WORKER_QUEUES: "a, b", TQ_WORKER_LABELS: "gpu=1,ssd" }))).toEqual({
    queues: ["a", "b"],
    labels: { gpu: "1", ssd: "true" },
  });
  expect(() => loadConfig({ TQ_WORKER_QUEUES: "bad name" })).toThrow(ConfigError);
  expect(() => loadConfig({ TQ_WORKER_LABELS: "=1" })).toThrow(ConfigError);
});
