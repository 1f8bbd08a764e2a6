// Leases with real processes (issue 12 items 1, 2 and 4): liveness and the lease are separate,
// a cut-off worker fences its attempt before the lease ends, and a worker thawed after a
// freeze starts nothing it received before it.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { postJson, watchTask } from "../support/http";
import { startCluster } from "../support/processes";
import { readmeCurls } from "../support/readme";
import { taskDir } from "../support/task-dir";
import { TcpProxy } from "../support/tcp-proxy";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let dir: string;

beforeAll(() => {
  dir = taskDir("tq-lease-");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Marks `name-started-<attempt>`, then blocks until `name.gate` exists. */
const blocking = (name: string) =>
  `echo $$ > '${join(dir, name)}-started-'$TQ_TASK_ATTEMPT; while [ ! -e '${join(dir, name)}.gate' ]; do sleep 0.02; done; echo "attempt $TQ_TASK_ATTEMPT"`;
const started = (name: string, attempt: number) => existsSync(join(dir, `${name}-started-${attempt}`));
const openGate = (name: string) => writeFileSync(join(dir, `${name}.gate`), "");

async function history(taskId: string): Promise<string[]> {
  const rows = await db.sql<{ kind: string; attempt: number }[]>`
    SELECT kind, attempt FROM task_events WHERE task_id = ${taskId} ORDER BY id`;
  return rows.map((row) => `${row.kind}#${row.attempt}`);
}

test("a lease_ms below the heartbeat timeout plus two intervals is a 400 naming the field", async () => {
  const cluster = await startCluster(db.url, { workers: 0, scheduler: false });
  try {
    // Heartbeats every 200 ms, timeout 1000 ms: at least 1400.
    const short = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: "true", lease_ms: 1399 });
    expect(short.status).toBe(400);
    expect(short.json.error).toMatchObject({ code: "invalid_argument", field: "lease_ms" });
    expect(short.json.error.message).toContain("at least 1400");
    const ok = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: "true", lease_ms: 1400 });
    expect(ok.status).toBe(201);
    expect(ok.json.lease_ms).toBe(1400);
    const unset = await postJson(`${cluster.coordinatorUrl}/submit`, { command: "true" });
    expect(unset.json.lease_ms).toBeNull();
    // The README's example, as printed.
    const example = readmeCurls("More of the API").find((line) => line.includes('"lease_ms"'));
    const body = JSON.parse(/-d '(.*)'$/.exec(example ?? "")?.[1] ?? "null");
    const printed = await postJson(`${cluster.coordinatorUrl}/tasks`, body);
    expect(printed.status).toBe(201);
    expect(printed.json.lease_ms).toBe(120_000);
    // Nothing of this test is left for the next one's workers.
    for (const id of [ok.json.id, unset.json.id, printed.json.id])
      await postJson(`${cluster.coordinatorUrl}/tasks/${id}/cancel`, {});
  } finally {
    await cluster.stop();
  }
});

test("a running task survives a coordinator restart shorter than its lease: nothing stopped, nothing rerun", async () => {
  // The defaults of the test cluster: heartbeat timeout 1 s, far below the lease (30 s).
  const cluster = await startCluster(db.url, { workers: 1, slots: 1, scheduler: false });
  try {
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blocking("restart") });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    const worker = cluster.workers[0]!;
    const old = cluster.coordinator;
    old.kill("SIGKILL");
    await old.exited;
    await worker.waitForEvent("worker.disconnected");
    const connects = worker.logged("worker.connected").length;
    const coordinator = await cluster.restartCoordinator();
    await worker.waitFor(
      (l) => l.event === "worker.connected" && worker.logged("worker.connected").length > connects,
      "a second connect",
    );
    // The new coordinator renewed the attempt's lease at Hello; the task keeps running there.
    await coordinator.waitForEvent("coordinator.worker_joined");
    openGate("restart");
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 1, stdout: "attempt 1\n" });
    expect(await history(task.id)).not.toContain("requeued#1");
    const ofTask = (event: string) => worker.logged(event).filter((l) => l.task_id === task.id);
    expect(ofTask("worker.lease_fenced")).toEqual([]);
    expect(ofTask("worker.task_stopped")).toEqual([]);
  } finally {
    await cluster.stop();
  }
});

