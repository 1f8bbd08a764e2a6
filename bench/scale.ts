// Scale: submit-to-start latency on an otherwise idle system, first with an empty queue, then
// with 1,000,000 tasks waiting in the future, and the coordinator's and worker's memory (RSS)
// with them waiting. Target: latency within 1.5x of the empty-queue figure, coordinator RSS
// <= 150 MB.
import { readFileSync } from "node:fs";
import postgres from "postgres";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  distribution,
  FifoSignals,
  ms,
  PRODUCT_ROLE_ENV,
  quartet,
  Scope,
  startBenchCluster,
} from "./support";

const FULL = { tasks: 100, warmup: 10, waiting: 1_000_000 };
const QUICK = { tasks: 10, warmup: 3, waiting: 20_000 };
const STEP_TIMEOUT_MS = 15_000;

function rssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? Number.NaN);
  return Math.round((kb / 1024) * 10) / 10;
}

async function sequential(url: string, fifo: FifoSignals, count: number, warmup: number): Promise<number[]> {
  const body = JSON.stringify({ command: fifo.command() });
  const samples: number[] = [];
  for (let i = 0; i < warmup + count; i++) {
    const began = performance.now();
    const response = await fetch(`${url}/submit`, { method: "POST", headers: { "content-type": "application/json" }, body });
    if (response.status !== 201) throw new Error(`POST /submit answered ${response.status}: ${await response.text()}`);
    const { id } = (await response.json()) as { id: string };
    const started = await fifo.waitFor(id, STEP_TIMEOUT_MS);
    if (i >= warmup) samples.push(started - began);
    // Let the result be recorded before the next one, as on an idle system.
    await Bun.sleep(5);
  }
  return samples;
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const plan = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`scale: ${line}`));
    const fifo = FifoSignals.open(scope);
    const roleEnv = PRODUCT_ROLE_ENV;
    const cluster = await startBenchCluster(scope, db.url, { workers: 1, slots: 2, env: roleEnv });
    const coordinator = cluster.processes.find((p) => p.role === "coordinator")!;
    const worker = cluster.workers[0]!;
    const sql = postgres(db.url, { max: 1, onnotice: () => {} });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));

    const empty = distribution(await sequential(cluster.coordinatorUrl, fifo, plan.tasks, plan.warmup));
    const rssEmpty = { coordinator: rssMb(coordinator.pid), worker: rssMb(worker.pid) };
    console.log(`scale: empty queue: p50 ${ms(empty.p50)} ms; inserting ${plan.waiting} future tasks`);
    const inserting = performance.now();
    await sql`
      INSERT INTO tasks (id, command, scheduled_at, run_at)
      SELECT gen_random_uuid(), 'true', at, at
      FROM generate_series(1, ${plan.waiting}::int) g
      CROSS JOIN LATERAL (SELECT now() + interval '1 day' + make_interval(secs => g / 1000.0) AS at) due`;
    await sql`ANALYZE tasks`;
    console.log(`scale: inserted in ${Math.round(performance.now() - inserting)} ms`);
    const loaded = distribution(await sequential(cluster.coordinatorUrl, fifo, plan.tasks, plan.warmup));
    const rssLoaded = { coordinator: rssMb(coordinator.pid), worker: rssMb(worker.pid) };
    const ratio = Math.round((loaded.p50 / empty.p50) * 100) / 100;
    console.log(
      `scale: with ${plan.waiting} waiting: p50 ${ms(loaded.p50)} ms (x${ratio}); RSS coordinator ${rssLoaded.coordinator} MB, worker ${rssLoaded.worker} MB`,
    );
    return {
      name: "scale",
      description: `Submit-to-start latency (idle, sequential) with an empty queue and with ${plan.waiting} tasks waiting in the future; RSS of the roles.`,
      settings: {
        tasks_per_series: plan.tasks,
        warmup: plan.warmup,
        waiting_tasks: plan.waiting,
        processes: { coordinator: 1, scheduler: 1, workers: 1, worker_slots: 2 },
        role_env: roleEnv,
        database: db.postgres.source,
      },
      figures: { empty, loaded, p50_ratio: ratio, rss_mb_empty: rssEmpty, rss_mb_loaded: rssLoaded },
      summary: [
        { metric: "submit→start, empty queue", value: quartet(empty) },
        {
          metric: `submit→start, ${plan.waiting.toLocaleString("en")} tasks waiting (p50 ratio ×${ratio})`,
          value: quartet(loaded),
        },
        { metric: "RSS with them waiting: coordinator / worker", value: `${rssLoaded.coordinator} MB / ${rssLoaded.worker} MB` },
      ],
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const scale: Bench = { name: "scale", run };
