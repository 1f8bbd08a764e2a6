// Scheduling precision: how late after its scheduled_at a task's shell runs, and whether any
// runs early. One coordinator, one scheduler and two workers with sixteen slots each (more
// than ever fall due at once) run as real processes with the product's heartbeat settings.
// The tasks are due at distinct milliseconds spread over 1 to 5 s ahead, submitted in one
// POST /tasks/batch to the scheduler; each writes its id to a FIFO the bench reads, and the
// arrival, put on the wall clock, minus scheduled_at is its lateness. The database's clock
// decides dueness; on one machine it is the bench's clock too (measured, in the figures).
import { connect, type Sql } from "../src/db/sql";
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
  requireAllSucceeded,
  Scope,
  type StateReport,
  type SummaryRow,
  spans,
  startBenchCluster,
  submitBatch,
  type TimelineRow,
  taskTimeline,
  untilAllFinal,
} from "./support";

const FULL = { tasks: 500, warmup: 10 };
const QUICK = { tasks: 40, warmup: 3 };
const WORKERS = 2;
const WORKER_SLOTS = 16;
/** The first task is due this long after the submit starts, the last LEAD + SPREAD. */
const LEAD_MS = 1000;
const SPREAD_MS = 4000;
const POLL_MS = 50;
/** A task whose shell has not run this long after it fell due is a fault, not a figure. */
const STEP_TIMEOUT_MS = 15_000;

/**
 * Wall-clock ms minus performance.now() ms. Each reading is taken just after Date.now()
 * ticks (it has millisecond resolution, so a reading at an arbitrary moment could be 1 ms
 * off); a reading can only come out low (a preemption between the tick and the reads), so the
 * highest of a few is kept. Busy-waits a few milliseconds.
 */
function wallClockOffset(readings = 5): number {
  let best = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < readings; i++) {
    const start = Date.now();
    let wall: number;
    let mono: number;
    do {
      wall = Date.now();
      mono = performance.now();
    } while (wall === start);
    best = Math.max(best, wall - mono);
  }
  return best;
}

/**
 * How far the database's clock is ahead of the bench's wall clock, in ms, from the quickest of
 * a few round trips; ± half that round trip.
 */
async function postgresClockAhead(sql: Sql, wallOffset: number): Promise<{ ahead_ms: number; plus_minus_ms: number }> {
  let best = { ahead_ms: Number.NaN, plus_minus_ms: Number.POSITIVE_INFINITY };
  for (let i = 0; i < 5; i++) {
    const before = performance.now();
    const serverMs = await databaseNow(sql);
    const after = performance.now();
    const half = (after - before) / 2;
    if (half < best.plus_minus_ms)
      best = { ahead_ms: round(serverMs - (wallOffset + before + half)), plus_minus_ms: round(half) };
  }
  return best;
}

/** clock_timestamp() in epoch milliseconds, with its microseconds. */
async function databaseNow(sql: Sql): Promise<number> {
  const [row] = await sql<{ ms: number }[]>`SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8 AS ms`;
  if (!row) throw new Error("SELECT clock_timestamp() returned no row");
  return row.ms;
}

const round = (x: number) => Math.round(x * 1000) / 1000;

