// Dispatch latency while retention prunes a backlog. The database is given 1,000,000 old rows
// (final tasks that ended 30 days ago, each with 4 events and 1 attempt: generate_series
// INSERTs), then the same cluster layout runs twice in one run: first with TQ_RETENTION=off
// (the rows stay; nothing is deleted), then with the default 7d, whose coordinator prunes the
// whole backlog in batches while the bench keeps measuring. Tasks are submitted one at a time
// to the coordinator; start = the task's shell writing its id to a FIFO the bench reads. Every
// fifth sample is a bare Bun.spawn of the same command instead: the raw ceiling under the same
// load at the same moment (the pruning's database work included).
import postgres from "postgres";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  type Distribution,
  distribution,
  FifoSignals,
  ms,
  PRODUCT_ROLE_ENV,
  quartet,
  rawSpawn,
  Scope,
  type SummaryRow,
  startBenchCluster,
  within,
} from "./support";
import { insertOldTasks, ROWS_PER_OLD_TASK } from "./support/old-tasks";

// The full run prunes with the default batches; the quick one with small ones, so that its
// small backlog still takes long enough to be measured while it goes.
const FULL = { rows: 1_000_000, samplesOff: 1500, warmup: 20, batch: "500", minSamples: 50 };
const QUICK = { rows: 12_000, samplesOff: 100, warmup: 5, batch: "20", minSamples: 3 };
const WORKER_SLOTS = 2;
const STEP_TIMEOUT_MS = 10_000;
/** Longest the pruning of the backlog may take before the bench gives up. */
const PRUNE_TIMEOUT_MS = 15 * 60_000;

interface Series {
  queue: number[];
  raw: number[];
}

/** One sample: a task through the coordinator, or (every fifth) a raw spawn. */
async function sample(baseUrl: string, fifo: FifoSignals, i: number, into: Series | null, body: string): Promise<void> {
  if (i % 5 === 4) {
    const id = `raw-${i}-${Math.random().toString(36).slice(2)}`;
    const before = performance.now();
    const proc = rawSpawn(fifo.command(), id);
    const started = await fifo.waitFor(id, STEP_TIMEOUT_MS);
    const code = await within(proc.exited, STEP_TIMEOUT_MS, `exit of raw spawn ${id}`);
    if (code !== 0) throw new Error(`raw spawn ${id} exited ${code}`);
    into?.raw.push(started - before);
    return;
  }
  const before = performance.now();
  const response = await within(
    fetch(`${baseUrl}/submit`, { method: "POST", headers: { "content-type": "application/json" }, body }),
    STEP_TIMEOUT_MS,
    `POST ${baseUrl}/submit`,
  );
  const answer = (await response.json()) as { id?: unknown };
  if (response.status !== 201 || typeof answer.id !== "string") {
    throw new Error(`POST ${baseUrl}/submit answered ${response.status}: ${JSON.stringify(answer)}`);
  }
  const started = await fifo.waitFor(answer.id, STEP_TIMEOUT_MS);
  into?.queue.push(started - before);
}

/** The coordinator's taskqueue_retention_pruned_rows_total by table. */
export async function prunedRows(baseUrl: string): Promise<Record<string, number>> {
  const text = await (await fetch(`${baseUrl}/metrics`)).text();
  const out: Record<string, number> = {};
  for (const match of text.matchAll(/^taskqueue_retention_pruned_rows_total\{([^}]*)\} (\S+)$/gm)) {
    const table = /table="([^"]+)"/.exec(match[1]!)?.[1];
    if (table) out[table] = Number(match[2]);
  }
  return out;
}

const total = (rows: Record<string, number>) =>
  (rows.tasks ?? 0) + (rows.task_events ?? 0) + (rows.task_attempts ?? 0) + (rows.task_dependencies ?? 0);

