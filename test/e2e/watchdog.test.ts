// The worker's watchdog with real processes: a worker killed (kill -9 of its process group) or
// frozen (SIGSTOP of its group) mid-task has its task's process killed by its watchdog, which
// reports the attempt stopped; only then is the task requeued (confirmed death) and run
// elsewhere. A reset stream with a live worker requeues nothing, and a forged report is refused.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { WorkerService } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { clientConstructor } from "../../src/rpc/definitions";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { getJson, postJson, watchTask } from "../support/http";
import { isRunning } from "../support/is-running";
import { type Cluster, type RoleProcess, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";
import { TcpProxy } from "../support/tcp-proxy";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let dir: string;

beforeAll(() => {
  dir = taskDir("tq-watchdog-");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/**
 * Attempt 1 writes its pid and blocks until the gate opens; a later attempt first records,
 * from inside itself, whether attempt 1's process still runs (two live copies), then exits 0.
 */
const command = (name: string) => {
  const file = (suffix: string) => `'${join(dir, `${name}.${suffix}`)}'`;
  return [
    `if [ "$TQ_TASK_ATTEMPT" -gt 1 ]; then`,
    `  s=$(cut -d' ' -f3 /proc/$(cat ${file("pid-1")})/stat 2>/dev/null)`,
    `  if [ -n "$s" ] && [ "$s" != Z ]; then echo overlap > ${file("overlap")}; fi`,
    `  exit 0`,
    `fi`,
    `echo $$ > ${file("pid-1")}`,
    `while [ ! -e ${file("gate")} ]; do sleep 0.02; done`,
  ].join("\n");
};
/**
 * The product's heartbeat timings, not the suite's fast ones: the watchdog's report must beat
 * the lease (heartbeat timeout plus an interval) on a loaded machine, where starting its Bun
 * half to report takes a while; with a lease shorter than that the rescuer requeues first
 * (the processes are gone by then all the same, killed by the bash half at once).
 */
const PRODUCT_TIMINGS = { TQ_HEARTBEAT_INTERVAL_MS: "1000", TQ_HEARTBEAT_TIMEOUT_MS: "3000" };
const pidOf = (name: string) => Number(readFileSync(join(dir, `${name}.pid-1`), "utf8").trim());

async function historyOf(cluster: Cluster, id: string): Promise<{ kind: string; attempt: number; detail: any }[]> {
  return (await getJson(`${cluster.coordinatorUrl}/tasks/${id}/history`)).json.events;
}

/** Runs the task on a worker of its own (in its own process group), then adds a second one. */
async function runOnVictim(cluster: Cluster, name: string): Promise<{ victim: RoleProcess; task: { id: string } }> {
  const victim = await cluster.addWorker({}, { viaBunRun: true });
  await victim.waitForEvent("watchdog.started");
  const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: command(name), max_attempts: 3 });
  await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
  await victim.waitForEvent("worker.connected");
  while (!existsSync(join(dir, `${name}.pid-1`))) await Bun.sleep(10);
  await cluster.addWorker();
  return { victim, task };
}

async function expectConfirmedDeath(cluster: Cluster, victim: RoleProcess, name: string, taskId: string, how: string) {
  const pid = pidOf(name);
  const lost = await victim.waitForEvent("watchdog.worker_lost");
  expect(lost).toMatchObject({ how, all_gone: true, attempts: [`${taskId}:1`] });
  const reported = await victim.waitForEvent("watchdog.reported");
  expect(reported.requeued).toBe(1);
  const done = await watchTask(cluster.coordinatorUrl, taskId);
  expect(done).toMatchObject({ state: "succeeded", attempt: 2 });
  // The old copy is gone, and was gone when the next attempt began (it looked, from inside).
  expect(isRunning(pid)).toBe(false);
  expect(existsSync(join(dir, `${name}.overlap`))).toBe(false);
  const history = await historyOf(cluster, taskId);
  const requeue = history.findIndex((e) => e.attempt === 1 && e.detail?.cause === "lost");
  expect(requeue).toBeGreaterThan(-1);
  expect(history[requeue]!.detail.reason).toStartWith("worker lost: stopped by the watchdog after the worker died");
  // Requeued by the report: nothing of the next attempt comes before it (shown if it does).
  expect(history.slice(0, requeue).filter((e) => e.attempt === 2)).toEqual([]);
  expect(history.slice(requeue).some((e) => e.attempt === 2)).toBe(true);
  const { json: attempts } = await getJson(`${cluster.coordinatorUrl}/tasks/${taskId}/attempts`);
  expect(attempts.attempts.map((a: { outcome: string }) => a.outcome)).toEqual(["lost", "succeeded"]);
  const confirmed = await cluster.coordinator.waitForEvent("coordinator.worker_lost");
  expect(confirmed).toMatchObject({ attempts: [`${taskId}:1`], requeued: 1 });
}

test("kill -9 of a worker's process group mid-task: its watchdog kills the task and reports it; only then does it run elsewhere", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1, env: PRODUCT_TIMINGS });
  try {
    const { victim, task } = await runOnVictim(cluster, "killed");
    victim.signalGroup("SIGKILL");
    await expectConfirmedDeath(cluster, victim, "killed", task.id, "exited");
  } finally {
    writeFileSync(join(dir, "killed.gate"), "");
    await cluster.stop();
  }
});

