// Worker credentials between real processes: join tokens rotated with overlap, joined workers
// kept through the removal of the token they joined with, and a revoked worker shut out with
// its running task killed and requeued to another worker.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync, rmSync } from "node:fs";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { hashToken } from "../../src/auth/tokens";
import { newJoinToken } from "../../src/auth/worker-tokens";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { getJson, postJson } from "../support/http";
import { isRunning } from "../support/is-running";
import { type Cluster, type RoleProcess, spawnRole, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const oldToken = newJoinToken();
const newToken = newJoinToken();
let cluster: Cluster;
let dir: string;

beforeAll(async () => {
  dir = taskDir("tq-creds-");
  cluster = await startCluster(db.url, {
    workers: 0,
    scheduler: false,
    env: { TQ_WORKER_TOKENS: `old:${hashToken(oldToken)},new:${hashToken(newToken)}` },
  });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await cluster?.stop();
  rmSync(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

const workerId = async (worker: RoleProcess) => String((await worker.waitForEvent("worker.starting")).id);
const connections = (worker: RoleProcess) => worker.logged("worker.connected").length;

let onOld: RoleProcess;
let onNew: RoleProcess;

test("two join tokens are accepted during a rotation, a third is refused", async () => {
  onOld = await cluster.addWorker({ TQ_WORKER_TOKEN: oldToken });
  onNew = await cluster.addWorker({ TQ_WORKER_TOKEN: newToken });
  const outsider = spawnRole("worker", {
    TQ_COORDINATOR_ADDRESSES: cluster.grpcAddress,
    TQ_WORKER_TOKEN: newJoinToken(),
  });
  const refused = await outsider.waitForEvent("worker.disconnected");
  expect(String(refused.why)).toContain("worker token is required");
  expect(outsider.logged("worker.connected")).toHaveLength(0);
  await outsider.stop(2000);
  const joined = await db.sql<{ worker_id: string; joined_with: string }[]>`
    SELECT worker_id, joined_with FROM worker_credentials ORDER BY joined_with`;
  expect([...joined]).toEqual([
    { worker_id: await workerId(onNew), joined_with: "new" },
    { worker_id: await workerId(onOld), joined_with: "old" },
  ]);
});

test("dropping the old join token keeps the worker that joined with it; a new worker with it is refused", async () => {
  const before = connections(onOld);
  await cluster.coordinator.stop();
  cluster.coordinatorEnv.TQ_WORKER_TOKENS = `new:${hashToken(newToken)}`;
  await cluster.restartCoordinator();
  // It comes back on its credential alone: the token it still sends is no longer accepted.
  await onOld.waitFor((line) => line.event === "worker.connected" && connections(onOld) > before, "a reconnect");
  const latecomer = spawnRole("worker", { TQ_COORDINATOR_ADDRESSES: cluster.grpcAddress, TQ_WORKER_TOKEN: oldToken });
  expect(String((await latecomer.waitForEvent("worker.disconnected")).why)).toContain("worker token is required");
  await latecomer.stop(2000);
});

test("revoking a worker closes its stream, kills its task and requeues it to another worker", async () => {
  const pids = join(dir, "pids");
  const submitted = await postJson(`${cluster.coordinatorUrl}/tasks`, {
    command: `echo $$ >> ${pids}; exec sleep 60`,
    max_attempts: 3,
  });
  expect(submitted.status).toBe(201);
  const id = submitted.json.id as string;
  const first = await eventually(
    async () => {
      const { json } = await getJson(`${cluster.coordinatorUrl}/tasks/${id}`);
      return json.state === "running" ? json : null;
    },
    { what: "the task running" },
  );
  const holder = first.worker_id as string;
  const [victim, survivor] = (await workerId(onOld)) === holder ? [onOld, onNew] : [onNew, onOld];
  const firstPid = Number(await eventually(() => readFileSync(pids, "utf8").split("\n")[0] || null, { what: "the task's pid" }));
  expect(isRunning(firstPid)).toBe(true);

  const revoke = Bun.spawn(["bun", "run", "token", "worker-revoke", "--id", holder], {
    cwd: join(import.meta.dir, "../.."),
    env: { ...process.env, DATABASE_URL: db.url },
    stdout: "pipe",
    stderr: "pipe",
  });
  expect(await revoke.exited).toBe(0);
  expect(await new Response(revoke.stdout).text()).toContain(`revoked the credential of worker "${holder}"`);

  await victim.waitForEvent("worker.revoked");
  expect(await victim.exited).toBe(3);
  await eventually(() => !isRunning(firstPid), { what: "the revoked worker's task killed" });
  const again = await eventually(
    async () => {
      const { json } = await getJson(`${cluster.coordinatorUrl}/tasks/${id}`);
      return json.state === "running" && json.attempt === 2 ? json : null;
    },
    { what: "the task running again" },
  );
  expect(again.worker_id).toBe(await workerId(survivor));
  expect(connections(survivor)).toBeGreaterThan(0);

  const list = Bun.spawn(["bun", "run", "token", "worker-list", "--all"], {
    cwd: join(import.meta.dir, "../.."),
    env: { ...process.env, DATABASE_URL: db.url },
    stdout: "pipe",
    stderr: "pipe",
  });
  expect(await list.exited).toBe(0);
  const rows = (await new Response(list.stdout).text()).trim().split("\n");
  expect(rows.find((row) => row.startsWith(holder))).toContain("revoked");
  const survivorId = await workerId(survivor);
  expect(rows.find((row) => row.startsWith(survivorId))).toContain("live");
  await postJson(`${cluster.coordinatorUrl}/tasks/${id}/cancel`, {});
});

/** A non-loopback address of this machine (nothing is sent to it: the roles refuse first). */
function ownAddress(): string {
  for (const list of Object.values(networkInterfaces())) {
    for (const entry of list ?? []) if (!entry.internal && entry.family === "IPv4") return entry.address;
  }
  return "0.0.0.0";
}

test("plaintext beyond loopback: the coordinator and the worker refuse to start unless TQ_INSECURE", async () => {
  const host = ownAddress();
  const ports = async () => ({ TQ_COORDINATOR_PORT: String(await freePort()), TQ_GRPC_PORT: String(await freePort()) });
  const protectedEnv = {
    DATABASE_URL: db.url,
    TQ_API_TOKENS: `ops:admin:${hashToken("x".repeat(40))}`,
    TQ_WORKER_TOKEN: newToken,
  };
  for (const bind of ["0.0.0.0", host]) {
    const coordinator = spawnRole("coordinator", { ...protectedEnv, ...(await ports()), TQ_HOST: bind });
    expect(await coordinator.exited).toBe(1);
    expect(coordinator.raw.join("\n")).toContain(`would listen on ${bind} (beyond loopback) without TLS`);
  }
  const insecure = spawnRole("coordinator", { ...protectedEnv, ...(await ports()), TQ_HOST: "0.0.0.0", TQ_INSECURE: "true" });
  await insecure.waitForEvent("coordinator.started");
  expect(insecure.raw.join("\n")).toContain("INSECURE");
  expect(await insecure.stop()).toBe(0);

  const worker = spawnRole("worker", { TQ_COORDINATOR_ADDRESSES: `${host}:${await freePort()}`, TQ_WORKER_TOKEN: newToken });
  expect(await worker.exited).toBe(1);
  expect(worker.raw.join("\n")).toContain(`would dial ${host}:`);
  expect(worker.logged("worker.starting")).toHaveLength(0);
});
