// How roles come and go: a worker drains on SIGTERM, hands work back after its grace period,
// and rides out a coordinator restart without losing or re-running its task.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { getJson, postJson, watchTask } from "../support/http";
import { startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let dir: string;

beforeAll(() => {
  dir = taskDir("tq-life-");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const blockUntil = (gate: string) => `while [ ! -e '${gate}' ]; do sleep 0.02; done; echo "attempt $TQ_TASK_ATTEMPT"`;

async function workerIds(processes: { waitForEvent(event: string): Promise<Record<string, unknown>> }[]) {
  return Promise.all(processes.map(async (p) => String((await p.waitForEvent("worker.starting")).id)));
}

test("SIGTERM drains a worker: its running task finishes, then it exits 0", async () => {
  const cluster = await startCluster(db.url, { workers: 1, slots: 1, env: { TQ_DRAIN_GRACE_MS: "30000" } });
  try {
    const gate = join(dir, "gate-drain");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blockUntil(gate) });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    const worker = cluster.workers[0]!;
    worker.kill("SIGTERM");
    await worker.waitForEvent("worker.draining");
    writeFileSync(gate, "");
    expect(await worker.exited).toBe(0);
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 1, stdout: "attempt 1\n" });
  } finally {
    await cluster.stop();
  }
});

test("a draining worker hands its task back after the grace period; it runs again elsewhere", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1 });
  try {
    const leaving = await cluster.addWorker({ TQ_DRAIN_GRACE_MS: "200" });
    const gate = join(dir, "gate-handback");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blockUntil(gate) });
    const first = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    const [leavingId] = await workerIds([leaving]);
    expect(first.worker_id).toBe(leavingId!);
    const staying = await cluster.addWorker();
    leaving.kill("SIGTERM");
    expect(await leaving.exited).toBe(0);
    const second = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running" && t.attempt === 2);
    const [stayingId] = await workerIds([staying]);
    expect(second.worker_id).toBe(stayingId!);
    writeFileSync(gate, "");
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2, stdout: "attempt 2\n" });
  } finally {
    await cluster.stop();
  }
});

test("a drain's hand-back does not use up the task's one attempt: it runs again elsewhere and succeeds", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1 });
  try {
    const leaving = await cluster.addWorker({ TQ_DRAIN_GRACE_MS: "200" });
    const [leavingId] = await workerIds([leaving]);
    const gate = join(dir, "gate-interrupted");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: blockUntil(gate), max_attempts: 1 });
    const first = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    expect(first.worker_id).toBe(leavingId!);
    leaving.kill("SIGTERM");
    expect(await leaving.exited).toBe(0);
    // Handed back, not failed: before, max_attempts 1 ended the task here.
    const requeued = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state !== "running" && t.state !== "dispatched");
    expect(requeued).toMatchObject({ state: "queued", attempt: 1, interruptions: 1 });
    const staying = await cluster.addWorker();
    const [stayingId] = await workerIds([staying]);
    const second = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running" && t.attempt === 2);
    expect(second.worker_id).toBe(stayingId!);
    writeFileSync(gate, "");
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2, interruptions: 1, stdout: "attempt 2\n" });
    const { json: attempts } = await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}/attempts`);
    expect(attempts.attempts.map((a: { outcome: string; error: string | null }) => [a.outcome, a.error])).toEqual([
      ["interrupted", "the worker is draining"],
      ["succeeded", null],
    ]);
    const { json: history } = await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}/history`);
    const requeues = history.events.filter((e: { kind: string }) => e.kind === "requeued");
    expect(requeues.map((e: { attempt: number; detail: { cause: string } }) => [e.attempt, e.detail.cause])).toEqual([
      [1, "interrupted"],
    ]);
  } finally {
    await cluster.stop();
  }
});

test("a worker killed outright loses its attempt, which counts: with max_attempts 1 the task fails", async () => {
  const cluster = await startCluster(db.url, { workers: 1, slots: 1 });
  try {
    const gate = join(dir, "gate-killed");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: blockUntil(gate), max_attempts: 1 });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    const worker = cluster.workers[0]!;
    worker.kill("SIGKILL");
    await worker.exited;
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "failed", attempt: 1, interruptions: 0 });
    expect(done.error).toMatch(/^exhausted 1 attempt: last worker lost/);
    const { json: attempts } = await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}/attempts`);
    expect(attempts.attempts.map((a: { outcome: string }) => a.outcome)).toEqual(["lost"]);
    const { json: history } = await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}/history`);
    expect(history.events.at(-1)).toMatchObject({ kind: "failed", detail: { cause: "lost", outcome: "lost" } });
  } finally {
    writeFileSync(join(dir, "gate-killed"), "");
    await cluster.stop();
  }
});

test("a coordinator restart: the worker reconnects, keeps its task, and delivers the result once", async () => {
  // A heartbeat timeout well above the restart time, so the task is not rescued meanwhile.
  const cluster = await startCluster(db.url, {
    workers: 1,
    slots: 1,
    scheduler: false,
    env: { TQ_HEARTBEAT_TIMEOUT_MS: "10000" },
  });
  try {
    const gate = join(dir, "gate-restart");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blockUntil(gate) });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    const worker = cluster.workers[0]!;
    const old = cluster.coordinator;
    old.kill("SIGKILL");
    await old.exited;
    await worker.waitForEvent("worker.disconnected");
    // The task finishes while no coordinator is there: the worker holds the result.
    writeFileSync(gate, "");
    const connects = worker.logged("worker.connected").length;
    await cluster.restartCoordinator();
    await worker.waitFor(
      (l) => l.event === "worker.connected" && worker.logged("worker.connected").length > connects,
      "a second connect",
    );
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 1, stdout: "attempt 1\n" });
    const events = await db.sql<{ kind: string }[]>`SELECT kind FROM task_events WHERE task_id = ${task.id} ORDER BY id`;
    expect(events.map((e) => e.kind)).not.toContain("requeued");
  } finally {
    await cluster.stop();
  }
});
