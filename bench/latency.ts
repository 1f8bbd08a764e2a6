// Submit-to-start latency on an idle system. One coordinator, one scheduler and one worker
// (2 slots) run as real processes; tasks are submitted one at a time, each after the previous
// one finished. A task's command writes its id to a FIFO the bench reads, so "started" is the
// moment the shell itself runs, not what any role reports. The same write from a bare
// Bun.spawn gives the ceiling: what no queue can beat on this machine.
import { type TaskJson, watchTask } from "../test/support/http";
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

const FULL = { tasks: 100, warmup: 10 };
const QUICK = { tasks: 10, warmup: 3 };
const WORKER_SLOTS = 2;
/** A step slower than this is a fault to report, not a figure. */
const STEP_TIMEOUT_MS = 10_000;

interface QueueSamples {
  /** POST /submit call until the FIFO line of the task arrived. */
  start: number[];
  /** POST /submit call until GET /tasks/:id/events showed the final state. */
  finished: number[];
  /** POST /submit call until its 201 body was read. */
  response: number[];
  /** From the task's own timestamps (millisecond resolution, server clocks). */
  createdToPicked: number[];
  pickedToStarted: number[];
  startedToCompleted: number[];
}

interface SeriesFigures {
  submit_to_start: Distribution;
  submit_to_finished: Distribution;
  submit_response: Distribution;
  /** Timeline of the task rows: created_at -> picked_at -> started_at -> completed_at. */
  server_created_to_picked: Distribution;
  server_picked_to_started: Distribution;
  server_started_to_completed: Distribution;
  /** submit_to_start p50 over the raw ceiling's p50, and their difference in ms. */
  p50_ratio_to_raw: number;
  p50_over_raw_ms: number;
}

function elapsed(task: TaskJson, from: string, to: string): number {
  const a = task[from];
  const b = task[to];
  if (typeof a !== "string" || typeof b !== "string") {
    throw new Error(`task ${task.id} has no ${typeof a === "string" ? to : from}: ${JSON.stringify(task)}`);
  }
  return Date.parse(b) - Date.parse(a);
}

/** Submits `warmup + count` tasks one at a time to `baseUrl`; the first `warmup` are untimed. */
async function measureQueue(baseUrl: string, fifo: FifoSignals, count: number, warmup: number): Promise<QueueSamples> {
  const samples: QueueSamples = {
    start: [],
    finished: [],
    response: [],
    createdToPicked: [],
    pickedToStarted: [],
    startedToCompleted: [],
  };
  const body = JSON.stringify({ command: fifo.command() });
  for (let i = 0; i < warmup + count; i++) {
    const before = performance.now();
    const response = await within(
      fetch(`${baseUrl}/submit`, { method: "POST", headers: { "content-type": "application/json" }, body }),
      STEP_TIMEOUT_MS,
      `POST ${baseUrl}/submit`,
    );
    const answer = (await response.json()) as { id?: unknown };
    const answered = performance.now();
    if (response.status !== 201 || typeof answer.id !== "string") {
      throw new Error(`POST ${baseUrl}/submit answered ${response.status}: ${JSON.stringify(answer)}`);
    }
    const id = answer.id;
    const started = await fifo.waitFor(id, STEP_TIMEOUT_MS);
    const task = await watchTask(baseUrl, id, undefined, STEP_TIMEOUT_MS);
    const finished = performance.now();
    if (task.state !== "succeeded") throw new Error(`task ${id} ended ${task.state}: ${JSON.stringify(task)}`);
    if (i < warmup) continue;
    samples.start.push(started - before);
    samples.finished.push(finished - before);
    samples.response.push(answered - before);
    samples.createdToPicked.push(elapsed(task, "created_at", "picked_at"));
    samples.pickedToStarted.push(elapsed(task, "picked_at", "started_at"));
    samples.startedToCompleted.push(elapsed(task, "started_at", "completed_at"));
  }
  return samples;
}

/**
 * The ceiling: the same command from Bun.spawn with the worker's executor options (own
 * process group, piped output), from the spawn call to the FIFO line.
 */
async function measureRaw(fifo: FifoSignals, count: number, warmup: number): Promise<number[]> {
  const samples: number[] = [];
  const command = fifo.command();
  for (let i = 0; i < warmup + count; i++) {
    const id = `raw-${i}`;
    const before = performance.now();
    const proc = rawSpawn(command, id);
    const started = await fifo.waitFor(id, STEP_TIMEOUT_MS);
    const code = await within(proc.exited, STEP_TIMEOUT_MS, `exit of raw spawn ${id}`);
    if (code !== 0) throw new Error(`raw spawn ${id} exited ${code}: ${await new Response(proc.stderr).text()}`);
    if (i >= warmup) samples.push(started - before);
  }
  return samples;
}

function seriesFigures(samples: QueueSamples, raw: Distribution): SeriesFigures {
  const start = distribution(samples.start);
  return {
    submit_to_start: start,
    submit_to_finished: distribution(samples.finished),
    submit_response: distribution(samples.response),
    server_created_to_picked: distribution(samples.createdToPicked),
    server_picked_to_started: distribution(samples.pickedToStarted),
    server_started_to_completed: distribution(samples.startedToCompleted),
    p50_ratio_to_raw: Math.round((start.p50 / raw.p50) * 100) / 100,
    p50_over_raw_ms: Math.round((start.p50 - raw.p50) * 1000) / 1000,
  };
}

