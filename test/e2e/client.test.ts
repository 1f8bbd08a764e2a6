// The README's flow through the generated client (src/client), against real role processes
// that require an API token: what a program built on the OpenAPI document gets.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { hashToken, newToken } from "../../src/auth/tokens";
import { createClient, type Schemas, type TaskQueueClient } from "../../src/client";
import { isFinal } from "../../src/task/state";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { type Cluster, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const { token } = newToken();

/** Follows GET /tasks/{id}/events through the client until the task is final. */
async function waitFinal(api: TaskQueueClient, id: string): Promise<Schemas["TaskEvent"]> {
  const { data, response } = await api.GET("/tasks/{id}/events", { params: { path: { id } }, parseAs: "stream" });
  expect(response.status).toBe(200);
  expect(response.headers.get("content-type")).toStartWith("text/event-stream");
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const chunk of data as ReadableStream<Uint8Array>) {
    buffer += decoder.decode(chunk, { stream: true });
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer
        .slice(0, end)
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("");
      buffer = buffer.slice(end + 2);
      if (!data) continue;
      const event = JSON.parse(data) as Schemas["TaskEvent"];
      if (isFinal(event.state)) return event;
    }
  }
  throw new Error(`the event stream of ${id} ended before a final state`);
}

describe("the typed client", () => {
  let cluster: Cluster;
  let scheduler: TaskQueueClient;
  let coordinator: TaskQueueClient;

  beforeAll(async () => {
    cluster = await startCluster(db.url, { workers: 1, env: { TQ_API_TOKENS: `client-e2e:admin:${hashToken(token)}` } });
    scheduler = createClient({ baseUrl: cluster.schedulerUrl, token });
    coordinator = createClient({ baseUrl: `${cluster.coordinatorUrl}/`, token });
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await cluster?.stop();
  }, HOOK_TIMEOUT_MS);

  test("the README's TypeScript example runs as printed", async () => {
    const root = join(import.meta.dir, "../..");
    const readme = readFileSync(join(root, "README.md"), "utf8");
    const example = /```ts\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(example).toContain('from "./src/client"');
    const dir = mkdtempSync(join(tmpdir(), "tq-readme-ts-"));
    try {
      const file = join(dir, "example.ts");
      const program = example!
        .replace('"./src/client"', JSON.stringify(join(root, "src/client")))
        .replace("http://localhost:8080", cluster.coordinatorUrl);
      writeFileSync(file, `${program}\nif (error) throw new Error(JSON.stringify(error));\nconsole.log(JSON.stringify(data));\n`);
      const run = Bun.spawn(["bun", file], { env: { ...process.env, TQ_TOKEN: token }, stdout: "pipe", stderr: "pipe" });
      const [out, err, code] = await Promise.all([new Response(run.stdout).text(), new Response(run.stderr).text(), run.exited]);
      expect(code, err).toBe(0);
      const task = JSON.parse(out) as Schemas["Task"];
      expect(task.command).toBe("echo hello");
      expect((await waitFinal(coordinator, task.id)).state).toBe("succeeded");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("runs the README's flow: schedule, status, submit, tasks, get, list, cancel, workers, health", async () => {
    // The original API, on the scheduler.
    const scheduled = await scheduler.POST("/schedule", { body: { command: "echo seed", scheduled_at: "2023-04-01T15:04:05Z" } });
    expect(scheduled.error).toBeUndefined();
    expect(scheduled.response.status).toBe(200);
    const taskId = scheduled.data!.task_id;
    expect(scheduled.data).toEqual({ task_id: taskId, command: "echo seed", scheduled_at: "2023-04-01T15:04:05.000Z" });
    expect((await waitFinal(scheduler, taskId)).state).toBe("succeeded");
    const status = await scheduler.GET("/status", { params: { query: { task_id: taskId } } });
    expect(status.data).toMatchObject({ task_id: taskId, state: "succeeded", exit_code: 0, attempt: 1 });

    // Run now, on the coordinator.
    const now = await coordinator.POST("/submit", { body: { command: "echo hello" } });
    expect(now.response.status).toBe(201);
    const ran = await waitFinal(coordinator, now.data!.id);
    expect(ran).toMatchObject({ state: "succeeded", exit_code: 0, stdout: "hello\n" });

    // The full form, safe to repeat with an Idempotency-Key.
    const body: Schemas["TaskInput"] = {
      command: "env | grep GREETING",
      scheduled_at: "2030-01-01T09:00:00+01:00",
      timeout_ms: 60_000,
      max_attempts: 3,
      retry: { on_timeout: false, backoff_base_ms: 5000 },
      env: { GREETING: "hi" },
      cwd: "/tmp",
    };
    const params = { header: { "idempotency-key": `report-${taskId}` } };
    const later = await coordinator.POST("/tasks", { body, params });
    expect(later.response.status).toBe(201);
    const again = await coordinator.POST("/tasks", { body, params });
    expect(again.response.status).toBe(200);
    expect(again.response.headers.get("idempotent-replayed")).toBe("true");
    expect(again.data!.id).toBe(later.data!.id);
    const id = later.data!.id;
    expect(later.data).toMatchObject({ state: "queued", scheduled_at: "2030-01-01T08:00:00.000Z", env: { GREETING: "hi" } });

    const one = await coordinator.GET("/tasks/{id}", { params: { path: { id } } });
    expect(one.data).toMatchObject({ id, command: "env | grep GREETING", retry: { on_timeout: false, backoff_base_ms: 5000 } });
    const queued = await coordinator.GET("/tasks", { params: { query: { state: "queued", limit: 20 } } });
    expect(queued.data!.tasks.map((task) => task.id)).toEqual([id]);
    expect(queued.data!.next_cursor).toBeNull();

    const cancelled = await coordinator.POST("/tasks/{id}/cancel", { params: { path: { id } } });
    expect(cancelled.data).toMatchObject({ id, state: "cancelled" });
    const final = await coordinator.POST("/tasks/{id}/cancel", { params: { path: { id } } });
    expect(final.response.status).toBe(409);
    expect(final.error?.error.code).toBe("conflict");

    // Many at once, typed by BatchInput.
    const batch = await coordinator.POST("/tasks/batch", { body: { tasks: [{ command: "true" }, { command: "false" }] } });
    expect(batch.response.status).toBe(201);
    expect(batch.data!.tasks.map((task) => task.command)).toEqual(["true", "false"]);

    const workers = await coordinator.GET("/workers");
    expect(workers.data!.workers).toHaveLength(1);
    expect(workers.data!.workers[0]).toMatchObject({ state: "connected", slots: 2 });
    expect((await coordinator.GET("/healthz")).data).toEqual({ status: "ok", role: "coordinator" });
    expect((await scheduler.GET("/healthz")).data).toEqual({ status: "ok", role: "scheduler" });
    expect((await coordinator.GET("/readyz")).data).toEqual({ status: "ready" });
  });

  test("answers errors in the document's Error shape, and sends the token it was given", async () => {
    const anonymous = createClient({ baseUrl: cluster.coordinatorUrl });
    const refused = await anonymous.GET("/tasks", {});
    expect(refused.response.status).toBe(401);
    expect(refused.error?.error.code).toBe("unauthenticated");
    expect(refused.response.headers.get("www-authenticate")).toContain("Bearer");
    const missing = await coordinator.GET("/tasks/{id}", { params: { path: { id: "019ac6f2-5d8e-7c3a-9b1e-4f0a2d6c8e10" } } });
    expect(missing.response.status).toBe(404);
    expect(missing.error?.error.code).toBe("not_found");
    const invalid = await coordinator.POST("/tasks", { body: { command: "x", timeout_ms: -1 } });
    expect(invalid.response.status).toBe(400);
    expect(invalid.error?.error).toMatchObject({ code: "invalid_argument", field: "timeout_ms" });
  });
});
