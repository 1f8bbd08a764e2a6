// The one claim statement with queues, priorities and labels (src/db/claim.ts), the queue
// limits and pauses it reads (src/db/queues.ts), and the waiting reasons (src/db/waiting.ts),
// against real PostgreSQL.
import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { claimDue } from "../../src/db/claim";
import { listQueues, setQueueLimit, setQueuePaused } from "../../src/db/queues";
import { connect } from "../../src/db/sql";
import { getTask } from "../../src/db/tasks";
import { finishAttempt } from "../../src/db/transitions";
import { expireScheduleTimeouts, withWaiting } from "../../src/db/waiting";
import { upsertWorker } from "../../src/db/workers";
import type { LabelRequirement } from "../../src/task/labels";
import type { WorkerRouting } from "../../src/task/routing";
import type { TaskRouting, TaskSpec } from "../../src/task/task";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { attemptResult, createTask, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

async function clear() {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers`;
  await db.sql`DELETE FROM queues WHERE name <> 'default'`;
  await db.sql`UPDATE queues SET paused = false, concurrency_limit = NULL, live = 0`;
}

const routed = (routing: Partial<TaskRouting>, over: Partial<TaskSpec> = {}): TaskSpec =>
  taskSpec({
    ...over,
    routing: { queue: "default", priority: 0, requires: [], prefers: [], scheduleTimeoutMs: 0, ...routing },
  });

const req = (key: string, op: LabelRequirement["op"], value?: string): LabelRequirement =>
  value === undefined ? { key, op } : { key, op, value };

const ago = (ms: number) => new Date(Date.now() - ms);

describe("named queues", () => {
  test("a queue exists once a task names it; GET /queues counts its tasks by state", async () => {
    await clear();
    await createTask(db.sql, routed({ queue: "emails" }));
    await createTask(db.sql, routed({ queue: "emails" }));
    const [claimed] = await claimDue(db.sql, "c1", ["w1"], 30_000);
    expect(claimed?.queue).toBe("emails");
    const emails = (await listQueues(db.sql)).find((q) => q.name === "emails");
    expect(emails).toMatchObject({ paused: false, concurrency_limit: null, depth: { queued: 1, dispatched: 1 } });
  });

  test("a worker serving some queues is given only their tasks", async () => {
    await clear();
    const a = await createTask(db.sql, routed({ queue: "a" }, { scheduledAt: ago(3000) }));
    const b = await createTask(db.sql, routed({ queue: "b" }, { scheduledAt: ago(2000) }));
    const routing = new Map<string, WorkerRouting>([["wb", { queues: ["b"], labels: {} }]]);
    const claimed = await claimDue(db.sql, "c1", ["wb", "wb"], 30_000, { routing });
    expect(claimed.map((t) => [t.id, t.worker_id])).toEqual([[b.id, "wb"]]);
    expect((await getTask(db.sql, a.id))?.state).toBe("queued");
  });

  test("a paused queue's tasks stay queued and say so; resumed, they are claimed", async () => {
    await clear();
    const task = await createTask(db.sql, routed({ queue: "held" }));
    await setQueuePaused(db.sql, "held", true);
    expect(await claimDue(db.sql, "c1", ["w1"], 30_000)).toEqual([]);
    const [view] = await withWaiting(db.sql, [(await getTask(db.sql, task.id))!], 10_000);
    expect(view?.waiting).toEqual({ kind: "queue_paused", message: "queue held is paused" });
    await setQueuePaused(db.sql, "held", false);
    expect((await claimDue(db.sql, "c1", ["w1"], 30_000)).map((t) => t.id)).toEqual([task.id]);
  });

  test("a queue's concurrency limit holds across claims and frees as tasks finish", async () => {
    await clear();
    await setQueueLimit(db.sql, "lim", 2);
    for (let i = 0; i < 5; i++) await createTask(db.sql, routed({ queue: "lim" }, { scheduledAt: ago(5000 - i) }));
    const first = await claimDue(db.sql, "c1", ["w", "w", "w", "w"], 30_000);
    expect(first).toHaveLength(2);
    expect(await claimDue(db.sql, "c2", ["v", "v"], 30_000)).toEqual([]);
    const done = first[0]!;
    await finishAttempt(db.sql, { taskId: done.id, attempt: done.attempt, workerId: "w" }, attemptResult());
    expect(await claimDue(db.sql, "c2", ["v", "v"], 30_000)).toHaveLength(1);
    const [row] = await listQueues(db.sql, "lim");
    expect(row?.depth.dispatched).toBe(2);
  });

  test("concurrent claimers on two connections never overfill a limited queue", async () => {
    await clear();
    await setQueueLimit(db.sql, "race", 3);
    for (let i = 0; i < 20; i++) await createTask(db.sql, routed({ queue: "race" }));
    const a = connect(db.url, { max: 1 });
    const b = connect(db.url, { max: 1 });
    try {
      const slots = Array.from({ length: 8 }, () => "w");
      const claims = await Promise.all(
        Array.from({ length: 6 }, (_, i) => claimDue(i % 2 ? a : b, i % 2 ? "ca" : "cb", slots, 30_000)),
      );
      expect(claims.flat()).toHaveLength(3);
      const [live] = await db.sql<{ n: number }[]>`
        SELECT count(*)::integer AS n FROM tasks WHERE queue = 'race' AND state IN ('dispatched', 'running')`;
      expect(live?.n).toBe(3);
    } finally {
      await a.end();
      await b.end();
    }
  });
});

describe("priorities", () => {
  test("higher priority first among tasks that waited alike", async () => {
    await clear();
    const at = ago(1000);
    const low = await createTask(db.sql, routed({ priority: -5 }, { scheduledAt: at }));
    const high = await createTask(db.sql, routed({ priority: 10 }, { scheduledAt: at }));
    const mid = await createTask(db.sql, routed({ priority: 0 }, { scheduledAt: at }));
    const claimed = await claimDue(db.sql, "c1", ["w", "w", "w"], 30_000);
    expect(claimed.map((t) => t.id)).toEqual([high.id, mid.id, low.id]);
  });

  test("aging: a low-priority task that waited longer than (difference x aging) goes before a fresh high one", async () => {
    await clear();
    // Aging 1000 ms: priority 10 over priority 0 is worth 10 s of waiting.
    const old = await createTask(db.sql, routed({ priority: 0 }, { scheduledAt: ago(11_000) }));
    const fresh = await createTask(db.sql, routed({ priority: 10 }, { scheduledAt: ago(0) }));
    const [first] = await claimDue(db.sql, "c1", ["w"], 30_000);
    expect(first?.id).toBe(old.id);
    const younger = await createTask(db.sql, routed({ priority: 0 }, { scheduledAt: ago(9_000) }));
    const [second] = await claimDue(db.sql, "c1", ["w"], 30_000);
    expect(second?.id).toBe(fresh.id);
    expect((await getTask(db.sql, younger.id))?.state).toBe("queued");
  });

  test("a requeue keeps the rank rule: rank follows run_at", async () => {
    await clear();
    const task = await createTask(db.sql, routed({ priority: 3 }, { scheduledAt: new Date("2030-01-01T00:00:00Z") }));
    expect(task.rank?.toISOString()).toBe("2029-12-31T23:59:57.000Z");
    await db.sql`UPDATE tasks SET run_at = '2030-01-01T00:01:00Z' WHERE id = ${task.id}`;
    expect((await getTask(db.sql, task.id))?.rank?.toISOString()).toBe("2030-01-01T00:00:57.000Z");
  });
});

describe("labels", () => {
  const gpu: WorkerRouting = { queues: null, labels: { gpu: "1", region: "eu", mem_gb: "64" } };
  const cpu: WorkerRouting = { queues: null, labels: { region: "us", mem_gb: "16" } };

  test.each([
    [[req("gpu", "=", "1")], "wg"],
    [[req("gpu", "exists")], "wg"],
    [[req("mem_gb", ">=", "32")], "wg"],
    [[req("mem_gb", "<", "32")], "wc"],
    [[req("region", "!=", "eu")], "wc"],
    [[req("mem_gb", ">", "8"), req("region", "=", "us")], "wc"],
  ] as const)("require %j goes to %s only", async (requires, expected) => {
    await clear();
    await createTask(db.sql, routed({ requires: [...requires] }));
    const routing = new Map([
      ["wg", gpu],
      ["wc", cpu],
    ]);
    const claimed = await claimDue(db.sql, "c1", ["wg", "wc"], 30_000, { routing });
    expect(claimed.map((t) => t.worker_id)).toEqual([expected]);
  });

  test("no free worker matches: nothing is claimed, and the waiting reason names the labels", async () => {
    await clear();
    const task = await createTask(db.sql, routed({ requires: [req("gpu", "=", "1")] }));
    expect(await claimDue(db.sql, "c1", ["wc"], 30_000, { routing: new Map([["wc", cpu]]) })).toEqual([]);
    await upsertWorker(db.sql, { id: "wc", name: "wc", coordinatorId: "c1", slots: 1, labels: cpu.labels, version: "t" });
    const [view] = await withWaiting(db.sql, [(await getTask(db.sql, task.id))!], 10_000);
    expect(view?.waiting).toEqual({ kind: "no_worker", message: "no worker with gpu=1" });
    await upsertWorker(db.sql, { id: "wg", name: "wg", coordinatorId: "c1", slots: 1, labels: gpu.labels, version: "t" });
    const [again] = await withWaiting(db.sql, [(await getTask(db.sql, task.id))!], 10_000);
    expect(again?.waiting).toBeNull();
  });

  test("a task preferring a label goes to the worker that has it", async () => {
    await clear();
    await createTask(db.sql, routed({ prefers: [{ key: "region", op: "=", value: "eu", weight: 10 }] }));
    const routing = new Map([
      ["wg", gpu],
      ["wc", cpu],
    ]);
    const claimed = await claimDue(db.sql, "c1", ["wc", "wg"], 30_000, { routing });
    expect(claimed.map((t) => t.worker_id)).toEqual(["wg"]);
  });

  test("the special worker is kept for the tasks only it can run", async () => {
    await clear();
    const plain = await createTask(db.sql, routed({}, { scheduledAt: ago(2000) }));
    const special = await createTask(db.sql, routed({ requires: [req("gpu", "=", "1")] }, { scheduledAt: ago(1000) }));
    const routing = new Map([
      ["wg", gpu],
      ["wc", cpu],
    ]);
    const claimed = await claimDue(db.sql, "c1", ["wg", "wc"], 30_000, { routing });
    expect(Object.fromEntries(claimed.map((t) => [t.id, t.worker_id]))).toEqual({ [plain.id]: "wc", [special.id]: "wg" });
  });

  test("never more tasks than slots per worker, with many groups", async () => {
    await clear();
    for (let i = 0; i < 30; i++) await createTask(db.sql, routed({ requires: i % 3 === 0 ? [req("gpu", "exists")] : [] }));
    const routing = new Map([
      ["wg", gpu],
      ["wc", cpu],
      ["wx", { queues: ["other"], labels: {} }],
    ]);
    const claimed = await claimDue(db.sql, "c1", ["wg", "wg", "wc", "wc", "wc", "wx"], 30_000, { routing });
    const per = (id: string) => claimed.filter((t) => t.worker_id === id).length;
    expect([per("wg"), per("wc"), per("wx")]).toEqual([2, 3, 0]);
  });
});

describe("schedule_timeout_ms", () => {
  test("a queued task past its schedule timeout fails, saying so; one within it stays", async () => {
    await clear();
    const late = await createTask(
      db.sql,
      routed({ scheduleTimeoutMs: 1000, requires: [req("gpu", "=", "1")] }, { scheduledAt: ago(5000) }),
    );
    const waiting = await createTask(db.sql, routed({ scheduleTimeoutMs: 60_000 }, { scheduledAt: ago(5000) }));
    const failed = await expireScheduleTimeouts(db.sql);
    expect(failed.map((t) => t.id)).toEqual([late.id]);
    const row = await getTask(db.sql, late.id);
    expect(row).toMatchObject({ state: "failed" });
    expect(row?.error).toContain("schedule_timeout");
    expect((await getTask(db.sql, waiting.id))?.state).toBe("queued");
    expect(await expireScheduleTimeouts(db.sql)).toEqual([]);
  });
});

describe("the claim's plan", () => {
  test("the claim reads the rank index, not the table", async () => {
    await clear();
    const plan = await db.sql.begin(async (tx) => {
      await tx`SET LOCAL enable_seqscan = off`;
      return tx<{ "QUERY PLAN": string }[]>`
        EXPLAIN SELECT id FROM tasks WHERE state = 'queued' AND rank <= now() + interval '100 s' AND run_at <= now()
        ORDER BY rank, id LIMIT 8 FOR UPDATE SKIP LOCKED`;
    });
    const text = plan.map((row) => row["QUERY PLAN"]).join("\n");
    expect(text).toContain("tasks_rank_idx");
    expect(text).toContain("Index Cond: (rank <=");
    expect(text).not.toContain("Sort");
  });

  test("with the queue and label checks, the candidate scan still walks the rank index in order", async () => {
    await clear();
    // A backlog large enough for the planner to weigh the index against a sort: 50 queues,
    // mixed priorities, half of it in the future.
    await db.sql`
      INSERT INTO tasks (id, command, scheduled_at, run_at, priority, queue)
      SELECT gen_random_uuid(), 'true', now() + (i % 100 - 50) * interval '1 s', now() + (i % 100 - 50) * interval '1 s',
             i % 21 - 10, 'q' || (i % 50)
      FROM generate_series(1, 5000) i`;
    await db.sql`ANALYZE tasks`;
    const plan = await db.sql.begin(async (tx) => {
      await tx`SET LOCAL enable_seqscan = off`;
      // The claim's candidate CTE as it writes it: same predicates, order and lock.
      return tx<{ "QUERY PLAN": string }[]>`
        EXPLAIN SELECT tasks.id FROM tasks
        WHERE state IN ('queued') AND rank <= now() + make_interval(secs => 100.05) AND run_at <= now() + make_interval(secs => 0.05)
          AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = tasks.queue AND q.paused)
          AND EXISTS (SELECT 1 FROM (VALUES (NULL::jsonb, '{}'::jsonb)) g(queues, labels)
                      WHERE (g.queues IS NULL OR g.queues ? tasks.queue) AND tq_labels_match(tasks.requires, g.labels))
        ORDER BY rank, id LIMIT 16 FOR UPDATE OF tasks SKIP LOCKED`;
    });
    const text = plan.map((row) => row["QUERY PLAN"]).join("\n");
    expect(text).toContain("tasks_rank_idx");
    expect(text).not.toContain("Sort");
  });
});
