// Queues, priorities and labels on real processes: a queue's limit and pause hold across two
// coordinators, aging bounds a low-priority task's wait under a sustained high-priority load,
// and labels route tasks to the workers that have them (or say why they wait, and fail after
// their schedule_timeout_ms). Every assertion reads rows or answers, never the clock.
import { expect, setDefaultTimeout, test } from "bun:test";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { getJson, postJson, watchTask } from "../support/http";
import { startCluster } from "../support/processes";
import { readmeCurls, runReadmeCommand } from "../support/readme";

setDefaultTimeout(TEST_TIMEOUT_MS * 3);

// Heartbeats slack enough that a loaded machine does not declare workers dead mid-test.
const slack = { TQ_HEARTBEAT_INTERVAL_MS: "500", TQ_HEARTBEAT_TIMEOUT_MS: "10000" };

const db = useTestDatabase();

async function send(method: string, url: string, body?: unknown): Promise<{ status: number; json: any }> {
  const response = await fetch(url, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: response.status, json: await response.json() };
}

async function workerId(process: { waitForEvent(event: string): Promise<Record<string, unknown>> }): Promise<string> {
  return String((await process.waitForEvent("worker.starting")).id);
}

test("a queue's concurrency limit and pause hold across two coordinators", async () => {
  const env = { ...slack, TQ_SAFETY_POLL_MS: "200" };
  const a = await startCluster(db.url, { workers: 2, slots: 2, scheduler: false, env });
  const b = await startCluster(db.url, { workers: 2, slots: 2, scheduler: false, env });
  try {
    const patched = await send("PATCH", `${a.coordinatorUrl}/queues/lim`, { concurrency_limit: 2 });
    expect(patched.status).toBe(200);
    expect(patched.json).toMatchObject({ name: "lim", concurrency_limit: 2, paused: false });
    const ids: string[] = [];
    for (let i = 0; i < 12; i++) {
      const url = i % 2 ? a.coordinatorUrl : b.coordinatorUrl;
      const { status, json } = await postJson(`${url}/tasks`, { command: "sleep 0.1", queue: "lim" });
      expect(status).toBe(201);
      ids.push(json.id);
    }
    for (const id of ids) expect(await watchTask(a.coordinatorUrl, id)).toMatchObject({ state: "succeeded", queue: "lim" });
    // From the attempts' own times: never three live at once, and both coordinators served it.
    const attempts = await db.sql<{ picked: Date; done: Date; coordinator_id: string }[]>`
      SELECT a.dispatched_at AS picked, a.finished_at AS done, t.coordinator_id
      FROM task_attempts a JOIN tasks t ON t.id = a.task_id WHERE t.queue = 'lim'`;
    // (A worker the loaded machine took for dead gives its attempt another: 12 or more.)
    expect(attempts.length).toBeGreaterThanOrEqual(12);
    const most = Math.max(...attempts.map((x) => attempts.filter((y) => y.picked <= x.picked && y.done > x.picked).length));
    expect(most).toBeLessThanOrEqual(2);
    expect(new Set(attempts.map((x) => x.coordinator_id)).size).toBe(2);
    const listed = await getJson(`${b.coordinatorUrl}/queues`);
    expect(listed.json.queues.find((q: { name: string }) => q.name === "lim")).toMatchObject({
      concurrency_limit: 2,
      running: 0,
      depth: { succeeded: 12, queued: 0 },
    });

    // Paused through one coordinator, its tasks wait on both, and say so.
    expect((await send("POST", `${b.coordinatorUrl}/queues/held/pause`)).json).toMatchObject({ name: "held", paused: true });
    const held = (await postJson(`${a.coordinatorUrl}/tasks`, { command: "true", queue: "held" })).json;
    // A later task of another queue runs to its end on the same workers: the paused one was passed over.
    const other = (await postJson(`${a.coordinatorUrl}/tasks`, { command: "true", queue: "other" })).json;
    expect(await watchTask(a.coordinatorUrl, other.id)).toMatchObject({ state: "succeeded" });
    const waiting = await getJson(`${a.coordinatorUrl}/tasks/${held.id}`);
    expect(waiting.json).toMatchObject({ state: "queued", waiting: { kind: "queue_paused", message: "queue held is paused" } });
    expect((await send("POST", `${a.coordinatorUrl}/queues/held/resume`)).json).toMatchObject({ paused: false });
    expect(await watchTask(b.coordinatorUrl, held.id)).toMatchObject({ state: "succeeded", attempt: 1 });
  } finally {
    await Promise.all([a.stop(), b.stop()]);
  }
});

