// GET /metrics from real roles, read with a Prometheus text-format parser: the counters move
// where the events happen (a submit on the scheduler counts there; dispatch, start and result
// on the coordinator), the histograms observe, the gauges read the database and the registry,
// and a worker serves its own beside /healthz.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import parsePrometheus from "parse-prometheus-text-format";
import { freePort, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { postJson, watchTask } from "../support/http";
import { type Cluster, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let cluster: Cluster;
let workerPort: number;

beforeAll(async () => {
  cluster = await startCluster(db.url, { workers: 0, slots: 2 });
  workerPort = await freePort();
  await cluster.addWorker({ TQ_WORKER_HEALTH_PORT: String(workerPort) });
});
afterAll(() => cluster.stop());

interface Family {
  name: string;
  type: string;
  metrics: { value?: string; labels?: Record<string, string>; buckets?: Record<string, string> }[];
}

async function scrape(url: string): Promise<Map<string, Family>> {
  const response = await fetch(`${url}/metrics`);
  expect(response.status).toBe(200);
  expect(response.headers.get("content-type")).toStartWith("text/plain; version=0.0.4");
  const families = parsePrometheus(await response.text()) as Family[];
  return new Map(families.map((family) => [family.name, family]));
}

/** The value of the sample of `name` whose labels include `labels`; 0 when there is none. */
function value(families: Map<string, Family>, name: string, labels: Record<string, string> = {}): number {
  const family = families.get(name);
  expect(family, name).toBeDefined();
  const sample = family!.metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v));
  return sample?.value === undefined ? 0 : Number(sample.value);
}

/**
 * A histogram's observation count: its +Inf bucket. (parse-prometheus-text-format drops the
 * labels, _sum and _count of a labelled histogram, its issue #13; the buckets it keeps, and each
 * of ours has one series per role.)
 */
function observations(families: Map<string, Family>, name: string): number {
  const family = families.get(name);
  expect(family?.type, name).toBe("HISTOGRAM");
  return family!.metrics.reduce((sum, m) => sum + Number(m.buckets?.["+Inf"] ?? 0), 0);
}

test("the coordinator counts a task's dispatch, start and success; the scheduler its submit", async () => {
  const before = await scrape(cluster.coordinatorUrl);
  const { json: task } = await postJson(`${cluster.schedulerUrl}/submit`, { command: "echo metrics" });
  expect((await watchTask(cluster.coordinatorUrl, task.id)).state).toBe("succeeded");
  const { json: failing } = await postJson(`${cluster.coordinatorUrl}/submit`, {
    command: "exit 3",
    max_attempts: 2,
    retry: { backoff_base_ms: 1, backoff_cap_ms: 1 },
  });
  const failed = await watchTask(cluster.coordinatorUrl, failing.id);
  expect(failed).toMatchObject({ state: "failed", attempt: 2 });

  const scheduler = await scrape(cluster.schedulerUrl);
  expect(value(scheduler, "taskqueue_tasks_submitted_total", { role: "scheduler" })).toBe(1);
  // The scheduler dispatches nothing: its registry is its own, not the coordinator's.
  expect(value(scheduler, "taskqueue_tasks_dispatched_total")).toBe(0);

  const after = await eventually(
    async () => {
      const now = await scrape(cluster.coordinatorUrl);
      return value(now, "taskqueue_tasks_finished_total", { state: "failed" }) === 1 ? now : null;
    },
    { what: "the failed result counted", timeoutMs: 10_000 },
  );
  const moved = (name: string, labels?: Record<string, string>) => value(after, name, labels) - value(before, name, labels);
  expect(moved("taskqueue_tasks_submitted_total", { role: "coordinator" })).toBe(1);
  // One attempt of the first task, two of the failing one (the first retried).
  expect(moved("taskqueue_tasks_dispatched_total")).toBe(3);
  expect(moved("taskqueue_tasks_started_total")).toBe(3);
  expect(moved("taskqueue_tasks_retried_total")).toBe(1);
  expect(moved("taskqueue_tasks_finished_total", { state: "succeeded" })).toBe(1);
  expect(moved("taskqueue_tasks_finished_total", { state: "failed" })).toBe(1);
  expect(value(after, "taskqueue_stale_reports_total")).toBe(0);
  expect(
    observations(after, "taskqueue_task_queue_wait_seconds") - observations(before, "taskqueue_task_queue_wait_seconds"),
  ).toBe(3);
  // First attempts only.
  expect(
    observations(after, "taskqueue_task_submit_to_start_seconds") -
      observations(before, "taskqueue_task_submit_to_start_seconds"),
  ).toBe(2);
  expect(
    observations(after, "taskqueue_task_run_duration_seconds") - observations(before, "taskqueue_task_run_duration_seconds"),
  ).toBe(3);
  // Declared before their branches call them: schedules and rate limits.
  expect(after.get("taskqueue_schedule_firings_total")?.type).toBe("COUNTER");
  expect(after.get("taskqueue_schedule_lateness_seconds")?.type).toBe("HISTOGRAM");
  expect(after.get("taskqueue_dispatch_rate_limited_total")?.type).toBe("COUNTER");

  expect(value(after, "taskqueue_workers")).toBe(1);
  expect(value(after, "taskqueue_worker_slots", { use: "free" }) + value(after, "taskqueue_worker_slots", { use: "used" })).toBe(
    2,
  );
});

test("queue depth and the oldest queued age are read from the database, under the default queue", async () => {
  // Due in an hour: queued, not yet due, so it counts in depth and not in the age.
  const at = new Date(Date.now() + 3_600_000).toISOString();
  const { status } = await postJson(`${cluster.schedulerUrl}/tasks`, { command: "true", scheduled_at: at });
  expect(status).toBe(201);
  const families = await eventually(
    async () => {
      const now = await scrape(cluster.schedulerUrl);
      return value(now, "taskqueue_queue_depth", { queue: "default", state: "queued" }) === 1 ? now : null;
    },
    { what: "the queued task in the depth gauge (cached for a second)", timeoutMs: 10_000 },
  );
  expect(value(families, "taskqueue_queue_oldest_queued_age_seconds", { queue: "default" })).toBe(0);
  expect(families.get("taskqueue_queue_depth")?.type).toBe("GAUGE");
});

test("a worker serves its own metrics beside /healthz", async () => {
  const families = await scrape(`http://127.0.0.1:${workerPort}`);
  expect(value(families, "taskqueue_worker_slots_total", { role: "worker" })).toBe(2);
  expect(value(families, "taskqueue_worker_connected")).toBe(1);
  expect(families.has("taskqueue_tasks_submitted_total")).toBe(false);
});

test("with tracing off, a submit's traceparent still reaches the task's TRACEPARENT as it came", async () => {
  const traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  const response = await fetch(`${cluster.coordinatorUrl}/submit`, {
    method: "POST",
    headers: { "content-type": "application/json", traceparent },
    body: JSON.stringify({ command: 'printf %s "$TRACEPARENT"' }),
  });
  const { id } = (await response.json()) as { id: string };
  expect(await watchTask(cluster.coordinatorUrl, id)).toMatchObject({ state: "succeeded", stdout: traceparent });
});
