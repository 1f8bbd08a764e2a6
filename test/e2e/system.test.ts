// The roles as separate processes on a real database: scheduling, execution, spreading,
// waiting for a worker, and rescue after a SIGKILL.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { getJson, postJson, type TaskJson, watchTask } from "../support/http";
import { type Cluster, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let dir: string;

beforeAll(() => {
  dir = taskDir("tq-e2e-");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A shell command that blocks until `gate` exists, then prints `out`. */
const blockUntil = (gate: string, out = "done") => `while [ ! -e '${gate}' ]; do sleep 0.02; done; echo ${out}`;

describe("one coordinator, one scheduler, two workers", () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster(db.url, { workers: 2 });
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await cluster?.stop();
  }, HOOK_TIMEOUT_MS);

  test("a task scheduled 2 s ahead runs after, never before, its time; status shows every timestamp", async () => {
    const scheduledAt = new Date(Date.now() + 2000);
    // The seed's request: no Content-Type, as curl -d sends it.
    const response = await fetch(`${cluster.schedulerUrl}/schedule`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: JSON.stringify({ command: "date +%s%3N", scheduled_at: scheduledAt.toISOString() }),
    });
    expect(response.status).toBe(200);
    const created = (await response.json()) as { task_id: string; command: string; scheduled_at: string };
    expect(created.command).toBe("date +%s%3N");
    expect(new Date(created.scheduled_at).getTime()).toBe(scheduledAt.getTime());
    const done = await watchTask(cluster.schedulerUrl, created.task_id);
    expect(done.state).toBe("succeeded");
    const ranAtMs = Number(String(done.stdout).trim());
    expect(ranAtMs).toBeGreaterThanOrEqual(scheduledAt.getTime());
    const { status, json } = await getJson(`${cluster.schedulerUrl}/status?task_id=${created.task_id}`);
    expect(status).toBe(200);
    expect(json.task_id).toBe(created.task_id);
    expect(json.state).toBe("succeeded");
    for (const field of ["scheduled_at", "created_at", "picked_at", "started_at", "completed_at"]) {
      expect(typeof json[field]).toBe("string");
      expect(json[field]).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    }
    expect(json.failed_at).toBeNull();
    expect(json.cancelled_at).toBeNull();
    // Handed to its worker at most TQ_DISPATCH_AHEAD_MS (200 by default) before its time.
    expect(new Date(json.picked_at).getTime()).toBeGreaterThanOrEqual(scheduledAt.getTime() - 200);
    expect(new Date(json.started_at).getTime()).toBeGreaterThanOrEqual(scheduledAt.getTime());
    expect(new Date(json.completed_at).getTime()).toBeGreaterThanOrEqual(new Date(json.started_at).getTime());
  });

  test("output of echo hello comes back, and a non-zero exit is failed with its code", async () => {
    const hello = await postJson(`${cluster.coordinatorUrl}/submit`, { command: "echo hello" });
    expect(hello.status).toBe(201);
    const failing = await postJson(`${cluster.schedulerUrl}/submit`, { command: "echo oops >&2; exit 3", max_attempts: 1 });
    expect(failing.status).toBe(201);
    const [ok, bad] = await Promise.all([
      watchTask(cluster.coordinatorUrl, hello.json.id),
      watchTask(cluster.coordinatorUrl, failing.json.id),
    ]);
    expect(ok).toMatchObject({ state: "succeeded", exit_code: 0, stdout: "hello\n", stdout_truncated: false });
    expect(bad).toMatchObject({ state: "failed", exit_code: 3, stderr: "oops\n" });
    expect(bad.failed_at).toEqual(expect.any(String));
    expect(bad.completed_at).toBeNull();
  });
});

test("8 tasks over 4 workers with 2 slots each run 2 on each", async () => {
  const cluster = await startCluster(db.url, { workers: 4, slots: 2 });
  try {
    const gate = join(dir, "gate-spread");
    const ids: string[] = [];
    for (let i = 0; i < 8; i++) {
      const { status, json } = await postJson(`${cluster.schedulerUrl}/tasks`, { command: blockUntil(gate) });
      expect(status).toBe(201);
      ids.push(json.id);
    }
    const running = await Promise.all(ids.map((id) => watchTask(cluster.coordinatorUrl, id, (t) => t.state === "running")));
    const perWorker = new Map<string, number>();
    for (const task of running) perWorker.set(task.worker_id!, (perWorker.get(task.worker_id!) ?? 0) + 1);
    expect([...perWorker.values()]).toEqual([2, 2, 2, 2]);
    writeFileSync(gate, "");
    const done = await Promise.all(ids.map((id) => watchTask(cluster.coordinatorUrl, id)));
    expect(done.map((t) => t.state)).toEqual(Array(8).fill("succeeded"));
  } finally {
    await cluster.stop();
  }
});

test("with no worker connected a task stays queued, and runs once one connects", async () => {
  const cluster = await startCluster(db.url, { workers: 0 });
  try {
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: "echo late" });
    expect(task.state).toBe("queued");
    // Nothing can claim it: this coordinator has no workers (the database may still list
    // other tests' workers for a heartbeat timeout).
    const coordinatorId = String((await cluster.coordinator.waitForEvent("coordinator.started")).id);
    const workers = await getJson(`${cluster.coordinatorUrl}/workers`);
    expect((workers.json.workers as { coordinator_id: string }[]).filter((w) => w.coordinator_id === coordinatorId)).toEqual([]);
    const status = await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}`);
    expect(status.json).toMatchObject({ state: "queued", picked_at: null, attempt: 0 });
    const joinedAt = Date.now();
    await cluster.addWorker();
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", stdout: "late\n", attempt: 1 });
    expect(new Date(String(done.picked_at)).getTime()).toBeGreaterThanOrEqual(joinedAt - 5);
  } finally {
    await cluster.stop();
  }
});

test("a worker killed with SIGKILL mid-task: the task runs again elsewhere and succeeds; the worker leaves /workers", async () => {
  const cluster = await startCluster(db.url, { workers: 2, slots: 1 });
  try {
    const gate = join(dir, "gate-kill");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, {
      command: blockUntil(gate, "$TQ_TASK_ATTEMPT"),
      max_attempts: 3,
    });
    const first: TaskJson = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    expect(first.attempt).toBe(1);
    const ids = await Promise.all(cluster.workers.map(async (w) => String((await w.waitForEvent("worker.starting")).id)));
    const victimIndex = ids.indexOf(first.worker_id!);
    expect(victimIndex).toBeGreaterThanOrEqual(0);
    cluster.workers[victimIndex]!.kill("SIGKILL");
    const second = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running" && t.attempt === 2);
    expect(second.worker_id).toBe(ids[1 - victimIndex]!);
    writeFileSync(gate, "");
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2, stdout: "2\n" });
    const workers = await getJson(`${cluster.coordinatorUrl}/workers`);
    const listed = (workers.json.workers as { id: string }[]).map((w) => w.id);
    expect(listed).not.toContain(first.worker_id);
    expect(listed).toContain(ids[1 - victimIndex]!);
    const events = await db.sql<{ kind: string; attempt: number }[]>`
      SELECT kind, attempt FROM task_events WHERE task_id = ${task.id} ORDER BY id`;
    expect(events.map((e) => `${e.kind}#${e.attempt}`)).toContain("requeued#1");
  } finally {
    await cluster.stop();
  }
});
