// Queues, priorities and labels against the plain case, on the same cluster: dispatch latency
// (an open loop of run-now tasks through the scheduler, so every one goes through the claim;
// created_at -> started_at from the rows) and burn-down (a backlog of `true` drained by 4
// workers x 2 slots). The routed case spreads tasks over 50 queues with priorities from -10 to
// 10, a quarter requiring gpu=1 (half the workers have it) and a quarter preferring region=eu.
import { connect, type Sql } from "../src/db/sql";
import {
  type BatchTask,
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
  spans,
  startBenchCluster,
  submitBatch,
  taskTimeline,
  untilAllFinal,
} from "./support";

const FULL = { burn: 3000, batch: 500, open: 300, rate: 50 };
const QUICK = { burn: 200, batch: 100, open: 40, rate: 40 };
const WORKERS = 4;
const SLOTS = 2;
const QUEUES = 50;
const POLL_MS = 50;

type Shape = "plain" | "routed";

function task(shape: Shape, i: number): BatchTask {
  if (shape === "plain") return { command: "true" };
  const t: BatchTask = { command: "true", queue: `q${i % QUEUES}`, priority: (i % 21) - 10 };
  if (i % 4 === 1) t.require = [{ key: "gpu", op: "=", value: "1" }];
  if (i % 4 === 2) t.prefer = [{ key: "region", op: "=", value: "eu", weight: 10 }];
  return t;
}

async function burnDown(url: string, sql: Sql, shape: Shape, count: number, batch: number) {
  const start = performance.now();
  const ids: string[] = [];
  for (let done = 0; done < count; done += batch) {
    const tasks = Array.from({ length: Math.min(batch, count - done) }, (_, k) => task(shape, done + k));
    ids.push(...(await submitBatch(url, tasks)).map((t) => t.id));
  }
  await untilAllFinal(sql, POLL_MS, 60_000 + count * 50);
  const elapsed = performance.now() - start;
  return { tasks: count, elapsed_ms: Math.round(elapsed), tasks_per_s: Math.round((count / elapsed) * 10_000) / 10, ids };
}

/** One task at a time at `rate`/s (open loop), each its own batch of one; created -> started from the rows. */
async function openLoop(url: string, sql: Sql, shape: Shape, count: number, rate: number): Promise<Distribution> {
  const ids: string[] = [];
  const start = performance.now();
  const pending: Promise<void>[] = [];
  for (let i = 0; i < count; i++) {
    const at = start + (i * 1000) / rate;
    const wait = at - performance.now();
    if (wait > 0) await Bun.sleep(wait);
    pending.push(submitBatch(url, [task(shape, i)]).then(([t]) => void ids.push(t!.id)));
  }
  await Promise.all(pending);
  await untilAllFinal(sql, POLL_MS, 60_000);
  const rows = await sql<{ created_at: Date; started_at: Date }[]>`
    SELECT created_at, started_at FROM tasks WHERE id IN ${sql(ids)}`;
  return distribution(rows.map((r) => r.started_at.getTime() - r.created_at.getTime()));
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const sizes = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`routing: ${line}`));
    const env = PRODUCT_ROLE_ENV;
    const cluster = await startBenchCluster(scope, db.url, {
      workers: WORKERS,
      slots: SLOTS,
      env,
      workerEnv: (i) => ({ TQ_WORKER_LABELS: i % 2 === 0 ? "gpu=1,region=eu" : "region=us" }),
    });
    const sql = connect(db.url, { max: 1, applicationName: "bench-routing" });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));
    const url = cluster.schedulerUrl;
    // Warm-up, untimed, of both shapes.
    for (const shape of ["plain", "routed"] as const) await burnDown(url, sql, shape, 50, 50);
    await requireAllSucceeded(sql);
    const figures: Record<string, unknown> = {};
    const latency: Record<Shape, Distribution> = {} as never;
    const burn: Record<Shape, { tasks_per_s: number; elapsed_ms: number }> = {} as never;
    const picked: Record<Shape, Distribution> = {} as never;
    // Interleaved, twice, so that drift in the machine's load falls on both alike.
    for (let round = 0; round < 2; round++) {
      for (const shape of ["plain", "routed"] as const) {
        const l = await openLoop(url, sql, shape, sizes.open / 2, sizes.rate);
        const b = await burnDown(url, sql, shape, sizes.burn / 2, sizes.batch);
        const timeline = await taskTimeline(sql, b.ids);
        const p = distribution(spans(timeline, "picked_at", "started_at"));
        console.log(`routing: round ${round} ${shape}: latency ${quartet(l)}; burn-down ${b.tasks_per_s}/s`);
        figures[`${shape}_${round}`] = {
          latency: l,
          burn: { tasks_per_s: b.tasks_per_s, elapsed_ms: b.elapsed_ms },
          picked_to_started: p,
        };
        const prev = burn[shape];
        burn[shape] = prev
          ? { tasks_per_s: (prev.tasks_per_s + b.tasks_per_s) / 2, elapsed_ms: prev.elapsed_ms + b.elapsed_ms }
          : { tasks_per_s: b.tasks_per_s, elapsed_ms: b.elapsed_ms };
        latency[shape] = latency[shape] ? merge(latency[shape], l) : l;
        picked[shape] = p;
      }
    }
    const report = await requireAllSucceeded(sql);
    const ratio = (a: number, b: number) => Math.round((a / b) * 1000) / 1000;
    const summary: SummaryRow[] = [
      {
        metric: `dispatch: created→started at ${sizes.rate}/s via scheduler, plain (p50 / p90 / p99 / max)`,
        value: quartet(latency.plain),
      },
      {
        metric: `dispatch: the same, ${QUEUES} queues, priorities -10..10, labels required/preferred`,
        value: quartet(latency.routed),
      },
      {
        metric: "dispatch p50 / p99 routed ÷ plain (target ≤ 1.10)",
        value: `×${ratio(latency.routed.p50, latency.plain.p50)} / ×${ratio(latency.routed.p99, latency.plain.p99)}`,
      },
      {
        metric: `burn-down: ${sizes.burn} × \`true\` (two rounds), ${WORKERS} workers × ${SLOTS} slots: plain / routed`,
        value: `${burn.plain.tasks_per_s.toFixed(1)} / ${burn.routed.tasks_per_s.toFixed(1)} tasks/s`,
      },
      { metric: "burn-down routed ÷ plain (target ≥ 0.90)", value: `×${ratio(burn.routed.tasks_per_s, burn.plain.tasks_per_s)}` },
      {
        metric: "tasks ended non-succeeded (must be 0)",
        value: String(
          Object.entries(report.states)
            .filter(([s]) => s !== "succeeded")
            .reduce((n, [, c]) => n + Number(c), 0),
        ),
      },
    ];
    for (const row of summary) console.log(`routing: ${row.metric}: ${row.value}`);
    return {
      name: "routing",
      description:
        "Queues, priorities and labels against the plain case on the same cluster: dispatch latency of an open loop and burn-down of a backlog.",
      settings: {
        ...sizes,
        workers: WORKERS,
        slots: SLOTS,
        queues: QUEUES,
        worker_labels: ["gpu=1,region=eu", "region=us"],
        role_env: env,
      },
      figures: { ...figures, states: report.states },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

/** Two runs' samples cannot be merged from summaries; keep the one with the larger p50 (the conservative figure). */
function merge(a: Distribution, b: Distribution): Distribution {
  return a.p50 >= b.p50 ? a : b;
}

export const routing: Bench = { name: "routing", run };