async function run(options: BenchOptions): Promise<BenchResult> {
  const { rows, samplesOff, warmup, batch, minSamples } = options.quick ? QUICK : FULL;
  const oldTasks = Math.ceil(rows / ROWS_PER_OLD_TASK);
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`retention: ${line}`));
    console.log(`retention: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const fifo = FifoSignals.open(scope);
    const sql = postgres(db.url, { max: 2, onnotice: () => {} });
    scope.defer("close the bench's connection", () => sql.end({ timeout: 5 }));
    const body = JSON.stringify({ command: fifo.command() });
    const roleEnv = { ...PRODUCT_ROLE_ENV };
    const retentionEnv = { TQ_RETENTION: "7d", TQ_RETENTION_INTERVAL_MS: "1000", TQ_RETENTION_BATCH_SIZE: batch };

    // Phase 1: retention off. Its coordinator migrates the database; then the backlog goes in.
    const offScope = new Scope();
    let off: Series;
    let generated: Awaited<ReturnType<typeof insertOldTasks>>;
    let generateMs: number;
    try {
      const cluster = await startBenchCluster(offScope, db.url, {
        workers: 1,
        slots: WORKER_SLOTS,
        env: { ...roleEnv, TQ_RETENTION: "off" },
      });
      const before = performance.now();
      generated = await insertOldTasks(sql, oldTasks, 30);
      generateMs = performance.now() - before;
      await sql`VACUUM ANALYZE tasks, task_events, task_attempts`;
      console.log(
        `retention: ${generated.rows} old rows (${generated.tasks} tasks, ${generated.task_events} events, ${generated.task_attempts} attempts) in ${ms(generateMs)} ms`,
      );
      off = { queue: [], raw: [] };
      for (let i = 0; i < warmup + samplesOff; i++) {
        await sample(cluster.coordinatorUrl, fifo, i, i < warmup ? null : off, body);
      }
      const left = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks WHERE worker_id = 'bench-old-worker'`;
      if (left[0]?.n !== generated.tasks)
        throw new Error(`with retention off, ${left[0]?.n} of ${generated.tasks} old tasks are left`);
    } finally {
      await offScope.close();
    }

    // Phase 2: the default retention (7d). The coordinator's first pass starts a second after
    // it does and works the whole backlog off; the bench measures all along.
    const onScope = new Scope();
    const pruning: Series = { queue: [], raw: [] };
    let pass: { tasks: number; batches: number; ms: number };
    let prunedByTable: Record<string, number>;
    try {
      const cluster = await startBenchCluster(onScope, db.url, {
        workers: 1,
        slots: WORKER_SLOTS,
        env: { ...roleEnv, ...retentionEnv },
      });
      const coordinator = cluster.processes.find((p) => p.role === "coordinator")!;
      const deadline = performance.now() + PRUNE_TIMEOUT_MS;
      let pruned: Record<string, number> = {};
      for (let i = 0; (pruned.tasks ?? 0) < generated.tasks; i++) {
        if (performance.now() > deadline) throw new Error(`pruning did not finish in ${PRUNE_TIMEOUT_MS} ms`);
        // A sample counts once pruning has begun (its first batch committed).
        if (i % 5 === 0) pruned = await prunedRows(cluster.coordinatorUrl);
        await sample(cluster.coordinatorUrl, fifo, i, total(pruned) > 0 ? pruning : null, body);
      }
      // The pass logs once its last batch committed (a failed batch ends a pass: then several).
      await coordinator.waitForEvent("retention.pruned", { timeoutMs: 30_000 });
      const lines = coordinator.logged("retention.pruned");
      pass = {
        tasks: lines.reduce((sum, line) => sum + Number(line.tasks), 0),
        batches: lines.reduce((sum, line) => sum + Number(line.batches), 0),
        ms: lines.reduce((sum, line) => sum + Number(line.ms), 0),
      };
      prunedByTable = await prunedRows(cluster.coordinatorUrl);
      const left = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks WHERE worker_id = 'bench-old-worker'`;
      if (left[0]?.n !== 0) throw new Error(`after the pass, ${left[0]?.n} old tasks are left`);
    } finally {
      await onScope.close();
    }
    if (pruning.queue.length < minSamples)
      throw new Error(`only ${pruning.queue.length} samples while pruning: the pass was too short`);

    const prunedTotal = total(prunedByTable);
    const figures = {
      old_rows: generated,
      generate_ms: Math.round(generateMs),
      generate_rows_per_second: Math.round(generated.rows / (generateMs / 1000)),
      retention_off: { submit_to_start: distribution(off.queue), raw_spawn_to_start: distribution(off.raw) },
      while_pruning: { submit_to_start: distribution(pruning.queue), raw_spawn_to_start: distribution(pruning.raw) },
      pass: {
        ...pass,
        rows: prunedTotal,
        rows_by_table: prunedByTable,
        rows_per_second: Math.round(prunedTotal / (pass.ms / 1000)),
      },
    };
    const ratio = (d: Distribution, raw: Distribution) => Math.round((d.p99 / raw.p99) * 100) / 100;
    const offQ = figures.retention_off.submit_to_start;
    const onQ = figures.while_pruning.submit_to_start;
    console.log(`\nsubmit -> shell running (ms): p50 / p90 / p99 / max`);
    console.log(`  retention off          ${quartet(offQ)}   (raw ${quartet(figures.retention_off.raw_spawn_to_start)})`);
    console.log(`  while pruning          ${quartet(onQ)}   (raw ${quartet(figures.while_pruning.raw_spawn_to_start)})`);
    console.log(
      `  pruned ${prunedTotal} rows (${pass.tasks} tasks) in ${pass.batches} batches, ${ms(pass.ms)} ms: ${figures.pass.rows_per_second} rows/s`,
    );
    const summary: SummaryRow[] = [
      {
        metric: `old rows generated (tasks + 4 events + 1 attempt each)`,
        value: `${generated.rows} in ${ms(generateMs)} ms (${figures.generate_rows_per_second} rows/s)`,
      },
      { metric: "submit→start, retention off (p50 / p90 / p99 / max)", value: quartet(offQ) },
      { metric: "raw spawn ceiling, same phase", value: quartet(figures.retention_off.raw_spawn_to_start) },
      { metric: "submit→start while pruning the backlog", value: quartet(onQ) },
      { metric: "raw spawn ceiling, same phase", value: quartet(figures.while_pruning.raw_spawn_to_start) },
      {
        metric: "p99 while pruning / retention off (p99 over raw p99: off, pruning)",
        value: `×${Math.round((onQ.p99 / offQ.p99) * 100) / 100} (×${ratio(offQ, figures.retention_off.raw_spawn_to_start)}, ×${ratio(onQ, figures.while_pruning.raw_spawn_to_start)})`,
      },
      {
        metric: "pruning pass",
        value: `${prunedTotal} rows (${pass.tasks} tasks) in ${pass.batches} batches, ${(pass.ms / 1000).toFixed(1)} s (${figures.pass.rows_per_second} rows/s)`,
      },
    ];
    return {
      name: "retention",
      description:
        "Submit-to-start latency with retention off, then while the coordinator prunes a backlog of old rows (TQ_RETENTION=7d, default batches), in the same run; every fifth sample a raw spawn as the ceiling.",
      settings: {
        old_rows: rows,
        old_tasks: oldTasks,
        old_task_age_days: 30,
        samples_retention_off: samplesOff,
        warmup,
        processes: { coordinator: 1, scheduler: 1, workers: 1, worker_slots: WORKER_SLOTS },
        role_env: roleEnv,
        retention_env: { ...retentionEnv, TQ_RETENTION_PAUSE_MS: "50 (default)" },
        command: 'echo "$TQ_TASK_ID" > <fifo>',
        submitted: "one at a time, POST /submit to the coordinator, the next after the previous one started",
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

export const retention: Bench = { name: "retention", run };