async function run(options: BenchOptions): Promise<BenchResult> {
  const { tasks, warmup } = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`precision: ${line}`));
    console.log(`precision: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const fifo = FifoSignals.open(scope);
    const roleEnv = PRODUCT_ROLE_ENV;
    const cluster = await startBenchCluster(scope, db.url, { workers: WORKERS, slots: WORKER_SLOTS, env: roleEnv });
    const sql = connect(db.url, { max: 1, applicationName: "bench-precision" });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));
    console.log(
      `precision: cluster up (${WORKERS} workers x ${WORKER_SLOTS} slots); ${warmup} warm-up + ${tasks} scheduled tasks`,
    );

    const command = fifo.command();
    let offset: number;
    let offsetDrift: number;
    let pgAhead: { ahead_ms: number; plus_minus_ms: number };
    let dueAt: number[];
    let ids: string[];
    let arrivals: number[];
    let submitMs: number;
    let report: StateReport;
    let timeline: TimelineRow[];
    let raw: number[];
    try {
      // Warm-up, untimed: every role's task path runs once before anything is measured.
      const warm = await submitBatch(
        cluster.schedulerUrl,
        Array.from({ length: warmup }, () => ({ command })),
      );
      await Promise.all(warm.map((t) => fifo.waitFor(t.id, STEP_TIMEOUT_MS)));
      await untilAllFinal(sql, POLL_MS, STEP_TIMEOUT_MS);

      offset = wallClockOffset();
      pgAhead = await postgresClockAhead(sql, offset);
      const base = offset + performance.now() + LEAD_MS;
      const baseMs = Math.ceil(base);
      dueAt = Array.from({ length: tasks }, (_, i) => baseMs + Math.round((i * SPREAD_MS) / Math.max(1, tasks - 1)));
      if (new Set(dueAt).size !== tasks) throw new Error(`${tasks} tasks do not fit distinct milliseconds in ${SPREAD_MS} ms`);
      const sent = performance.now();
      const created = await submitBatch(
        cluster.schedulerUrl,
        dueAt.map((at) => ({ command, scheduled_at: new Date(at).toISOString() })),
      );
      const answered = performance.now();
      submitMs = answered - sent;
      if (offset + answered >= dueAt[0]!) {
        throw new Error(
          `the submit took ${ms(submitMs)} ms, past the first task's scheduled_at (${LEAD_MS} ms ahead): its lateness would include the submit`,
        );
      }
      created.forEach((task, i) => {
        if (Date.parse(task.scheduled_at) !== dueAt[i]) {
          throw new Error(`task ${task.id} was stored for ${task.scheduled_at}, not ${new Date(dueAt[i]!).toISOString()}`);
        }
      });
      ids = created.map((t) => t.id);
      arrivals = await Promise.all(
        ids.map((id, i) => fifo.waitFor(id, dueAt[i]! - (offset + performance.now()) + STEP_TIMEOUT_MS)),
      );
      offsetDrift = wallClockOffset() - offset;
      await untilAllFinal(sql, POLL_MS, STEP_TIMEOUT_MS);
      report = await requireAllSucceeded(sql);
      timeline = await taskTimeline(sql, ids);
      raw = await rawTimedSpawns(fifo, command, tasks);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new Error(`${message}\nrole process logs:\n${cluster.logs()}`);
    }
    const lateness = arrivals.map((at, i) => at + offset - dueAt[i]!);
    const late: Distribution = distribution(lateness);
    const early = lateness
      .map((value, i) => ({ id: ids[i]!, scheduled_at: new Date(dueAt[i]!).toISOString(), lateness_ms: value }))
      .filter((x) => x.lateness_ms < 0)
      .map((x) => ({ ...x, lateness_ms: round(x.lateness_ms) }));
    const rawLate = distribution(raw);
    const scheduledToPicked = distribution(spans(timeline, "scheduled_at", "picked_at"));
    const pickedToStarted = distribution(spans(timeline, "picked_at", "started_at"));

    console.log(
      `\nlateness: shell running - scheduled_at, ${tasks} tasks at distinct ms ${LEAD_MS}-${LEAD_MS + SPREAD_MS} ms ahead`,
    );
    console.log(`  p50 ${ms(late.p50)}  p90 ${ms(late.p90)}  p99 ${ms(late.p99)}  max ${ms(late.max)}  min ${ms(late.min)} ms`);
    console.log(
      `  raw ceiling (timer + Bun.spawn in this process, same times): p50 ${ms(rawLate.p50)}  p90 ${ms(rawLate.p90)}  p99 ${ms(rawLate.p99)}  max ${ms(rawLate.max)} ms`,
    );
    console.log(
      `  rows: scheduled_at -> picked_at ${quartet(scheduledToPicked)}; picked_at -> started_at ${quartet(pickedToStarted)}`,
    );
    console.log(
      `  submit ${ms(submitMs)} ms; PostgreSQL clock ahead of the bench by ${pgAhead.ahead_ms} ± ${pgAhead.plus_minus_ms} ms; wall/monotonic drift over the run ${round(offsetDrift)} ms`,
    );
    if (early.length > 0) {
      console.error(
        `precision: FAIL: ${early.length} of ${tasks} tasks started before their scheduled_at, e.g. ${JSON.stringify(early.slice(0, 5))}`,
      );
    }

    const summary: SummaryRow[] = [
      {
        metric: `lateness: shell running − scheduled_at, ${tasks} tasks at distinct ms ${LEAD_MS / 1000}–${(LEAD_MS + SPREAD_MS) / 1000} s ahead, ${WORKERS} workers × ${WORKER_SLOTS} slots`,
        value: quartet(late),
      },
      {
        metric: "tasks started before scheduled_at (must be 0)",
        value:
          early.length === 0
            ? "0"
            : `${early.length} — FAIL: tasks ran early (earliest ${ms(Math.min(...early.map((e) => e.lateness_ms)))} ms)`,
      },
      {
        metric: "raw ceiling: a timer and Bun.spawn in the bench process at the same times, shell running − due",
        value: quartet(rawLate),
      },
      {
        metric: "lateness p50 / p99 over the raw ceiling",
        value: `+${ms(late.p50 - rawLate.p50)} / +${ms(late.p99 - rawLate.p99)} ms`,
      },
      {
        metric: "hand-over by the rows (database clock, ms resolution): picked_at − scheduled_at (negative: early hand-over)",
        value: quartet(scheduledToPicked),
      },
    ];
    return {
      name: "precision",
      description:
        "Scheduling precision: how late after scheduled_at each task's shell runs (it writes to a FIFO the bench reads), for tasks due at distinct times 1-5 s ahead, with more slots than ever fall due at once.",
      settings: {
        tasks,
        warmup_tasks: warmup,
        scheduled: `distinct milliseconds, evenly from now+${LEAD_MS} ms to now+${LEAD_MS + SPREAD_MS} ms`,
        submitted_to: "scheduler POST /tasks/batch, all tasks in one batch",
        command: 'echo "$TQ_TASK_ID" > <fifo>',
        processes: {
          coordinator: 1,
          scheduler: 1,
          workers: WORKERS,
          worker_slots: WORKER_SLOTS,
          total_slots: WORKERS * WORKER_SLOTS,
        },
        role_env: roleEnv,
        lateness:
          "performance.now() at which the FIFO line arrived, put on the wall clock by an offset (Date.now() - performance.now(), read at Date.now() ticks) taken before the submit, minus scheduled_at",
        clocks:
          "the database's clock decides dueness (run_at <= clock_timestamp(); run_at is scheduled_at for a first attempt, and " +
          "these tasks have one); on one machine it is the bench's wall clock, " +
          "figures.postgres_clock_ahead_ms says by how much it differs",
        database: db.postgres.source,
      },
      figures: {
        lateness: late,
        started_early: early.length,
        early_examples: early.slice(0, 10),
        raw_ceiling_lateness: rawLate,
        rows_scheduled_to_picked: scheduledToPicked,
        rows_picked_to_started: pickedToStarted,
        submit_ms: round(submitMs),
        postgres_clock_ahead_ms: pgAhead,
        wall_monotonic_drift_ms: round(offsetDrift),
        wall_offset_minus_time_origin_ms: round(offset - performance.timeOrigin),
        states: report.states,
        retried: report.retried,
      },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

/**
 * The ceiling: the same spread of due times (count tasks over SPREAD_MS, LEAD_MS ahead), each
 * started by a timer in this process with Bun.spawn as the executor spawns (own process
 * group, piped output); lateness is the FIFO arrival minus the due time, both on
 * performance.now(). Nothing of the queue is running meanwhile.
 */
async function rawTimedSpawns(fifo: FifoSignals, command: string, count: number): Promise<number[]> {
  const base = performance.now() + LEAD_MS;
  const due = Array.from({ length: count }, (_, i) => base + Math.round((i * SPREAD_MS) / Math.max(1, count - 1)));
  const procs: Promise<number>[] = [];
  const arrivals = due.map((at, i) => {
    const id = `raw-${i}`;
    const arrival = fifo.waitFor(id, at - performance.now() + STEP_TIMEOUT_MS);
    setTimeout(() => {
      procs.push(rawSpawn(command, id).exited);
    }, at - performance.now());
    return arrival.then((t) => t - at);
  });
  const lateness = await Promise.all(arrivals);
  const codes = await Promise.all(procs);
  if (codes.some((code) => code !== 0)) throw new Error(`raw spawns exited with ${codes.filter((c) => c !== 0).join(", ")}`);
  return lateness;
}

export const precision: Bench = { name: "precision", run };
