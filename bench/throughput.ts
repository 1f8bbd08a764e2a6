// Burn-down throughput: how fast a backlog of trivial tasks drains. One coordinator, one
// scheduler and four workers with two slots each (eight commands at once) run as real
// processes with the product's heartbeat settings. The backlog is `true` commands submitted
// to the scheduler in batches (POST /tasks/batch, one batch after another); the clock runs
// from the first submit to the first poll of the tasks table that finds none unfinished. The
// ceiling is the same number of `sh -c true` from bare Bun.spawn, eight in flight.
import { connect, type Sql } from "../src/db/sql";
import {
  type BatchTask,
  type Bench,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  type Distribution,
  distribution,
  ms,
  notSucceeded,
  PRODUCT_ROLE_ENV,
  quartet,
  rawSpawn,
  requireAllSucceeded,
  Scope,
  type StateReport,
  type SummaryRow,
  spans,
  startBenchCluster,
  submitBatch,
  taskTimeline,
  untilAllFinal,
  within,
} from "./support";

const FULL = { tasks: 5000, batch: 1000, warmup: 50 };
const QUICK = { tasks: 300, batch: 100, warmup: 10 };
const WORKERS = 4;
const WORKER_SLOTS = 2;
const CONCURRENCY = WORKERS * WORKER_SLOTS;
const COMMAND = "true";
/** How often the bench asks the database whether any task is unfinished. */
const POLL_MS = 50;
const STEP_TIMEOUT_MS = 30_000;
/** Generous: a run slower than 50 ms per task plus this is a fault, not a figure. */
const timeoutFor = (tasks: number) => STEP_TIMEOUT_MS + tasks * 50;

// ---- helpers shared with precision.ts (candidates for support.ts) ---------------------------

// ---- the measurements ----------------------------------------------------------------------

interface QueueRun {
  tasks: number;
  batches: number;
  /** First POST /tasks/batch call until the last one's 201 body was read. */
  submit_ms: number;
  /** First POST /tasks/batch call until a poll first found no unfinished task. */
  elapsed_ms: number;
  tasks_per_s: number;
  /**
   * First POST call until the latest completed_at of the timed tasks (the workers' clocks,
   * ms resolution): the end without the poll's delay.
   */
  last_completed_ms: number;
  tasks_per_s_by_last_completed: number;
  /** Per task, from the rows: claim to the worker's process start, and that to its exit. */
  rows_picked_to_started: Distribution;
  rows_started_to_completed: Distribution;
}

/** Submits `count` tasks in batches of `batchSize`, one batch after another, and times the burn-down. */
async function burnDown(
  baseUrl: string,
  sql: Sql,
  count: number,
  batchSize: number,
): Promise<{ run: QueueRun; report: StateReport }> {
  const batches: BatchTask[][] = [];
  for (let done = 0; done < count; done += batchSize) {
    batches.push(Array.from({ length: Math.min(batchSize, count - done) }, () => ({ command: COMMAND })));
  }
  const wallStart = Date.now();
  const start = performance.now();
  const ids: string[] = [];
  for (const batch of batches) ids.push(...(await submitBatch(baseUrl, batch)).map((t) => t.id));
  const submitted = performance.now();
  // Only now: between two batches the table can be momentarily all final.
  const end = await untilAllFinal(sql, POLL_MS, timeoutFor(count));
  const report = await requireAllSucceeded(sql);
  const timeline = await taskTimeline(sql, ids);
  const pickedToStarted = distribution(spans(timeline, "picked_at", "started_at"));
  const startedToCompleted = distribution(spans(timeline, "started_at", "completed_at"));
  const elapsed = end - start;
  // wallStart and start are read together; Date.now() has millisecond resolution, like the rows.
  const lastCompleted = timeline.reduce((last, row) => Math.max(last, row.completed_at?.getTime() ?? last), 0) - wallStart;
  const run: QueueRun = {
    tasks: count,
    batches: batches.length,
    submit_ms: round(submitted - start),
    elapsed_ms: round(elapsed),
    tasks_per_s: perSecond(count, elapsed),
    last_completed_ms: lastCompleted,
    tasks_per_s_by_last_completed: perSecond(count, lastCompleted),
    rows_picked_to_started: pickedToStarted,
    rows_started_to_completed: startedToCompleted,
  };
  return { run, report };
}

interface RawRun {
  commands: number;
  in_flight: number;
  elapsed_ms: number;
  commands_per_s: number;
}

/**
 * The ceiling: `count` runs of `sh -c true` from Bun.spawn with the executor's options (own
 * process group, piped output), `inFlight` at a time, from the first spawn to the last exit.
 */
async function rawSpawns(count: number, inFlight: number): Promise<RawRun> {
  let next = 0;
  const failures: string[] = [];
  const lane = async () => {
    while (next < count) {
      next++;
      const proc = rawSpawn(COMMAND);
      const code = await proc.exited;
      if (code !== 0) failures.push(`exit ${code}: ${await new Response(proc.stderr).text()}`);
    }
  };
  const start = performance.now();
  await within(Promise.all(Array.from({ length: inFlight }, lane)), timeoutFor(count), `${count} raw spawns`);
  const elapsed = performance.now() - start;
  if (failures.length > 0) throw new Error(`${failures.length} raw spawns failed, e.g. ${failures[0]}`);
  return { commands: count, in_flight: inFlight, elapsed_ms: round(elapsed), commands_per_s: perSecond(count, elapsed) };
}

