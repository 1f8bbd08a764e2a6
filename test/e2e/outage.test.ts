// A PostgreSQL outage, on a cluster of this test's own (so that it can be stopped): the APIs
// answer 503 promptly, results are held and delivered afterwards, dispatch resumes by
// itself, and nothing acknowledged is lost or run again.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type EmbeddedDatabase, startEmbedded } from "../../src/db/embedded";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS } from "../support/db";
import { eventually } from "../support/eventually";
import { postJson, watchTask } from "../support/http";
import { type Cluster, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

let dir: string;
let pgDir: string;
let pg: EmbeddedDatabase;
let cluster: Cluster;

beforeAll(async () => {
  dir = taskDir("tq-outage-");
  // Its own folder: started by root, PostgreSQL runs as user postgres, which must reach it.
  pgDir = mkdtempSync(join(tmpdir(), "tq-outage-pg-"));
  pg = await startEmbedded({ dataDir: pgDir, port: await freePort(), settings: { fsync: "off" } });
  cluster = await startCluster(pg.url, { workers: 1, slots: 2, env: { TQ_HEARTBEAT_TIMEOUT_MS: "1000" } });
}, 90_000);

afterAll(async () => {
  await cluster?.stop();
  await pg?.stop();
  rmSync(dir, { recursive: true, force: true });
  rmSync(pgDir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

/** Repeats `attempt` until it succeeds, a bounded number of times. */
function retrying<T>(what: string, attempt: () => Promise<T>): Promise<NonNullable<T>> {
  return eventually(attempt, { what, tries: 5, intervalMs: 250, timeoutMs: 45_000 });
}

/**
 * A GET on a fresh connection, tried once more if the first meets a reset: Bun may still hand
 * the request a pooled connection that the event stream just ended on, and such a reset says
 * nothing about the server. A server that is gone refuses the second try too.
 */
async function fetchOnceMoreAfterReset(url: string): Promise<Response> {
  try {
    return await fetch(url, { keepalive: false });
  } catch (error) {
    if ((error as { code?: string }).code !== "ECONNRESET") throw error;
    return fetch(url, { keepalive: false });
  }
}

async function timed<T>(work: () => Promise<T>): Promise<{ value: T; ms: number }> {
  const started = performance.now();
  const value = await work();
  return { value, ms: performance.now() - started };
}

test("while PostgreSQL is down the APIs answer 503, and afterwards everything carries on", async () => {
  const gate = join(dir, "gate");
  const { json: task } = await postJson(`${cluster.coordinatorUrl}/submit`, {
    command: `while [ ! -e '${gate}' ]; do sleep 0.02; done; echo "attempt $TQ_TASK_ATTEMPT"`,
  });
  await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");

  await pg.stop();
  for (const url of [cluster.coordinatorUrl, cluster.schedulerUrl]) {
    // A fresh connection: a pooled keep-alive one (the event stream above just ended on it)
    // can meet a reset that says nothing about the server.
    const read = await timed(() => fetchOnceMoreAfterReset(`${url}/tasks/${task.id}`));
    expect(read.value.status).toBe(503);
    const body = (await read.value.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("unavailable");
    expect(body.error.message).not.toMatch(/ECONNREFUSED|127\.0\.0\.1|postgres/i);
    expect(read.ms).toBeLessThan(5000);
    const write = await timed(() => postJson(`${url}/submit`, { command: "echo lost?" }));
    expect(write.value.status).toBe(503);
    expect((await fetch(`${url}/readyz`)).status).toBe(503);
    expect((await fetch(`${url}/healthz`)).status).toBe(200);
  }
  // The task finishes while the database is away: the worker holds the result (and the
  // coordinator its output, whose write comes first and fails first).
  writeFileSync(gate, "");
  await Promise.any([
    cluster.coordinator.waitForEvent("completer.record_failed"),
    cluster.coordinator.waitForEvent("logs.write_failed"),
  ]);

  await pg.restart();
  // Right after the restart a request may still meet a connection the restart broke (503, or
  // a stream ending with an error event), as any client would: try again, a bounded number
  // of times.
  const done = await retrying("the held task, watched", () => watchTask(cluster.coordinatorUrl, task.id));
  expect(done).toMatchObject({ state: "succeeded", attempt: 1, stdout: "attempt 1\n" });
  // Dispatch resumed by itself.
  const { status, json: next } = await retrying("a submit after the restart", async () => {
    const answer = await postJson(`${cluster.schedulerUrl}/submit`, { command: "echo after" });
    if (answer.status === 503) throw new Error("503 right after the restart");
    return answer;
  });
  expect(status).toBe(201);
  // Another pooled connection may still be one the restart broke: the same bounded retry.
  expect(
    await retrying("the task submitted after the restart, watched", () => watchTask(cluster.coordinatorUrl, next.id)),
  ).toMatchObject({
    state: "succeeded",
    stdout: "after\n",
  });
  // The 503 submits left nothing behind.
  const after = await fetch(`${cluster.coordinatorUrl}/tasks?limit=10`);
  const listed = (await after.json()) as { tasks: { command: string }[] };
  expect(listed.tasks.map((t) => t.command)).not.toContain("echo lost?");
}, 60_000);