test("a worker cut off without a reset stops its task before its lease ends, and before the next attempt starts", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1, scheduler: false });
  const [host, port] = cluster.grpcAddress.split(":") as [string, string];
  const proxy = await TcpProxy.start(host, Number(port));
  try {
    const cut = await cluster.addWorker({ TQ_COORDINATOR_ADDRESSES: `127.0.0.1:${proxy.port}` });
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blocking("cut"), lease_ms: 3000 });
    const first = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    expect(first.lease_ms).toBe(3000);
    const cutId = String((await cut.waitForEvent("worker.starting")).id);
    expect(first.worker_id).toBe(cutId);
    const other = await cluster.addWorker();
    proxy.silence();
    const fenced = await cut.waitForEvent("worker.lease_fenced", { where: (l) => l.task_id === task.id });
    expect(fenced).toMatchObject({ attempt: 1, lease_ms: 3000 });
    const stopped = await cut.waitForEvent("worker.task_stopped", { where: (l) => l.task_id === task.id });
    const second = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running" && t.attempt === 2);
    expect(second.worker_id).toBe(String((await other.waitForEvent("worker.starting")).id));
    // By the roles' own records (one host, one wall clock): the first attempt's processes were
    // gone (task_stopped is logged once its group has exited) before its lease ran out, which
    // is when the coordinator requeued it, and before the second attempt started.
    const [requeued] = await db.sql<{ at: Date }[]>`
      SELECT at FROM task_events WHERE task_id = ${task.id} AND kind = 'requeued' AND attempt = 1`;
    const [attempt2] = await db.sql<{ started_at: Date }[]>`
      SELECT started_at FROM task_attempts WHERE task_id = ${task.id} AND attempt = 2`;
    const stoppedAt = Date.parse(String(stopped.time));
    expect(stoppedAt).toBeLessThan(requeued!.at.getTime());
    expect(stoppedAt).toBeLessThan(attempt2!.started_at.getTime());
    expect(started("cut", 1)).toBe(true);
    proxy.restore();
    openGate("cut");
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2, stdout: "attempt 2\n" });
    // The cut worker's hand-back, delivered after the heal, is recorded as stale.
    await cut.waitForEvent("worker.connected", { where: () => cut.logged("worker.connected").length > 1 });
    await cluster.coordinator.waitForEvent("attempt.finished", { where: (l) => l.task_id === task.id && l.attempt === 1 });
    expect(await history(task.id)).toContain("stale#1");
  } finally {
    proxy.restore();
    await cluster.stop();
    await proxy.stop();
  }
});

test("a worker thawed after a freeze longer than the heartbeat timeout does not start an assignment it received before", async () => {
  // The production timings (heartbeats every second, dead after 3 s): a frozen worker counts
  // as live for two intervals, so the submit right after the freeze is assigned to it, and the
  // Assign waits in its socket through the freeze.
  const timings = { TQ_HEARTBEAT_INTERVAL_MS: "1000", TQ_HEARTBEAT_TIMEOUT_MS: "3000" };
  const cluster = await startCluster(db.url, { workers: 0, slots: 1, scheduler: false, env: timings });
  try {
    // Without its watchdog, which would kill a frozen worker (test/e2e/watchdog.test.ts): this is
    // the stall the worker must notice itself (a paused VM or container freezes the watchdog too).
    const frozen = await cluster.addWorker({ TQ_WORKER_WATCHDOG: "off" });
    const frozenId = String((await frozen.waitForEvent("worker.starting")).id);
    await frozen.waitForEvent("worker.no_watchdog");
    frozen.kill("SIGSTOP");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: blocking("thaw"), lease_ms: 5000 });
    try {
      const first = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "dispatched");
      expect(first.worker_id).toBe(frozenId);
      await cluster.coordinator.waitForEvent("sessions.worker_silent", { where: (l) => l.worker === frozenId });
      // Its lease lapses and the task runs elsewhere.
      const other = await cluster.addWorker();
      const second = await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running" && t.attempt === 2);
      expect(second.worker_id).toBe(String((await other.waitForEvent("worker.starting")).id));
    } finally {
      frozen.kill("SIGCONT");
    }
    // (A loaded machine may show shorter stalls before: the freeze is the one past the timeout.)
    const stall = await frozen.waitForEvent("worker.stall_detected", { where: (l) => Number(l.gapMs) > 3000 });
    await frozen.waitFor(
      (l) => l.event === "worker.reconciled" && Date.parse(String(l.time)) >= Date.parse(String(stall.time)),
      "the reconciliation after the freeze",
    );
    expect(started("thaw", 1)).toBe(false);
    openGate("thaw");
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2, stdout: "attempt 2\n" });
    expect(readFileSync(join(dir, "thaw-started-2"), "utf8").trim()).not.toBe("");
  } finally {
    await cluster.stop();
  }
});
