// Early hand-over (TQ_DISPATCH_AHEAD_MS): a coordinator gives a worker a task shortly before
// it is due and the worker starts it at its time. A wide window here makes the wait
// observable: the task is dispatched well before its time, still never starts early, and
// while it waits it can be cancelled, or handed back by a draining worker.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, rmSync } from "node:fs";
import { join } from "node:path";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { getJson, postJson, watchTask } from "../support/http";
import { type Cluster, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const AHEAD_MS = 1000;
let dir: string;
let cluster: Cluster;

beforeAll(async () => {
  dir = taskDir("tq-ahead-");
  cluster = await startCluster(db.url, {
    workers: 1,
    slots: 2,
    scheduler: false,
    env: { TQ_DISPATCH_AHEAD_MS: String(AHEAD_MS) },
  });
}, HOOK_TIMEOUT_MS);
afterAll(async () => {
  await cluster?.stop();
  rmSync(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

const inTwoSeconds = () => new Date(Date.now() + 2000).toISOString();

describe(`TQ_DISPATCH_AHEAD_MS=${AHEAD_MS}`, () => {
  test("a task is dispatched before its time and starts at its time, never before", async () => {
    const scheduledAt = inTwoSeconds();
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, {
      command: "date +%s%3N",
      scheduled_at: scheduledAt,
    });
    const dispatched = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state !== "queued");
    // Handed over while still waiting for its time.
    expect(dispatched.state).toBe("dispatched");
    expect(new Date(String(dispatched.picked_at)).getTime()).toBeLessThan(new Date(scheduledAt).getTime());
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done.state).toBe("succeeded");
    expect(Number(String(done.stdout).trim())).toBeGreaterThanOrEqual(new Date(scheduledAt).getTime());
    expect(new Date(String(done.started_at)).getTime()).toBeGreaterThanOrEqual(new Date(scheduledAt).getTime());
  });

  test("cancelling a task that waits on its worker: it never runs, and the worker says it stopped it", async () => {
    const marker = join(dir, "ran");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, {
      command: `touch '${marker}'`,
      scheduled_at: inTwoSeconds(),
    });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "dispatched");
    const cancel = await postJson(`${cluster.coordinatorUrl}/tasks/${task.id}/cancel`, {});
    expect(cancel.status).toBe(200);
    // The worker's report of the attempt it dropped is recorded as a `stopped` event.
    const events = await waitForEvent(task.id, "stopped");
    expect(events.map((e) => e.kind)).toEqual(["submitted", "dispatched", "cancelled", "stopped"]);
    const { json: final } = await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}`);
    expect(final).toMatchObject({ state: "cancelled", started_at: null });
    expect(existsSync(marker)).toBe(false);
  });

  test("a draining worker hands back the tasks waiting on it at once; they run elsewhere on time", async () => {
    const leaving = cluster.workers[0]!;
    const scheduledAt = inTwoSeconds();
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, {
      command: "date +%s%3N",
      scheduled_at: scheduledAt,
    });
    const first = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "dispatched");
    const staying = await cluster.addWorker();
    leaving.kill("SIGTERM");
    // Nothing ran on it, so it leaves without waiting for its drain grace period.
    expect(await leaving.exited).toBe(0);
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2 });
    expect(done.worker_id).not.toBe(first.worker_id);
    expect(Number(String(done.stdout).trim())).toBeGreaterThanOrEqual(new Date(scheduledAt).getTime());
    const [stayingId] = await Promise.all([staying.waitForEvent("worker.starting")]);
    expect(done.worker_id).toBe(String(stayingId?.id));
  });
});

/** The kinds of the task's events once one of `kind` is among them (the note has no notification to wait on). */
async function waitForEvent(id: string, kind: string): Promise<{ kind: string }[]> {
  return eventually(
    async () => {
      const events = await db.sql<{ kind: string }[]>`SELECT kind FROM task_events WHERE task_id = ${id} ORDER BY id`;
      return events.some((e) => e.kind === kind) ? [...events] : null;
    },
    { what: `a ${kind} event of task ${id}`, timeoutMs: 10_000 },
  );
}
