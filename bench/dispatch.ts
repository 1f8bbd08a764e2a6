// Dispatch latency, open loop: tasks are submitted at a fixed rate whatever happens to earlier
// ones (no coordinated omission), over HTTP at several rates and once over gRPC SubmitTask.
// Per task: submit-call start to the task's shell running (it writes its id to a FIFO the
// bench reads), and to the result being recorded (completed_at, by the database's clock, at
// millisecond resolution). In the same run, raw Bun.spawn of the same shell at the same rates
// gives the ceiling.
import * as grpc from "@grpc/grpc-js";
import postgres from "postgres";
import { TaskService } from "../src/gen/taskqueue/v1/task_service_pb";
import { clientConstructor } from "../src/rpc/definitions";
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
} from "./support";

const FULL = { rates: [20, 50, 100, 300], seconds: 5, grpcRate: 100 };
const QUICK = { rates: [20], seconds: 1, grpcRate: 20 };
const WORKERS = 2;
const SLOTS = 8;
const STEP_TIMEOUT_MS = 15_000;

interface Series {
  rate: number;
  via: "http" | "grpc" | "raw";
  start: Distribution;
  completed: Distribution | null;
  submitted: number;
}

/** Calls `fire(i)` at `rate` per second for `seconds`, on schedule, never waiting for a call. */
async function openLoop(rate: number, seconds: number, fire: (i: number) => Promise<void>): Promise<void> {
  const count = Math.round(rate * seconds);
  const began = performance.now();
  const calls: Promise<void>[] = [];
  for (let i = 0; i < count; i++) {
    const due = began + (i * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 1) await Bun.sleep(wait);
    calls.push(fire(i));
  }
  await Promise.all(calls);
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const plan = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`dispatch: ${line}`));
    const fifo = FifoSignals.open(scope);
    const roleEnv = PRODUCT_ROLE_ENV;
    const cluster = await startBenchCluster(scope, db.url, { workers: WORKERS, slots: SLOTS, env: roleEnv });
    const sql = postgres(db.url, { max: 2, onnotice: () => {} });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));
    const grpcAddress = cluster.processes[0]!.logged("coordinator.started")[0]?.grpcAddress;
    const TaskClient = clientConstructor(TaskService);
    const grpcClient = new TaskClient(String(grpcAddress), grpc.credentials.createInsecure()) as grpc.Client &
      Record<string, Function>;
    scope.defer("close the gRPC client", () => grpcClient.close());
    const command = fifo.command();
    const body = JSON.stringify({ command });

    /** Submits at `rate` for the planned time; returns start and completion latencies. */
    const measure = async (rate: number, via: "http" | "grpc"): Promise<Series> => {
      const submittedAt = new Map<string, { mono: number; wall: number }>();
      const starts: number[] = [];
      await openLoop(rate, plan.seconds, async () => {
        const mono = performance.now();
        const wall = Date.now();
        let id: string;
        if (via === "http") {
          const response = await fetch(`${cluster.coordinatorUrl}/submit`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body,
          });
          if (response.status !== 201) throw new Error(`POST /submit answered ${response.status}: ${await response.text()}`);
          id = ((await response.json()) as { id: string }).id;
        } else {
          id = await new Promise<string>((resolve, reject) =>
            grpcClient.submitTask!({ command }, (error: grpc.ServiceError | null, answer: { task: { id: string } }) =>
              error ? reject(error) : resolve(answer.task.id),
            ),
          );
        }
        submittedAt.set(id, { mono, wall });
        const started = await fifo.waitFor(id, STEP_TIMEOUT_MS);
        starts.push(started - mono);
      });
      // Results are recorded a moment after the shell ran: wait until all are.
      const ids = [...submittedAt.keys()];
      const deadline = performance.now() + STEP_TIMEOUT_MS;
      let rows: { id: string; completed_at: Date | null }[] = [];
      for (;;) {
        rows = await sql<{ id: string; completed_at: Date | null }[]>`
          SELECT id::text AS id, completed_at FROM tasks WHERE id::text IN ${sql(ids)}`;
        if (rows.every((r) => r.completed_at) || performance.now() > deadline) break;
        await Bun.sleep(50);
      }
      const completed = rows.filter((r) => r.completed_at).map((r) => r.completed_at!.getTime() - submittedAt.get(r.id)!.wall);
      if (completed.length !== ids.length)
        throw new Error(`${ids.length - completed.length} of ${ids.length} tasks did not complete`);
      return { rate, via, start: distribution(starts), completed: distribution(completed), submitted: ids.length };
    };

    /** The ceiling: Bun.spawn of the same shell at the same rate, spawn call to FIFO line. */
    const raw = async (rate: number): Promise<Series> => {
      const starts: number[] = [];
      let n = 0;
      await openLoop(rate, plan.seconds, async () => {
        const id = `raw-${rate}-${n++}`;
        const began = performance.now();
        const child = rawSpawn(command, id);
        starts.push((await fifo.waitFor(id, STEP_TIMEOUT_MS)) - began);
        await child.exited;
      });
      return { rate, via: "raw", start: distribution(starts), completed: null, submitted: starts.length };
    };

    const series: Series[] = [];
    try {
      // Warm up every path first.
      await measure(10, "http");
      await measure(10, "grpc");
      for (const rate of plan.rates) {
        series.push(await raw(rate));
        series.push(await measure(rate, "http"));
      }
      series.push(await raw(plan.grpcRate));
      series.push(await measure(plan.grpcRate, "grpc"));
    } catch (error) {
      throw new Error(`${error instanceof Error ? error.message : String(error)}\nrole process logs:\n${cluster.logs()}`);
    }

    console.log("\nsubmit -> shell running, open loop (ms)");
    console.log("  rate/s  via    n      p50     p90     p99     max    | completed p50   p99");
    for (const s of series) {
      const c = s.completed;
      console.log(
        `  ${String(s.rate).padStart(6)}  ${s.via.padEnd(5)} ${String(s.submitted).padStart(5)}  ${ms(s.start.p50).padStart(6)}  ${ms(s.start.p90).padStart(6)}  ${ms(s.start.p99).padStart(6)}  ${ms(s.start.max).padStart(6)}  | ${c ? `${ms(c.p50).padStart(6)}  ${ms(c.p99).padStart(6)}` : "   -"}`,
      );
    }
    const summary: SummaryRow[] = series.map((s) => ({
      metric: `submit→start at ${s.rate}/s, ${s.via === "raw" ? "raw Bun.spawn ceiling" : s.via === "http" ? "HTTP POST /submit (coordinator)" : "gRPC SubmitTask"}`,
      value: quartet(s.start),
    }));
    return {
      name: "dispatch",
      description:
        "Open-loop submit-to-start latency at fixed rates: submit call to the task's shell writing to a FIFO; completion by completed_at.",
      settings: {
        rates: plan.rates,
        seconds_per_rate: plan.seconds,
        grpc_rate: plan.grpcRate,
        processes: { coordinator: 1, scheduler: 1, workers: WORKERS, worker_slots: SLOTS },
        role_env: roleEnv,
        submit: "POST /submit to the coordinator (its fast path hands the task to a free local slot)",
        database: db.postgres.source,
      },
      figures: { series },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const dispatch: Bench = { name: "dispatch", run };