function printTable(rows: [string, Distribution][]): void {
  const head = ["", "n", "p50", "p90", "p99", "max"];
  const body = rows.map(([label, d]) => [label, String(d.n), ms(d.p50), ms(d.p90), ms(d.p99), ms(d.max)]);
  const widths = head.map((_, c) => Math.max(head[c]!.length, ...body.map((r) => r[c]!.length)));
  const line = (cells: string[]) =>
    cells.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join("  ");
  console.log(line(head));
  for (const row of body) console.log(line(row));
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const { tasks, warmup } = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`latency: ${line}`));
    console.log(`latency: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const fifo = FifoSignals.open(scope);

    const roleEnv = PRODUCT_ROLE_ENV;
    const cluster = await startBenchCluster(scope, db.url, { workers: 1, slots: WORKER_SLOTS, env: roleEnv });
    console.log(
      `latency: cluster up (coordinator ${cluster.coordinatorUrl}, scheduler ${cluster.schedulerUrl}); ${warmup} warm-up + ${tasks} timed tasks per series`,
    );

    let raw: number[];
    let viaCoordinator: QueueSamples;
    let viaScheduler: QueueSamples;
    try {
      raw = await measureRaw(fifo, tasks, warmup);
      viaCoordinator = await measureQueue(cluster.coordinatorUrl, fifo, tasks, warmup);
      viaScheduler = await measureQueue(cluster.schedulerUrl, fifo, tasks, warmup);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new Error(`${message}\nrole process logs:\n${cluster.logs()}`);
    }

    const rawDist = distribution(raw);
    const coordinator = seriesFigures(viaCoordinator, rawDist);
    const scheduler = seriesFigures(viaScheduler, rawDist);

    console.log("\nsubmit -> shell running (ms)");
    printTable([
      ["raw Bun.spawn (ceiling)", rawDist],
      ["coordinator POST /submit", coordinator.submit_to_start],
      ["scheduler POST /submit", scheduler.submit_to_start],
    ]);
    console.log("\nsubmit -> final state seen on GET /tasks/:id/events (ms)");
    printTable([
      ["coordinator", coordinator.submit_to_finished],
      ["scheduler", scheduler.submit_to_finished],
    ]);
    console.log("\nPOST /submit -> 201 read (ms)");
    printTable([
      ["coordinator", coordinator.submit_response],
      ["scheduler", scheduler.submit_response],
    ]);
    console.log("\ntask row timeline, server clocks, ms resolution (ms)");
    printTable([
      ["coordinator created -> picked", coordinator.server_created_to_picked],
      ["coordinator picked -> started", coordinator.server_picked_to_started],
      ["scheduler created -> picked", scheduler.server_created_to_picked],
      ["scheduler picked -> started", scheduler.server_picked_to_started],
    ]);
    console.log(
      `\np50 vs raw: coordinator x${coordinator.p50_ratio_to_raw} (+${ms(coordinator.p50_over_raw_ms)} ms), ` +
        `scheduler x${scheduler.p50_ratio_to_raw} (+${ms(scheduler.p50_over_raw_ms)} ms)`,
    );

    const summary: SummaryRow[] = [
      { metric: "submit→start, raw Bun.spawn ceiling (p50 / p90 / p99 / max)", value: quartet(rawDist) },
      { metric: "submit→start, coordinator POST /submit (fast path)", value: quartet(coordinator.submit_to_start) },
      { metric: "submit→start, scheduler POST /submit (NOTIFY + claim)", value: quartet(scheduler.submit_to_start) },
      {
        metric: "submit→start p50 over raw: coordinator / scheduler",
        value: `×${coordinator.p50_ratio_to_raw} (+${ms(coordinator.p50_over_raw_ms)} ms) / ×${scheduler.p50_ratio_to_raw} (+${ms(scheduler.p50_over_raw_ms)} ms)`,
      },
      { metric: "submit→finished seen over SSE, coordinator", value: quartet(coordinator.submit_to_finished) },
      { metric: "submit→finished seen over SSE, scheduler", value: quartet(scheduler.submit_to_finished) },
    ];
    return {
      name: "latency",
      description:
        "Submit-to-start latency on an idle system: tasks submitted one at a time, start = the task's shell writing its id to a FIFO the bench reads.",
      settings: {
        tasks_per_series: tasks,
        warmup_per_series: warmup,
        processes: { coordinator: 1, scheduler: 1, workers: 1, worker_slots: WORKER_SLOTS },
        role_env: roleEnv,
        command: 'echo "$TQ_TASK_ID" > <fifo>',
        finished_observed_by: "GET /tasks/:id/events, opened once the task had started",
        raw_spawn: "Bun.spawn sh -c, stdin ignore, stdout/stderr pipe, detached (as the executor)",
        database: db.postgres.source,
      },
      figures: { raw_spawn_to_start: rawDist, coordinator, scheduler },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const latency: Bench = { name: "latency", run };
