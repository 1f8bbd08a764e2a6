// What an operator reads, from real processes: every JSON line names its process (service,
// version, host, pid), every line about a task carries task_id, attempt, worker_id and
// coordinator_id whichever role wrote it, the coordinator logs one `attempt.finished` line per
// attempt it records, and the worker's /healthz answers beside it.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pkg from "../../package.json";
import { freePort, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { getJson, postJson, watchTask } from "../support/http";
import { type Cluster, type LogLine, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let dir: string;
let cluster: Cluster;
let healthPort: number;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "tq-logs-"));
  healthPort = await freePort();
  cluster = await startCluster(db.url, { workers: 0, slots: 1 });
  await cluster.addWorker({ TQ_WORKER_HEALTH_PORT: String(healthPort) });
}, 60_000);

afterAll(async () => {
  await cluster?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const mentions = (line: LogLine, id: string) => JSON.stringify(line).includes(id);

test("task lines carry the four fields in every role, and the coordinator logs each finished attempt", async () => {
  const worker = cluster.workers[0]!;
  const workerId = String((await worker.waitForEvent("worker.starting")).id);
  const coordinatorId = String((await cluster.coordinator.waitForEvent("coordinator.started")).id);

  const { json: done } = await postJson(`${cluster.coordinatorUrl}/submit`, { command: "echo out; exit 3", max_attempts: 1 });
  expect((await watchTask(cluster.coordinatorUrl, done.id)).state).toBe("failed");
  const finished = await cluster.coordinator.waitForEvent("attempt.finished", { where: (l) => l.task_id === done.id });
  expect(finished).toMatchObject({
    task_id: done.id,
    attempt: 1,
    worker_id: workerId,
    coordinator_id: coordinatorId,
    outcome: "failed",
    exit_code: 3,
    signal: null,
    stale: false,
    service: "coordinator",
  });
  expect(finished.duration_ms).toEqual(expect.any(Number));

  const gate = join(dir, "gate");
  const { json: stopped } = await postJson(`${cluster.coordinatorUrl}/submit`, {
    command: `while [ ! -e '${gate}' ]; do sleep 0.02; done`,
  });
  await watchTask(cluster.coordinatorUrl, stopped.id, (t) => t.state === "running");
  expect((await postJson(`${cluster.coordinatorUrl}/tasks/${stopped.id}/cancel`, {})).status).toBe(200);
  const stoppedLine = await worker.waitForEvent("worker.task_stopped", { where: (l) => l.task_id === stopped.id });
  expect(stoppedLine).toMatchObject({ attempt: 1, worker_id: workerId, coordinator_id: coordinatorId, outcome: "cancelled" });
  await cluster.coordinator.waitForEvent("attempt.finished", { where: (l) => l.task_id === stopped.id });
  writeFileSync(gate, "");

  for (const process of [cluster.coordinator, cluster.scheduler!, worker]) {
    const json = process.lines.filter((line) => !line.text);
    expect(json.length).toBeGreaterThan(0);
    for (const line of json) {
      expect(line).toMatchObject({ service: process.role, version: pkg.version, pid: process.pid, host: expect.any(String) });
    }
    for (const id of [done.id, stopped.id]) {
      for (const line of json.filter((l) => mentions(l, id))) {
        expect(line, JSON.stringify(line)).toMatchObject({
          task_id: id,
          attempt: 1,
          worker_id: workerId,
          coordinator_id: coordinatorId,
        });
      }
    }
  }
  // Each attempt once: a line per recorded end, not per write or retry.
  expect(cluster.coordinator.logged("attempt.finished").filter((l) => l.task_id === done.id)).toHaveLength(1);

  // The last Ack may still be on its way to the worker.
  const health = await eventually(
    async () => {
      const answer = await getJson(`http://127.0.0.1:${healthPort}/healthz`);
      return answer.json.unacknowledged === 0 ? answer : null;
    },
    { what: "/healthz with every result acknowledged" },
  );
  expect(health.status).toBe(200);
  expect(health.json).toMatchObject({ connected: true, coordinator: coordinatorId, worker_id: workerId, running: 0 });
  expect(health.json.last_ack_age_ms).toEqual(expect.any(Number));
});
