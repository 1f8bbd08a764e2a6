// Fault tolerance with real processes: frozen workers, cancels and timeouts that really stop
// processes, retries, a second coordinator to fail over to, and graceful shutdown.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { freePort, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { getJson, postJson, watchTask } from "../support/http";
import { isRunning } from "../support/is-running";
import { type RoleProcess, spawnRole, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let dir: string;

beforeAll(() => {
  dir = taskDir("tq-faults-");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Writes its pid to `pidFile-<attempt>`, then blocks until `gate` exists. */
const blocking = (name: string) =>
  `echo $$ > '${join(dir, name)}-'$TQ_TASK_ATTEMPT; while [ ! -e '${join(dir, name)}.gate' ]; do sleep 0.02; done; echo "attempt $TQ_TASK_ATTEMPT"`;
const pidOf = (name: string, attempt: number) => Number(readFileSync(join(dir, `${name}-${attempt}`), "utf8").trim());
const openGate = (name: string) => writeFileSync(join(dir, `${name}.gate`), "");

async function workerId(worker: RoleProcess): Promise<string> {
  return String((await worker.waitForEvent("worker.starting")).id);
}

async function events(taskId: string): Promise<string[]> {
  const rows = await db.sql<{ kind: string; attempt: number }[]>`
    SELECT kind, attempt FROM task_events WHERE task_id = ${taskId} ORDER BY id`;
  return rows.map((row) => `${row.kind}#${row.attempt}`);
}

// With its watchdog on, a frozen worker is killed with its tasks first (test/e2e/watchdog.test.ts);
// without one, this is what remains: the lease lapses, and the thawed worker stops its stale copy.
test("a frozen worker without a watchdog: its task runs elsewhere once its lease lapses; resumed, its stale copy is stopped", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1 });
  try {
    const frozen = await cluster.addWorker({ TQ_WORKER_WATCHDOG: "off" });
    await frozen.waitForEvent("worker.no_watchdog");
    // A lease of its own, well above the heartbeat timeout (1 s here): silence alone requeues nothing.
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blocking("freeze"), lease_ms: 3000 });
    const first = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    expect(first.worker_id).toBe(await workerId(frozen));
    const other = await cluster.addWorker();
    frozen.kill("SIGSTOP");
    const second = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running" && t.attempt === 2);
    expect(second.worker_id).toBe(await workerId(other));
    const stalePid = pidOf("freeze", 1);
    expect(isRunning(stalePid)).toBe(true);
    expect(cluster.coordinator.logged("sessions.worker_silent").length).toBeGreaterThan(0);
    frozen.kill("SIGCONT");
    // Back, it stops the superseded attempt: its own count of the lease ran out while frozen
    // (worker.lease_fenced), or it is told to on reconnecting.
    await frozen.waitForEvent("worker.task_stopped", { where: (line) => line.attempt === 1, what: "the stale attempt stopped" });
    expect(isRunning(stalePid)).toBe(false);
    openGate("freeze");
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2, stdout: "attempt 2\n" });
    const history = await events(task.id);
    expect(history).toContain("requeued#1");
    expect(history.filter((e) => e.startsWith("succeeded"))).toEqual(["succeeded#2"]);
    // It re-registered cleanly and takes work again.
    const { json: next } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: "echo again" });
    expect((await watchTask(cluster.coordinatorUrl, next.id)).state).toBe("succeeded");
  } finally {
    await cluster.stop();
  }
});

