// Fleet size: what many connected workers cost one coordinator and PostgreSQL. The workers are
// the no-op fleet (bench/support/noop-fleet.ts: real streams, Hello, heartbeats, lease
// renewals; nothing spawned) in a process of its own, first 1 worker, then 2,000 (200 in the
// quick run), all of one slot. For each: over a quiet window, the database statements per
// heartbeat interval (pg_stat_statements: they should not grow with the workers), the
// coordinator's CPU (ms/s) and RSS; then dispatch latency, one task at a time submitted by
// POST /tasks once the previous one has succeeded, from just before the request to the no-op
// run on a worker (the fleet stamps it with the host's wall clock, sub-ms).
import { readFileSync } from "node:fs";
import { connect, type Sql } from "../src/db/sql";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  distribution,
  PRODUCT_ROLE_ENV,
  quartet,
  Scope,
  type SummaryRow,
  startBenchCluster,
  within,
} from "./support";
import { spawnNoopFleet } from "./support/noop-fleet";
import { idleSample, postmasterPid } from "./support/proc-cpu";

const FULL = { workers: 2000, idleMs: 10_000, tasks: 300 };
const QUICK = { workers: 200, idleMs: 3000, tasks: 40 };
const HEARTBEAT_MS = Number(PRODUCT_ROLE_ENV.TQ_HEARTBEAT_INTERVAL_MS);
/** From the project's goals (issue 16), shown beside the figures, not asserted. */
const TARGETS = { dispatch_p50_within: 1.5 };

function rssBytes(pid: number): number {
  const line = readFileSync(`/proc/${pid}/status`, "utf8")
    .split("\n")
    .find((l) => l.startsWith("VmRSS:"));
  return Number(line?.split(/\s+/)[1] ?? 0) * 1024;
}

