// Control-plane capacity: how many tasks per second one coordinator and PostgreSQL complete end
// to end when the workers cost nothing. The workers are the no-op fleet (bench/support/
// noop-fleet.ts: real Worker streams, heartbeats, leases, Started/Finished/Ack, but each
// assignment exits 0 at once without spawning) in a process of its own. Two series, each timed
// from the first submit until a poll finds no task unfinished:
//   - batch: POST /tasks/batch of 1000 tasks, 4 requests in flight;
//   - single: POST /tasks, one task per request, from 64 connections (fetch loops).
// CPU per task of the coordinator, the fleet and the PostgreSQL cluster (an embedded server of
// the bench's own, so that its backends are ours alone) is read from /proc over each series.
import { connect } from "../src/db/sql";
import { databaseWork } from "./cost";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  PRODUCT_ROLE_ENV,
  requireAllSucceeded,
  Scope,
  type SummaryRow,
  startBenchCluster,
  submitBatch,
  untilAllFinal,
  within,
} from "./support";
import { spawnNoopFleet } from "./support/noop-fleet";
import { cpuPer, postmasterPid, sampleCpu } from "./support/proc-cpu";

const FULL = { batchTasks: 60_000, singleTasks: 15_000, warmup: 2000 };
const QUICK = { batchTasks: 4000, singleTasks: 1000, warmup: 200 };
const FLEET = { workers: 8, slots: 128 };
const BATCH = 1000;
const BATCH_IN_FLIGHT = 4;
const CONNECTIONS = 64;
const POLL_MS = 20;
/** From the project's goals (issue 16): shown beside the figures, not asserted. */
const TARGETS = { batch_tasks_per_s: 15_000, single_tasks_per_s: 3_000 };

const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

