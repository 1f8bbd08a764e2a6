// TLS between real processes: HTTPS on the scheduler and coordinator, TLS and mutual TLS on
// the gRPC port, and workers that must not connect (wrong CA, no client certificate, no TLS).
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { isFinal } from "../../src/task/state";
import { makeTestCerts, type TestCerts } from "../support/certs";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import type { TaskJson } from "../support/http";
import { type Cluster, type RoleProcess, spawnRole, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let certs: TestCerts;
let caPem: string;

beforeAll(() => {
  certs = makeTestCerts();
  caPem = readFileSync(certs.ca, "utf8");
});
afterAll(() => certs?.remove());

const serving = () => ({ TQ_TLS_CERT: certs.serverCert, TQ_TLS_KEY: certs.serverKey });
/** startCluster hands its env to workers too: a worker gets only what it is given here. */
const workerTls = (env: Record<string, string>) => ({ TQ_TLS_CERT: "", TQ_TLS_KEY: "", TQ_TLS_CLIENT_CA: "", ...env });

/** fetch trusting `ca` (the test CA by default) and nothing else. */
function fetchTls(url: string, init: RequestInit = {}, ca = caPem): Promise<Response> {
  return fetch(url, { ...init, tls: { ca } });
}

async function submit(baseUrl: string, command: string, ca?: string): Promise<TaskJson> {
  const response = await fetchTls(
    `${baseUrl}/tasks`,
    { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ command }) },
    ca,
  );
  expect(response.status).toBe(201);
  return (await response.json()) as TaskJson;
}

/** Follows GET /tasks/:id/events over HTTPS until the task is final. */
async function finished(baseUrl: string, id: string, ca?: string): Promise<TaskJson> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 20_000);
  try {
    const response = await fetchTls(`${baseUrl}/tasks/${id}/events`, { signal: controller.signal }, ca);
    expect(response.ok).toBe(true);
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of response.body!) {
      buffer += decoder.decode(chunk, { stream: true });
      let end: number;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer
          .slice(0, end)
          .split("\n")
          .find((line) => line.startsWith("data:"));
        buffer = buffer.slice(end + 2);
        const task = data ? (JSON.parse(data.slice(5)) as TaskJson) : null;
        if (task && isFinal(task.state)) return task;
      }
    }
    throw new Error(`the event stream of ${id} ended before the task finished`);
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

/** The URL a role says it serves, from its "….started" line. */
async function startedUrl(role: RoleProcess, event: string, field: string): Promise<string> {
  return String((await role.waitForEvent(event))[field]);
}

/**
 * A worker that must not get in: it is refused twice (so it did retry) and never welcomed.
 * Returns why it was refused.
 */
async function expectRefused(cluster: Cluster, env: Record<string, string>): Promise<string> {
  const worker = spawnRole("worker", {
    TQ_HEARTBEAT_INTERVAL_MS: "200",
    TQ_HEARTBEAT_TIMEOUT_MS: "1000",
    TQ_COORDINATOR_ADDRESSES: cluster.grpcAddress,
    ...env,
  });
  try {
    const refusals = () => worker.logged("worker.disconnected");
    // A welcome ends the wait too, so that a worker let in fails at once.
    await worker.waitFor((line) => line.event === "worker.connected" || refusals().length >= 2, "two refusals");
    expect(worker.lines.map((line) => line.event)).not.toContain("worker.connected");
    return String(refusals()[0]!.why);
  } finally {
    await worker.stop(5000);
  }
}

describe("servers with TQ_TLS_CERT, a worker with TQ_TLS_CA", () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster(db.url, { workers: 0, env: serving() });
    await cluster.addWorker(workerTls({ TQ_TLS_CA: certs.ca }));
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await cluster?.stop();
  }, HOOK_TIMEOUT_MS);

  test("a task submitted over HTTPS runs; both roles log https:// URLs", async () => {
    const schedulerUrl = await startedUrl(cluster.scheduler!, "scheduler.started", "url");
    const coordinatorUrl = await startedUrl(cluster.coordinator, "coordinator.started", "httpUrl");
    expect(schedulerUrl).toBe(cluster.schedulerUrl.replace("http:", "https:"));
    expect(coordinatorUrl).toBe(cluster.coordinatorUrl.replace("http:", "https:"));
    const task = await submit(schedulerUrl, "echo over tls");
    const done = await finished(coordinatorUrl, task.id);
    expect(done).toMatchObject({ state: "succeeded", exit_code: 0, stdout: "over tls\n" });
  });

  test("plain HTTP to the HTTPS port fails, and so does HTTPS without trusting the CA", async () => {
    await expect(fetch(`${cluster.coordinatorUrl}/healthz`)).rejects.toThrow();
    await expect(fetch(`${cluster.schedulerUrl.replace("http:", "https:")}/healthz`)).rejects.toThrow();
    const trusted = await fetchTls(`${cluster.schedulerUrl.replace("http:", "https:")}/healthz`);
    expect(trusted.status).toBe(200);
  });

  test("a worker may dial the coordinator by name (SNI) as well as by IP", async () => {
    const port = cluster.grpcAddress.split(":")[1]!;
    const worker = await cluster.addWorker(workerTls({ TQ_TLS_CA: certs.ca, TQ_COORDINATOR_ADDRESSES: `localhost:${port}` }));
    expect((await worker.waitForEvent("worker.starting")).addresses).toEqual([`localhost:${port}`]);
  });

  test("a worker trusting another CA, or dialing without TLS, is never connected", async () => {
    const [wrongCa, plaintext] = await Promise.all([
      expectRefused(cluster, { TQ_TLS_CA: certs.otherCa }),
      expectRefused(cluster, {}),
    ]);
    expect(wrongCa).toMatch(/unable to verify|certificate/i);
    expect(plaintext).not.toBe("");
  });
});

