import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { listAttempts } from "../../src/db/attempts";
import { claimBatchKey, getBatch } from "../../src/db/batches";
import { claimDue, nextDueIn } from "../../src/db/claim";
import { listTaskEvents, readTaskSince } from "../../src/db/events";
import { insertTask, insertTasks } from "../../src/db/insert";
import { migrate, parseMigration, readMigrations } from "../../src/db/migrate";
import { type TaskChange, TaskChangeFeed } from "../../src/db/notify";
import { connect } from "../../src/db/sql";
import { getTask, listTasks, OUTPUT_COLUMNS, TASK_ROW_COLUMNS } from "../../src/db/tasks";
import {
  cancelTask,
  finishAttempt,
  markStarted,
  renewLeases,
  requeueAttempt,
  requeueExpiredLeases,
  requeueWorkerTasks,
} from "../../src/db/transitions";
import { listLiveWorkers, markWorkerGone, touchWorkers, upsertWorker } from "../../src/db/workers";
import type { AttemptResult } from "../../src/task/task";
import { createTestDatabase, dropTestDatabase, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { attemptResult, createTask, newTaskId, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

const success = (over: Partial<AttemptResult> = {}): AttemptResult => attemptResult({ stdout: "ok\n", ...over });

async function clear() {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers`;
}

describe("insertTask", () => {
  test("persists a queued task with its submitted event and notifies", async () => {
    await clear();
    const feed = new TaskChangeFeed(db.sql);
    await feed.start();
    const seen = new Promise<TaskChange>((resolve) => feed.onChange(resolve));
    const id = newTaskId();
    const row = await createTask(db.sql, taskSpec({ command: "echo hi", env: { A: "1" }, cwd: "/tmp" }), { id });
    expect(row.id).toBe(id);
    expect(row.state).toBe("queued");
    expect(row.attempt).toBe(0);
    expect(row.env).toEqual({ A: "1" });
    expect(row.created_at).toBeInstanceOf(Date);
    const change = await seen;
    expect(change).toMatchObject({ id, state: "queued", kind: "submitted", event_id: row.event_id });
    expect(change.due_in_ms).toBe(0);
    await feed.stop();
    const events = await listTaskEvents(db.sql, id);
    expect(events.map((e) => e.kind)).toEqual(["submitted"]);
  });

  test("a run-now task is due at once: its time is never rounded into the future", async () => {
    await clear();
    const feed = new TaskChangeFeed(db.sql);
    await feed.start();
    const dues: number[] = [];
    let done: () => void = () => {};
    const all = new Promise<void>((resolve) => (done = resolve));
    feed.onChange((change) => {
      dues.push(change.due_in_ms ?? -1);
      if (dues.length === 110) done();
    });
    for (let i = 0; i < 100; i++) await createTask(db.sql, taskSpec());
    // A statement notifies coordinators of the queued task it holds that is due first.
    for (let i = 0; i < 10; i++)
      await insertTasks(
        db.sql,
        Array.from({ length: 10 }, () => ({ id: newTaskId(), spec: taskSpec() })),
      );
    await all;
    await feed.stop();
    expect(dues.filter((d) => d !== 0)).toEqual([]);
  });

  test("with an assignment the task is born dispatched, attempt 1", async () => {
    await clear();
    const row = await createTask(db.sql, taskSpec(), { assignTo: { workerId: "w1", coordinatorId: "c1", leaseMs: 30_000 } });
    expect(row).toMatchObject({ state: "dispatched", attempt: 1, worker_id: "w1", coordinator_id: "c1" });
    expect(row.picked_at).toBeInstanceOf(Date);
  });

  test("a future task reports when it is due", async () => {
    await clear();
    const feed = new TaskChangeFeed(db.sql);
    await feed.start();
    const seen = new Promise<TaskChange>((resolve) => feed.onChange(resolve));
    await createTask(db.sql, taskSpec({ scheduledAt: new Date(Date.now() + 60_000) }));
    const change = await seen;
    expect(change.due_in_ms).toBeGreaterThan(55_000);
    expect(change.due_in_ms).toBeLessThanOrEqual(60_000);
    await feed.stop();
    const due = await nextDueIn(db.sql);
    expect(due).toBeGreaterThan(55_000);
  });

  test("nothing queued is no due time (null), not 0: an idle dispatcher arms no timer", async () => {
    await clear();
    // greatest(0, NULL) is 0 in SQL: the empty queue once read as "due now", every 5 ms.
    expect(await nextDueIn(db.sql)).toBeNull();
    await createTask(db.sql, taskSpec({ scheduledAt: new Date(Date.now() - 5000) }));
    // An overdue task is due now: 0, never negative.
    expect(await nextDueIn(db.sql)).toBe(0);
  });
});

describe("claimDue", () => {
  test("never claims more than the slots and assigns each slot's worker", async () => {
    await clear();
    for (let i = 0; i < 10; i++) await createTask(db.sql, taskSpec());
    const claimed = await claimDue(db.sql, "c1", ["w1", "w2", "w1"], 30_000);
    expect(claimed).toHaveLength(3);
    expect(claimed.map((t) => t.worker_id).sort()).toEqual(["w1", "w1", "w2"]);
    for (const t of claimed) expect(t).toMatchObject({ state: "dispatched", attempt: 1, coordinator_id: "c1" });
    const queued = await db.sql<{ count: number }[]>`SELECT count(*)::int AS count FROM tasks WHERE state = 'queued'`;
    expect(queued[0]?.count).toBe(7);
    expect(await claimDue(db.sql, "c1", [], 30_000)).toEqual([]);
  });

  test("claims in scheduled order and never a task that is not yet due", async () => {
    await clear();
    const future = await createTask(db.sql, taskSpec({ scheduledAt: new Date(Date.now() + 60_000) }));
    const later = await createTask(db.sql, taskSpec({ scheduledAt: new Date(Date.now() - 1000) }));
    const earlier = await createTask(db.sql, taskSpec({ scheduledAt: new Date(Date.now() - 5000) }));
    const claimed = await claimDue(db.sql, "c1", ["w", "w", "w"], 30_000);
    expect(claimed.map((t) => t.id)).toEqual([earlier.id, later.id]);
    expect((await getTask(db.sql, future.id))?.state).toBe("queued");
  });

  test("two concurrent claimers never get the same task", async () => {
    await clear();
    const ids = new Set<string>();
    for (let i = 0; i < 60; i++) ids.add((await createTask(db.sql, taskSpec())).id);
    const a = connect(db.url, { max: 1 });
    const b = connect(db.url, { max: 1 });
    const got: string[] = [];
    for (let round = 0; round < 10; round++) {
      const [x, y] = await Promise.all([
        claimDue(a, "ca", ["w", "w", "w", "w"], 30_000),
        claimDue(b, "cb", ["v", "v", "v", "v"], 30_000),
      ]);
      got.push(...x.map((t) => t.id), ...y.map((t) => t.id));
    }
    await Promise.all([a.end(), b.end()]);
    expect(new Set(got).size).toBe(got.length);
    expect(got.length).toBe(60);
    for (const id of got) expect(ids.has(id)).toBe(true);
  });
});

describe("fenced reports", () => {
  test("start and finish apply for the attempt that holds the task", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const started = await markStarted(db.sql, { taskId: task.id, attempt: 1, workerId: "w1", startedAt: new Date(), pid: 42 });
    expect(started?.state).toBe("running");
    const { applied } = await finishAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, success());
    expect(applied).toMatchObject({ state: "succeeded", exit_code: 0, stdout: "ok\n" });
    expect(applied?.completed_at).toBeInstanceOf(Date);
    expect(applied?.failed_at).toBeNull();
    const kinds = (await listTaskEvents(db.sql, task.id)).map((e) => e.kind);
    expect(kinds).toEqual(["submitted", "dispatched", "started", "succeeded"]);
  });

  test("a non-zero exit on the last attempt is state failed with the exit code", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 1 }));
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const { applied } = await finishAttempt(
      db.sql,
      { taskId: task.id, attempt: 1, workerId: "w1" },
      success({ state: "failed", exitCode: 3 }),
    );
    expect(applied).toMatchObject({ state: "failed", exit_code: 3 });
    expect(applied?.failed_at).toBeInstanceOf(Date);
    expect(applied?.completed_at).toBeNull();
  });

  test("a report from a superseded attempt changes nothing and is recorded as stale", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const requeued = await requeueWorkerTasks(db.sql, "w1", "worker lost", "lost");
    expect(requeued.map((t) => [t.id, t.state])).toEqual([[task.id, "queued"]]);
    const [second] = await claimDue(db.sql, "c1", ["w2"], 30_000);
    expect(second).toMatchObject({ id: task.id, attempt: 2, worker_id: "w2" });
    const stale = await finishAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, success());
    expect(stale.applied).toBeNull();
    expect(await markStarted(db.sql, { taskId: task.id, attempt: 1, workerId: "w1", startedAt: new Date(), pid: 1 })).toBeNull();
    // Right attempt, wrong worker: also fenced.
    expect((await finishAttempt(db.sql, { taskId: task.id, attempt: 2, workerId: "w1" }, success())).applied).toBeNull();
    expect((await getTask(db.sql, task.id))?.state).toBe("dispatched");
    const { applied } = await finishAttempt(db.sql, { taskId: task.id, attempt: 2, workerId: "w2" }, success());
    expect(applied?.state).toBe("succeeded");
    const events = await listTaskEvents(db.sql, task.id);
    expect(events.filter((e) => e.kind === "stale").map((e) => e.attempt)).toEqual([1, 2]);
    expect(events.filter((e) => e.kind === "stale")[0]?.detail).toEqual({ reported: "succeeded", current_attempt: 2 });
  });

  test("requeue keeps the attempts the worker still holds and fails exhausted tasks", async () => {
    await clear();
    const keep = await createTask(db.sql, taskSpec());
    const drop = await createTask(db.sql, taskSpec());
    const last = await createTask(db.sql, taskSpec({ maxAttempts: 1 }));
    await claimDue(db.sql, "c1", ["w1", "w1", "w1"], 30_000);
    const changed = await requeueWorkerTasks(db.sql, "w1", "worker lost", "lost", [`${keep.id}:1`]);
    const byId = new Map(changed.map((t) => [t.id, t]));
    expect(byId.has(keep.id)).toBe(false);
    expect(byId.get(drop.id)?.state).toBe("queued");
    expect(byId.get(last.id)?.state).toBe("failed");
    expect(byId.get(last.id)?.error).toBe("exhausted 1 attempt: last worker lost");
    // A lost attempt with no attempt left ends the task: the event says failed, not requeued.
    expect((await listTaskEvents(db.sql, drop.id)).at(-1)).toMatchObject({ kind: "requeued", state: "queued" });
    expect((await listTaskEvents(db.sql, last.id)).at(-1)).toMatchObject({ kind: "failed", state: "failed" });
    expect((await listAttempts(db.sql, drop.id))[0]).toMatchObject({ outcome: "lost", error: "worker lost" });
    expect((await listAttempts(db.sql, keep.id))[0]).toMatchObject({ outcome: null, finished_at: null });
    expect((await getTask(db.sql, keep.id))?.state).toBe("dispatched");
  });

  test("a handed-back attempt is requeued only under its fence", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    expect(await requeueAttempt(db.sql, { taskId: task.id, attempt: 2, workerId: "w1" }, "handed back", "lost")).toBeNull();
    expect((await requeueAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, "handed back", "lost"))?.state).toBe(
      "queued",
    );
  });

  test("an interrupted attempt does not use up the task's attempts; a lost one does, and the history says which", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 1 }));
    const [first] = await claimDue(db.sql, "c1", ["w1"], 30_000);
    const ref1 = { taskId: task.id, attempt: first!.attempt, workerId: "w1" };
    const requeued = await requeueAttempt(db.sql, ref1, "the worker is draining", "interrupted");
    expect(requeued).toMatchObject({ state: "queued", attempt: 1, interruptions: 1 });
    // The same again, as a reconnected worker's unknown assignment.
    const [second] = await claimDue(db.sql, "c1", ["w2"], 30_000);
    expect(second).toMatchObject({ attempt: 2, interruptions: 1 });
    const changed = await requeueWorkerTasks(db.sql, "w2", "not held by the worker after reconnecting", "interrupted");
    expect(changed.map((t) => [t.state, t.interruptions])).toEqual([["queued", 2]]);
    // A genuine loss counts: with max_attempts 1, it is the one attempt, and the task fails.
    const [third] = await claimDue(db.sql, "c1", ["w3"], 30_000);
    expect(third?.attempt).toBe(3);
    const [lost] = await requeueWorkerTasks(db.sql, "w3", "worker lost (stream ended)", "lost");
    expect(lost).toMatchObject({
      state: "failed",
      attempt: 3,
      interruptions: 2,
      error: "exhausted 1 attempt: last worker lost (stream ended)",
    });

    expect((await listAttempts(db.sql, task.id)).map((a) => [a.attempt, a.outcome, a.error])).toEqual([
      [1, "interrupted", "the worker is draining"],
      [2, "interrupted", "not held by the worker after reconnecting"],
      [3, "lost", "worker lost (stream ended)"],
    ]);
    const ends = (await listTaskEvents(db.sql, task.id)).filter((e) => e.kind === "requeued" || e.kind === "failed");
    expect(ends.map((e) => [e.kind, e.attempt, e.detail?.cause, e.detail?.outcome])).toEqual([
      ["requeued", 1, "interrupted", "interrupted"],
      ["requeued", 2, "interrupted", "interrupted"],
      ["failed", 3, "lost", "lost"],
    ]);
    // A late result of an interrupted attempt is kept on its row as stale.
    await finishAttempt(db.sql, ref1, success());
    expect((await listAttempts(db.sql, task.id))[0]?.outcome).toBe("stale");
  });

  test("a failure after an interruption is retried while the counted attempts allow it", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 2 }));
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await requeueAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, "the worker is draining", "interrupted");
    const failure = attemptResult({ state: "failed", exitCode: 1, error: null });
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    // Attempt 2 is the first that counts: one more follows.
    expect((await finishAttempt(db.sql, { taskId: task.id, attempt: 2, workerId: "w1" }, failure)).applied?.state).toBe("queued");
    await db.sql`UPDATE tasks SET run_at = now() WHERE id = ${task.id}`;
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const { applied } = await finishAttempt(db.sql, { taskId: task.id, attempt: 3, workerId: "w1" }, failure);
    expect(applied).toMatchObject({
      state: "failed",
      attempt: 3,
      interruptions: 1,
      error: "exhausted 2 attempts: last exit code 1",
    });
  });
});

describe("leases", () => {
  test("reported attempts are renewed; a lapsed lease is requeued by anyone", async () => {
    await clear();
    const a = await createTask(db.sql, taskSpec());
    const b = await createTask(db.sql, taskSpec());
    const c = await createTask(db.sql, taskSpec({ retry: { ...taskSpec().retry, onLost: false } }));
    // A lease of 0 ms lapses at once unless renewed.
    const claimed = await claimDue(db.sql, "c1", ["w1", "w1", "w2"], 0);
    expect(claimed.every((t) => t.lease_expires_at instanceof Date)).toBe(true);
    const renewed = await renewLeases(
      db.sql,
      [
        { taskId: a.id, attempt: 1, workerId: "w1" },
        { taskId: b.id, attempt: 7, workerId: "w1" }, // superseded attempt: not renewed
        { taskId: c.id, attempt: 1, workerId: "w9" }, // another worker: not renewed
      ],
      60_000,
    );
    expect([...renewed]).toEqual([[`${a.id}:1`, 60_000]]);
    const rescued = await requeueExpiredLeases(db.sql, 0);
    const byId = new Map(rescued.map((t) => [t.id, t]));
    expect(byId.has(a.id)).toBe(false);
    expect(byId.get(b.id)).toMatchObject({ state: "queued", lease_expires_at: null });
    expect(byId.get(c.id)).toMatchObject({ state: "failed" });
    expect(byId.get(c.id)?.error).toMatch(/does not retry a lost worker/);
    expect((await getTask(db.sql, a.id))?.state).toBe("dispatched");
  });

  test("a lapse is believed once the worker's coordinator has vouched for it since, or has been silent two leases", async () => {
    await clear();
    const worker = (id: string) =>
      upsertWorker(db.sql, { id, name: id, coordinatorId: "c1", slots: 4, labels: {}, version: "t" });
    await Promise.all(["lagging", "vouched", "silent", "gone"].map(worker));
    const tasks = await Promise.all(Array.from({ length: 4 }, () => createTask(db.sql, taskSpec())));
    // One transaction, so that every now() below, the rule's included, is the same instant.
    const tx = await db.sql.reserve();
    let up: number;
    let lease: number;
    let claimed: Awaited<ReturnType<typeof claimDue>>;
    let rescued: Set<string>;
    try {
      await tx`BEGIN`;
      // Silence counts from the database's own start too: the lease is a quarter of its uptime
      // (at most 1 s), so that a worker silent for five leases has been silent over two since
      // then, even on a cluster started a moment ago.
      [{ up } = { up: 0 }] = await tx<{ up: number }[]>`
        SELECT extract(epoch FROM now() - pg_postmaster_start_time()) * 1000 AS up`;
      lease = Math.min(1000, Number(up) / 4);
      const leases = (n: number) => tx`make_interval(secs => ${(n * lease) / 1000})`;
      claimed = await claimDue(tx, "c1", ["lagging", "vouched", "silent", "gone"], lease);
      // Every lease lapsed a hundredth of a lease ago, renewed (or dispatched) a lease before that.
      await tx`UPDATE tasks SET lease_expires_at = now() - ${leases(0.01)}`;
      // lagging: its coordinator's last pass came before that renewal (it has not caught up yet).
      await tx`UPDATE workers SET last_heartbeat_at = now() - ${leases(1.11)} WHERE id = 'lagging'`;
      // vouched: a pass after the renewal did not renew the attempt: the worker does not hold it.
      await tx`UPDATE workers SET last_heartbeat_at = now() WHERE id = 'vouched'`;
      // silent: no pass for more than two leases (and the database has been up longer than that).
      await tx`UPDATE workers SET last_heartbeat_at = now() - ${leases(5)} WHERE id = 'silent'`;
      await markWorkerGone(tx, "gone", "c1");
      rescued = new Set((await requeueExpiredLeases(tx, lease)).map((t) => t.id));
      await tx`COMMIT`;
    } finally {
      await tx`ROLLBACK`.catch(() => {}); // only a warning after COMMIT
      tx.release();
    }
    expect(Number(up)).toBeGreaterThan(2 * lease);
    expect(lease).toBeGreaterThan(0);
    const on = (w: string) => claimed.find((t) => t.worker_id === w)!.id;
    expect(claimed).toHaveLength(tasks.length);
    expect(rescued).toEqual(new Set([on("vouched"), on("silent"), on("gone")]));
    expect((await getTask(db.sql, on("lagging")))?.state).toBe("dispatched");
  });

  test("workers listed live are those vouched for within the timeout", async () => {
    await clear();
    await upsertWorker(db.sql, { id: "live", name: "live", coordinatorId: "c1", slots: 2, labels: {}, version: "t" });
    await upsertWorker(db.sql, { id: "dead", name: "dead", coordinatorId: "c1", slots: 2, labels: {}, version: "t" });
    await db.sql`UPDATE workers SET last_heartbeat_at = now() - interval '1 minute' WHERE id = 'dead'`;
    await touchWorkers(db.sql, "c1", ["live"]);
    expect((await listLiveWorkers(db.sql, 3000)).map((w) => w.id)).toEqual(["live"]);
    expect(await markWorkerGone(db.sql, "live", "other-coordinator")).toBe(false);
    expect(await markWorkerGone(db.sql, "live", "c1")).toBe(true);
    expect((await listLiveWorkers(db.sql, 3000)).map((w) => w.id)).toEqual([]);
    await touchWorkers(db.sql, "c1", ["dead"]);
    expect((await listLiveWorkers(db.sql, 3000)).map((w) => w.id)).toEqual(["dead"]);
  });
});

describe("retries", () => {
  const failure = (over: Partial<AttemptResult> = {}) =>
    success({ state: "failed", exitCode: 1, stdout: "", stderr: "boom\n", ...over });

  test("a failed attempt with attempts left is queued again after a backoff, its result kept in history", async () => {
    await clear();
    const task = await createTask(
      db.sql,
      taskSpec({
        maxAttempts: 3,
        retry: { onFailure: true, onTimeout: true, onLost: true, backoffBaseMs: 60_000, backoffCapMs: 600_000 },
      }),
    );
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const before = Date.now();
    const { applied } = await finishAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, failure());
    expect(applied).toMatchObject({ state: "queued", attempt: 1, exit_code: 1, failed_at: null, lease_expires_at: null });
    // First backoff: the base times a jitter in [0.5, 1), on run_at; scheduled_at stays as submitted.
    const delay = applied!.run_at.getTime() - before;
    expect(delay).toBeGreaterThanOrEqual(30_000 - 1000);
    expect(delay).toBeLessThanOrEqual(60_000 + 1000);
    expect(applied!.scheduled_at).toEqual(task.scheduled_at);
    expect(await claimDue(db.sql, "c1", ["w1"], 30_000)).toEqual([]);
    const events = await listTaskEvents(db.sql, task.id);
    // Not "failed" while the task is queued: the kind says a retry follows, and when.
    expect(events.at(-1)).toMatchObject({ kind: "retrying", state: "queued", attempt: 1 });
    expect(events.at(-1)?.detail).toMatchObject({ outcome: "failed", exit_code: 1 });
    expect(new Date(String(events.at(-1)?.detail?.run_at)).getTime()).toBe(applied!.run_at.getTime());
    const [attempt] = await listAttempts(db.sql, task.id);
    expect(attempt).toMatchObject({ attempt: 1, outcome: "failed", exit_code: 1, stderr: "boom\n", worker_id: "w1" });
  });

  test("backoff doubles per attempt up to the cap; the last attempt's failure is final", async () => {
    await clear();
    const task = await createTask(
      db.sql,
      taskSpec({ maxAttempts: 3, retry: { onFailure: true, onTimeout: true, onLost: true, backoffBaseMs: 0, backoffCapMs: 0 } }),
    );
    for (let attempt = 1; attempt <= 3; attempt++) {
      const [claimed] = await claimDue(db.sql, "c1", ["w1"], 30_000);
      expect(claimed?.attempt).toBe(attempt);
      const { applied } = await finishAttempt(
        db.sql,
        { taskId: task.id, attempt, workerId: "w1" },
        failure({ exitCode: attempt }),
      );
      expect(applied?.state).toBe(attempt < 3 ? "queued" : "failed");
    }
    const final = await getTask(db.sql, task.id);
    expect(final).toMatchObject({ state: "failed", exit_code: 3, attempt: 3, error: "exhausted 3 attempts: last exit code 3" });
    expect(final?.failed_at).toBeInstanceOf(Date);
    const results = (await listTaskEvents(db.sql, task.id)).filter((e) => e.kind === "retrying" || e.kind === "failed");
    expect(results.map((e) => [e.kind, e.state, e.attempt, e.detail?.exit_code])).toEqual([
      ["retrying", "queued", 1, 1],
      ["retrying", "queued", 2, 2],
      ["failed", "failed", 3, 3],
    ]);
  });

  test("each retry reason can be switched off", async () => {
    await clear();
    const off = { onFailure: false, onTimeout: false, onLost: true, backoffBaseMs: 0, backoffCapMs: 0 };
    const failing = await createTask(db.sql, taskSpec({ retry: off }));
    const timing = await createTask(db.sql, taskSpec({ retry: off }));
    await claimDue(db.sql, "c1", ["w1", "w1"], 30_000);
    expect((await finishAttempt(db.sql, { taskId: failing.id, attempt: 1, workerId: "w1" }, failure())).applied?.state).toBe(
      "failed",
    );
    const timedOut = failure({ state: "timed_out", exitCode: null, signal: "SIGTERM", error: "timed out after 5 ms" });
    expect((await finishAttempt(db.sql, { taskId: timing.id, attempt: 1, workerId: "w1" }, timedOut)).applied?.state).toBe(
      "timed_out",
    );
  });
});

describe("idempotent insert", () => {
  test("a repeated key returns the original task; another request under it is told apart", async () => {
    await clear();
    const spec = taskSpec({ command: "echo once", idempotencyKey: "k-1" });
    const first = await insertTask(db.sql, newTaskId(), spec);
    expect(first.kind).toBe("created");
    const again = await insertTask(db.sql, newTaskId(), spec);
    expect(again).toMatchObject({ kind: "existing", sameRequest: true, task: { id: first.task.id } });
    const other = await insertTask(db.sql, newTaskId(), { ...spec, command: "echo twice" });
    expect(other).toMatchObject({ kind: "existing", sameRequest: false, task: { id: first.task.id } });
    const count = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
    expect(count[0]?.n).toBe(1);
  });

  test("concurrent repeats create one task", async () => {
    await clear();
    const pools = Array.from({ length: 4 }, () => connect(db.url, { max: 1 }));
    const spec = taskSpec({ idempotencyKey: "race" });
    const outcomes = await Promise.all(pools.map((sql) => insertTask(sql, newTaskId(), spec)));
    await Promise.all(pools.map((sql) => sql.end()));
    expect(outcomes.filter((o) => o.kind === "created")).toHaveLength(1);
    expect(new Set(outcomes.map((o) => o.task.id)).size).toBe(1);
  });
});

describe("notification channels", () => {
  test("a task's own channel carries each change after its creation; the shared one only what dispatch acts on", async () => {
    await clear();
    const feed = new TaskChangeFeed(db.sql);
    await feed.start();
    const shared: string[] = [];
    let sawMarker: () => void = () => {};
    const marker = newTaskId();
    const markerSeen = new Promise<void>((resolve) => (sawMarker = resolve));
    feed.onChange((change) => {
      shared.push(`${change.id === marker ? "marker" : "task"}:${change.kind}`);
      if (change.id === marker && change.kind === "cancelled") sawMarker();
    });
    const id = newTaskId();
    const own: string[] = [];
    let finished: () => void = () => {};
    const done = new Promise<void>((resolve) => (finished = resolve));
    const off = await feed.onTask(id, (change) => {
      own.push(change.kind);
      if (change.state === "succeeded") finished();
    });
    await createTask(db.sql, taskSpec(), { id });
    const [claimed] = await claimDue(db.sql, "c1", ["w1"], 30_000);
    expect(claimed?.id).toBe(id);
    await markStarted(db.sql, { taskId: id, attempt: 1, workerId: "w1", startedAt: new Date(), pid: 42 });
    await finishAttempt(db.sql, { taskId: id, attempt: 1, workerId: "w1" }, success());
    await done;
    // Notifications arrive in commit order: once the marker's cancel is in, nothing more of
    // the task is on its way to the shared channel.
    await createTask(db.sql, taskSpec(), { id: marker });
    await cancelTask(db.sql, marker);
    await markerSeen;
    off();
    await feed.stop();
    // Not its creation: through the API nobody can know the id of a task before it exists.
    expect(own).toEqual(["dispatched", "started", "succeeded"]);
    expect(shared).toEqual(["task:submitted", "marker:submitted", "marker:cancelled"]);
  });

  test("after its connection is cut, the feed listens again on every channel, then asks consumers to resync", async () => {
    await clear();
    const feed = new TaskChangeFeed(db.sql);
    await feed.start();
    const task = await createTask(db.sql, taskSpec());
    const seen: string[] = [];
    let dispatched: () => void = () => {};
    const sawDispatch = new Promise<void>((resolve) => (dispatched = resolve));
    const off = await feed.onTask(task.id, (change) => {
      seen.push(change.kind);
      if (change.kind === "dispatched") dispatched();
    });
    let resynced: () => void = () => {};
    const resync = new Promise<void>((resolve) => (resynced = resolve));
    feed.onResync(() => resynced());
    // This feed's listening backend: its last statement was the LISTEN for this task.
    const cut = await db.sql<{ ok: boolean }[]>`
      SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
      WHERE datname = current_database() AND query = ${`LISTEN "tq_task_${task.id}"`}`;
    expect(cut.map((row) => row.ok)).toEqual([true]);
    await resync;
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await sawDispatch;
    // The last watcher leaving UNLISTENs on the new connection (a handle from before the cut
    // would no longer reach it): the listening backend's last statement says so.
    off();
    const unlisten = `UNLISTEN "tq_task_${task.id}"`;
    let last = "";
    try {
      await eventually(
        async () => {
          const rows = await db.sql<{ query: string }[]>`
            SELECT query FROM pg_stat_activity
            WHERE datname = current_database() AND query LIKE ${`%LISTEN "tq_task_${task.id}"%`}
              AND query NOT LIKE '%pg_stat_activity%'`;
          last = rows[0]?.query ?? "";
          return last === unlisten;
        },
        { what: `the listening backend to run ${unlisten}`, timeoutMs: 5000 },
      );
    } finally {
      await feed.stop();
    }
    expect(last).toBe(unlisten);
    expect(seen).toEqual(["dispatched"]);
  });

  test("a statement that queues many tasks tells coordinators once, of the one due first", async () => {
    await clear();
    const feed = new TaskChangeFeed(db.sql);
    await feed.start();
    const shared: { id: string; due: number | null }[] = [];
    let sawMarker: () => void = () => {};
    const marker = newTaskId();
    const markerSeen = new Promise<void>((resolve) => (sawMarker = resolve));
    feed.onChange((change) => {
      if (change.id === marker) sawMarker();
      else shared.push({ id: change.id, due: change.due_in_ms });
    });
    const now = Date.now();
    const items = [40, 10, 30, 20].map((s) => ({ id: newTaskId(), spec: taskSpec({ scheduledAt: new Date(now + s * 1000) }) }));
    await insertTasks(db.sql, items);
    await createTask(db.sql, taskSpec(), { id: marker });
    await markerSeen;
    await feed.stop();
    expect(shared).toHaveLength(1);
    expect(shared[0]?.id).toBe(items[1]!.id);
    expect(shared[0]?.due).toBeGreaterThan(5_000);
    expect(shared[0]?.due).toBeLessThanOrEqual(10_000);
  });
});

describe("insertTasks", () => {
  test("one statement for queued, assigned and idempotent tasks; each gets its own outcome and actor", async () => {
    await clear();
    const earlier = await insertTask(db.sql, newTaskId(), taskSpec({ command: "echo earlier", idempotencyKey: "taken" }));
    const items = [
      {
        id: newTaskId(),
        spec: taskSpec({ command: "echo queued", env: { A: 'quote " and \\ backslash, {braces}' } }),
        actor: "alice",
      },
      {
        id: newTaskId(),
        spec: taskSpec({ command: "echo assigned" }),
        actor: "bob",
        assignTo: { workerId: "w-1", coordinatorId: "c-1", leaseMs: 4000 },
      },
      { id: newTaskId(), spec: taskSpec({ command: "echo earlier", idempotencyKey: "taken" }), actor: "carol" },
      { id: newTaskId(), spec: taskSpec({ command: "echo new key", idempotencyKey: "fresh" }) },
      { id: newTaskId(), spec: taskSpec({ command: "echo other request", idempotencyKey: "fresh" }) },
      {
        id: newTaskId(),
        spec: taskSpec({ command: 'printf "%s\\n" NULL "{a,b}"', cwd: null, scheduledAt: new Date(Date.now() + 60_000) }),
      },
    ];
    const outcomes = await insertTasks(db.sql, items);
    expect(outcomes.map((o) => o.kind)).toEqual(["created", "created", "existing", "created", "existing", "created"]);
    expect(outcomes[0]?.task).toMatchObject({ id: items[0]!.id, state: "queued", attempt: 0, env: items[0]!.spec.env });
    expect(outcomes[1]?.task).toMatchObject({
      id: items[1]!.id,
      state: "dispatched",
      attempt: 1,
      worker_id: "w-1",
      coordinator_id: "c-1",
    });
    expect(outcomes[1]?.task.lease_expires_at).toBeInstanceOf(Date);
    expect(outcomes[2]).toMatchObject({ kind: "existing", sameRequest: true, task: { id: earlier.task.id } });
    // A key repeated inside the batch: the first one wins, the second is told apart.
    expect(outcomes[4]).toMatchObject({ kind: "existing", sameRequest: false, task: { id: items[3]!.id } });
    expect(outcomes[5]?.task).toMatchObject({ command: items[5]!.spec.command, cwd: null, state: "queued" });
    expect(outcomes[5]?.task.scheduled_at.getTime()).toBe(items[5]!.spec.scheduledAt!.getTime());

    const events = await db.sql<{ task_id: string; kind: string; actor: string | null }[]>`
      SELECT task_id, kind, actor FROM task_events WHERE task_id IN (${items[0]!.id}, ${items[1]!.id}, ${items[3]!.id}) ORDER BY id`;
    expect([...events]).toEqual([
      { task_id: items[0]!.id, kind: "submitted", actor: "alice" },
      { task_id: items[1]!.id, kind: "submitted+dispatched", actor: "bob" },
      { task_id: items[3]!.id, kind: "submitted", actor: null },
    ]);
    const count = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
    expect(count[0]?.n).toBe(5);
  });
});

describe("cancelTask", () => {
  test("cancels a queued task; a final one is reported as such", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec());
    const first = await cancelTask(db.sql, task.id);
    expect(first.kind).toBe("cancelled");
    if (first.kind === "cancelled") {
      expect(first.wasState).toBe("queued");
      expect(first.task.cancelled_at).toBeInstanceOf(Date);
    }
    const again = await cancelTask(db.sql, task.id);
    expect(again).toMatchObject({ kind: "final", task: { state: "cancelled" } });
    expect(await cancelTask(db.sql, newTaskId())).toEqual({ kind: "not_found" });
    expect(await claimDue(db.sql, "c1", ["w"], 30_000)).toEqual([]);
  });
});

describe("listTasks", () => {
  test("pages newest first and filters by state", async () => {
    await clear();
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) ids.push((await createTask(db.sql, taskSpec())).id);
    await cancelTask(db.sql, ids[0]!);
    const page1 = await listTasks(db.sql, { limit: 2 });
    expect(page1.map((t) => t.id)).toEqual([ids[4]!, ids[3]!]);
    const page2 = await listTasks(db.sql, { limit: 2, before: page1[1]!.id });
    expect(page2.map((t) => t.id)).toEqual([ids[2]!, ids[1]!]);
    const cancelled = await listTasks(db.sql, { limit: 10, state: "cancelled" });
    expect(cancelled.map((t) => t.id)).toEqual([ids[0]!]);
  });
});

describe("migrate", () => {
  test("is idempotent and safe when several processes start at once", async () => {
    const fresh = await createTestDatabase({ migrate: false });
    try {
      const others = [connect(fresh.url, { max: 1 }), connect(fresh.url, { max: 1 }), connect(fresh.url, { max: 1 })];
      const applied = await Promise.all(others.map((sql) => migrate(sql)));
      await Promise.all(others.map((sql) => sql.end()));
      const versions = readMigrations().map((m) => m.version);
      expect(applied.flat().sort((a, b) => a - b)).toEqual(versions);
      expect(await migrate(fresh.sql)).toEqual([]);
    } finally {
      await dropTestDatabase(fresh);
    }
  });

  test("runs under no statement or lock timeout, whatever the pool it is given sets", async () => {
    const fresh = await createTestDatabase({ migrate: false });
    const strict = connect(fresh.url, { max: 1, statementTimeoutMs: 50, lockTimeoutMs: 50 });
    try {
      const [pool] = await strict<{ statement_timeout: string; lock_timeout: string }[]>`
        SELECT current_setting('statement_timeout') AS statement_timeout, current_setting('lock_timeout') AS lock_timeout`;
      expect(pool).toEqual({ statement_timeout: "50ms", lock_timeout: "50ms" });
      // A long migration (or a wait for another process's advisory lock) would be cut short.
      const probe = `DO $$ BEGIN
        IF current_setting('statement_timeout') <> '0' OR current_setting('lock_timeout') <> '0' THEN
          RAISE EXCEPTION 'migration under statement_timeout % and lock_timeout %',
            current_setting('statement_timeout'), current_setting('lock_timeout');
        END IF;
      END $$`;
      expect(await migrate(strict, [parseMigration(1, "probe", probe)])).toEqual([1]);
      // The pool's own settings are back on the connection the migration used.
      const [after] = await strict<{ statement_timeout: string; lock_timeout: string }[]>`
        SELECT current_setting('statement_timeout') AS statement_timeout, current_setting('lock_timeout') AS lock_timeout`;
      expect(after).toEqual({ statement_timeout: "50ms", lock_timeout: "50ms" });
    } finally {
      await strict.end();
      await dropTestDatabase(fresh);
    }
  });

  test("refuses a migration that was edited after it was applied", async () => {
    const edited = readMigrations().map((m, i) => (i === 0 ? { ...m, checksum: "different" } : m));
    expect(migrate(db.sql, edited)).rejects.toThrow(/changed after it was applied/);
  });
});

describe("run_at", () => {
  test("retries move run_at and never scheduled_at; the claim and nextDueIn follow run_at", async () => {
    await clear();
    const requested = new Date("2023-04-01T15:04:05.000Z");
    const retry = { onFailure: true, onTimeout: true, onLost: true, backoffBaseMs: 0, backoffCapMs: 0 };
    const task = await createTask(db.sql, taskSpec({ scheduledAt: requested, maxAttempts: 3, retry }));
    expect(task.run_at).toEqual(requested);
    const runAts: number[] = [];
    for (let attempt = 1; attempt <= 3; attempt++) {
      const [claimed] = await claimDue(db.sql, "c1", ["w1"], 30_000);
      expect(claimed?.attempt).toBe(attempt);
      const { applied } = await finishAttempt(
        db.sql,
        { taskId: task.id, attempt, workerId: "w1" },
        success({ state: "failed", exitCode: 3 }),
      );
      expect(applied?.scheduled_at.toISOString()).toBe("2023-04-01T15:04:05.000Z");
      runAts.push(applied!.run_at.getTime());
    }
    // Each retry is due at its own time, after the submitted one; the final attempt leaves run_at alone.
    expect(runAts[0]).toBeGreaterThan(requested.getTime());
    expect(runAts[1]).toBeGreaterThanOrEqual(runAts[0]!);
    expect(runAts[2]).toBe(runAts[1]!);
    const final = await getTask(db.sql, task.id);
    expect(final?.scheduled_at.toISOString()).toBe("2023-04-01T15:04:05.000Z");

    // A retry backed off into the future is not due, though its scheduled_at has long passed.
    const later = await createTask(
      db.sql,
      taskSpec({ scheduledAt: requested, retry: { ...retry, backoffBaseMs: 120_000, backoffCapMs: 120_000 } }),
    );
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(db.sql, { taskId: later.id, attempt: 1, workerId: "w1" }, success({ state: "failed", exitCode: 1 }));
    expect(await claimDue(db.sql, "c1", ["w1"], 30_000)).toEqual([]);
    const due = await nextDueIn(db.sql);
    expect(due).toBeGreaterThan(50_000);
    expect(due).toBeLessThanOrEqual(120_000);
  });

  test("the claim reads the run_at index, not the table", async () => {
    await clear();
    const plan = await db.sql.begin(async (tx) => {
      await tx`SET LOCAL enable_seqscan = off`;
      return tx<{ "QUERY PLAN": string }[]>`
        EXPLAIN SELECT id FROM tasks WHERE state = 'queued' AND run_at <= now() ORDER BY run_at, id LIMIT 8 FOR UPDATE SKIP LOCKED`;
    });
    const text = plan.map((row) => row["QUERY PLAN"]).join("\n");
    expect(text).toContain("tasks_run_at_idx");
    expect(text).not.toContain("Sort");
  });
});

describe("output stored once", () => {
  /** The output columns of the tasks row itself, which nothing writes any more. */
  const rowOutput = async (id: string) => (await db.sql`SELECT ${db.sql(OUTPUT_COLUMNS)} FROM tasks WHERE id = ${id}`)[0];
  const unwritten = {
    stdout: null,
    stderr: null,
    stdout_truncated: false,
    stderr_truncated: false,
    stdout_replaced: false,
    stderr_replaced: false,
  };
  const output = (task: object | null | undefined) =>
    task && Object.fromEntries(OUTPUT_COLUMNS.map((column) => [column, (task as Record<string, unknown>)[column]]));

  test("a finished attempt's output is on its attempt row only; every read and answer shows the current attempt's", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 2, idempotencyKey: "once-1" }));
    const [claimed] = await claimDue(db.sql, "c1", ["w1"], 30_000);
    expect(output(claimed)).toEqual(unwritten);
    const ref1 = { taskId: task.id, attempt: 1, workerId: "w1" };
    const first = {
      stdout: "first\n",
      stderr: "e1",
      stdout_truncated: true,
      stderr_truncated: false,
      stdout_replaced: false,
      stderr_replaced: true,
    };
    const { applied } = await finishAttempt(
      db.sql,
      ref1,
      success({ state: "failed", exitCode: 1, stdout: "first\n", stderr: "e1", stdoutTruncated: true, stderrReplaced: true }),
    );
    expect(applied?.state).toBe("queued");
    expect(output(applied)).toEqual(first);
    expect(await rowOutput(task.id)).toEqual(unwritten);
    expect(output(await getTask(db.sql, task.id))).toEqual(first);
    expect(output((await listTasks(db.sql, { limit: 10 }))[0])).toEqual(first);
    expect(output((await readTaskSince(db.sql, task.id, "0", 10))?.task)).toEqual(first);
    const replay = await insertTask(db.sql, newTaskId(), taskSpec({ maxAttempts: 2, idempotencyKey: "once-1" }));
    expect(replay.kind).toBe("existing");
    expect(output(replay.task)).toEqual(first);

    // The retry's attempt has no output yet, and shows none; the first keeps its own.
    const [retried] = await claimDue(db.sql, "c1", ["w2"], 30_000);
    expect(retried).toMatchObject({ id: task.id, attempt: 2 });
    expect(output(retried)).toEqual(unwritten);
    expect(output(await getTask(db.sql, task.id))).toEqual(unwritten);
    const started = await markStarted(db.sql, { taskId: task.id, attempt: 2, workerId: "w2", startedAt: new Date(), pid: 7 });
    expect(output(started)).toEqual(unwritten);
    const second = { ...unwritten, stdout: "second\n", stderr: "", stdout_replaced: true };
    const done = await finishAttempt(
      db.sql,
      { taskId: task.id, attempt: 2, workerId: "w2" },
      success({ stdout: "second\n", stdoutReplaced: true }),
    );
    expect(output(done.applied)).toEqual(second);
    expect(await rowOutput(task.id)).toEqual(unwritten);
    expect(output(await getTask(db.sql, task.id))).toEqual(second);
    const attempts = await listAttempts(db.sql, task.id);
    expect(attempts.map(output)).toEqual([first, second]);
  });

  test("a cancel, a lost attempt and a batch replay answer with the current attempt's output", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 3 }));
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(
      db.sql,
      { taskId: task.id, attempt: 1, workerId: "w1" },
      success({ state: "failed", exitCode: 2, stdout: "one\n" }),
    );
    expect(await claimBatchKey(db.sql, { key: "once-batch", hash: "h", taskIds: [task.id], actor: null })).toBe(true);
    expect((await getBatch(db.sql, "once-batch", [null]))?.tasks[0]?.stdout).toBe("one\n");
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const [lost] = await requeueWorkerTasks(db.sql, "w1", "gone", "lost");
    expect(lost).toMatchObject({ state: "queued", attempt: 2, stdout: null });
    const cancelled = await cancelTask(db.sql, task.id);
    expect(cancelled.kind).toBe("cancelled");
    if (cancelled.kind === "cancelled") expect(cancelled.task).toMatchObject({ attempt: 2, stdout: null });

    const other = await createTask(db.sql, taskSpec({ maxAttempts: 2 }));
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(
      db.sql,
      { taskId: other.id, attempt: 1, workerId: "w1" },
      success({ state: "failed", exitCode: 2, stdout: "kept\n" }),
    );
    const stopped = await cancelTask(db.sql, other.id);
    if (stopped.kind !== "cancelled") throw new Error(`expected a cancel, got ${stopped.kind}`);
    expect(stopped.task).toMatchObject({ state: "cancelled", attempt: 1, stdout: "kept\n" });
  });

  test("a Task's columns are the tasks row's own and its output", async () => {
    const rows = await db.sql<{ column_name: string }[]>`
      SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'tasks'`;
    expect(rows.map((row) => row.column_name).sort()).toEqual([...TASK_ROW_COLUMNS, ...OUTPUT_COLUMNS].sort());
  });
});

describe("attempts", () => {
  const at = (ms: number) => new Date(Date.UTC(2030, 0, 1, 0, 0, 0, ms));

  test("each attempt keeps its worker, times, pid, result and outcome after the task moved on", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 3 }));
    for (let attempt = 1; attempt <= 3; attempt++) {
      const worker = `w${attempt}`;
      const [claimed] = await claimDue(db.sql, `c${attempt}`, [worker], 30_000);
      const [open] = await listAttempts(db.sql, task.id).then((rows) => rows.slice(-1));
      expect(open).toMatchObject({ attempt, worker_id: worker, coordinator_id: `c${attempt}`, outcome: null, started_at: null });
      expect(open?.dispatched_at).toEqual(claimed!.picked_at!);
      await markStarted(db.sql, {
        taskId: task.id,
        attempt,
        workerId: worker,
        startedAt: at(attempt * 1000),
        pid: 100 + attempt,
      });
      await finishAttempt(
        db.sql,
        { taskId: task.id, attempt, workerId: worker },
        success({
          state: "failed",
          exitCode: 126 + attempt,
          stdout: `out ${attempt}\n`,
          startedAt: at(attempt * 1000),
          finishedAt: at(attempt * 1000 + 500),
        }),
      );
    }
    const attempts = await listAttempts(db.sql, task.id);
    expect(
      attempts.map((a) => [
        a.attempt,
        a.worker_id,
        a.pid,
        a.exit_code,
        a.stdout,
        a.outcome,
        a.started_at?.getTime(),
        a.finished_at?.getTime(),
      ]),
    ).toEqual([
      [1, "w1", 101, 127, "out 1\n", "failed", at(1000).getTime(), at(1500).getTime()],
      [2, "w2", 102, 128, "out 2\n", "failed", at(2000).getTime(), at(2500).getTime()],
      [3, "w3", 103, 129, "out 3\n", "failed", at(3000).getTime(), at(3500).getTime()],
    ]);
    expect((await getTask(db.sql, task.id))?.error).toBe("exhausted 3 attempts: last exit code 129");
  });

  test("the run-now fast path opens attempt 1; a cancel stops the attempt in flight", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec(), { assignTo: { workerId: "w1", coordinatorId: "c1", leaseMs: 30_000 } });
    expect(await listAttempts(db.sql, task.id)).toMatchObject([
      { attempt: 1, worker_id: "w1", coordinator_id: "c1", outcome: null },
    ]);
    await cancelTask(db.sql, task.id);
    const [stopped] = await listAttempts(db.sql, task.id);
    expect(stopped).toMatchObject({ outcome: "stopped", error: "cancelled" });
    expect(stopped?.finished_at).toBeInstanceOf(Date);
    // A queued task cancelled after a retry: its last attempt keeps the outcome it had.
    const retried = await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await finishAttempt(db.sql, { taskId: retried.id, attempt: 1, workerId: "w1" }, success({ state: "failed", exitCode: 1 }));
    await cancelTask(db.sql, retried.id);
    expect((await listAttempts(db.sql, retried.id)).map((a) => a.outcome)).toEqual(["failed"]);
  });

  test("a late result of a lost attempt is kept on its row as stale; a repeated result changes nothing", async () => {
    await clear();
    const task = await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await markStarted(db.sql, { taskId: task.id, attempt: 1, workerId: "w1", startedAt: at(0), pid: 7 });
    await requeueWorkerTasks(db.sql, "w1", "worker lost", "lost");
    expect((await listAttempts(db.sql, task.id))[0]).toMatchObject({ outcome: "lost", error: "worker lost", pid: 7 });
    await claimDue(db.sql, "c1", ["w2"], 30_000);
    const late = await finishAttempt(
      db.sql,
      { taskId: task.id, attempt: 1, workerId: "w1" },
      success({ exitCode: 0, stdout: "done anyway\n", startedAt: at(0), finishedAt: at(900) }),
    );
    expect(late.applied).toBeNull();
    const second = await finishAttempt(
      db.sql,
      { taskId: task.id, attempt: 2, workerId: "w2" },
      success({ state: "failed", exitCode: 2, finishedAt: at(2000) }),
    );
    expect(second.applied?.state).toBe("queued");
    // The worker re-sends attempt 2's result (its ack was lost): the row keeps what was applied.
    await finishAttempt(db.sql, { taskId: task.id, attempt: 2, workerId: "w2" }, success({ exitCode: 0, stdout: "other\n" }));
    const [first, again] = await listAttempts(db.sql, task.id);
    expect(first).toMatchObject({ outcome: "stale", exit_code: 0, stdout: "done anyway\n", error: "worker lost" });
    expect(first?.finished_at?.getTime()).toBe(at(900).getTime());
    expect(again).toMatchObject({ outcome: "failed", exit_code: 2 });
    const stale = (await listTaskEvents(db.sql, task.id)).filter((e) => e.kind === "stale");
    expect(stale.map((e) => [e.attempt, e.detail?.reported])).toEqual([
      [1, "succeeded"],
      [2, "succeeded"],
    ]);
  });
});

describe("a final task says why", () => {
  const noBackoff = { onFailure: true, onTimeout: true, onLost: true, backoffBaseMs: 0, backoffCapMs: 0 };

  /** Runs every attempt of a new task to `result` (or loses it) and returns the task's final error. */
  async function finalError(
    spec: Parameters<typeof taskSpec>[0],
    end: AttemptResult | "lost",
  ): Promise<{ state: string | undefined; error: string | null | undefined }> {
    await clear();
    const task = await createTask(db.sql, taskSpec(spec));
    for (;;) {
      const [claimed] = await claimDue(db.sql, "c1", ["w1"], 30_000);
      if (!claimed) break;
      if (end === "lost") await requeueWorkerTasks(db.sql, "w1", "worker lost", "lost");
      else await finishAttempt(db.sql, { taskId: task.id, attempt: claimed.attempt, workerId: "w1" }, end);
    }
    const final = await getTask(db.sql, task.id);
    return { state: final?.state, error: final?.error };
  }

  test.each([
    [{ maxAttempts: 3 }, { state: "failed", exitCode: 127 }, "failed", "exhausted 3 attempts: last exit code 127"],
    [
      { maxAttempts: 2 },
      { state: "failed", exitCode: null, signal: "SIGKILL" },
      "failed",
      "exhausted 2 attempts: last signal SIGKILL",
    ],
    [
      { maxAttempts: 2 },
      { state: "timed_out", exitCode: null, signal: "SIGTERM", error: "timed out after 50 ms" },
      "timed_out",
      "exhausted 2 attempts: last timed out after 50 ms",
    ],
    [
      { maxAttempts: 1 },
      { state: "failed", exitCode: null, error: "cwd /nope does not exist" },
      "failed",
      "exhausted 1 attempt: last could not start: cwd /nope does not exist",
    ],
    [
      { maxAttempts: 3, retry: { ...noBackoff, onFailure: false } },
      { state: "failed", exitCode: 1 },
      "failed",
      "exit code 1; the task does not retry failures",
    ],
    [
      { maxAttempts: 3, retry: { ...noBackoff, onTimeout: false } },
      { state: "timed_out", exitCode: null, error: "timed out after 5 ms" },
      "timed_out",
      "timed out after 5 ms; the task does not retry timeouts",
    ],
  ] as const)("%j ending %j is %s: %s", async (spec, result, state, error) => {
    const outcome = await finalError({ retry: noBackoff, ...spec }, success({ ...result, stdout: "" }));
    expect(outcome).toEqual({ state, error });
  });

  test("a lost worker: exhausted, or not retried by the task's policy", async () => {
    expect(await finalError({ maxAttempts: 2, retry: noBackoff }, "lost")).toEqual({
      state: "failed",
      error: "exhausted 2 attempts: last worker lost",
    });
    expect(await finalError({ maxAttempts: 2, retry: { ...noBackoff, onLost: false } }, "lost")).toEqual({
      state: "failed",
      error: "worker lost; the task does not retry a lost worker",
    });
  });
});

describe("migration of existing rows", () => {
  test("old rows get run_at = scheduled_at and their attempts rebuilt from history", async () => {
    const all = readMigrations();
    const index = all.findIndex((m) => m.sql.includes("CREATE TABLE task_attempts"));
    expect(index).toBeGreaterThan(0);
    const old = await createTestDatabase({ migrate: false });
    try {
      await migrate(old.sql, all.slice(0, index));
      const id = newTaskId();
      await old.sql`
        INSERT INTO tasks (id, command, state, scheduled_at, attempt, worker_id, coordinator_id, started_at, lease_expires_at)
        VALUES (${id}, 'exit 3', 'running', '2023-04-01T15:04:05Z', 2, 'w2', 'c2', '2030-01-01T00:00:02Z', now() + interval '1 minute')`;
      await old.sql`
        INSERT INTO task_events (task_id, at, kind, state, attempt, worker_id, detail) VALUES
          (${id}, '2030-01-01T00:00:00Z', 'submitted', 'queued', 0, NULL, NULL),
          (${id}, '2030-01-01T00:00:00.1Z', 'dispatched', 'dispatched', 1, 'w1', NULL),
          (${id}, '2030-01-01T00:00:00.2Z', 'started', 'running', 1, 'w1', '{"pid": 41}'),
          (${id}, '2030-01-01T00:00:01Z', 'failed', 'queued', 1, 'w1', '{"exit_code": 3, "signal": null, "error": null, "stdout": "a", "stderr": "b", "stdout_truncated": false, "stderr_truncated": true}'),
          (${id}, '2030-01-01T00:00:01.5Z', 'dispatched', 'dispatched', 2, 'w2', NULL),
          (${id}, '2030-01-01T00:00:01.6Z', 'started', 'running', 2, 'w2', '{"pid": 42}')`;
      expect(await migrate(old.sql)).toEqual(all.slice(index).map((m) => m.version));
      const task = await getTask(old.sql, id);
      expect(task?.run_at.toISOString()).toBe("2023-04-01T15:04:05.000Z");
      const attempts = await listAttempts(old.sql, id);
      expect(attempts).toMatchObject([
        { attempt: 1, worker_id: "w1", pid: 41, exit_code: 3, stdout: "a", stderr_truncated: true, outcome: "failed" },
        { attempt: 2, worker_id: "w2", coordinator_id: "c2", pid: 42, outcome: null, finished_at: null },
      ]);
      expect(attempts[1]?.started_at?.toISOString()).toBe("2030-01-01T00:00:02.000Z");
      // The open attempt goes on as any other.
      await finishAttempt(old.sql, { taskId: id, attempt: 2, workerId: "w2" }, success({ state: "failed", exitCode: 3 }));
      expect((await listAttempts(old.sql, id))[1]).toMatchObject({ outcome: "failed", exit_code: 3 });
    } finally {
      await dropTestDatabase(old);
    }
  });
});
