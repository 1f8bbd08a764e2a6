// Flow control: what concurrency keys and rate limits cost, and how exactly a limit holds.
// One coordinator, one scheduler and four workers with two slots each, real processes with
// the product's heartbeat settings. Burn-down of a backlog of `true` tasks three ways: plain,
// each task with one of 1,000 distinct concurrency keys (max 1), and all with one hot key
// whose max is the slot count (so the key itself never limits below the plain case); dispatch
// latency (created_at to picked_at on the database's clock) of single tasks submitted one at a
// time, plain and keyed; and a rate-limited queue's admitted rate against its limit, from the
// attempts' dispatched_at after the burst.
import { connect, type Sql } from "../src/db/sql";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  type Distribution,
  distribution,
  PRODUCT_ROLE_ENV,
  quartet,
  requireAllSucceeded,
  Scope,
  type SummaryRow,
  startBenchCluster,
  untilAllFinal,
  within,
} from "./support";
import { type CpuSample, cpuPer, cpuPerNetOfIdle, idleSample, postmasterPid, sampleCpu } from "./support/proc-cpu";

const FULL = { tasks: 1000, batch: 500, latency: 100, rated: 300, rate: 20 };
const QUICK = { tasks: 300, batch: 100, latency: 10, rated: 40, rate: 20 };
const WORKERS = 4;
const WORKER_SLOTS = 2;
const SLOTS = WORKERS * WORKER_SLOTS;
const KEYS = 1000;
const POLL_MS = 50;
/** Generous (the machine may be shared): slower than this is a fault, not a figure. */
const timeoutFor = (tasks: number) => 60_000 + tasks * 200;

type Item = Record<string, unknown> & { command: string };

async function submit(baseUrl: string, tasks: readonly Item[]): Promise<string[]> {
  const response = await within(
    fetch(`${baseUrl}/tasks/batch`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ tasks }),
    }),
    30_000,
    "POST /tasks/batch",
  );
  const answer = (await response.json()) as { tasks?: { id: string }[] };
  if (response.status !== 201 || !answer.tasks)
    throw new Error(`batch answered ${response.status}: ${JSON.stringify(answer).slice(0, 300)}`);
  return answer.tasks.map((t) => t.id);
}

interface BurnDown {
  tasks: number;
  elapsed_ms: number;
  tasks_per_s: number;
  /**
   * CPU ms per task of each role (and of PostgreSQL when the bench runs its own, without
   * DATABASE_URL), from /proc over the burn-down, net of the processes' idle rate (measured
   * before the runs): on a loaded machine the rate is distorted far more than this.
   */
  cpu_ms_per_task: Record<string, number>;
  /** The same with the idle CPU of the window left in. */
  cpu_ms_per_task_with_idle: Record<string, number>;
  /**
   * The dispatch claim (claimDue) per task: calls, and PostgreSQL's execution ms per call, from
   * pg_stat_statements (the bench's own PostgreSQL preloads it; null on a server without it).
   */
  claims: { calls_per_task: number; exec_ms_per_call: number } | null;
}

/** pg_stat_statements' counts of the claim statement, or null when the server has none. */
async function claimStats(sql: Sql): Promise<{ calls: number; ms: number } | null> {
  try {
    const [row] = await sql<{ calls: number; ms: number }[]>`
      SELECT coalesce(sum(calls), 0)::float8 AS calls, coalesce(sum(total_exec_time), 0)::float8 AS ms
      FROM pg_stat_statements
      WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query LIKE '%WITH g AS%'`;
    return row ? { calls: Number(row.calls), ms: Number(row.ms) } : null;
  } catch {
    return null;
  }
}

/** The processes whose CPU a burn-down reads: role name to pid, the postmaster when ours, and their idle rate. */
interface CpuSources {
  roles: Record<string, number>;
  postmaster?: number;
  idle?: { before: CpuSample; after: CpuSample };
}

/** The idle window whose CPU rate is taken off each burn-down's. */
const IDLE_MS = 3000;

