import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { claimDue, nextDueIn } from "../../src/db/claim";
import { createRateLimit, flowWaitOf, nextTokenIn } from "../../src/db/flow";
import { insertTasks } from "../../src/db/insert";
import { connect } from "../../src/db/sql";
import { cancelTask, finishAttempt, recordAttemptStopped, requeueWorkerTasks } from "../../src/db/transitions";
import type { TaskSpec } from "../../src/task/task";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { attemptResult, newTaskId, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

async function clear() {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, workers, concurrency_keys, rate_limits, rate_buckets CASCADE`;
}

const keyed = (key: string, max: number, over: Partial<TaskSpec> = {}): TaskSpec =>
  taskSpec({ concurrency: { key, max, strategy: "queue" }, ...over });

async function submit(specs: TaskSpec[]): Promise<string[]> {
  const items = specs.map((spec) => ({ id: newTaskId(), spec }));
  await insertTasks(db.sql, items);
  return items.map((item) => item.id);
}

const slots = (n: number, worker = "w1") => Array.from({ length: n }, () => worker);

async function liveOf(key: string): Promise<number> {
  const [row] = await db.sql<{ n: number }[]>`
    SELECT count(*)::int AS n FROM tasks WHERE concurrency_key = ${key} AND state IN ('dispatched', 'running')`;
  return row!.n;
}

describe("concurrency keys in the claim", () => {
  test("a key with max 2 gives 2 of 5 tasks, and a finished one lets the next in", async () => {
    await clear();
    await submit(Array.from({ length: 5 }, () => keyed("k", 2)));
    const first = await claimDue(db.sql, "c1", slots(5), 60_000);
    expect(first).toHaveLength(2);
    expect(await claimDue(db.sql, "c1", slots(5), 60_000)).toHaveLength(0);
    const done = first[0]!;
    await finishAttempt(db.sql, { taskId: done.id, attempt: done.attempt, workerId: "w1" }, attemptResult());
    const next = await claimDue(db.sql, "c1", slots(5), 60_000);
    expect(next).toHaveLength(1);
    expect(await liveOf("k")).toBe(2);
  });

  test("candidates of a full key do not use up the claim's slots", async () => {
    await clear();
    await submit(Array.from({ length: 20 }, () => keyed("hot", 1)));
    const plain = await submit(Array.from({ length: 3 }, () => taskSpec()));
    const claimed = await claimDue(db.sql, "c1", slots(4), 60_000);
    expect(claimed).toHaveLength(4);
    expect(claimed.filter((t) => plain.includes(t.id))).toHaveLength(3);
  });

  test("a hot key with live tasks gives only its room from a deep backlog, and the tasks behind it still go", async () => {
    await clear();
    await submit(Array.from({ length: 2 }, () => keyed("hot", 4)));
    const live = await claimDue(db.sql, "c1", slots(2), 60_000);
    expect(live).toHaveLength(2);
    const backlog = await submit(Array.from({ length: 60 }, () => keyed("hot", 4)));
    const plain = await submit(Array.from({ length: 3 }, () => taskSpec()));
    const claimed = await claimDue(db.sql, "c1", slots(8), 60_000);
    // Room for 2 more of the key (its first 2 queued), and the 3 plain ones.
    expect(claimed.filter((t) => plain.includes(t.id))).toHaveLength(3);
    expect(
      claimed
        .filter((t) => t.concurrency_key === "hot")
        .map((t) => t.id)
        .sort(),
    ).toEqual(backlog.slice(0, 2).sort());
    expect(await liveOf("hot")).toBe(4);
    expect(await claimDue(db.sql, "c1", slots(8), 60_000)).toHaveLength(0);
    // One done: exactly the next one of the queue.
    const done = claimed.find((t) => t.concurrency_key === "hot")!;
    await finishAttempt(db.sql, { taskId: done.id, attempt: done.attempt, workerId: "w1" }, attemptResult());
    expect((await claimDue(db.sql, "c1", slots(8), 60_000)).map((t) => t.id)).toEqual([backlog[2]!]);
  });

  test("a hot key with none live, at the head of a deep backlog, gives exactly its first max", async () => {
    await clear();
    const backlog = await submit(Array.from({ length: 80 }, () => keyed("deep", 3)));
    const plain = await submit(Array.from({ length: 2 }, () => taskSpec()));
    const claimed = await claimDue(db.sql, "c1", slots(8), 60_000);
    expect(claimed.filter((t) => plain.includes(t.id))).toHaveLength(2);
    expect(
      claimed
        .filter((t) => t.concurrency_key === "deep")
        .map((t) => t.id)
        .sort(),
    ).toEqual(backlog.slice(0, 3).sort());
    // All three done at once: none live again, and exactly the next three go.
    for (const t of claimed) await finishAttempt(db.sql, { taskId: t.id, attempt: t.attempt, workerId: "w1" }, attemptResult());
    const next = await claimDue(db.sql, "c1", slots(8), 60_000);
    expect(next.map((t) => t.id).sort()).toEqual(backlog.slice(3, 6).sort());
    expect(await liveOf("deep")).toBe(3);
  });

  test("a key whose first queued task is far back in the queue is still held to its max", async () => {
    await clear();
    const plain = await submit(Array.from({ length: 40 }, () => taskSpec()));
    const far = await submit(Array.from({ length: 5 }, () => keyed("far", 2)));
    const claimed = await claimDue(db.sql, "c1", slots(50), 60_000);
    expect(claimed.filter((t) => plain.includes(t.id))).toHaveLength(40);
    expect(
      claimed
        .filter((t) => t.concurrency_key === "far")
        .map((t) => t.id)
        .sort(),
    ).toEqual(far.slice(0, 2).sort());
  });

  test("a task asking a smaller max than its key's live ones is held to its own max", async () => {
    await clear();
    await submit(Array.from({ length: 2 }, () => keyed("mixed", 3)));
    expect(await claimDue(db.sql, "c1", slots(2), 60_000)).toHaveLength(2);
    await submit([keyed("mixed", 2)]);
    await submit([keyed("mixed", 3)]);
    // 2 live, room 1 by the live ones' max: the first queued asks 2 (full for it), and the
    // one behind it would be a 4th (over its 3).
    expect(await claimDue(db.sql, "c1", slots(4), 60_000)).toHaveLength(0);
    expect(await liveOf("mixed")).toBe(2);
  });

  test("keys are served round robin: each key gets one slot before any gets a second", async () => {
    await clear();
    const a = await submit(Array.from({ length: 5 }, () => keyed("a", 5)));
    const b = await submit(Array.from({ length: 2 }, () => keyed("b", 5)));
    const claimed = await claimDue(db.sql, "c1", slots(3), 60_000);
    expect(claimed.filter((t) => a.includes(t.id))).toHaveLength(2);
    expect(claimed.filter((t) => b.includes(t.id))).toHaveLength(1);
  });

  test("a rescued attempt keeps its key slot until it is requeued, and frees it once", async () => {
    await clear();
    await submit(Array.from({ length: 3 }, () => keyed("r", 1)));
    const [held] = await claimDue(db.sql, "c1", slots(1, "dead"), 60_000);
    expect(held).toBeDefined();
    expect(await claimDue(db.sql, "c1", slots(3, "w2"), 60_000)).toHaveLength(0);
    await requeueWorkerTasks(db.sql, "dead", "worker lost", "lost");
    // Requeued keeping its run_at, it is first in its key's line again: exactly one gets in.
    const after = await claimDue(db.sql, "c1", slots(3, "w2"), 60_000);
    expect(after.map((t) => t.id)).toEqual([held!.id]);
    expect(await liveOf("r")).toBe(1);
  });

  test("concurrent claims from separate connections never exceed a key's max", async () => {
    await clear();
    await submit(Array.from({ length: 60 }, (_, i) => keyed(`k${i % 3}`, 2)));
    const others = [connect(db.url, { max: 2 }), connect(db.url, { max: 2 })];
    try {
      for (let round = 0; round < 10; round++) {
        await Promise.all([db.sql, ...others].map((sql, i) => claimDue(sql, `c${i}`, slots(4, `w${i}`), 60_000)));
        for (const key of ["k0", "k1", "k2"]) expect(await liveOf(key)).toBeLessThanOrEqual(2);
        // Finish everything live, so the next round claims again.
        const live = await db.sql<{ id: string; attempt: number; worker_id: string }[]>`
          SELECT id, attempt, worker_id FROM tasks WHERE state IN ('dispatched', 'running')`;
        for (const t of live)
          await finishAttempt(db.sql, { taskId: t.id, attempt: t.attempt, workerId: t.worker_id }, attemptResult());
      }
    } finally {
      await Promise.all(others.map((sql) => sql.end({ timeout: 5 })));
    }
  });
});

describe("rate limits in the claim", () => {
  test("a bucket admits its burst, then none until a token refills, and says when", async () => {
    await clear();
    await createRateLimit(db.sql, "smtp", { count: 1, periodMs: 60_000 }, 3);
    await submit(Array.from({ length: 10 }, () => taskSpec({ rateLimit: { name: "smtp", key: "" } })));
    const plain = await submit([taskSpec()]);
    const claimed = await claimDue(db.sql, "c1", slots(10), 60_000);
    expect(claimed).toHaveLength(4);
    expect(claimed.some((t) => t.id === plain[0])).toBe(true);
    const wait = await nextTokenIn(db.sql);
    expect(wait).toBeGreaterThan(50_000);
    expect(wait).toBeLessThanOrEqual(60_000);
  });

  test("per-key buckets are separate", async () => {
    await clear();
    await createRateLimit(db.sql, "api", { count: 1, periodMs: 60_000 }, 1);
    await submit([
      ...Array.from({ length: 3 }, () => taskSpec({ rateLimit: { name: "api", key: "a" } })),
      ...Array.from({ length: 3 }, () => taskSpec({ rateLimit: { name: "api", key: "b" } })),
    ]);
    const claimed = await claimDue(db.sql, "c1", slots(6), 60_000);
    expect(claimed.map((t) => t.rate_limit_key).sort()).toEqual(["a", "b"]);
  });
});

describe("a cancelled task keeps its key's slot until its process is gone", () => {
  test("max 1: cancelling the live one lets the next in only once its worker reports the stop", async () => {
    await clear();
    const [old] = await claimDue(db.sql, "c1", slots(1), 60_000).then(async (none) => {
      expect(none).toHaveLength(0);
      await submit([keyed("one", 1)]);
      return claimDue(db.sql, "c1", slots(1), 60_000);
    });
    const [next] = await submit([keyed("one", 1)]);
    expect((await cancelTask(db.sql, old!.id)).kind).toBe("cancelled");
    // The cancel is recorded, the process may still run: no second live command.
    expect(await claimDue(db.sql, "c1", slots(2, "w2"), 60_000)).toHaveLength(0);
    expect((await flowWaitOf(db.sql, next!))?.key_live).toBe(1);
    expect(await nextDueIn(db.sql)).toBeGreaterThan(0);
    // A stop reported for another attempt or worker frees nothing.
    expect(await recordAttemptStopped(db.sql, { taskId: old!.id, attempt: old!.attempt, workerId: "w9" }, "cancelled")).toBe(
      false,
    );
    expect(await claimDue(db.sql, "c1", slots(2, "w2"), 60_000)).toHaveLength(0);
    // The worker that ran it reports it stopped: the slot is free, once.
    expect(await recordAttemptStopped(db.sql, { taskId: old!.id, attempt: old!.attempt, workerId: "w1" }, "cancelled")).toBe(
      true,
    );
    expect(await recordAttemptStopped(db.sql, { taskId: old!.id, attempt: old!.attempt, workerId: "w1" }, "cancelled")).toBe(
      false,
    );
    expect((await claimDue(db.sql, "c1", slots(2, "w2"), 60_000)).map((t) => t.id)).toEqual([next!]);
    expect(await liveOf("one")).toBe(1);
  });

  test("a worker that never reports: the hold ends at its time", async () => {
    await clear();
    await submit([keyed("gone", 1)]);
    const [old] = await claimDue(db.sql, "c1", slots(1), 60_000);
    const [next] = await submit([keyed("gone", 1)]);
    await cancelTask(db.sql, old!.id);
    expect(await claimDue(db.sql, "c1", slots(1, "w2"), 60_000)).toHaveLength(0);
    await db.sql`UPDATE tasks SET key_held_until = clock_timestamp() - interval '1 ms' WHERE id = ${old!.id}`;
    expect((await claimDue(db.sql, "c1", slots(1, "w2"), 60_000)).map((t) => t.id)).toEqual([next!]);
  });

  test("nextDueIn: null when nothing is queued or only a full key's tasks are", async () => {
    await clear();
    expect(await nextDueIn(db.sql)).toBeNull();
    await submit([keyed("full", 1), keyed("full", 1)]);
    expect(await claimDue(db.sql, "c1", slots(2), 60_000)).toHaveLength(1);
    // The finish of the live one wakes the dispatchers (frees_key): no timer needed.
    expect(await nextDueIn(db.sql)).toBeNull();
  });

  test("a task cancelled while queued holds nothing", async () => {
    await clear();
    const [queued, other] = await submit([keyed("q", 1), keyed("q", 1)]);
    await cancelTask(db.sql, queued!);
    expect((await claimDue(db.sql, "c1", slots(1), 60_000)).map((t) => t.id)).toEqual([other!]);
  });
});
