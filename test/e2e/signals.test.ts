// Stopping a role started as the README says, `bun run <role>`, with a signal to its process
// group (what systemd does by default, and a terminal's Ctrl+C): `bun run` forwards what it
// receives, so the role gets each signal twice. Repeated SIGTERMs drain once and exit 0; only
// a second interrupt cuts the drain short (exit 130).
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { getTask } from "../../src/db/tasks";
import { freePort, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { postJson, watchTask } from "../support/http";
import { isRunning } from "../support/is-running";
import { type RoleProcess, spawnRole, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let dir: string;

beforeAll(() => {
  dir = taskDir("tq-signals-");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Writes its pid to `<name>-<attempt>`, then blocks until `<name>.gate` exists. */
const blocking = (name: string) =>
  `echo $$ > '${join(dir, name)}-'$TQ_TASK_ATTEMPT; while [ ! -e '${join(dir, name)}.gate' ]; do sleep 0.02; done; echo "attempt $TQ_TASK_ATTEMPT"`;
const pidOf = (name: string, attempt: number) => Number(readFileSync(join(dir, `${name}-${attempt}`), "utf8").trim());
const openGate = (name: string) => writeFileSync(join(dir, `${name}.gate`), "");

// What src/role.ts logs as it reads the stop signals (their `event`).
const STOPPING = "role.stopping";
const AGAIN = "role.stopping_again";
const ARMED = "role.stop_armed";
const NOW = "role.stopping_now";

const count = (role: RoleProcess, event: string) => role.logged(event).length;

async function taskRow(id: string) {
  const task = await getTask(db.sql, id);
  return task && { state: task.state, attempt: task.attempt, stdout: task.stdout };
}

test("worker: SIGTERM to the group, twice, drains once; the running task finishes and the worker exits 0", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1, scheduler: false, env: { TQ_DRAIN_GRACE_MS: "30000" } });
  try {
    const worker = await cluster.addWorker({}, { viaBunRun: true });
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blocking("term") });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    worker.signalGroup("SIGTERM");
    await worker.waitForEvent("worker.draining");
    worker.signalGroup("SIGTERM");
    await worker.waitForEvent(AGAIN, { where: (line) => line.signal === "SIGTERM", what: "a repeated SIGTERM" });
    openGate("term");
    expect(await worker.exited).toBe(0);
    expect(count(worker, STOPPING)).toBe(1);
    expect(count(worker, NOW)).toBe(0);
    expect(await taskRow(task.id)).toEqual({ state: "succeeded", attempt: 1, stdout: "attempt 1\n" });
  } finally {
    openGate("term");
    await cluster.stop();
  }
});

test("worker: a second Ctrl-C stops it now (exit 130) and kills its task; the task runs again elsewhere", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1, scheduler: false, env: { TQ_DRAIN_GRACE_MS: "30000" } });
  try {
    const worker = await cluster.addWorker({}, { viaBunRun: true });
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: blocking("int"), max_attempts: 2 });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    // One Ctrl-C reaches the worker twice (from the terminal and from `bun run`): one interrupt.
    worker.signalGroup("SIGINT");
    await worker.waitForEvent("worker.draining");
    await worker.waitForEvent(ARMED);
    expect(count(worker, NOW)).toBe(0);
    worker.signalGroup("SIGINT");
    await worker.waitForEvent(NOW);
    expect(await worker.exited).toBe(130);
    expect(count(worker, STOPPING)).toBe(1);
    expect(isRunning(pidOf("int", 1))).toBe(false);
    openGate("int");
    await cluster.addWorker();
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2 });
    expect(await taskRow(task.id)).toEqual({ state: "succeeded", attempt: 2, stdout: "attempt 2\n" });
  } finally {
    openGate("int");
    await cluster.stop();
  }
});

/**
 * A coordinator through `bun run` with a frozen worker connected: the worker cannot close its
 * stream, so the coordinator's drain lasts until it cuts the stream off (2 s).
 */
async function drainingCoordinator(): Promise<{ coordinator: RoleProcess; release(): Promise<void> }> {
  const grpcPort = await freePort();
  const coordinator = spawnRole(
    "coordinator",
    { DATABASE_URL: db.url, TQ_COORDINATOR_PORT: String(await freePort()), TQ_GRPC_PORT: String(grpcPort) },
    { viaBunRun: true },
  );
  await coordinator.waitForEvent("coordinator.started");
  const worker = spawnRole("worker", { TQ_COORDINATOR_ADDRESSES: `127.0.0.1:${grpcPort}` });
  await worker.waitForEvent("worker.connected");
  worker.kill("SIGSTOP");
  return {
    coordinator,
    async release() {
      worker.kill("SIGCONT");
      await Promise.all([coordinator.stop(5000), worker.stop(5000)]);
    },
  };
}

test("coordinator: SIGTERM to the group, twice, drains once and exits 0", async () => {
  const { coordinator, release } = await drainingCoordinator();
  try {
    coordinator.signalGroup("SIGTERM");
    await coordinator.waitForEvent(STOPPING);
    coordinator.signalGroup("SIGTERM");
    await coordinator.waitForEvent(AGAIN, { where: (line) => line.signal === "SIGTERM", what: "a repeated SIGTERM" });
    expect(await coordinator.exited).toBe(0);
    await coordinator.waitForEvent("coordinator.stopped");
    expect(count(coordinator, STOPPING)).toBe(1);
  } finally {
    await release();
  }
});

test("coordinator: a second Ctrl-C stops it now without drain and says so (exit 130)", async () => {
  const { coordinator, release } = await drainingCoordinator();
  try {
    coordinator.signalGroup("SIGINT");
    await coordinator.waitForEvent(ARMED);
    coordinator.signalGroup("SIGINT");
    const line = await coordinator.waitForEvent(NOW);
    expect(line.level).toBe(40); // warn
    expect(await coordinator.exited).toBe(130);
    expect(count(coordinator, "coordinator.stopped")).toBe(0);
  } finally {
    await release();
  }
});

test("scheduler: one Ctrl-C to the group (it arrives twice) drains and exits 0", async () => {
  const scheduler = spawnRole(
    "scheduler",
    { DATABASE_URL: db.url, TQ_SCHEDULER_PORT: String(await freePort()) },
    { viaBunRun: true },
  );
  try {
    await scheduler.waitForEvent("scheduler.started");
    scheduler.signalGroup("SIGINT");
    expect(await scheduler.exited).toBe(0);
    await scheduler.waitForEvent("scheduler.stopped");
    expect(count(scheduler, STOPPING)).toBe(1);
    expect(count(scheduler, NOW)).toBe(0);
  } finally {
    await scheduler.stop(5000);
  }
});
