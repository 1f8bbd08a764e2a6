// Rescue time: how long after a worker dies (SIGKILL) or freezes (SIGSTOP) its task starts
// again on another worker. One coordinator, one scheduler and two workers with one slot each
// run as real processes with the product's heartbeat settings. Each trial runs a task that
// signals the FIFO when an attempt's shell starts and then waits for a gate; the bench kills
// or freezes the worker holding it and times until the next attempt signals.
import { chmodSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { watchTask } from "../test/support/http";
import type { RoleProcess } from "../test/support/processes";
import {
  type Bench,
  type BenchCluster,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  type Distribution,
  distribution,
  FifoSignals,
  ms,
  quartet,
  Scope,
  startBenchCluster,
  within,
} from "./support";

const FULL = { trials: 20 };
const QUICK = { trials: 2 };
const HEARTBEAT_INTERVAL_MS = 1000;
const HEARTBEAT_TIMEOUT_MS = 3000;
const STEP_TIMEOUT_MS = 15_000;

type Fault = "crash" | "freeze";

async function workerIds(workers: RoleProcess[]): Promise<Map<string, RoleProcess>> {
  const entries = await Promise.all(workers.map(async (w) => [String((await w.waitForEvent("worker.starting")).id), w] as const));
  return new Map(entries);
}

/** One trial: returns ms from the fault to the next attempt's shell starting. */
async function trial(cluster: BenchCluster, fifo: FifoSignals, fault: Fault, gateDir: string, i: number): Promise<number> {
  const gate = join(gateDir, `${fault}-${i}`);
  // The first attempt signals "<id>-1", any later one "<id>-again": the rescue is whichever
  // attempt runs next.
  const signal = `if [ "$TQ_TASK_ATTEMPT" = 1 ]; then echo "$TQ_TASK_ID-1"; else echo "$TQ_TASK_ID-again"; fi > '${fifo.path}'`;
  const response = await fetch(`${cluster.coordinatorUrl}/submit`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ command: `${signal}; while [ ! -e '${gate}' ]; do sleep 0.01; done` }),
  });
  if (response.status !== 201) throw new Error(`POST /submit answered ${response.status}: ${await response.text()}`);
  const { id } = (await response.json()) as { id: string };
  await fifo.waitFor(`${id}-1`, STEP_TIMEOUT_MS);
  const task = (await (await fetch(`${cluster.coordinatorUrl}/tasks/${id}`)).json()) as { worker_id: string };
  const victim = (await workerIds(cluster.workers)).get(task.worker_id);
  if (!victim) throw new Error(`task ${id} runs on unknown worker ${task.worker_id}`);

  const faultAt = performance.now();
  victim.kill(fault === "crash" ? "SIGKILL" : "SIGSTOP");
  const restartedAt = await fifo.waitFor(`${id}-again`, STEP_TIMEOUT_MS);

  // Put things back: release the task, bring the worker back, and wait until it is done.
  writeFileSync(gate, "");
  if (fault === "crash") {
    cluster.workers.splice(cluster.workers.indexOf(victim), 1);
    await victim.exited;
    await cluster.addWorker();
  } else {
    const connects = victim.logged("worker.connected").length;
    victim.kill("SIGCONT");
    await victim.waitFor(
      (l) => l.event === "worker.connected" && victim.logged("worker.connected").length > connects,
      "a reconnect after SIGCONT",
      STEP_TIMEOUT_MS,
    );
  }
  await within(watchTask(cluster.coordinatorUrl, id), STEP_TIMEOUT_MS, `task ${id} to finish`);
  return restartedAt - faultAt;
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const { trials } = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`failover: ${line}`));
    console.log(`failover: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const fifo = FifoSignals.open(scope);
    const gateDir = mkdtempSync(join(tmpdir(), "tq-bench-gates-"));
    // Tasks may run as their slots' own users, who must see the gates appear.
    chmodSync(gateDir, 0o711);
    scope.defer("remove the gates", () => existsSync(gateDir) && rmSync(gateDir, { recursive: true, force: true }));
    const roleEnv = {
      TQ_HEARTBEAT_INTERVAL_MS: String(HEARTBEAT_INTERVAL_MS),
      TQ_HEARTBEAT_TIMEOUT_MS: String(HEARTBEAT_TIMEOUT_MS),
      TQ_LOG_LEVEL: "info",
    };
    const cluster = await startBenchCluster(scope, db.url, { workers: 2, slots: 1, env: roleEnv });
    // A frozen worker is thawed before the scope stops it, so that SIGTERM can land.
    scope.defer("thaw workers", () => {
      for (const w of cluster.workers) w.kill("SIGCONT");
    });
    console.log(`failover: cluster up; ${trials} trials each of SIGKILL and SIGSTOP`);

    const samples: Record<Fault, number[]> = { crash: [], freeze: [] };
    try {
      for (const fault of ["crash", "freeze"] as const) {
        for (let i = 0; i < trials; i++) samples[fault].push(await trial(cluster, fifo, fault, gateDir, i));
      }
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new Error(`${message}\nrole process logs:\n${cluster.logs()}`);
    }
    const crash = distribution(samples.crash);
    const freeze = distribution(samples.freeze);
    const freezeOverTimeout: Distribution = distribution(samples.freeze.map((x) => x - HEARTBEAT_TIMEOUT_MS));
    console.log("\nfault -> task running again on the other worker (ms)");
    console.log(`  SIGKILL  p50 ${ms(crash.p50)}  p99 ${ms(crash.p99)}  max ${ms(crash.max)}  (n=${crash.n})`);
    console.log(
      `  SIGSTOP  p50 ${ms(freeze.p50)}  p99 ${ms(freeze.p99)}  max ${ms(freeze.max)}  (n=${freeze.n}; heartbeat timeout ${HEARTBEAT_TIMEOUT_MS} ms)`,
    );
    return {
      name: "failover",
      description:
        "Rescue time: from SIGKILL or SIGSTOP of the worker running a task to the task's next attempt starting on the other worker.",
      settings: {
        trials_per_fault: trials,
        processes: { coordinator: 1, scheduler: 1, workers: 2, worker_slots: 1 },
        role_env: roleEnv,
        start_observed_by: "the attempt's shell writing to a FIFO the bench reads",
        database: db.postgres.source,
      },
      figures: { crash_rescue: crash, freeze_rescue: freeze, freeze_rescue_over_heartbeat_timeout: freezeOverTimeout },
      summary: [
        { metric: "crash rescue: SIGKILL → task running elsewhere", value: quartet(crash) },
        {
          metric: `freeze rescue: SIGSTOP → task running elsewhere (heartbeat timeout ${HEARTBEAT_TIMEOUT_MS} ms)`,
          value: quartet(freeze),
        },
      ],
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const failover: Bench = { name: "failover", run };
