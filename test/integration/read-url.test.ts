// DATABASE_READ_URL: read queries that may lag (task lists, workers, queues) go to the read
// pool (a replica in production); a task read by id and every write stay on the primary. Here
// the "replica" is a second database of its own, so that which pool answered shows in the rows.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { createApp } from "../../src/api/index";
import { apiSettings, loadConfig } from "../../src/config";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { silentLogger } from "../../src/log";
import { createTestDatabase, dropTestDatabase, HOOK_TIMEOUT_MS, type TestDatabase, useTestDatabase } from "../support/db";
import { createTask, openAuth, taskSpec } from "../support/factories";

const primary = useTestDatabase();
let replica: TestDatabase;
let feed: TaskChangeFeed;
let app: ReturnType<typeof createApp>;

beforeAll(async () => {
  replica = await createTestDatabase();
  feed = new TaskChangeFeed(primary.sql);
  await feed.start();
  app = createApp({
    role: "coordinator",
    settings: apiSettings(loadConfig({})),
    sql: primary.sql,
    readSql: replica.sql,
    feed,
    log: silentLogger,
    auth: openAuth,
    submit: (id, spec) => insertTask(primary.sql, id, spec),
  });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await feed.stop();
  if (replica) await dropTestDatabase(replica);
});

const get = async (path: string) => {
  const response = await app.handle(new Request(`http://localhost${path}`));
  return { status: response.status, json: (await response.json()) as Record<string, unknown> };
};

test("GET /tasks lists from the read pool; POST /tasks writes and GET /tasks/:id reads the primary", async () => {
  const onReplica = await createTask(replica.sql, taskSpec({ command: "echo on-the-replica" }));
  const response = await app.handle(
    new Request("http://localhost/tasks", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ command: "echo on-the-primary" }),
    }),
  );
  expect(response.status).toBe(201);
  const created = (await response.json()) as { id: string };

  const list = await get("/tasks");
  expect(list.status).toBe(200);
  expect((list.json.tasks as { id: string }[]).map((t) => t.id)).toEqual([onReplica.id]);

  const byId = await get(`/tasks/${created.id}`);
  expect(byId.status).toBe(200);
  expect(byId.json.command).toBe("echo on-the-primary");
  expect((await get(`/tasks/${onReplica.id}`)).status).toBe(404);
  const rows = await primary.sql`SELECT command FROM tasks`;
  expect(rows.map((r) => r.command)).toEqual(["echo on-the-primary"]);
});

test("GET /queues and GET /workers read the read pool", async () => {
  await replica.sql`INSERT INTO queues (name) VALUES ('replica-only') ON CONFLICT DO NOTHING`;
  const queues = await get("/queues");
  expect(queues.status).toBe(200);
  expect((queues.json.queues as { name: string }[]).map((q) => q.name)).toContain("replica-only");
  expect((await get("/workers")).status).toBe(200);
});
