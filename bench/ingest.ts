// Ingest throughput: how fast the scheduler accepts durable work. One coordinator and one
// scheduler run as real processes, with no worker: every task is scheduled far in the future,
// so nothing runs and the figures are the submit path alone (HTTP, validation, one INSERT
// statement with its event and NOTIFY, commit). Two series against the scheduler:
//   - POST /schedule from many concurrent fetch loops for a fixed time, one task per request;
//   - POST /tasks/batch with 1000 tasks per request, a few requests at a time.
// Every answer must be a success, and afterwards the rows in the database must number exactly
// the tasks that were answered: an answer is only worth counting if its task is durable.
import { cpus } from "node:os";
import { connect, type Sql } from "../src/db/sql";
import {
  type Bench,
  type BenchCluster,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  distribution,
  ms,
  quartet,
  Scope,
  type SummaryRow,
  startBenchCluster,
} from "./support";

const FULL = { scheduleMs: 10_000, scheduleWarmupMs: 1_000, batches: 100, batchWarmup: 2 };
const QUICK = { scheduleMs: 1_000, scheduleWarmupMs: 200, batches: 5, batchWarmup: 1 };
/** Concurrent POST /schedule loops, each with at most one request in flight. */
const CONNECTIONS = 64;
/** Concurrent POST /tasks/batch requests. */
const BATCH_CONCURRENCY = 4;
/** TQ_MAX_BATCH's default: the largest batch the API accepts out of the box. */
const BATCH_SIZE = 1000;
/** Far enough ahead that no coordinator ever finds these tasks due during the bench. */
const FAR_FUTURE = "2099-01-01T00:00:00Z";
/** More failed requests than this ends a series early: the run is already invalid. */
const MAX_FAILURES = 200;
/** Context for the figures, from the project's goals; not asserted. */
const TARGETS = { schedule_requests_per_s: 5_000, batch_tasks_per_s: 50_000 };

/** What a series of requests produced. Latencies in ms, of successful requests only. */
interface Series {
  ok: number;
  latencies: number[];
  /** Failed requests by answer ("503", "network error"), with the first few bodies. */
  failures: Map<string, number>;
  failureSamples: string[];
  elapsedMs: number;
}

function newSeries(): Series {
  return { ok: 0, latencies: [], failures: new Map(), failureSamples: [], elapsedMs: 0 };
}

function fail(series: Series, kind: string, detail: string): void {
  series.failures.set(kind, (series.failures.get(kind) ?? 0) + 1);
  if (series.failureSamples.length < 5) series.failureSamples.push(`${kind}: ${detail.slice(0, 300)}`);
}

const failureCount = (series: Series) => [...series.failures.values()].reduce((sum, n) => sum + n, 0);

/**
 * Runs `loops` concurrent request loops, each with one request in flight, until `durationMs`
 * has passed or `requests` were sent; no request starts after the deadline. `send` does one
 * request and throws a Failure when the answer is not the expected one.
 */
async function load(
  loops: number,
  limit: { durationMs: number } | { requests: number },
  send: () => Promise<void>,
  series: Series,
): Promise<void> {
  const began = performance.now();
  const deadline = "durationMs" in limit ? began + limit.durationMs : Infinity;
  let remaining = "requests" in limit ? limit.requests : Infinity;
  const loop = async () => {
    while (performance.now() < deadline && remaining > 0 && failureCount(series) < MAX_FAILURES) {
      remaining--;
      const before = performance.now();
      try {
        await send();
        series.ok++;
        series.latencies.push(performance.now() - before);
      } catch (error) {
        if (error instanceof Failure) fail(series, error.kind, error.message);
        else fail(series, "network error", error instanceof Error ? error.message : String(error));
      }
    }
  };
  await Promise.all(Array.from({ length: loops }, loop));
  series.elapsedMs = performance.now() - began;
}

/** A request that was answered, but not with what the bench expects. */
class Failure extends Error {
  constructor(
    readonly kind: string,
    message: string,
  ) {
    super(message);
  }
}

async function postJson(url: string, body: string, expectStatus: number): Promise<unknown> {
  const response = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body });
  const text = await response.text();
  if (response.status !== expectStatus) throw new Failure(String(response.status), text);
  return JSON.parse(text);
}

/** One POST /schedule; its answer must name the new task. */
function scheduleOnce(baseUrl: string): () => Promise<void> {
  const url = `${baseUrl}/schedule`;
  const body = JSON.stringify({ command: "true", scheduled_at: FAR_FUTURE });
  return async () => {
    const answer = (await postJson(url, body, 200)) as { task_id?: unknown };
    if (typeof answer.task_id !== "string") throw new Failure("200 without task_id", JSON.stringify(answer));
  };
}