test("aging: under a sustained high-priority load, a low-priority task starts within its bound", async () => {
  const agingMs = 10;
  const cluster = await startCluster(db.url, {
    workers: 1,
    slots: 1,
    scheduler: false,
    env: { ...slack, TQ_PRIORITY_AGING_MS: String(agingMs) },
  });
  try {
    const url = cluster.coordinatorUrl;
    const high = () => ({ command: "true", priority: 100 });
    const batch = async (n: number): Promise<string[]> => {
      const { status, json } = await postJson(`${url}/tasks/batch`, { tasks: Array.from({ length: n }, high) });
      expect(status).toBe(201);
      return json.tasks.map((t: { id: string }) => t.id);
    };
    // A backlog of high-priority work before the low one arrives, and more all along: each
    // round adds 10 once the previous round's last task has finished, so the one worker
    // always has high-priority work queued. Strict priorities would starve the low one.
    let last = (await batch(30)).at(-1)!;
    const low = (await postJson(`${url}/tasks`, { command: "true", priority: -100 })).json;
    let rounds = 0;
    for (;;) {
      const next = (await batch(10)).at(-1)!;
      await watchTask(url, last);
      last = next;
      rounds++;
      const { json } = await getJson(`${url}/tasks/${low.id}`);
      if (json.state !== "queued") break;
    }
    // Still under load after it started: a few more rounds behind it.
    for (let i = 0; i < 2; i++) await batch(10);
    expect(rounds).toBeGreaterThan(0);
    // The rule, from the rows: every high-priority task due more than (100 - -100) * aging after
    // the low one was picked after it; and it was passed by some (it did wait).
    const rows = await db.sql<{ id: string; priority: number; run_at: Date; picked_at: Date | null }[]>`
      SELECT id, priority, run_at, picked_at FROM tasks`;
    const lowRow = rows.find((r) => r.id === low.id)!;
    expect(lowRow.picked_at).not.toBeNull();
    const boundMs = 200 * agingMs;
    const later = rows.filter((r) => r.priority === 100 && r.run_at.getTime() > lowRow.run_at.getTime() + boundMs);
    expect(later.length).toBeGreaterThan(0);
    const overtook = later.filter((r) => r.picked_at !== null && r.picked_at < lowRow.picked_at!);
    expect(overtook.map((r) => r.id)).toEqual([]);
    const before = rows.filter((r) => r.priority === 100 && r.picked_at !== null && r.picked_at < lowRow.picked_at!);
    expect(before.length).toBeGreaterThan(0);
  } finally {
    await cluster.stop();
  }
});