test("cancelling a running task kills its process group; the task is cancelled", async () => {
  const cluster = await startCluster(db.url, { workers: 1, slots: 1 });
  try {
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blocking("cancel") });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    const pid = pidOf("cancel", 1);
    const cancelled = await postJson(`${cluster.schedulerUrl}/tasks/${task.id}/cancel`, {});
    expect(cancelled.status).toBe(200);
    expect(cancelled.json).toMatchObject({ state: "cancelled" });
    expect(cancelled.json.cancelled_at).toEqual(expect.any(String));
    await cluster.workers[0]!.waitForEvent("worker.task_stopped", {
      where: (l) => l.task_id === task.id,
      what: "the cancelled task stopped",
    });
    expect(isRunning(pid)).toBe(false);
    const again = await postJson(`${cluster.coordinatorUrl}/tasks/${task.id}/cancel`, {});
    expect(again.status).toBe(409);
    expect(again.json.error.message).toContain("cancelled");
    expect((await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}`)).json.state).toBe("cancelled");
  } finally {
    await cluster.stop();
  }
});

test("a timeout kills the whole process group, grandchildren included: state timed_out", async () => {
  const cluster = await startCluster(db.url, { workers: 1, slots: 1, env: { TQ_KILL_GRACE_MS: "200" } });
  try {
    const pids = join(dir, "timeout-pids");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, {
      command: `sleep 100 & echo $! > '${pids}'; sleep 100 & echo $! >> '${pids}'; wait`,
      timeout_ms: 300,
      max_attempts: 1,
    });
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "timed_out", attempt: 1 });
    expect(done.error).toContain("timed out after 300 ms");
    expect(done.failed_at).toEqual(expect.any(String));
    const children = readFileSync(pids, "utf8").trim().split("\n").map(Number);
    expect(children).toHaveLength(2);
    for (const pid of children) expect(isRunning(pid)).toBe(false);
  } finally {
    await cluster.stop();
  }
});

test("a failed attempt is retried after its backoff and the next one succeeds", async () => {
  const cluster = await startCluster(db.url, { workers: 1, slots: 1 });
  try {
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, {
      command: `[ "$TQ_TASK_ATTEMPT" -ge 2 ] || exit 7; echo "attempt $TQ_TASK_ATTEMPT"`,
      max_attempts: 3,
      retry: { backoff_base_ms: 50, backoff_cap_ms: 100 },
    });
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2, stdout: "attempt 2\n" });
    const history = await events(task.id);
    // The first failure is retried: its event says so, and the attempt keeps its exit code.
    expect(history.filter((e) => /^(retrying|failed|succeeded)/.test(e))).toEqual(["retrying#1", "succeeded#2"]);
    const attempts = (await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}/attempts`)).json.attempts;
    expect(attempts.map((a: { exit_code: number; outcome: string }) => [a.exit_code, a.outcome])).toEqual([
      [7, "failed"],
      [0, "succeeded"],
    ]);
  } finally {
    await cluster.stop();
  }
});

describe("two coordinators", () => {
  test("killing one: its worker fails over to the other and delivers its result; nothing runs twice", async () => {
    const a = await startCluster(db.url, { workers: 0, scheduler: false, env: { TQ_HEARTBEAT_TIMEOUT_MS: "5000" } });
    const b = await startCluster(db.url, { workers: 0, scheduler: false, env: { TQ_HEARTBEAT_TIMEOUT_MS: "5000" } });
    try {
      // The worker knows both; it starts on a random one, so make sure it is on A first.
      const worker = await a.addWorker({ TQ_COORDINATOR_ADDRESSES: `${a.grpcAddress},${b.grpcAddress}` });
      const joined = await worker.waitForEvent("worker.connected");
      const onA = String(joined.coordinator) === String((await a.coordinator.waitForEvent("coordinator.started")).id);
      const [home, away] = onA ? [a, b] : [b, a];
      const { json: task } = await postJson(`${home.coordinatorUrl}/submit`, { command: blocking("failover") });
      await watchTask(home.coordinatorUrl, task.id, (t) => t.state === "running");
      home.coordinator.kill("SIGKILL");
      await home.coordinator.exited;
      const awayId = String((await away.coordinator.waitForEvent("coordinator.started")).id);
      await worker.waitForEvent("worker.connected", {
        where: (l) => l.coordinator === awayId,
        what: "a connect to the other coordinator",
      });
      openGate("failover");
      const done = await watchTask(away.coordinatorUrl, task.id);
      expect(done).toMatchObject({ state: "succeeded", attempt: 1, stdout: "attempt 1\n" });
      expect(await events(task.id)).not.toContain("requeued#1");
    } finally {
      await a.stop();
      await b.stop();
    }
  });
});

test("every role stops cleanly on SIGTERM", async () => {
  const env = { DATABASE_URL: db.url };
  const coordinator = spawnRole("coordinator", {
    ...env,
    TQ_COORDINATOR_PORT: String(await freePort()),
    TQ_GRPC_PORT: String(await freePort()),
  });
  const scheduler = spawnRole("scheduler", { ...env, TQ_SCHEDULER_PORT: String(await freePort()) });
  await Promise.all([coordinator.waitForEvent("coordinator.started"), scheduler.waitForEvent("scheduler.started")]);
  coordinator.kill("SIGTERM");
  scheduler.kill("SIGTERM");
  expect(await coordinator.exited).toBe(0);
  expect(await scheduler.exited).toBe(0);
  await coordinator.waitForEvent("coordinator.stopped");
  await scheduler.waitForEvent("scheduler.stopped");
});