/** One POST /tasks/batch of BATCH_SIZE tasks; its answer must list every one. */
function batchOnce(baseUrl: string): () => Promise<void> {
  const url = `${baseUrl}/tasks/batch`;
  const tasks = Array.from({ length: BATCH_SIZE }, (_, i) => ({ command: `echo batch-task-${i}`, scheduled_at: FAR_FUTURE }));
  const body = JSON.stringify({ tasks });
  return async () => {
    const answer = (await postJson(url, body, 201)) as { tasks?: unknown };
    if (!Array.isArray(answer.tasks) || answer.tasks.length !== BATCH_SIZE) {
      throw new Failure(`201 without ${BATCH_SIZE} tasks`, JSON.stringify(answer).slice(0, 300));
    }
  };
}

/**
 * Rows in the tasks table, read by the bench itself to check durability. Bench-only: no role
 * needs a count, so it is not in src/db/tasks.ts.
 */
async function countTaskRows(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
  return row?.n ?? 0;
}

function throwIfFailed(what: string, series: Series, cluster: BenchCluster): void {
  if (series.failures.size === 0) return;
  const counts = [...series.failures].map(([kind, n]) => `${n} × ${kind}`).join(", ");
  throw new Error(
    `${what}: ${failureCount(series)} request(s) failed (${counts}) beside ${series.ok} successes; first failures:\n  ` +
      `${series.failureSamples.join("\n  ")}\nrole process logs:\n${cluster.logs(20)}`,
  );
}

const perSecond = (count: number, elapsedMs: number) => Math.round((count / elapsedMs) * 1000);
const thousands = (n: number) => n.toLocaleString("en-US");

