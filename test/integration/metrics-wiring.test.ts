// The metrics the merged features feed, against real PostgreSQL: a schedule firing pass counts
// its firings by outcome once committed (src/schedule/firer.ts), and the queue depth reads
// tasks.queue and counts tasks waiting for their parents (src/db/depth.ts), and a dispatch pass
// that left slots free while a task waited for a rate limit's token counts one.
import { beforeEach, expect, setDefaultTimeout, test } from "bun:test";
import { loadConfig, taskDefaults } from "../../src/config";
import { Dispatcher } from "../../src/coordinator/dispatcher";
import { WorkerRegistry } from "../../src/coordinator/registry";
import { readQueueDepth } from "../../src/db/depth";
import { createRateLimit } from "../../src/db/flow";
import { insertTasks } from "../../src/db/insert";
import { silentLogger } from "../../src/log";
import { TaskMetrics } from "../../src/metrics/metrics";
import { firePass } from "../../src/schedule/firer";
import { useApiApp } from "../support/api";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { newTaskId, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const api = useApiApp(db);
const defaults = taskDefaults(loadConfig({}));

beforeEach(async () => {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, schedules, schedule_firings, rate_limits, rate_buckets CASCADE`;
});

/** An `every 1m` schedule whose plan is moved 630 s into the past: ten fire times are due. */
async function overdueSchedule(extra: Record<string, unknown>): Promise<string> {
  const response = await api.app.handle(
    new Request("http://localhost/schedules", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: `s${Bun.randomUUIDv7()}`, every: "1m", task: { command: "true" }, ...extra }),
    }),
  );
  expect(response.status).toBe(201);
  const { id } = (await response.json()) as { id: string };
  await db.sql`
    UPDATE schedules SET next_fire_at = next_fire_at - make_interval(secs => 630),
      anchor_at = anchor_at - make_interval(secs => 630)
    WHERE id = ${id}`;
  return id;
}

async function firingCounts(metrics: TaskMetrics): Promise<{ byOutcome: Record<string, number>; lateness: number }> {
  const all = await metrics.registry.getMetricsAsJSON();
  const byOutcome: Record<string, number> = {};
  for (const v of all.find((m) => m.name === "taskqueue_schedule_firings_total")?.values ?? []) {
    byOutcome[String(v.labels.outcome)] = v.value;
  }
  const lateness =
    all
      .find((m) => m.name === "taskqueue_schedule_lateness_seconds")
      ?.values.find((v) => (v as { metricName?: string }).metricName === "taskqueue_schedule_lateness_seconds_count")?.value ?? 0;
  return { byOutcome, lateness };
}

test("a firing pass counts fired (with lateness), missed and skipped firings", async () => {
  const metrics = new TaskMetrics("scheduler");
  const pass = () => firePass({ sql: db.sql, log: silentLogger, taskDefaults: defaults, aheadMs: 0, metrics });
  await overdueSchedule({ catch_up: { window: "5m", mode: "all" } });
  await pass();
  expect(await firingCounts(metrics)).toEqual({ byOutcome: { fired: 5, missed: 5 }, lateness: 5 });
  await overdueSchedule({ overlap: "skip", catch_up: { window: "1h", mode: "all" } });
  await pass();
  expect(await firingCounts(metrics)).toEqual({ byOutcome: { fired: 6, skipped: 9, missed: 5 }, lateness: 6 });
});

test("queue depth counts by tasks.queue, waiting tasks included", async () => {
  await insertTasks(db.sql, [
    { id: newTaskId(), spec: taskSpec() },
    {
      id: newTaskId(),
      spec: taskSpec({ routing: { queue: "reports", priority: 0, requires: [], prefers: [], scheduleTimeoutMs: 0 } }),
    },
    { id: newTaskId(), spec: taskSpec({ dependsOn: ["00000000-0000-7000-8000-000000000000"] }), parents: 1 },
  ]);
  const rows = await readQueueDepth(db.sql);
  const depth = Object.fromEntries(rows.map((row) => [`${row.queue}/${row.state}`, row.tasks]));
  expect(depth).toEqual({ "default/queued": 1, "reports/queued": 1, "default/waiting": 1 });
});

test("a dispatch pass held back by a rate limit counts one", async () => {
  await createRateLimit(db.sql, "api", { count: 1, periodMs: 3_600_000 }, 1);
  await insertTasks(
    db.sql,
    [1, 2].map(() => ({ id: newTaskId(), spec: taskSpec({ rateLimit: { name: "api", key: "" } }) })),
  );
  const metrics = new TaskMetrics("coordinator");
  const registry = new WorkerRegistry();
  const assigned: string[] = [];
  registry.add(
    registry.open(
      { id: "w-1", name: "w-1", slots: 2, held: [], features: new Set(["start_in_ms"] as const) },
      {
        write: (message) => {
          if (message.payload.case === "assign") assigned.push(message.payload.value.ref?.taskId ?? "");
        },
        close() {},
      },
    ),
  );
  const dispatcher = new Dispatcher({
    sql: db.sql,
    registry,
    coordinatorId: "c-test",
    log: silentLogger,
    safetyPollMs: 60_000,
    leaseMs: 4000,
    aheadMs: 0,
    metrics,
  });
  dispatcher.start();
  try {
    const held = await eventually(
      async () => {
        const all = await metrics.registry.getMetricsAsJSON();
        const value = all.find((m) => m.name === "taskqueue_dispatch_rate_limited_total")?.values[0]?.value ?? 0;
        return value >= 1 ? value : null;
      },
      { timeoutMs: 10_000, what: "a rate-limited dispatch pass" },
    );
    expect(held).toBeGreaterThanOrEqual(1);
    // The one token went to one task; the other waits an hour for the next.
    expect(assigned).toHaveLength(1);
  } finally {
    await dispatcher.stop();
  }
});
