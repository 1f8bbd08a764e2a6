// bun bench/watchdog-cost.ts [tasks]: what the worker's watchdog costs. For TQ_WORKER_WATCHDOG
// on, lean and off, one worker (4 slots, product heartbeat timings) burns down `tasks` (2000) `true`
// tasks; the CPU time of the watchdog and of the worker over the burn-down (utime+stime from
// /proc/<pid>/stat) and their RSS (VmRSS, VmHWM from /proc/<pid>/status) are printed, and the
// watchdog's CPU over 10 s idle. Not a registered bench: a measurement for the record.
import { readFileSync } from "node:fs";
import postgres from "postgres";
import type { RoleProcess } from "../test/support/processes";
import {
  closeAllScopes,
  createBenchDatabase,
  PRODUCT_ROLE_ENV,
  Scope,
  startBenchCluster,
  submitBatch,
  untilAllFinal,
} from "./support";

const TASKS = Number(process.argv[2] ?? 2000);
const TICK_US = 1_000_000 / 100; // USER_HZ

function cpuUs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * TICK_US;
}

function memoryKb(pid: number): { rss: number; hwm: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const field = (name: string) => Number(new RegExp(`${name}:\\s+(\\d+)`).exec(status)?.[1] ?? Number.NaN);
  return { rss: field("VmRSS"), hwm: field("VmHWM") };
}

async function workerPids(worker: RoleProcess): Promise<{ worker: number; watchdog: number | null }> {
  const pid = Number((await worker.waitForEvent("worker.starting")).pid);
  const started =
    worker.logged("watchdog.started")[0] ??
    (await worker.waitForEvent("watchdog.started", { timeoutMs: 5000 }).catch(() => null));
  return { worker: pid, watchdog: started ? Number(started.watchdog_pid) : null };
}

async function run(mode: "on" | "lean" | "off"): Promise<void> {
  const scope = new Scope();
  try {
    const database = await createBenchDatabase(scope);
    const cluster = await startBenchCluster(scope, database.url, {
      workers: 1,
      slots: 4,
      env: { ...PRODUCT_ROLE_ENV, TQ_WORKER_WATCHDOG: mode, TQ_LOG_LEVEL: "info" },
    });
    const pids = await workerPids(cluster.workers[0]!);
    const sql = postgres(database.url, { max: 2, onnotice: () => {} });
    scope.defer("close sql", () => sql.end({ timeout: 5 }));
    const idleFrom = pids.watchdog ? cpuUs(pids.watchdog) : 0;
    const idleWorkerFrom = cpuUs(pids.worker);
    await Bun.sleep(10_000);
    const idleWatchdog = pids.watchdog ? cpuUs(pids.watchdog) - idleFrom : 0;
    const idleWorker = cpuUs(pids.worker) - idleWorkerFrom;
    const before = { worker: cpuUs(pids.worker), watchdog: pids.watchdog ? cpuUs(pids.watchdog) : 0 };
    const start = performance.now();
    for (let done = 0; done < TASKS; done += 1000) {
      await submitBatch(
        cluster.coordinatorUrl,
        Array.from({ length: Math.min(1000, TASKS - done) }, () => ({ command: "true" })),
      );
    }
    await untilAllFinal(sql, 50, 300_000);
    const wallMs = performance.now() - start;
    const worker = cpuUs(pids.worker) - before.worker;
    const watchdog = pids.watchdog ? cpuUs(pids.watchdog) - before.watchdog : 0;
    const memory = pids.watchdog ? memoryKb(pids.watchdog) : null;
    console.log(
      JSON.stringify({
        mode,
        tasks: TASKS,
        wall_ms: Math.round(wallMs),
        worker_cpu_ms: Math.round(worker / 1000),
        worker_cpu_us_per_task: Math.round(worker / TASKS),
        watchdog_cpu_ms: Math.round(watchdog / 1000),
        watchdog_cpu_us_per_task: Math.round(watchdog / TASKS),
        idle_10s_watchdog_cpu_ms: Math.round(idleWatchdog / 1000),
        idle_10s_worker_cpu_ms: Math.round(idleWorker / 1000),
        watchdog_rss_kb: memory?.rss ?? null,
        watchdog_peak_rss_kb: memory?.hwm ?? null,
        worker_rss_kb: memoryKb(pids.worker).rss,
      }),
    );
  } finally {
    await scope.close();
  }
}

for (const mode of ["on", "lean", "off"] as const) await run(mode);
await closeAllScopes();
