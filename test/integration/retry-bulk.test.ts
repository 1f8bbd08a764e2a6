// A client's retry and bulk actions (POST /tasks/:id/retry, POST /tasks/bulk, gRPC RetryTask)
// against a real coordinator in this process on a real database, with real API tokens: the
// rule (final states only, one more attempt, the history's actor), the scopes, and the
// answers' shapes through the typed client.
import { afterAll, beforeAll, beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import * as grpc from "@grpc/grpc-js";
import { hashToken, newToken, type Scope } from "../../src/auth/tokens";
import { createClient, type TaskQueueClient } from "../../src/client";
import { loadConfig } from "../../src/config";
import { Coordinator } from "../../src/coordinator/coordinator";
import { claimDue } from "../../src/db/claim";
import { getTask } from "../../src/db/tasks";
import { insertToken } from "../../src/db/tokens";
import { cancelTask, finishAttempt } from "../../src/db/transitions";
import { TaskState } from "../../src/gen/taskqueue/v1/task_pb";
import { TaskService } from "../../src/gen/taskqueue/v1/task_service_pb";
import { silentLogger } from "../../src/log";
import { clientConstructor } from "../../src/rpc/definitions";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { attemptResult, createTask, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let coordinator: Coordinator;
let httpUrl: string;
let grpcAddress: string;
const tokens: Record<string, string> = {};
const clients: Record<string, TaskQueueClient> = {};

async function makeToken(name: string, scopes: Scope[]): Promise<string> {
  const { id, token } = newToken();
  await insertToken(db.sql, { id, name, hash: hashToken(token), scopes });
  return token;
}

beforeAll(async () => {
  tokens.operator = await makeToken("operator", ["submit", "cancel", "read"]);
  tokens.reader = await makeToken("reader", ["read"]);
  tokens.canceller = await makeToken("canceller", ["cancel", "read"]);
  const config = loadConfig({
    TQ_COORDINATOR_PORT: String(await freePort()),
    TQ_GRPC_PORT: String(await freePort()),
    TQ_SCHEDULES: "false",
  });
  coordinator = new Coordinator(config, db.url, silentLogger);
  const started = await coordinator.start();
  httpUrl = started.httpUrl;
  grpcAddress = started.grpcAddress;
  for (const [name, token] of Object.entries(tokens)) clients[name] = createClient({ baseUrl: httpUrl, token });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await coordinator?.stop();
}, HOOK_TIMEOUT_MS);

beforeEach(async () => {
  // CASCADE: and whatever else refers to tasks (live logs' chunks).
  await db.sql`TRUNCATE tasks, task_events, task_attempts, workers CASCADE`;
});

/** A task that ran `attempts` attempts on worker w1, each failing with exit code 3 (max_attempts = attempts). */
async function failedTask(attempts = 1) {
  const task = await createTask(db.sql, taskSpec({ maxAttempts: attempts }));
  for (let n = 1; n <= attempts; n++) {
    await claimDue(db.sql, "c-test", ["w1"], 30_000);
    await finishAttempt(db.sql, { taskId: task.id, attempt: n, workerId: "w1" }, attemptResult({ state: "failed", exitCode: 3 }));
  }
  const row = await getTask(db.sql, task.id);
  expect(row?.state).toBe("failed");
  return row!;
}

async function succeededTask() {
  const task = await createTask(db.sql, taskSpec({ maxAttempts: 3 }));
  await claimDue(db.sql, "c-test", ["w1"], 30_000);
  await finishAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, attemptResult());
  return task;
}

describe("POST /tasks/:id/retry", () => {
  test("a failed task that exhausted its attempts is queued now for exactly one more, recorded with the actor", async () => {
    const task = await failedTask(2);
    const before = Date.now();
    const { data, error, response } = await clients.operator!.POST("/tasks/{id}/retry", { params: { path: { id: task.id } } });
    expect(error).toBeUndefined();
    expect(response.status).toBe(200);
    expect(data?.state).toBe("queued");
    expect(data?.attempt).toBe(2);
    // One more attempt: the budget rises from 2 to 3, no further.
    expect(data?.max_attempts).toBe(3);
    expect(data?.exit_code).toBeNull();
    expect(data?.error).toBeNull();
    expect(data?.failed_at).toBeNull();
    // Due now (by the database's clock, which is this machine's).
    expect(Date.parse(data!.run_at)).toBeLessThanOrEqual(Date.now() + 1000);
    expect(Date.parse(data!.run_at)).toBeGreaterThanOrEqual(before - 1000);

    const history = await clients.operator!.GET("/tasks/{id}/history", { params: { path: { id: task.id }, query: {} } });
    const retried = history.data?.events.filter((event) => event.kind === "retried") ?? [];
    expect(retried).toHaveLength(1);
    expect(retried[0]).toMatchObject({
      state: "queued",
      actor: "operator",
      detail: { from: "failed", max_attempts_before: 2, max_attempts: 3 },
    });

    // The next attempt runs under the next fencing number, and its failure is final: exactly one more.
    const claimed = await claimDue(db.sql, "c-test", ["w1"], 30_000);
    expect(claimed.map((row) => [row.id, row.attempt])).toEqual([[task.id, 3]]);
    await finishAttempt(db.sql, { taskId: task.id, attempt: 3, workerId: "w1" }, attemptResult({ state: "failed", exitCode: 4 }));
    const after = await getTask(db.sql, task.id);
    expect(after?.state).toBe("failed");
    expect(after?.error).toBe("exhausted 3 attempts: last exit code 4");
  });

  test("succeeded, cancelled and timed-out tasks retry; a cancelled one with attempts left keeps its budget", async () => {
    const succeeded = await succeededTask();
    const cancelled = await createTask(db.sql, taskSpec({ maxAttempts: 3 }));
    await cancelTask(db.sql, cancelled.id, "someone");
    const timedOut = await createTask(db.sql, taskSpec({ maxAttempts: 1 }));
    await claimDue(db.sql, "c-test", ["w1"], 30_000);
    await finishAttempt(
      db.sql,
      { taskId: timedOut.id, attempt: 1, workerId: "w1" },
      attemptResult({ state: "timed_out", exitCode: null, signal: "SIGKILL" }),
    );
    expect((await getTask(db.sql, timedOut.id))?.state).toBe("timed_out");

    for (const [task, from, budget] of [
      [succeeded, "succeeded", 3],
      [cancelled, "cancelled", 3],
      [timedOut, "timed_out", 2],
    ] as const) {
      const { data, response } = await clients.operator!.POST("/tasks/{id}/retry", { params: { path: { id: task.id } } });
      expect(response.status, from).toBe(200);
      expect(data?.state).toBe("queued");
      expect(data?.max_attempts, from).toBe(budget);
      expect(data?.cancelled_at).toBeNull();
      expect(data?.completed_at).toBeNull();
    }
  });

  test("409 not_final for a task that has not finished; 404 unknown; 400 not an id", async () => {
    const queued = await createTask(db.sql);
    const { error, response } = await clients.operator!.POST("/tasks/{id}/retry", { params: { path: { id: queued.id } } });
    expect(response.status).toBe(409);
    expect(error?.error.code).toBe("not_final");
    expect(error?.error.message).toContain("queued");
    // Running, too.
    await claimDue(db.sql, "c-test", ["w1"], 30_000);
    const running = await clients.operator!.POST("/tasks/{id}/retry", { params: { path: { id: queued.id } } });
    expect(running.response.status).toBe(409);
    expect(running.error?.error.code).toBe("not_final");
    // Nothing was recorded.
    expect((await db.sql`SELECT 1 FROM task_events WHERE task_id = ${queued.id} AND kind = 'retried'`).length).toBe(0);

    const unknown = await clients.operator!.POST("/tasks/{id}/retry", {
      params: { path: { id: "0190a0a0-0000-7000-8000-000000000000" } },
    });
    expect(unknown.response.status).toBe(404);
    expect(unknown.error?.error.code).toBe("not_found");
    const bad = await clients.operator!.POST("/tasks/{id}/retry", { params: { path: { id: "nope" } } });
    expect(bad.response.status).toBe(400);
  });

  test("needs the submit scope", async () => {
    const task = await failedTask();
    for (const who of ["reader", "canceller"]) {
      const { error, response } = await clients[who]!.POST("/tasks/{id}/retry", { params: { path: { id: task.id } } });
      expect(response.status, who).toBe(403);
      expect(error?.error.message).toContain("submit");
    }
    expect((await getTask(db.sql, task.id))?.state).toBe("failed");
  });

  test("a retried task's watch follows the new attempt from its retried event", async () => {
    const task = await failedTask();
    await clients.operator!.POST("/tasks/{id}/retry", { params: { path: { id: task.id } } });
    const response = await fetch(`${httpUrl}/tasks/${task.id}/events`, {
      headers: { authorization: `Bearer ${tokens.reader}` },
    });
    expect(response.status).toBe(200);
    const reader = response.body!.getReader();
    const { value } = await reader.read();
    await reader.cancel();
    const text = new TextDecoder().decode(value);
    expect(text).toContain('"state":"queued"');
  });
});

describe("POST /tasks/bulk", () => {
  test("retry by ids: the finished ones are queued, the others skipped with their reason", async () => {
    const failed = await failedTask();
    const done = await succeededTask();
    const queued = await createTask(db.sql);
    const unknown = "0190a0a0-0000-7000-8000-000000000001";
    const { data, response } = await clients.operator!.POST("/tasks/bulk", {
      body: { action: "retry", ids: [failed.id, done.id, queued.id, unknown] },
    });
    expect(response.status).toBe(200);
    expect(data?.matched).toBe(4);
    expect(data?.changed).toBe(2);
    expect(data?.skipped).toEqual(
      expect.arrayContaining([
        { id: queued.id, reason: "not_final" },
        { id: unknown, reason: "not_found" },
      ]),
    );
    expect(data?.skipped).toHaveLength(2);
    for (const id of [failed.id, done.id]) expect((await getTask(db.sql, id))?.state).toBe("queued");
    const actors = await db.sql<{ actor: string }[]>`SELECT actor FROM task_events WHERE kind = 'retried'`;
    expect(actors.map((row) => row.actor)).toEqual(["operator", "operator"]);
  });

  test("cancel by filter: every matching task, beyond one statement's page, the rest untouched", async () => {
    // 501 queued tasks in queue "bulk": more than one page of 500.
    await db.sql`INSERT INTO tasks (id, command, state, scheduled_at, run_at, queue)
      SELECT gen_random_uuid(), 'true', 'queued', now() + interval '1 hour', now() + interval '1 hour', 'bulk'
      FROM generate_series(1, 501)`;
    const other = await createTask(db.sql, taskSpec({ scheduledAt: new Date(Date.now() + 3_600_000) }));
    const done = await succeededTask();
    const { data, response } = await clients.canceller!.POST("/tasks/bulk", {
      body: { action: "cancel", filter: { queue: "bulk" } },
    });
    expect(response.status).toBe(200);
    expect(data).toEqual({ matched: 501, changed: 501, skipped: [] });
    const counts = await db.sql<{ state: string; n: number }[]>`
      SELECT state, count(*)::int AS n FROM tasks WHERE queue = 'bulk' GROUP BY state`;
    expect([...counts]).toEqual([{ state: "cancelled", n: 501 }]);
    expect((await getTask(db.sql, other.id))?.state).toBe("queued");

    // A cancel of a finished task is skipped, as the one-task route's 409.
    const again = await clients.canceller!.POST("/tasks/bulk", { body: { action: "cancel", ids: [done.id] } });
    expect(again.data).toEqual({ matched: 1, changed: 0, skipped: [{ id: done.id, reason: "already_final" }] });

    // And a retry over a state filter takes them back.
    const retried = await clients.operator!.POST("/tasks/bulk", {
      body: { action: "retry", filter: { state: "cancelled", queue: "bulk" } },
    });
    expect(retried.data?.changed).toBe(501);
    // The skipped list is capped at 100.
    const capped = await clients.operator!.POST("/tasks/bulk", { body: { action: "retry", filter: { queue: "bulk" } } });
    expect(capped.data?.matched).toBe(501);
    expect(capped.data?.changed).toBe(0);
    expect(capped.data?.skipped).toHaveLength(100);
  });

  test("each action needs its own scope; bad bodies are 400 naming the problem", async () => {
    const task = await failedTask();
    const asCanceller = await clients.canceller!.POST("/tasks/bulk", { body: { action: "retry", ids: [task.id] } });
    expect(asCanceller.response.status).toBe(403);
    expect(asCanceller.error?.error.message).toContain("submit");
    const asReader = await clients.reader!.POST("/tasks/bulk", { body: { action: "cancel", ids: [task.id] } });
    expect(asReader.response.status).toBe(403);
    expect(asReader.error?.error.message).toContain("cancel");

    const raw = (body: unknown) =>
      fetch(`${httpUrl}/tasks/bulk`, {
        method: "POST",
        headers: { authorization: `Bearer ${tokens.operator}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      }).then(async (response) => ({ status: response.status, json: (await response.json()) as any }));
    const both = await raw({ action: "retry", ids: [task.id], filter: {} });
    expect(both.status).toBe(400);
    expect(both.json.error.message).toContain("exactly one of ids or filter");
    const neither = await raw({ action: "retry" });
    expect(neither.status).toBe(400);
    const badAction = await raw({ action: "explode", ids: [task.id] });
    expect(badAction.status).toBe(400);
    expect(badAction.json.error.field).toBe("action");
    const badId = await raw({ action: "retry", ids: ["nope"] });
    expect(badId.status).toBe(400);
    expect(badId.json.error.field).toMatch(/^ids/);
    const badFilter = await raw({ action: "retry", filter: { colour: "red" } });
    expect(badFilter.status).toBe(400);
    expect(JSON.stringify(badFilter.json.error)).toContain("colour");
    expect((await getTask(db.sql, task.id))?.state).toBe("failed");
  });
});

describe("gRPC RetryTask", () => {
  test("retries a finished task; FAILED_PRECONDITION while it has not finished; needs submit", async () => {
    const TaskClient = clientConstructor(TaskService);
    const client = new TaskClient(grpcAddress, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
    const call = (request: object, token: string) =>
      new Promise<any>((resolve) => {
        const metadata = new grpc.Metadata();
        metadata.set("authorization", `Bearer ${token}`);
        client.retryTask!(request, metadata, (error: grpc.ServiceError | null, response: unknown) =>
          resolve(error ? { code: error.code, details: error.details } : response),
        );
      });
    try {
      const task = await failedTask();
      const denied = await call({ id: task.id }, tokens.reader!);
      expect(denied.code).toBe(grpc.status.PERMISSION_DENIED);
      const answer = await call({ id: task.id }, tokens.operator!);
      expect(answer.task.state).toBe(TaskState.QUEUED);
      const again = await call({ id: task.id }, tokens.operator!);
      expect(again.code).toBe(grpc.status.FAILED_PRECONDITION);
      const events = await db.sql`SELECT actor FROM task_events WHERE task_id = ${task.id} AND kind = 'retried'`;
      expect(events.map((row) => row.actor)).toEqual(["operator"]);
    } finally {
      client.close();
    }
  });
});