async function run(options: BenchOptions): Promise<BenchResult> {
  const plan = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`ingest: ${line}`));
    console.log(`ingest: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const roleEnv = { TQ_LOG_LEVEL: "info" };
    const cluster = await startBenchCluster(scope, db.url, { workers: 0, slots: 1, env: roleEnv });
    const sql = connect(db.url, { max: 1, applicationName: "task-queue bench ingest" });
    scope.defer("close the bench's database pool", () => sql.end({ timeout: 5 }));
    console.log(`ingest: cluster up (scheduler ${cluster.schedulerUrl}), no workers`);

    // (a) POST /schedule, one task per request.
    const schedule = scheduleOnce(cluster.schedulerUrl);
    const scheduleWarmup = newSeries();
    await load(CONNECTIONS, { durationMs: plan.scheduleWarmupMs }, schedule, scheduleWarmup);
    throwIfFailed("POST /schedule warm-up", scheduleWarmup, cluster);
    const scheduled = newSeries();
    await load(CONNECTIONS, { durationMs: plan.scheduleMs }, schedule, scheduled);
    throwIfFailed("POST /schedule", scheduled, cluster);
    const scheduleAnswered = scheduleWarmup.ok + scheduled.ok;
    const rowsAfterSchedule = await countTaskRows(sql);
    const scheduleRps = perSecond(scheduled.ok, scheduled.elapsedMs);
    const scheduleLatency = distribution(scheduled.latencies);
    console.log(
      `ingest: POST /schedule: ${thousands(scheduled.ok)} in ${(scheduled.elapsedMs / 1000).toFixed(2)} s = ` +
        `${thousands(scheduleRps)} req/s; latency p50 ${ms(scheduleLatency.p50)} ms, p99 ${ms(scheduleLatency.p99)} ms; ` +
        `rows ${thousands(rowsAfterSchedule)} for ${thousands(scheduleAnswered)} answers (warm-up included)`,
    );
    if (rowsAfterSchedule !== scheduleAnswered) {
      throw new Error(
        `POST /schedule: ${scheduleAnswered} tasks were answered 200 but the database holds ${rowsAfterSchedule} rows`,
      );
    }

    // (b) POST /tasks/batch, BATCH_SIZE tasks per request.
    const batch = batchOnce(cluster.schedulerUrl);
    const batchWarmup = newSeries();
    await load(Math.min(BATCH_CONCURRENCY, plan.batchWarmup), { requests: plan.batchWarmup }, batch, batchWarmup);
    throwIfFailed("POST /tasks/batch warm-up", batchWarmup, cluster);
    const batched = newSeries();
    await load(BATCH_CONCURRENCY, { requests: plan.batches }, batch, batched);
    throwIfFailed("POST /tasks/batch", batched, cluster);
    const batchTasksAnswered = (batchWarmup.ok + batched.ok) * BATCH_SIZE;
    const rowsAfterBatch = (await countTaskRows(sql)) - rowsAfterSchedule;
    const batchTps = perSecond(batched.ok * BATCH_SIZE, batched.elapsedMs);
    const batchLatency = distribution(batched.latencies);
    console.log(
      `ingest: POST /tasks/batch: ${batched.ok} × ${BATCH_SIZE} in ${(batched.elapsedMs / 1000).toFixed(2)} s = ` +
        `${thousands(batchTps)} tasks/s; per batch p50 ${ms(batchLatency.p50)} ms, p99 ${ms(batchLatency.p99)} ms; ` +
        `rows ${thousands(rowsAfterBatch)} for ${thousands(batchTasksAnswered)} answered tasks (warm-up included)`,
    );
    if (rowsAfterBatch !== batchTasksAnswered) {
      throw new Error(
        `POST /tasks/batch: ${batchTasksAnswered} tasks were answered 201 but the database holds ${rowsAfterBatch} new rows`,
      );
    }

    const durability = (rows: number, answered: number) => `${thousands(rows)} rows / ${thousands(answered)} answered`;
    const summary: SummaryRow[] = [
      {
        metric: `POST /schedule throughput, ${CONNECTIONS} concurrent connections (target ≥ ${thousands(TARGETS.schedule_requests_per_s)})`,
        value: `${thousands(scheduleRps)} req/s`,
      },
      { metric: "POST /schedule latency under that load (p50 / p90 / p99 / max)", value: quartet(scheduleLatency) },
      {
        metric: `POST /tasks/batch throughput, ${BATCH_SIZE} tasks per request, ${BATCH_CONCURRENCY} concurrent (target ≥ ${thousands(TARGETS.batch_tasks_per_s)})`,
        value: `${thousands(batchTps)} tasks/s`,
      },
      {
        metric: `POST /tasks/batch latency per ${BATCH_SIZE}-task request (p50 / p90 / p99 / max)`,
        value: quartet(batchLatency),
      },
      {
        metric: "durable: task rows in the database / tasks answered 2xx (/schedule; /tasks/batch)",
        value: `${durability(rowsAfterSchedule, scheduleAnswered)}; ${durability(rowsAfterBatch, batchTasksAnswered)}`,
      },
    ];
    return {
      name: "ingest",
      description:
        "Durable submit throughput of the scheduler: POST /schedule from many concurrent connections, and POST /tasks/batch of 1000 tasks; every answer a success and every answered task a row in the database.",
      settings: {
        schedule: {
          connections: CONNECTIONS,
          duration_ms: plan.scheduleMs,
          warmup_ms: plan.scheduleWarmupMs,
          body: { command: "true", scheduled_at: FAR_FUTURE },
        },
        batch: {
          tasks_per_request: BATCH_SIZE,
          concurrent_requests: BATCH_CONCURRENCY,
          requests: plan.batches,
          warmup_requests: plan.batchWarmup,
          task: { command: "echo batch-task-<i>", scheduled_at: FAR_FUTURE },
        },
        processes: { coordinator: 1, scheduler: 1, workers: 0 },
        target: "the scheduler's HTTP port; the coordinator runs too (it hears every NOTIFY) but no task comes due",
        role_env: roleEnv,
        scheduler_db_pool: "TQ_DB_POOL_SIZE default (10)",
        load_generator:
          "fetch loops in the bench process itself, on the same machine as the roles and PostgreSQL: it competes with them for the CPUs",
        cpus: navigator.hardwareConcurrency || cpus().length,
        durability_check: "SELECT count(*) FROM tasks after each series, against the tasks answered 2xx (warm-up included)",
        targets: TARGETS,
        database: db.postgres.source,
      },
      figures: {
        schedule: {
          requests: scheduled.ok,
          elapsed_ms: Math.round(scheduled.elapsedMs),
          requests_per_s: scheduleRps,
          latency: scheduleLatency,
          answered_including_warmup: scheduleAnswered,
          rows: rowsAfterSchedule,
        },
        batch: {
          requests: batched.ok,
          tasks: batched.ok * BATCH_SIZE,
          elapsed_ms: Math.round(batched.elapsedMs),
          tasks_per_s: batchTps,
          latency: batchLatency,
          answered_tasks_including_warmup: batchTasksAnswered,
          rows: rowsAfterBatch,
        },
      },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const ingest: Bench = { name: "ingest", run };