async function burnDown(baseUrl: string, sql: Sql, items: Item[], batch: number, cpu: CpuSources): Promise<BurnDown> {
  const claimsBefore = await claimStats(sql);
  const before = sampleCpu(cpu.roles, cpu.postmaster);
  const start = performance.now();
  for (let i = 0; i < items.length; i += batch) await submit(baseUrl, items.slice(i, i + batch));
  const end = await untilAllFinal(sql, POLL_MS, timeoutFor(items.length));
  const after = sampleCpu(cpu.roles, cpu.postmaster);
  const claimsAfter = await claimStats(sql);
  await requireAllSucceeded(sql);
  const elapsed = end - start;
  const calls = claimsBefore && claimsAfter ? claimsAfter.calls - claimsBefore.calls : null;
  return {
    tasks: items.length,
    elapsed_ms: Math.round(elapsed),
    tasks_per_s: Math.round((items.length / elapsed) * 10_000) / 10,
    cpu_ms_per_task: cpu.idle ? cpuPerNetOfIdle(cpu.idle, before, after, items.length) : cpuPer(before, after, items.length),
    cpu_ms_per_task_with_idle: cpuPer(before, after, items.length),
    claims:
      calls === null
        ? null
        : {
            calls_per_task: Math.round((calls / items.length) * 1000) / 1000,
            exec_ms_per_call: Math.round(((claimsAfter!.ms - claimsBefore!.ms) / Math.max(1, calls)) * 1000) / 1000,
          },
  };
}

/** Single tasks one after another; created_at to picked_at of each, by the database's clock. */
async function latency(baseUrl: string, sql: Sql, count: number, item: (i: number) => Item): Promise<Distribution> {
  const samples: number[] = [];
  for (let i = 0; i < count; i++) {
    const [id] = await submit(baseUrl, [item(i)]);
    await untilAllFinal(sql, 5, 30_000);
    const [row] = await sql<{ ms: number }[]>`
      SELECT extract(epoch FROM picked_at - created_at) * 1000 AS ms FROM tasks WHERE id = ${id!}`;
    samples.push(Number(row!.ms));
  }
  return distribution(samples);
}

interface RatedRun {
  limit_per_s: number;
  burst: number;
  tasks: number;
  /** Dispatches after the burst, over the time from the burst's end to the last dispatch. */
  admitted_per_s: number;
  off_by_percent: number;
}

