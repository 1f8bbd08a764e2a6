// Retention against real PostgreSQL: what a batch deletes (final tasks past the cutoff, with
// their events, attempts and edges) and what it keeps (recent final tasks, live tasks however
// old, a parent a live child needs, batch keys with tasks left, buffered firings); batches of
// the configured size and a pass that runs them all; rows held by others skipped, not waited
// for; one pruner at a time; the setting parsed, and off.
import { beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { ConfigError, loadConfig, retentionSettings } from "../../src/config";
import { Pruner } from "../../src/coordinator/pruner";
import { claimDue } from "../../src/db/claim";
import { pruneBatch, RETENTION_LOCK_KEY } from "../../src/db/retention";
import { connect } from "../../src/db/sql";
import { finishAttempt, markStarted, recordStaleHandBack, recordStaleResult } from "../../src/db/transitions";
import { silentLogger } from "../../src/log";
import { TaskMetrics } from "../../src/metrics/metrics";
import { useApiApp } from "../support/api";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { attemptResult, createTask, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const { call } = useApiApp(db);
const DAY_MS = 86_400_000;
/** The cutoff of a 7-day retention, as of now. */
const cutoff = () => new Date(Date.now() - 7 * DAY_MS);

beforeEach(async () => {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers, task_batches, task_dependencies, schedules, schedule_firings`;
});

/** Claims, starts and ends every due task (worker w1), each with the given result state. */
async function runAll(state: "succeeded" | "failed" = "succeeded"): Promise<string[]> {
  const claimed = await claimDue(db.sql, "c1", Array(100).fill("w1"), 30_000);
  for (const task of claimed) {
    const ref = { taskId: task.id, attempt: task.attempt, workerId: "w1" };
    await markStarted(db.sql, { ...ref, startedAt: new Date(), pid: 1 });
    await finishAttempt(db.sql, ref, attemptResult(state === "failed" ? { state: "failed", exitCode: 1 } : {}));
  }
  return claimed.map((task) => task.id);
}

/** Moves tasks back in time by `days`: created, ended and everything in between. */
async function age(ids: string[], days: number) {
  const by = `${days} days`;
  await db.sql`
    UPDATE tasks SET created_at = created_at - ${by}::interval, completed_at = completed_at - ${by}::interval,
      failed_at = failed_at - ${by}::interval, cancelled_at = cancelled_at - ${by}::interval
    WHERE id = ANY(${ids}::uuid[])`;
}

async function count(
  table: "tasks" | "task_events" | "task_attempts" | "task_dependencies" | "task_batches" | "schedule_firings",
) {
  const [row] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM ${db.sql(table)}`;
  return row!.n;
}

async function exists(id: string) {
  const [row] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks WHERE id = ${id}`;
  return row!.n === 1;
}

describe("a retention batch", () => {
  test("deletes final tasks that ended before the cutoff with their events and attempts, and keeps the rest", async () => {
    for (let i = 0; i < 4; i++) await createTask(db.sql, taskSpec({ command: `old ${i}` }));
    const old = await runAll();
    await age(old.slice(0, 3), 30); // the fourth ended just now
    const queuedLongAgo = await createTask(db.sql, taskSpec({ command: "still queued" }));
    await age([queuedLongAgo.id], 30);
    const eventsOfKept = await db.sql<{ n: number }[]>`
      SELECT count(*)::int AS n FROM task_events WHERE task_id = ANY(${[old[3]!, queuedLongAgo.id]}::uuid[])`;
    const eventsOfOld = (await count("task_events")) - eventsOfKept[0]!.n;
    expect(eventsOfOld).toBeGreaterThanOrEqual(3 * 3); // submitted, dispatched, started, succeeded...

    const result = await pruneBatch(db.sql, cutoff(), 100);
    expect(result?.rows).toEqual({
      tasks: 3,
      task_events: eventsOfOld,
      task_attempts: 3,
      task_dependencies: 0,
      task_batches: 0,
      schedule_firings: 0,
    });
    expect(result?.full).toBe(false);
    for (const id of old.slice(0, 3)) expect(await exists(id)).toBe(false);
    expect(await exists(old[3]!)).toBe(true);
    expect(await exists(queuedLongAgo.id)).toBe(true);
    expect(await count("task_events")).toBe(eventsOfKept[0]!.n);
    expect(await count("task_attempts")).toBe(1);
    // Through the API, a pruned task is simply unknown.
    expect((await call("GET", `/tasks/${old[0]}`)).status).toBe(404);
  });

  test("every final state goes: failed and cancelled as well as succeeded", async () => {
    await createTask(db.sql, taskSpec({ command: "fails", maxAttempts: 1 }));
    const [failed] = await runAll("failed");
    const cancelled = await createTask(db.sql, taskSpec({ command: "cancelled" }));
    expect((await call("POST", `/tasks/${cancelled.id}/cancel`)).status).toBe(200);
    await age([failed!, cancelled.id], 8);
    const result = await pruneBatch(db.sql, cutoff(), 100);
    expect(result?.rows.tasks).toBe(2);
    expect(await count("tasks")).toBe(0);
  });

  test("takes at most its limit, oldest first, and says when it was full; a pass runs batches until done", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 25; i++) ids.push((await createTask(db.sql, taskSpec({ command: `t${i}` }))).id);
    await runAll();
    await age(ids.slice(0, 5), 40);
    await age(ids.slice(5), 20);
    const first = await pruneBatch(db.sql, cutoff(), 5);
    expect(first?.rows.tasks).toBe(5);
    expect(first?.full).toBe(true);
    // The oldest five went first.
    for (const id of ids.slice(0, 5)) expect(await exists(id)).toBe(false);
    expect(await count("tasks")).toBe(20);

    const metrics = new TaskMetrics("coordinator");
    const pruner = new Pruner({
      sql: db.sql,
      log: silentLogger,
      retentionMs: 7 * DAY_MS,
      batchSize: 6,
      pauseMs: 0,
      intervalMs: 60_000,
      metrics,
    });
    expect(await pruner.runPass()).toBe(20);
    expect(await count("tasks")).toBe(0);
    expect(await count("task_attempts")).toBe(0);
    const text = await metrics.scrape();
    expect(text).toContain('taskqueue_retention_pruned_rows_total{table="tasks",role="coordinator"} 20');
    expect(text).toMatch(/taskqueue_retention_pruned_rows_total\{table="task_events",role="coordinator"\} [1-9]/);
    await pruner.stop();
  });

  test("the pruner's own loop runs passes after start(), and stop() ends it", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) ids.push((await createTask(db.sql, taskSpec({ command: `t${i}` }))).id);
    await runAll();
    await age(ids, 30);
    const metrics = new TaskMetrics("coordinator");
    const pruner = new Pruner({
      sql: db.sql,
      log: silentLogger,
      retentionMs: 7 * DAY_MS,
      batchSize: 2,
      pauseMs: 1,
      intervalMs: 10,
      metrics,
    });
    pruner.start();
    try {
      await eventually(async () => (await count("tasks")) === 0, { what: "the old tasks pruned by the loop" });
    } finally {
      await pruner.stop();
    }
    expect(await metrics.scrape()).toContain('taskqueue_retention_pruned_rows_total{table="tasks",role="coordinator"} 4');
  });

  test("skips a row another transaction holds instead of waiting for it", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push((await createTask(db.sql, taskSpec({ command: `t${i}` }))).id);
    await runAll();
    await age(ids, 30);
    const other = connect(db.url, { max: 1 });
    try {
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      let locked!: () => void;
      const lockTaken = new Promise<void>((resolve) => (locked = resolve));
      const holder = other.begin(async (tx) => {
        await tx`SELECT id FROM tasks WHERE id = ${ids[1]!} FOR UPDATE`;
        locked();
        await held;
      });
      await lockTaken;
      const result = await pruneBatch(db.sql, cutoff(), 100);
      release();
      await holder;
      expect(result?.rows.tasks).toBe(2);
      expect(await exists(ids[1]!)).toBe(true);
      expect((await pruneBatch(db.sql, cutoff(), 100))?.rows.tasks).toBe(1);
    } finally {
      await other.end();
    }
  });

  test("does nothing while another process holds the retention lock", async () => {
    await createTask(db.sql, taskSpec());
    const ids = await runAll();
    await age(ids, 30);
    const other = connect(db.url, { max: 1 });
    try {
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      let locked!: () => void;
      const lockTaken = new Promise<void>((resolve) => (locked = resolve));
      const holder = other.begin(async (tx) => {
        await tx`SELECT pg_advisory_xact_lock(${RETENTION_LOCK_KEY.toString()}::bigint)`;
        locked();
        await held;
      });
      await lockTaken;
      expect(await pruneBatch(db.sql, cutoff(), 100)).toBeNull();
      release();
      await holder;
      expect(await exists(ids[0]!)).toBe(true);
      expect((await pruneBatch(db.sql, cutoff(), 100))?.rows.tasks).toBe(1);
    } finally {
      await other.end();
    }
  });
});

describe("events and attempts have no foreign key (migration 0026)", () => {
  test("a stale report for a task being pruned waits for the prune and then writes nothing", async () => {
    const [id] = await (async () => {
      await createTask(db.sql);
      return runAll();
    })();
    const ref = { taskId: id!, attempt: 1, workerId: "w1" };
    // A pruner's transaction, as pruneBatch's: the task locked, then deleted with its rows.
    const pruner = await db.sql.reserve();
    try {
      await pruner`BEGIN`;
      await pruner`SELECT id FROM tasks WHERE id = ${id!} FOR UPDATE`;
      await pruner`DELETE FROM task_events WHERE task_id = ${id!}`;
      await pruner`DELETE FROM task_attempts WHERE task_id = ${id!}`;
      await pruner`DELETE FROM tasks WHERE id = ${id!}`;
      const reports = Promise.all([
        recordStaleResult(db.sql, ref, attemptResult()),
        recordStaleHandBack(db.sql, ref, "drained", "interrupted"),
      ]);
      await eventually(
        async () => {
          const [row] = await db.sql<{ n: number }[]>`
            SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%stale%'`;
          return (row?.n ?? 0) === 2;
        },
        { what: "both reports waiting for the pruner's lock" },
      );
      await pruner`COMMIT`;
      await reports;
    } finally {
      pruner.release();
    }
    const [left] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM task_events WHERE task_id = ${id!}`;
    expect(left?.n).toBe(0);
  });
});

describe("dependencies", () => {
  test("an old parent is kept while a child still waits on it, and goes with its edges once the child has ended", async () => {
    const answer = await call("POST", "/tasks/batch", {
      tasks: [
        { ref: "build", command: "make" },
        { ref: "lint", command: "make lint", scheduled_at: new Date(Date.now() + DAY_MS).toISOString() },
        { ref: "test", command: "make test", depends_on: ["build", "lint"] },
      ],
    });
    expect(answer.status).toBe(201);
    const [build, lint, child] = answer.json.tasks;
    expect(await runAll()).toEqual([build.id]); // lint is not due: the child waits on it
    await age([build.id], 30);
    expect((await pruneBatch(db.sql, cutoff(), 100))?.rows.tasks).toBe(0);
    expect(await exists(build.id)).toBe(true);
    expect(await count("task_dependencies")).toBe(2);

    // The child ends (its other parent cancelled under the default policy cancels it).
    expect((await call("POST", `/tasks/${lint.id}/cancel`)).status).toBe(200);
    expect((await call("GET", `/tasks/${child.id}`)).json.state).toBe("cancelled");
    const result = await pruneBatch(db.sql, cutoff(), 100);
    expect(result?.rows.tasks).toBe(1);
    expect(await exists(build.id)).toBe(false);
    // Its edge went with it; the child (ended just now) keeps its other edge.
    expect(result?.rows.task_dependencies).toBe(1);
    expect(await count("task_dependencies")).toBe(1);
    expect(await exists(child.id)).toBe(true);
  });

  test("a kept parent never fills the batch: older tasks behind it are still pruned", async () => {
    const answer = await call("POST", "/tasks/batch", {
      tasks: [
        { ref: "p", command: "parent" },
        { ref: "gate", command: "gate", scheduled_at: new Date(Date.now() + DAY_MS).toISOString() },
        { ref: "c", command: "child", depends_on: ["p", "gate"] },
      ],
    });
    const [parent] = answer.json.tasks;
    await runAll();
    const others: string[] = [];
    for (let i = 0; i < 3; i++) others.push((await createTask(db.sql, taskSpec({ command: `t${i}` }))).id);
    await runAll();
    await age([parent.id], 40);
    await age(others, 30);
    const result = await pruneBatch(db.sql, cutoff(), 3);
    expect(result?.rows.tasks).toBe(3);
    expect(await exists(parent.id)).toBe(true);
  });
});

describe("idempotency keys and schedules", () => {
  test("a task's key goes with it: a repeat after retention creates a new task", async () => {
    const headers = { "idempotency-key": "order-42" };
    const first = await call("POST", "/tasks", { command: "charge" }, headers);
    expect(first.status).toBe(201);
    await runAll();
    await age([first.json.id], 30);
    expect((await call("POST", "/tasks", { command: "charge" }, headers)).json.id).toBe(first.json.id);
    expect((await pruneBatch(db.sql, cutoff(), 100))?.rows.tasks).toBe(1);
    const again = await call("POST", "/tasks", { command: "charge" }, headers);
    expect(again.status).toBe(201);
    expect(again.json.id).not.toBe(first.json.id);
  });

  test("a batch key is kept while any of its tasks is, and goes after the last", async () => {
    const headers = { "idempotency-key": "nightly-1" };
    const tasks = [{ command: "a" }, { command: "b", scheduled_at: new Date(Date.now() + DAY_MS).toISOString() }];
    const first = await call("POST", "/tasks/batch", { tasks }, headers);
    expect(first.status).toBe(201);
    const [a, b] = first.json.tasks;
    await runAll();
    await age([a.id, b.id], 30);
    await db.sql`UPDATE task_batches SET created_at = created_at - interval '30 days'`;
    // a is pruned; b (queued) keeps the key: a repeat creates nothing, and says a task is gone.
    const kept = await pruneBatch(db.sql, cutoff(), 100);
    expect(kept?.rows).toMatchObject({ tasks: 1, task_batches: 0 });
    const repeat = await call("POST", "/tasks/batch", { tasks }, headers);
    expect(repeat.status).toBe(404);
    expect(repeat.json.error.message).toContain("no longer exists");
    expect(await count("tasks")).toBe(1);

    expect((await call("POST", `/tasks/${b.id}/cancel`)).status).toBe(200);
    await age([b.id], 30);
    expect((await pruneBatch(db.sql, cutoff(), 100))?.rows).toMatchObject({ tasks: 1, task_batches: 1 });
    const fresh = await call("POST", "/tasks/batch", { tasks }, headers);
    expect(fresh.status).toBe(201);
    expect(fresh.json.tasks[0].id).not.toBe(a.id);
  });

  test("old firings of a schedule go once their task has, a buffered one stays, and the schedule stays", async () => {
    const created = await call("POST", "/schedules", {
      name: "hourly",
      every: "1h",
      task: { command: "true" },
    });
    expect(created.status).toBe(201);
    const scheduleId = created.json.id;
    const task = await createTask(db.sql, taskSpec({ command: "fired" }));
    await runAll();
    await age([task.id], 30);
    const old = (days: number) => new Date(Date.now() - days * DAY_MS);
    await db.sql`
      INSERT INTO schedule_firings (schedule_id, fire_at, outcome, task_id, reason) VALUES
        (${scheduleId}, ${old(30)}, 'created', ${task.id}, NULL),
        (${scheduleId}, ${old(29)}, 'skipped', NULL, 'overlap'),
        (${scheduleId}, ${old(28)}, 'buffered', NULL, NULL),
        (${scheduleId}, ${old(1)}, 'missed', NULL, 'outage')`;
    const result = await pruneBatch(db.sql, cutoff(), 100);
    expect(result?.rows).toMatchObject({ tasks: 1, schedule_firings: 2 });
    const left = await db.sql<{ outcome: string }[]>`SELECT outcome FROM schedule_firings ORDER BY fire_at`;
    expect(left.map((row) => row.outcome)).toEqual(["buffered", "missed"]);
    expect((await call("GET", `/schedules/${scheduleId}`)).status).toBe(200);
  });
});

describe("TQ_RETENTION", () => {
  test("defaults to 7 days; takes durations; off and 0 turn it off", () => {
    expect(retentionSettings(loadConfig({}))).toEqual({
      retentionMs: 7 * DAY_MS,
      batchSize: 500,
      pauseMs: 50,
      intervalMs: 60_000,
    });
    const ms = (value: string) => retentionSettings(loadConfig({ TQ_RETENTION: value }))?.retentionMs ?? null;
    expect(ms("36h")).toBe(36 * 3_600_000);
    expect(ms("1d12h")).toBe(36 * 3_600_000);
    expect(ms("90m")).toBe(90 * 60_000);
    expect(ms("30d")).toBe(30 * DAY_MS);
    expect(ms("30s")).toBe(30_000);
    expect(ms("off")).toBeNull();
    expect(ms("OFF")).toBeNull();
    expect(ms("0")).toBeNull();
    expect(ms("0s")).toBeNull();
  });

  test("a value that is not a duration is refused with an error naming the variable", () => {
    for (const value of ["7", "seven days", "7 d", "-1d", "1.5d", "2w", "500ms", "400d"]) {
      expect(() => loadConfig({ TQ_RETENTION: value }), value).toThrow(ConfigError);
      expect(() => loadConfig({ TQ_RETENTION: value }), value).toThrow(/TQ_RETENTION/);
    }
  });
});