test("SIGSTOP of a worker's process group mid-task: its watchdog kills the worker and the task, reports it; then it runs elsewhere", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1, env: PRODUCT_TIMINGS });
  let victim: RoleProcess | null = null;
  try {
    const run = await runOnVictim(cluster, "frozen");
    victim = run.victim;
    victim.signalGroup("SIGSTOP");
    await expectConfirmedDeath(cluster, victim, "frozen", run.task.id, "frozen");
    // The frozen worker itself was killed by its watchdog (`bun run` around it is still stopped).
    const workerPid = Number((await victim.waitForEvent("worker.starting")).pid);
    expect((await victim.waitForEvent("watchdog.started")).pid).toBe(workerPid);
    expect(isRunning(workerPid)).toBe(false);
  } finally {
    writeFileSync(join(dir, "frozen.gate"), "");
    // `bun run` around the worker is still stopped.
    victim?.signalGroup("SIGKILL");
    victim?.signalGroup("SIGCONT");
    await cluster.stop();
  }
});

test("TQ_WORKER_WATCHDOG=lean (a bash watcher): kill -9 of the worker's group kills its task before the next attempt starts", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1, env: PRODUCT_TIMINGS });
  try {
    const victim = await cluster.addWorker({ TQ_WORKER_WATCHDOG: "lean" }, { viaBunRun: true });
    expect((await victim.waitForEvent("watchdog.started")).watcher).toBe("bash");
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: command("lean"), max_attempts: 3 });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    while (!existsSync(join(dir, "lean.pid-1"))) await Bun.sleep(10);
    await cluster.addWorker();
    victim.signalGroup("SIGKILL");
    expect(await victim.waitForEvent("watchdog.worker_lost")).toMatchObject({ how: "exited", all_gone: true });
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 2 });
    expect(isRunning(pidOf("lean"))).toBe(false);
    // Requeued by the report or, when Bun's start-up made it late, by the lapsed lease: either
    // way attempt 1's process was gone before attempt 2 looked.
    expect(existsSync(join(dir, "lean.overlap"))).toBe(false);
  } finally {
    writeFileSync(join(dir, "lean.gate"), "");
    await cluster.stop();
  }
});

test("a reset stream with a live worker requeues nothing: the task keeps running and succeeds on its first attempt", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 1 });
  const [host, port] = cluster.grpcAddress.split(":") as [string, string];
  const proxy = await TcpProxy.start(host, Number(port));
  try {
    const worker = await cluster.addWorker({ TQ_COORDINATOR_ADDRESSES: `127.0.0.1:${proxy.port}` });
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: command("reset"), max_attempts: 3 });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    proxy.cut();
    proxy.restore();
    await cluster.coordinator.waitForEvent("coordinator.worker_unconfirmed");
    // Back on a new stream, holding its attempt.
    await worker.waitFor((line) => line.event === "worker.connected" && worker.logged("worker.connected").length >= 2);
    writeFileSync(join(dir, "reset.gate"), "");
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", attempt: 1 });
    const { json: attempts } = await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}/attempts`);
    expect(attempts.attempts.map((a: { outcome: string }) => a.outcome)).toEqual(["succeeded"]);
    expect(cluster.coordinator.logged("coordinator.worker_lost")).toEqual([]);
    // Drained, it leaves its watchdog nothing to stop or report.
    await worker.stop();
    expect(await worker.waitForEvent("watchdog.stopped")).toMatchObject({ how: "exited" });
    expect(worker.logged("watchdog.worker_lost")).toEqual([]);
  } finally {
    writeFileSync(join(dir, "reset.gate"), "");
    await cluster.stop();
    await proxy.stop();
  }
});

test("a ReportWorkerLost without the worker's own credential is refused and changes nothing", async () => {
  const token = "a-join-token-of-the-cluster-0123456789";
  const cluster = await startCluster(db.url, { workers: 1, slots: 1, env: { TQ_WORKER_TOKEN: token } });
  const Client = clientConstructor(WorkerService);
  const client = new Client(cluster.grpcAddress, grpc.credentials.createInsecure()) as unknown as {
    reportWorkerLost(
      request: unknown,
      metadata: grpc.Metadata,
      callback: (error: grpc.ServiceError | null, response: unknown) => void,
    ): void;
    close(): void;
  };
  try {
    const workerId = String((await cluster.workers[0]!.waitForEvent("worker.starting")).id);
    const { json: task } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: command("forged") });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    const report = (bearer: string | null) => {
      const metadata = new grpc.Metadata();
      if (bearer !== null) metadata.set("authorization", `Bearer ${bearer}`);
      return new Promise<grpc.ServiceError | null>((resolve) =>
        client.reportWorkerLost({ workerId, attempts: [{ taskId: task.id, attempt: 1 }], reason: "forged" }, metadata, (error) =>
          resolve(error),
        ),
      );
    };
    for (const bearer of [null, "not-the-credential-0123456789", token]) {
      expect((await report(bearer))?.code).toBe(grpc.status.UNAUTHENTICATED);
    }
    // Refused before anything is written: the task runs on, on its first attempt.
    const { json: now } = await getJson(`${cluster.coordinatorUrl}/tasks/${task.id}`);
    expect(now).toMatchObject({ state: "running", attempt: 1 });
    expect(cluster.coordinator.logged("coordinator.worker_lost_refused").length).toBe(3);
    expect(cluster.coordinator.logged("coordinator.worker_lost")).toEqual([]);
  } finally {
    client.close();
    writeFileSync(join(dir, "forged.gate"), "");
    await cluster.stop();
  }
});