test("labels route tasks to the workers that have them; a task no worker can take waits, says why, and times out", async () => {
  const cluster = await startCluster(db.url, {
    workers: 0,
    slots: 2,
    scheduler: false,
    env: { ...slack, TQ_SAFETY_POLL_MS: "100" },
  });
  try {
    const url = cluster.coordinatorUrl;
    const gpu = await workerId(await cluster.addWorker({ TQ_WORKER_LABELS: "gpu=1,region=eu,mem_gb=64" }));
    const cpu = await workerId(await cluster.addWorker({ TQ_WORKER_LABELS: "region=us,mem_gb=16" }));
    const reports = await workerId(await cluster.addWorker({ TQ_WORKER_QUEUES: "reports" }));

    const submit = async (body: Record<string, unknown>) => {
      const { status, json } = await postJson(`${url}/tasks`, { command: "true", ...body });
      expect(status).toBe(201);
      return json.id as string;
    };
    const cases: [Record<string, unknown>, string][] = [
      [{ require: [{ key: "gpu", op: "=", value: "1" }] }, gpu],
      [{ require: [{ key: "mem_gb", op: "<", value: "32" }] }, cpu],
      [
        {
          require: [
            { key: "region", op: "!=", value: "eu" },
            { key: "mem_gb", op: "exists" },
          ],
        },
        cpu,
      ],
    ];
    for (let round = 0; round < 3; round++) {
      for (const [body, expected] of cases) {
        const done = await watchTask(url, await submit(body));
        expect(done).toMatchObject({ state: "succeeded", worker_id: expected });
      }
      // Any worker serving the queue may take it; the reports-only worker takes nothing else.
      expect(await watchTask(url, await submit({ queue: "reports" }))).toMatchObject({ state: "succeeded", queue: "reports" });
    }
    const plainDone = await Promise.all(Array.from({ length: 6 }, async () => watchTask(url, await submit({}))));
    expect(plainDone.every((t) => t.state === "succeeded" && t.worker_id !== reports)).toBe(true);
    const shown = await getJson(`${url}/tasks/${await submit({ require: [{ key: "gpu", op: "exists" }], priority: 7 })}`);
    expect(shown.json).toMatchObject({ queue: "default", priority: 7, require: [{ key: "gpu", op: "exists" }], prefer: [] });

    const stuck = await submit({ require: [{ key: "mem_gb", op: ">=", value: "128" }] });
    await eventually(
      async () => {
        const { json } = await getJson(`${url}/tasks/${stuck}`);
        expect(json).toMatchObject({ state: "queued", waiting: { kind: "no_worker", message: "no worker with mem_gb>=128" } });
        return true;
      },
      { what: "the stuck task's waiting reason", timeoutMs: 30_000 },
    );
    const timed = await submit({ require: [{ key: "tpu", op: "exists" }], schedule_timeout_ms: 300 });
    const failed = await watchTask(url, timed);
    expect(failed).toMatchObject({ state: "failed", attempt: 0 });
    expect(String(failed.error)).toContain("schedule_timeout");
    const listed = await getJson(`${url}/tasks?queue=reports`);
    expect(listed.json.tasks).toHaveLength(3);
    expect(listed.json.tasks.every((t: { queue: string }) => t.queue === "reports")).toBe(true);
  } finally {
    await cluster.stop();
  }
});

test("the README's queue and label commands work as printed", async () => {
  const cluster = await startCluster(db.url, { workers: 0, slots: 2, scheduler: false, env: slack });
  try {
    await cluster.addWorker({ TQ_WORKER_LABELS: "gpu=1,region=eu,mem_gb=64" });
    const port = Number(new URL(cluster.coordinatorUrl).port);
    const ports = { coordinator: port, scheduler: port };
    const curls = readmeCurls("Queues, priorities and labels");
    expect(curls).toHaveLength(7);
    const outputs: any[] = [];
    for (const command of curls) outputs.push(JSON.parse(await runReadmeCommand(command, ports)));
    const [mail, patched, paused, resumed, queues, listed, gpu] = outputs;
    expect(mail).toMatchObject({ queue: "emails", priority: 10 });
    expect(patched).toMatchObject({ name: "emails", concurrency_limit: 2 });
    expect(paused).toMatchObject({ name: "emails", paused: true });
    expect(resumed).toMatchObject({ name: "emails", paused: false });
    expect(queues.queues.map((q: { name: string }) => q.name)).toContain("emails");
    expect(listed.tasks.map((t: { id: string }) => t.id)).toEqual([mail.id]);
    expect(gpu).toMatchObject({ require: [{ key: "gpu" }, { key: "mem_gb" }], schedule_timeout_ms: 60000 });
    expect(await watchTask(cluster.coordinatorUrl, mail.id)).toMatchObject({ state: "succeeded", stdout: "mail\n" });
    // nvidia-smi is not installed here: it ran on the labelled worker all the same (and failed).
    expect((await watchTask(cluster.coordinatorUrl, gpu.id)).attempt).toBeGreaterThan(0);
  } finally {
    await cluster.stop();
  }
});
