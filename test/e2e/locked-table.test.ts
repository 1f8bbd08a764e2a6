// A slow database is not a hang: with the tasks table locked (as a migration or an operator's
// LOCK TABLE does), submits and lists are answered 503 with Retry-After within the roles'
// lock timeout, /readyz says 503 meanwhile, the coordinator's loops ride it out, and once
// the lock is gone everything carries on.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { postJson, watchTask } from "../support/http";
import { type Cluster, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const LOCK_TIMEOUT_MS = 300;
const STATEMENT_TIMEOUT_MS = 1000;
let dir: string;
let cluster: Cluster;

beforeAll(async () => {
  dir = taskDir("tq-locked-");
  cluster = await startCluster(db.url, {
    workers: 1,
    slots: 2,
    env: { TQ_DB_LOCK_TIMEOUT_MS: String(LOCK_TIMEOUT_MS), TQ_DB_STATEMENT_TIMEOUT_MS: String(STATEMENT_TIMEOUT_MS) },
  });
}, 90_000);

afterAll(async () => {
  await cluster?.stop();
  rmSync(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

async function timed(request: () => Promise<Response>): Promise<{ response: Response; ms: number }> {
  const started = performance.now();
  const response = await request();
  return { response, ms: performance.now() - started };
}

/** Today's hang was the lock's whole length; a timed-out statement answers well within this. */
const ANSWER_WITHIN_MS = STATEMENT_TIMEOUT_MS + 1500;

async function expectUnavailable(what: string, request: () => Promise<Response>): Promise<void> {
  const { response, ms } = await timed(request);
  const body = (await response.json()) as { error: { code: string; message: string } };
  expect({ what, status: response.status, code: body.error?.code }).toEqual({ what, status: 503, code: "unavailable" });
  expect({ what, retryAfter: Number(response.headers.get("retry-after")) >= 1 }).toEqual({ what, retryAfter: true });
  // The server's own text (SQLSTATE, "canceling statement due to lock timeout") stays inside.
  expect(body.error.message).not.toMatch(/55P03|57014|canceling/);
  expect({ what, fast: ms < ANSWER_WITHIN_MS }).toEqual({ what, fast: true });
}

test("with tasks locked, submits and lists answer 503 with Retry-After, /readyz says 503, and all recovers after", async () => {
  const gate = join(dir, "gate");
  const { json: held } = await postJson(`${cluster.coordinatorUrl}/submit`, {
    command: `while [ ! -e '${gate}' ]; do sleep 0.02; done; echo held`,
  });
  await watchTask(cluster.coordinatorUrl, held.id, (t) => t.state === "running");
  for (const url of [cluster.coordinatorUrl, cluster.schedulerUrl]) expect((await fetch(`${url}/readyz`)).status).toBe(200);

  const locker = await db.sql.reserve();
  try {
    await locker`BEGIN`;
    await locker`LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE`;

    // The held task finishes under the lock: its output's write (live logs store a result's
    // output before the result) or the completer's write times out, and is retried.
    writeFileSync(gate, "");
    await Promise.any([
      cluster.coordinator.waitForEvent("completer.record_failed"),
      cluster.coordinator.waitForEvent("logs.write_failed"),
    ]);

    for (const url of [cluster.coordinatorUrl, cluster.schedulerUrl]) {
      const json = { method: "POST", headers: { "content-type": "application/json" }, keepalive: false };
      await expectUnavailable(`POST ${url}/submit`, () => fetch(`${url}/submit`, { ...json, body: '{"command":"echo lost?"}' }));
      await expectUnavailable(`GET ${url}/tasks`, () => fetch(`${url}/tasks?limit=5`, { keepalive: false }));
      await expectUnavailable(`GET ${url}/readyz`, () => fetch(`${url}/readyz`, { keepalive: false }));
      expect((await fetch(`${url}/healthz`)).status).toBe(200);
    }
  } finally {
    await locker`ROLLBACK`;
    locker.release();
  }

  for (const url of [cluster.coordinatorUrl, cluster.schedulerUrl]) expect((await fetch(`${url}/readyz`)).status).toBe(200);
  // The completer kept the result and wrote it once the lock was gone.
  expect(await watchTask(cluster.coordinatorUrl, held.id)).toMatchObject({ state: "succeeded", attempt: 1, stdout: "held\n" });
  // Dispatch carries on: a task submitted now runs.
  const { status, json: next } = await postJson(`${cluster.schedulerUrl}/submit`, { command: "echo after" });
  expect(status).toBe(201);
  expect(await watchTask(cluster.coordinatorUrl, next.id)).toMatchObject({ state: "succeeded", stdout: "after\n" });
  // The 503 submits wrote nothing.
  const listed = (await (await fetch(`${cluster.coordinatorUrl}/tasks?limit=10`)).json()) as { tasks: { command: string }[] };
  expect(listed.tasks.map((t) => t.command)).not.toContain("echo lost?");
});