async function postOne(baseUrl: string): Promise<void> {
  const response = await fetch(`${baseUrl}/tasks`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: '{"command":"true"}',
  });
  if (response.status !== 201)
    throw new Error(`POST /tasks answered ${response.status}: ${(await response.text()).slice(0, 300)}`);
  await response.arrayBuffer();
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const { batchTasks, singleTasks, warmup } = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    // An embedded server of our own: its CPU is the queue's alone.
    const db = await createBenchDatabase(scope, (line) => console.log(`control-plane: ${line}`), {
      shared_preload_libraries: "pg_stat_statements",
    });
    const cluster = await startBenchCluster(scope, db.url, {
      workers: 0,
      slots: 1,
      env: { ...PRODUCT_ROLE_ENV },
    });
    const coordinator = cluster.processes[0]!;
    const started = coordinator.lines.find((l) => l.event === "coordinator.started");
    const grpc = String(started?.grpcAddress ?? "");
    const fleet = spawnNoopFleet({ address: grpc, workers: FLEET.workers, slots: FLEET.slots });
    scope.defer("stop the no-op fleet", () => fleet.stop());
    await within(fleet.ready, 60_000, "the no-op fleet's start");
    const sql = connect(db.url, { max: 1, applicationName: "bench-control-plane" });
    scope.defer("close the bench's connection", () => sql.end({ timeout: 5 }));
    const roles = { coordinator: coordinator.pid, fleet: fleet.proc.pid };
    const postmaster = postmasterPid(db.dataDir!);
    const url = cluster.coordinatorUrl;

    const batches = async (count: number) => {
      let next = 0;
      const lane = async () => {
        while (next < count) {
          const n = Math.min(BATCH, count - next);
          next += n;
          await submitBatch(
            url,
            Array.from({ length: n }, () => ({ command: "true" })),
          );
        }
      };
      await Promise.all(Array.from({ length: BATCH_IN_FLIGHT }, lane));
    };
    const singles = async (count: number) => {
      let next = 0;
      const lane = async () => {
        while (next < count) {
          next++;
          await postOne(url);
        }
      };
      await Promise.all(Array.from({ length: CONNECTIONS }, lane));
    };
    await sql`CREATE EXTENSION IF NOT EXISTS pg_stat_statements`;
    const series = async (name: string, count: number, submit: (n: number) => Promise<void>) => {
      await sql`SELECT pg_stat_statements_reset()`;
      await sql`SELECT pg_stat_reset()`;
      const before = sampleCpu(roles, postmaster);
      await submit(count);
      const submitted = performance.now();
      await untilAllFinal(sql, POLL_MS, 60_000 + count * 5);
      const after = sampleCpu(roles, postmaster);
      const elapsed = after.at - before.at;
      await Bun.sleep(600);
      const database = await databaseWork(sql, count);
      const result = {
        tasks: count,
        elapsed_ms: Math.round(elapsed),
        submit_ms: Math.round(submitted - before.at),
        tasks_per_s: round((count / elapsed) * 1000),
        submitted_per_s: round((count / (submitted - before.at)) * 1000),
        cpu_ms_per_task: cpuPer(before, after, count),
        database,
      };
      const { database: _, ...brief } = result;
      console.log(`control-plane ${name}: ${JSON.stringify(brief)}`);
      console.log(`  db per task: commits ${database.commits_per_task}, tuples read ${database.tuples_read_per_task}`);
      for (const s of database.statements.slice(0, 8))
        console.log(
          `    ${s.calls_per_task} calls ${s.exec_ms_per_task} ms ${s.rows_per_call} rows/call  ${s.query.slice(0, 120)}`,
        );
      return result;
    };
    await batches(warmup);
    await untilAllFinal(sql, POLL_MS, 60_000);
    let batch: Awaited<ReturnType<typeof series>>;
    let single: Awaited<ReturnType<typeof series>>;
    try {
      batch = await series("batch", batchTasks, batches);
      single = await series("single", singleTasks, singles);
    } catch (error) {
      throw new Error(`${error instanceof Error ? error.message : String(error)}\n${cluster.logs()}`);
    }
    const report = await requireAllSucceeded(sql);
    const summary: SummaryRow[] = [
      {
        metric: `control plane, batch submits (${BATCH}/request, ${BATCH_IN_FLIGHT} in flight) → all final, no-op fleet ${FLEET.workers}×${FLEET.slots} (target ≥ ${TARGETS.batch_tasks_per_s}/s)`,
        value: `${batch.tasks_per_s} tasks/s; CPU ms/task coordinator ${batch.cpu_ms_per_task.coordinator}, PostgreSQL ${batch.cpu_ms_per_task.postgres}, fleet ${batch.cpu_ms_per_task.fleet}`,
      },
      {
        metric: `control plane, one task per POST /tasks over ${CONNECTIONS} connections → all final (target ≥ ${TARGETS.single_tasks_per_s}/s)`,
        value: `${single.tasks_per_s} tasks/s (submitted at ${single.submitted_per_s}/s); CPU ms/task coordinator ${single.cpu_ms_per_task.coordinator}, PostgreSQL ${single.cpu_ms_per_task.postgres}`,
      },
    ];
    return {
      name: "control-plane",
      description:
        "Control-plane capacity: tasks/s one coordinator and PostgreSQL complete end to end with no-op workers (real protocol, nothing spawned), from batch submits and from one task per HTTP request over 64 connections, with CPU per task from /proc.",
      settings: {
        batch_tasks: batchTasks,
        single_tasks: singleTasks,
        warmup,
        fleet: FLEET,
        batch: BATCH,
        batch_in_flight: BATCH_IN_FLIGHT,
        connections: CONNECTIONS,
        submitted_to: "coordinator HTTP",
        database: "embedded PostgreSQL of the bench's own",
        role_env: PRODUCT_ROLE_ENV,
        targets: TARGETS,
      },
      figures: { batch, single, states: report.states },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const controlPlane: Bench = { name: "control-plane", run };
