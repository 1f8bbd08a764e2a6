// Flow control on real processes: two coordinators, a worker on each, tasks submitted over
// HTTP. What is asserted is read from the history (task_events, in id order: a claim that
// admits a task starts after the statement that freed its slot committed, so its event comes
// later), never from timing.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { type RoleProcess, spawnRole } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const processes: RoleProcess[] = [];
let dir: string;
let urls: string[] = [];
const workers: { process: RoleProcess; id: string }[] = [];
const common = () => ({ DATABASE_URL: db.url, TQ_HEARTBEAT_INTERVAL_MS: "200", TQ_HEARTBEAT_TIMEOUT_MS: "1000" });

async function startWorker(grpc: string) {
  const { DATABASE_URL: _, ...env } = common();
  const worker = spawnRole("worker", { ...env, TQ_COORDINATOR_ADDRESSES: grpc, TQ_WORKER_SLOTS: "2" });
  processes.push(worker);
  const id = String((await worker.waitForEvent("worker.starting")).id);
  await worker.waitForEvent("worker.connected");
  workers.push({ process: worker, id });
}

beforeAll(async () => {
  dir = taskDir("tq-flow-");
  const ports = await Promise.all([0, 1].map(async () => ({ http: await freePort(), grpc: await freePort() })));
  const coordinators = ports.map((p) =>
    spawnRole("coordinator", { ...common(), TQ_COORDINATOR_PORT: String(p.http), TQ_GRPC_PORT: String(p.grpc) }),
  );
  processes.push(...coordinators);
  await Promise.all(coordinators.map((c) => c.waitForEvent("coordinator.started")));
  urls = ports.map((p) => `http://127.0.0.1:${p.http}`);
  await Promise.all(ports.map((p) => startWorker(`127.0.0.1:${p.grpc}`)));
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await Promise.all(processes.map((p) => p.stop(5000)));
  // Processes a SIGKILLed worker left behind.
  for (const name of ["held.pid"]) {
    try {
      process.kill(-Number(readFileSync(join(dir, name), "utf8").trim()), "SIGKILL");
    } catch {
      // gone already
    }
  }
  rmSync(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

async function post(url: string, path: string, body: unknown) {
  const response = await fetch(`${url}${path}`, { method: "POST", body: JSON.stringify(body) });
  const json = (await response.json()) as any;
  if (response.status >= 300) throw new Error(`${path}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

async function finalStates(ids: string[]): Promise<string[]> {
  const rows = await db.sql<{ state: string }[]>`SELECT state FROM tasks WHERE id = ANY(${ids}::uuid[])`;
  return rows.map((r) => r.state);
}

const FINAL = ["succeeded", "failed", "timed_out", "cancelled"];

/** The most tasks of the key that were live at once, from the history in event order. */
async function mostLive(key: string): Promise<{ most: number; dispatches: number; coordinators: number }> {
  const events = await db.sql<{ task_id: string; state: string; coordinator: string | null }[]>`
    SELECT e.task_id, e.state, a.coordinator_id AS coordinator FROM task_events e
    JOIN tasks t ON t.id = e.task_id
    LEFT JOIN task_attempts a ON a.task_id = e.task_id AND a.attempt = e.attempt
    WHERE t.concurrency_key = ${key} ORDER BY e.id`;
  const live = new Set<string>();
  const coordinators = new Set<string>();
  let most = 0;
  let dispatches = 0;
  for (const event of events) {
    const isLive = event.state === "dispatched" || event.state === "running";
    if (isLive && !live.has(event.task_id)) {
      dispatches++;
      if (event.coordinator) coordinators.add(event.coordinator);
    }
    if (isLive) live.add(event.task_id);
    else live.delete(event.task_id);
    most = Math.max(most, live.size);
  }
  return { most, dispatches, coordinators: coordinators.size };
}

describe("concurrency keys across two coordinators", () => {
  test("a key with max 2 and 20 tasks never has 3 live", async () => {
    const tasks = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        post(urls[i % 2]!, "/tasks", { command: "sleep 0.1", concurrency: { key: "pair", max: 2 } }),
      ),
    );
    const ids = tasks.map((t) => t.id as string);
    await eventually(async () => (await finalStates(ids)).every((s) => s === "succeeded") || null, {
      what: "all 20 keyed tasks succeeded",
      timeoutMs: 45_000,
    });
    const { most, dispatches } = await mostLive("pair");
    // A lease lapse under load may dispatch a task twice; each dispatch counts as live.
    expect(dispatches).toBeGreaterThanOrEqual(20);
    expect(most).toBeLessThanOrEqual(2);
  });

  test("cancel_in_progress stops the oldest live task's process and runs the new one", async () => {
    const first = await post(urls[0]!, "/tasks", {
      command: "sleep 60",
      concurrency: { key: "deploy", max: 1, strategy: "cancel_in_progress" },
    });
    await eventually(async () => (await finalStates([first.id]))[0] === "running" || null, { what: "the first deploy runs" });
    const second = await post(urls[1]!, "/tasks", {
      command: "true",
      concurrency: { key: "deploy", max: 1, strategy: "cancel_in_progress" },
    });
    await eventually(async () => (await finalStates([second.id]))[0] === "succeeded" || null, {
      what: "the second deploy ran",
      timeoutMs: 20_000,
    });
    expect((await finalStates([first.id]))[0]).toBe("cancelled");
    // Its process group was stopped by its worker.
    const stopped = await Promise.race(
      workers.map((w) => w.process.waitForEvent("worker.task_stopped", { where: (l) => l.task_id === first.id })),
    );
    expect(stopped.outcome).toBeDefined();
    expect((await mostLive("deploy")).most).toBe(1);
    // One live command at a time: the new one was dispatched only after the old one's worker
    // reported its process gone (the `stopped` event), not at the cancel.
    // (task_events.at is kept to the millisecond, rounded: 1 ms of slack.)
    const [order] = await db.sql<{ stopped_at: Date; cancelled_at: Date; dispatched_at: Date }[]>`
      SELECT (SELECT min(at) FROM task_events WHERE task_id = ${first.id} AND kind = 'stopped') AS stopped_at,
        (SELECT cancelled_at FROM tasks WHERE id = ${first.id}) AS cancelled_at,
        (SELECT min(dispatched_at) FROM task_attempts WHERE task_id = ${second.id}) AS dispatched_at`;
    expect(order!.stopped_at.getTime()).toBeGreaterThanOrEqual(order!.cancelled_at.getTime() - 1);
    expect(order!.dispatched_at.getTime()).toBeGreaterThanOrEqual(order!.stopped_at.getTime() - 1);
  });

  test("cancel_newest ends the new task cancelled at submit while the key is full", async () => {
    const first = await post(urls[0]!, "/tasks", { command: "sleep 2", concurrency: { key: "once", strategy: "cancel_newest" } });
    await eventually(async () => ["dispatched", "running"].includes((await finalStates([first.id]))[0]!) || null, {
      what: "the first one holds the key",
    });
    const second = await post(urls[1]!, "/tasks", { command: "true", concurrency: { key: "once", strategy: "cancel_newest" } });
    expect(second.state).toBe("cancelled");
    expect(second.error).toMatch(/full/);
  });

  test("a worker SIGKILLed while holding a key slot frees it exactly once", async () => {
    const held = await post(urls[0]!, "/tasks", {
      command: `echo $$ > ${join(dir, "held.pid")}; exec sleep 60`,
      concurrency: { key: "solo", max: 1 },
      // Lost is final: the slot must come free for the next task, not for a retry of this one.
      retry: { on_lost: false },
    });
    const running = await eventually(
      async () => {
        const [row] = await db.sql<
          { state: string; worker_id: string }[]
        >`SELECT state, worker_id FROM tasks WHERE id = ${held.id}`;
        return row?.state === "running" ? row : null;
      },
      { what: "the held task runs" },
    );
    const waiting = await Promise.all(
      [0, 1, 2].map((i) => post(urls[i % 2]!, "/tasks", { command: "true", concurrency: { key: "solo", max: 1 } })),
    );
    const holder = workers.find((w) => w.id === running.worker_id);
    expect(holder).toBeDefined();
    holder!.process.kill("SIGKILL");
    const ids = [held.id, ...waiting.map((t) => t.id)];
    await eventually(async () => (await finalStates(ids)).every((s) => FINAL.includes(s)) || null, {
      what: "the lost task ended and the waiting ones ran",
      timeoutMs: 45_000,
    });
    expect((await finalStates([held.id]))[0]).toBe("failed");
    expect((await finalStates(waiting.map((t) => t.id))).every((s) => s === "succeeded")).toBe(true);
    const { most, dispatches } = await mostLive("solo");
    // One dispatch each: the freed slot let exactly one task in at a time, and none twice.
    expect(dispatches).toBe(4);
    expect(most).toBe(1);
  });
});

describe("rate limits across two coordinators", () => {
  test("dispatches never outrun the bucket: in any window, at most burst + rate x its length", async () => {
    await post(urls[0]!, "/rate-limits", { name: "e2e", rate: "10/s", burst: 5 });
    const tasks = await Promise.all(
      Array.from({ length: 40 }, (_, i) => post(urls[i % 2]!, "/tasks", { command: "true", rate_limit: "e2e" })),
    );
    const ids = tasks.map((t) => t.id as string);
    await eventually(async () => (await finalStates(ids)).every((s) => s === "succeeded") || null, {
      what: "all rate-limited tasks ran",
      timeoutMs: 45_000,
    });
    const rows = await db.sql<{ at: number }[]>`
      SELECT extract(epoch FROM dispatched_at) * 1000 AS at FROM task_attempts
      WHERE task_id = ANY(${ids}::uuid[]) ORDER BY dispatched_at`;
    const times = rows.map((r) => Number(r.at));
    expect(times).toHaveLength(40);
    // The bucket's bound, with 20 ms for the claim's now() against the attempt's clock and ms rounding.
    for (let i = 0; i < times.length; i++) {
      for (let j = i; j < times.length; j++) {
        const windowMs = times[j]! - times[i]!;
        expect(j - i + 1).toBeLessThanOrEqual(5 + Math.floor(((windowMs + 20) * 10) / 1000) + 1);
      }
    }
    // 40 tasks at 10/s after a burst of 5 take at least 3.4 s: a bound, not a timing claim.
    expect(times.at(-1)! - times[0]!).toBeGreaterThanOrEqual(3400 - 40);
  });
});