const round = (x: number) => Math.round(x * 1000) / 1000;
const perSecond = (count: number, elapsedMs: number) => Math.round((count / elapsedMs) * 1000 * 10) / 10;

async function run(options: BenchOptions): Promise<BenchResult> {
  const { tasks, batch, warmup } = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`throughput: ${line}`));
    console.log(`throughput: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const roleEnv = PRODUCT_ROLE_ENV;
    const cluster = await startBenchCluster(scope, db.url, { workers: WORKERS, slots: WORKER_SLOTS, env: roleEnv });
    // The roles have migrated the database by now.
    const sql = connect(db.url, { max: 1, applicationName: "bench-throughput" });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));
    console.log(
      `throughput: cluster up (${WORKERS} workers x ${WORKER_SLOTS} slots); ${warmup} warm-up + ${tasks} timed tasks and raw spawns`,
    );

    let raw: RawRun;
    let queue: QueueRun;
    let report: StateReport;
    try {
      // Warm-ups, untimed: the spawn path of this process, then every role's task path.
      await rawSpawns(warmup, CONCURRENCY);
      raw = await rawSpawns(tasks, CONCURRENCY);
      await submitBatch(
        cluster.schedulerUrl,
        Array.from({ length: warmup }, () => ({ command: COMMAND })),
      );
      await untilAllFinal(sql, POLL_MS, timeoutFor(warmup));
      ({ run: queue, report } = await burnDown(cluster.schedulerUrl, sql, tasks, batch));
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new Error(`${message}\nrole process logs:\n${cluster.logs()}`);
    }
    const ratio = Math.round((queue.tasks_per_s / raw.commands_per_s) * 1000) / 1000;

    console.log(`\nburn-down of ${tasks} x \`${COMMAND}\`, ${CONCURRENCY} at once`);
    console.log(`  raw Bun.spawn  ${raw.commands_per_s} /s  (${ms(raw.elapsed_ms)} ms)`);
    console.log(
      `  queue          ${queue.tasks_per_s} /s  (${ms(queue.elapsed_ms)} ms to all final seen; submit took ${ms(queue.submit_ms)} ms; ` +
        `last completed_at at ${ms(queue.last_completed_ms)} ms = ${queue.tasks_per_s_by_last_completed} /s)`,
    );
    console.log(`  queue / raw    ${ratio}`);
    console.log(
      `  rows           picked -> started ${quartet(queue.rows_picked_to_started)}; started -> completed ${quartet(queue.rows_started_to_completed)}`,
    );
    console.log(`  states         ${JSON.stringify(report.states)}; retried ${report.retried}`);

    const summary: SummaryRow[] = [
      {
        metric: `burn-down: ${tasks} × \`${COMMAND}\` via scheduler POST /tasks/batch, ${WORKERS} workers × ${WORKER_SLOTS} slots, first submit → all final`,
        value: `${queue.tasks_per_s} tasks/s (${(queue.elapsed_ms / 1000).toFixed(2)} s)`,
      },
      {
        metric: `raw ceiling: ${tasks} × Bun.spawn \`sh -c ${COMMAND}\`, ${CONCURRENCY} in flight`,
        value: `${raw.commands_per_s} commands/s (${(raw.elapsed_ms / 1000).toFixed(2)} s)`,
      },
      { metric: "burn-down over raw ceiling (queue tasks/s ÷ raw commands/s)", value: `×${ratio}` },
      {
        metric: "tasks ended non-succeeded (must be 0; the bench fails otherwise) / needed a retry",
        value: `${notSucceeded(report)} / ${report.retried}`,
      },
    ];
    return {
      name: "throughput",
      description: `Burn-down throughput: a backlog of \`${COMMAND}\` tasks submitted in batches to the scheduler, timed from the first submit until every task is final, against bare Bun.spawn at the same concurrency.`,
      settings: {
        tasks,
        warmup_tasks: warmup,
        batch_size: batch,
        batches: queue.batches,
        submitted_to: "scheduler POST /tasks/batch, each batch sent after the previous one's 201",
        command: COMMAND,
        processes: { coordinator: 1, scheduler: 1, workers: WORKERS, worker_slots: WORKER_SLOTS, total_slots: CONCURRENCY },
        role_env: roleEnv,
        start: "just before the first POST /tasks/batch call",
        end:
          `the arrival of the first answer to SELECT count(*) FROM tasks WHERE state NOT IN (final states) that is 0, ` +
          `polled every ${POLL_MS} ms from the bench once the last batch was acknowledged (so up to one poll period plus one query late)`,
        raw_spawn: `Bun.spawn sh -c ${COMMAND}, stdin ignore, stdout/stderr pipe, detached (as the executor), ${CONCURRENCY} in flight, first spawn to last exit`,
        database: db.postgres.source,
      },
      figures: { queue, raw, queue_over_raw: ratio, states: report.states, retried: report.retried },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const throughput: Bench = { name: "throughput", run };