describe("mutual TLS: the coordinator with TQ_TLS_CLIENT_CA", () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster(db.url, { workers: 0, scheduler: false, env: { ...serving(), TQ_TLS_CLIENT_CA: certs.ca } });
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await cluster?.stop();
  }, HOOK_TIMEOUT_MS);

  test("a worker with a client certificate connects and runs a task", async () => {
    await cluster.addWorker(
      workerTls({ TQ_TLS_CA: certs.ca, TQ_TLS_CLIENT_CERT: certs.clientCert, TQ_TLS_CLIENT_KEY: certs.clientKey }),
    );
    const coordinatorUrl = await startedUrl(cluster.coordinator, "coordinator.started", "httpUrl");
    const task = await submit(coordinatorUrl, "echo mutual");
    expect(await finished(coordinatorUrl, task.id)).toMatchObject({ state: "succeeded", stdout: "mutual\n" });
  });

  test("a worker without a client certificate is never connected", async () => {
    const why = await expectRefused(cluster, { TQ_TLS_CA: certs.ca });
    expect(why).toContain("CERTIFICATE_REQUIRED");
  });

  test("a worker whose client certificate another CA signed is never connected", async () => {
    const why = await expectRefused(cluster, {
      TQ_TLS_CA: certs.ca,
      TQ_TLS_CLIENT_CERT: certs.otherClientCert,
      TQ_TLS_CLIENT_KEY: certs.otherClientKey,
    });
    // Only the certificate differs from the worker that connected above.
    expect(why).not.toBe("");
  });
});

test("bun start with a self-signed TQ_TLS_CERT: its own workers trust it and run a task", async () => {
  const ports = { scheduler: await freePort(), coordinator: await freePort(), grpc: await freePort() };
  const start = spawnRole("start", {
    DATABASE_URL: db.url,
    TQ_SCHEDULER_PORT: String(ports.scheduler),
    TQ_COORDINATOR_PORT: String(ports.coordinator),
    TQ_GRPC_PORT: String(ports.grpc),
    TQ_WORKERS: "1",
    TQ_TLS_CERT: certs.selfSignedCert,
    TQ_TLS_KEY: certs.selfSignedKey,
  });
  try {
    // Printed only once its workers are connected.
    await start.waitFor((line) => String(line.msg).includes(`https://127.0.0.1:${ports.coordinator}`), "its https URL");
    const url = `https://127.0.0.1:${ports.scheduler}`;
    const selfSigned = readFileSync(certs.selfSignedCert, "utf8");
    const task = await submit(url, "echo all in one", selfSigned);
    expect(await finished(url, task.id, selfSigned)).toMatchObject({ state: "succeeded", stdout: "all in one\n" });
  } finally {
    expect(await start.stop(10_000)).toBe(0);
  }
});

test("a missing certificate file stops a role at start-up, naming the option", async () => {
  const missing = join(certs.dir, "missing.pem");
  const worker = spawnRole("worker", { TQ_TLS_CA: missing, TQ_COORDINATOR_ADDRESSES: "127.0.0.1:1" });
  const coordinator = spawnRole("coordinator", {
    DATABASE_URL: db.url,
    TQ_COORDINATOR_PORT: String(await freePort()),
    TQ_GRPC_PORT: String(await freePort()),
    TQ_TLS_CERT: missing,
    TQ_TLS_KEY: certs.serverKey,
  });
  try {
    await worker.waitForText(`worker: TQ_TLS_CA=${missing}: no such file`);
    await coordinator.waitForText(`coordinator: TQ_TLS_CERT=${missing}: no such file`);
    expect(await worker.exited).toBe(1);
    expect(await coordinator.exited).toBe(1);
  } finally {
    await Promise.all([worker.stop(2000), coordinator.stop(2000)]);
  }
});