async function statementsPerInterval(sql: Sql, windowMs: number) {
  const rows = await sql<{ query: string; calls: number }[]>`
    SELECT regexp_replace(query, '\\s+', ' ', 'g') AS query, calls::float8 AS calls FROM pg_stat_statements
    WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND query NOT LIKE '%pg_stat_statements%' ORDER BY calls DESC`;
  const intervals = windowMs / HEARTBEAT_MS;
  const total = rows.reduce((sum, r) => sum + r.calls, 0);
  return {
    per_interval: Math.round((total / intervals) * 10) / 10,
    top: rows
      .slice(0, 6)
      .map((r) => ({ per_interval: Math.round((r.calls / intervals) * 10) / 10, query: r.query.slice(0, 160) })),
  };
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const { workers, idleMs, tasks } = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`fleet: ${line}`), {
      shared_preload_libraries: "pg_stat_statements",
    });
    const cluster = await startBenchCluster(scope, db.url, { workers: 0, slots: 1, env: { ...PRODUCT_ROLE_ENV } });
    const coordinator = cluster.processes[0]!;
    const grpc = String(coordinator.lines.find((l) => l.event === "coordinator.started")?.grpcAddress ?? "");
    const sql = connect(db.url, { max: 1, applicationName: "bench-fleet" });
    scope.defer("close the bench's connection", () => sql.end({ timeout: 5 }));
    await sql`CREATE EXTENSION IF NOT EXISTS pg_stat_statements`;
    const postmaster = postmasterPid(db.dataDir!);

    const phase = async (size: number) => {
      const startedAt = performance.now();
      const fleet = spawnNoopFleet({ address: grpc, workers: size, slots: 1, reportRuns: true });
      try {
        await within(fleet.ready, 300_000, `a fleet of ${size} workers' start`);
        const connectMs = Math.round(performance.now() - startedAt);
        // A run may be stamped before its POST's answer is read: kept until asked for.
        const runs = new Map<string, (at: number) => void>();
        const arrived = new Map<string, number>();
        fleet.onLine((line) => {
          if (line.event !== "fleet.run") return;
          const waiter = runs.get(String(line.task));
          if (waiter) waiter(Number(line.at));
          else arrived.set(String(line.task), Number(line.at));
        });
        // Settle: every worker has sent its first heartbeats.
        await Bun.sleep(2 * HEARTBEAT_MS);
        await sql`SELECT pg_stat_statements_reset()`;
        const roles = { coordinator: coordinator.pid, fleet: fleet.proc.pid };
        const idle = await idleSample(roles, postmaster, idleMs);
        const windowMs = idle.after.at - idle.before.at;
        const statements = await statementsPerInterval(sql, windowMs);
        const perSecond = (name: string) =>
          Math.round((((idle.after.cpu[name] ?? 0) - (idle.before.cpu[name] ?? 0)) / windowMs) * 1000 * 10) / 10;
        const latencies: number[] = [];
        for (let i = 0; i < tasks; i++) {
          const before = performance.timeOrigin + performance.now();
          const response = await fetch(`${cluster.coordinatorUrl}/tasks`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: '{"command":"true"}',
          });
          const task = (await response.json()) as { id?: string };
          if (response.status !== 201 || !task.id) throw new Error(`POST /tasks answered ${response.status}`);
          const at = await within(
            new Promise<number>((resolve) => {
              const at = arrived.get(task.id!);
              if (at !== undefined) resolve(at);
              else runs.set(task.id!, resolve);
            }),
            30_000,
            `task ${task.id} run on the fleet`,
          );
          latencies.push(at - before);
          // The next one only once this one's slot is free again (its result recorded): with one
          // worker of one slot, the next would otherwise wait for this one's end.
          for (let tries = 0; ; tries++) {
            const [row] = await sql<{ state: string }[]>`SELECT state FROM tasks WHERE id = ${task.id}`;
            if (row?.state === "succeeded") break;
            if (tries > 10_000) throw new Error(`task ${task.id} did not succeed (${row?.state})`);
            await Bun.sleep(2);
          }
          await Bun.sleep(20);
        }
        const result = {
          workers: size,
          connect_ms: connectMs,
          statements_per_heartbeat_interval: statements.per_interval,
          top_statements: statements.top,
          coordinator_cpu_ms_per_s: perSecond("coordinator"),
          postgres_cpu_ms_per_s: perSecond("postgres"),
          fleet_cpu_ms_per_s: perSecond("fleet"),
          coordinator_rss_bytes: rssBytes(coordinator.pid),
          fleet_rss_bytes: rssBytes(fleet.proc.pid),
          dispatch: distribution(latencies),
        };
        console.log(
          `fleet of ${size}: ${statements.per_interval} statements/interval; coordinator ${result.coordinator_cpu_ms_per_s} ms/s, ` +
            `RSS ${(result.coordinator_rss_bytes / 2 ** 20).toFixed(1)} MiB; PostgreSQL ${result.postgres_cpu_ms_per_s} ms/s; ` +
            `dispatch ${quartet(result.dispatch)}`,
        );
        for (const s of statements.top) console.log(`    ${s.per_interval}/interval  ${s.query.slice(0, 120)}`);
        return result;
      } finally {
        await fleet.stop();
      }
    };
    const one = await phase(1);
    const many = await phase(workers);
    const thousands = (workers - 1) / 1000;
    const perThousand = {
      coordinator_cpu_ms_per_s:
        Math.round(((many.coordinator_cpu_ms_per_s - one.coordinator_cpu_ms_per_s) / thousands) * 10) / 10,
      coordinator_rss_mib: Math.round(((many.coordinator_rss_bytes - one.coordinator_rss_bytes) / 2 ** 20 / thousands) * 10) / 10,
      postgres_cpu_ms_per_s: Math.round(((many.postgres_cpu_ms_per_s - one.postgres_cpu_ms_per_s) / thousands) * 10) / 10,
      fleet_rss_mib: Math.round((many.fleet_rss_bytes / 2 ** 20 / (workers / 1000)) * 10) / 10,
    };
    const dispatchRatio = Math.round((many.dispatch.p50 / one.dispatch.p50) * 100) / 100;
    const summary: SummaryRow[] = [
      {
        metric: `fleet: database statements per heartbeat interval (${HEARTBEAT_MS} ms), 1 worker → ${workers} workers (O(1) wanted)`,
        value: `${one.statements_per_heartbeat_interval} → ${many.statements_per_heartbeat_interval}`,
      },
      {
        metric: "fleet: coordinator cost per 1,000 connected workers (CPU, RSS)",
        value: `${perThousand.coordinator_cpu_ms_per_s} ms CPU/s, ${perThousand.coordinator_rss_mib} MiB`,
      },
      {
        metric: `fleet: dispatch latency (POST /tasks → run) p50 / p99, 1 worker vs ${workers} (target p50 within ×${TARGETS.dispatch_p50_within})`,
        value: `${one.dispatch.p50.toFixed(2)} / ${one.dispatch.p99.toFixed(2)} vs ${many.dispatch.p50.toFixed(2)} / ${many.dispatch.p99.toFixed(2)} ms (×${dispatchRatio})`,
      },
    ];
    return {
      name: "fleet",
      description:
        "Fleet size: many no-op workers (real streams and heartbeats, one process) on one coordinator: database statements per heartbeat interval, coordinator CPU and RSS per 1,000 workers, dispatch latency against 1 worker.",
      settings: {
        workers,
        slots: 1,
        idle_window_ms: idleMs,
        dispatch_tasks: tasks,
        role_env: PRODUCT_ROLE_ENV,
        targets: TARGETS,
      },
      figures: { one, many, per_thousand_workers: perThousand, dispatch_p50_ratio: dispatchRatio },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const fleet: Bench = { name: "fleet", run };