async function rated(baseUrl: string, sql: Sql, tasks: number, rate: number): Promise<RatedRun> {
  // A burst of a quarter second's tokens: a claim a little late does not lose what it was owed.
  const burst = Math.max(2, Math.round(rate / 4));
  const created = await fetch(`${baseUrl}/rate-limits`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name: "bench", rate: `${rate}/s`, burst }),
  });
  if (created.status !== 201) throw new Error(`POST /rate-limits answered ${created.status}`);
  const ids = await submit(
    baseUrl,
    Array.from({ length: tasks }, () => ({ command: "true", rate_limit: "bench" })),
  );
  await untilAllFinal(sql, POLL_MS, timeoutFor(tasks) + (tasks / rate) * 1000);
  await requireAllSucceeded(sql);
  const rows = await sql<{ at: number }[]>`
    SELECT extract(epoch FROM dispatched_at) * 1000 AS at FROM task_attempts WHERE task_id = ANY(${ids}::uuid[]) ORDER BY dispatched_at`;
  const times = rows.map((r) => Number(r.at));
  // The bucket is full at the first dispatch: by time t after it, at most burst + rate * t have
  // gone. The admitted rate is what went beyond the burst over that time.
  const admitted = ((times.length - burst) / (times.at(-1)! - times[0]!)) * 1000;
  return {
    limit_per_s: rate,
    burst,
    tasks,
    admitted_per_s: Math.round(admitted * 1000) / 1000,
    off_by_percent: Math.round(((admitted - rate) / rate) * 10_000) / 100,
  };
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const p = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    // Without DATABASE_URL, the bench's own PostgreSQL counts the claims (pg_stat_statements).
    const db = await createBenchDatabase(
      scope,
      (line) => console.log(`flow: ${line}`),
      process.env.DATABASE_URL ? undefined : { shared_preload_libraries: "pg_stat_statements" },
    );
    const cluster = await startBenchCluster(scope, db.url, { workers: WORKERS, slots: WORKER_SLOTS, env: PRODUCT_ROLE_ENV });
    const sql = connect(db.url, { max: 1, applicationName: "bench-flow" });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));
    await sql`CREATE EXTENSION IF NOT EXISTS pg_stat_statements`.catch(() => {});
    const url = cluster.schedulerUrl;
    const [coordinator, scheduler, ...workers] = cluster.processes;
    const roles: Record<string, number> = { coordinator: coordinator!.pid, scheduler: scheduler!.pid };
    workers.forEach((w, i) => {
      roles[`worker${i}`] = w.pid;
    });
    const cpu: CpuSources = { roles, ...(db.dataDir ? { postmaster: postmasterPid(db.dataDir) } : {}) };
    const plainItems = Array.from({ length: p.tasks }, () => ({ command: "true" }));
    const keyedItems = Array.from({ length: p.tasks }, (_, i) => ({
      command: "true",
      concurrency: { key: `k${i % KEYS}`, max: 1 },
    }));
    const hotItems = Array.from({ length: p.tasks }, () => ({ command: "true", concurrency: { key: "hot", max: SLOTS } }));
    let figures: Record<string, unknown>;
    try {
      // Warm-up, untimed.
      await burnDown(url, sql, plainItems.slice(0, 50), p.batch, cpu);
      cpu.idle = await idleSample(roles, cpu.postmaster, IDLE_MS);
      const plain = await burnDown(url, sql, plainItems, p.batch, cpu);
      const keys = await burnDown(url, sql, keyedItems, p.batch, cpu);
      const hot = await burnDown(url, sql, hotItems, p.batch, cpu);
      const plainAgain = await burnDown(url, sql, plainItems, p.batch, cpu);
      console.log(
        `flow: burn-down plain ${plain.tasks_per_s}/s, ${KEYS} keys ${keys.tasks_per_s}/s, hot key ${hot.tasks_per_s}/s, plain again ${plainAgain.tasks_per_s}/s`,
      );
      const cpuLine = (x: BurnDown) =>
        `coordinator ${x.cpu_ms_per_task.coordinator}${x.cpu_ms_per_task.postgres !== undefined ? `, postgres ${x.cpu_ms_per_task.postgres}` : ""}, total ${x.cpu_ms_per_task.total}`;
      const claimLine = (x: BurnDown) =>
        x.claims ? `${x.claims.calls_per_task} claims/task at ${x.claims.exec_ms_per_call} ms` : "no pg_stat_statements";
      console.log(
        `flow: claims plain ${claimLine(plain)}; ${KEYS} keys ${claimLine(keys)}; hot key ${claimLine(hot)}; plain again ${claimLine(plainAgain)}`,
      );
      console.log(
        `flow: CPU ms/task net of idle: plain ${cpuLine(plain)}; ${KEYS} keys ${cpuLine(keys)}; hot key ${cpuLine(hot)}; plain again ${cpuLine(plainAgain)}`,
      );
      const latencyPlain = await latency(url, sql, p.latency, () => ({ command: "true" }));
      const latencyKeyed = await latency(url, sql, p.latency, (i) => ({ command: "true", concurrency: { key: `k${i % KEYS}` } }));
      console.log(`flow: dispatch latency plain ${quartet(latencyPlain)}; keyed ${quartet(latencyKeyed)}`);
      const rate = await rated(url, sql, p.rated, p.rate);
      console.log(`flow: rate limit ${rate.limit_per_s}/s admitted ${rate.admitted_per_s}/s (${rate.off_by_percent}%)`);
      const plainBest = Math.max(plain.tasks_per_s, plainAgain.tasks_per_s);
      const vs = (x: BurnDown) => Math.round((x.tasks_per_s / plainBest) * 1000) / 1000;
      figures = {
        plain,
        plain_again: plainAgain,
        keys_1000: keys,
        hot_key: hot,
        keys_over_plain: vs(keys),
        hot_over_plain: vs(hot),
        latency_plain: latencyPlain,
        latency_keyed: latencyKeyed,
        rate,
      };
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      const left = await sql`
        SELECT state, concurrency_key IS NOT NULL AS keyed, rate_limit, count(*)::int AS n, min(attempt) AS min_attempt,
          max(attempt) AS max_attempt FROM tasks
        WHERE state NOT IN ('succeeded', 'failed', 'timed_out', 'cancelled') GROUP BY 1, 2, 3`.catch(() => []);
      const warnings = cluster.processes.flatMap((p) =>
        p.lines.filter((line) => Number(line.level) >= 40).map((line) => `${p.role}: ${JSON.stringify(line).slice(0, 600)}`),
      );
      throw new Error(
        `${message}\nunfinished: ${JSON.stringify(left)}\nwarnings:\n${warnings.slice(-30).join("\n")}\nrole process logs:\n${cluster.logs()}`,
      );
    }
    const f = figures as {
      plain: BurnDown;
      plain_again: BurnDown;
      keys_1000: BurnDown;
      hot_key: BurnDown;
      keys_over_plain: number;
      hot_over_plain: number;
      latency_plain: Distribution;
      latency_keyed: Distribution;
      rate: RatedRun;
    };
    const summary: SummaryRow[] = [
      {
        metric: `burn-down: ${p.tasks} × \`true\`, plain (best of two runs)`,
        value: `${Math.max(f.plain.tasks_per_s, f.plain_again.tasks_per_s)} tasks/s (CPU ${f.plain.cpu_ms_per_task.total} ms/task)`,
      },
      {
        metric: `burn-down: the same, ${KEYS} distinct concurrency keys (max 1 each)`,
        value: `${f.keys_1000.tasks_per_s} tasks/s (×${f.keys_over_plain} of plain; CPU ${f.keys_1000.cpu_ms_per_task.total} ms/task)`,
      },
      {
        metric: `burn-down: the same, one hot key (max ${SLOTS})`,
        value: `${f.hot_key.tasks_per_s} tasks/s (×${f.hot_over_plain} of plain; CPU ${f.hot_key.cpu_ms_per_task.total} ms/task)`,
      },
      { metric: "dispatch latency created → picked, plain (p50 / p90 / p99 / max)", value: quartet(f.latency_plain) },
      { metric: "dispatch latency created → picked, keyed", value: quartet(f.latency_keyed) },
      {
        metric: `rate limit ${f.rate.limit_per_s}/s (burst ${f.rate.burst}): admitted rate over ${f.rate.tasks} tasks`,
        value: `${f.rate.admitted_per_s}/s (${f.rate.off_by_percent}% off)`,
      },
    ];
    return {
      name: "flow",
      description:
        "Flow control: burn-down with 1,000 concurrency keys and with one hot key against plain tasks, dispatch latency plain and keyed, and a rate-limited queue's admitted rate against its limit.",
      settings: {
        ...p,
        keys: KEYS,
        processes: { coordinator: 1, scheduler: 1, workers: WORKERS, worker_slots: WORKER_SLOTS },
        submitted_to: "scheduler POST /tasks/batch",
        latency: "one task at a time, created_at to picked_at (database clock)",
        rate: "dispatched_at of each attempt; admitted = (n - burst) / (last - first dispatch)",
        database: db.postgres.source,
      },
      figures,
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

/** The rate limit alone, at a rate far under what the slots drain on a busy machine. */
async function runRate(options: BenchOptions): Promise<BenchResult> {
  const p = options.quick ? { rated: 20, rate: 5 } : { rated: 150, rate: 5 };
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`flow-rate: ${line}`));
    const cluster = await startBenchCluster(scope, db.url, { workers: WORKERS, slots: WORKER_SLOTS, env: PRODUCT_ROLE_ENV });
    const sql = connect(db.url, { max: 1, applicationName: "bench-flow-rate" });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));
    const rate = await rated(cluster.schedulerUrl, sql, p.rated, p.rate);
    console.log(`flow-rate: rate limit ${rate.limit_per_s}/s admitted ${rate.admitted_per_s}/s (${rate.off_by_percent}%)`);
    return {
      name: "flow-rate",
      description:
        "A rate-limited queue's admitted rate against its limit: a backlog of `true` tasks naming one limit, from the attempts' dispatched_at.",
      settings: {
        ...p,
        burst: rate.burst,
        processes: { coordinator: 1, scheduler: 1, workers: WORKERS, worker_slots: WORKER_SLOTS },
        rate: "admitted = (n - burst) / (last - first dispatch)",
        database: db.postgres.source,
      },
      figures: { rate },
      summary: [
        {
          metric: `rate limit ${rate.limit_per_s}/s (burst ${rate.burst}): admitted rate over ${rate.tasks} tasks`,
          value: `${rate.admitted_per_s}/s (${rate.off_by_percent}% off)`,
        },
      ],
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const flow: Bench = { name: "flow", run };
export const flowRate: Bench = { name: "flow-rate", run: runRate };
