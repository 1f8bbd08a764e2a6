// Failover: what happens to a task's running attempt when its worker crashes (SIGKILL of the
// worker's process group), freezes (SIGSTOP of the group) or is cut off (its host's link
// taken down), and when the coordinator restarts for less than a lease.
//
// The workers run on hosts of their own (network namespaces joined by veths to the server
// host, test/support/netns.ts) and dial the coordinator over TLS with a join token, as in
// production; where the machine cannot make namespaces (not root), crash and freeze run on
// loopback (the worker process alone is signalled) and partition is skipped, with the reason.
//
// Each trial runs a task whose attempt logs its start (with its pid, the leader of its
// process group, and the count of earlier attempts' live processes, test/support/attempt-log.ts),
// signals a FIFO and waits for a gate. The bench applies the fault and measures, from it:
// - old gone: until no process of the old attempt's group is alive (polled from /proc);
// - next started: until the next attempt signals the FIFO;
// - in order: whether the next attempt's shell found the old attempt's processes all gone
//   when it started (its own /proc count, not the bench's polling).
// Then it opens the gate, puts the worker back and waits for the task to end.
import { existsSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { attemptSpans, createAttemptLog, loggedCommand, readAttemptLog } from "../test/support/attempt-log";
import { runningInGroup } from "../test/support/is-running";
import { type NetCluster, startNetCluster } from "../test/support/net-cluster";
import { netnsUnavailable } from "../test/support/netns";
import type { RoleProcess } from "../test/support/processes";
import { taskDir } from "../test/support/task-dir";
import { POSTGRES_FAILOVER_SETTINGS, postgresFailover, postgresFailoverLine, postgresFailoverSummary } from "./postgres-failover";
import {
  type Bench,
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

const FULL = { trials: 20, restartDownMs: 10_000, restartTasks: 4, postgresTrials: 10 };
const QUICK = { trials: 1, restartDownMs: 2_000, restartTasks: 2, postgresTrials: 2 };
const HEARTBEAT_INTERVAL_MS = 500;
const HEARTBEAT_TIMEOUT_MS = 1500;
/** The lease a partition trial's task asks for (lease_ms). */
const PARTITION_LEASE_MS = 4000;
const STEP_TIMEOUT_MS = 20_000;
/** How often the bench looks for the old attempt's processes. */
const GONE_POLL_MS = 5;
/** Targets from issue 12: crash p99; freeze over the heartbeat timeout; partition over the lease. */
const TARGET_SLACK_MS = 250;

type Fault = "crash" | "freeze" | "partition";

interface Trial {
  fault: Fault;
  /** ms from the fault until the old attempt's processes were all gone (null: not within the step timeout). */
  oldGoneMs: number | null;
  /** ms from the fault until the next attempt started. */
  nextStartedMs: number;
  /** The next attempt's shell found none of the old attempt's processes alive. */
  oldGoneFirst: boolean;
}

/** What a trial needs from either layout. */
interface Rig {
  describe: string;
  submit(body: Record<string, unknown>): Promise<string>;
  taskWorker(id: string): Promise<string>;
  taskState(id: string): Promise<string>;
  /** Applies the fault to the worker with this id; returns how to put it back. */
  fault(fault: Fault, workerId: string): Promise<() => Promise<void>>;
  logs(): string;
}

async function polledGone(group: number, from: number, until: number): Promise<number | null> {
  while (performance.now() < until) {
    if (runningInGroup(group).length === 0) return performance.now() - from;
    await Bun.sleep(GONE_POLL_MS);
  }
  return null;
}

async function trial(
  rig: Rig,
  fifo: FifoSignals,
  log: string,
  gateDir: string,
  fault: Fault,
  i: number,
  leaseMs?: number,
): Promise<Trial> {
  const gate = join(gateDir, `${fault}-${i}`);
  const signal = `if [ "$TQ_TASK_ATTEMPT" = 1 ]; then echo "$TQ_TASK_ID-1"; else echo "$TQ_TASK_ID-again"; fi > '${fifo.path}'`;
  const body = `${signal}; while [ ! -e '${gate}' ]; do sleep 0.01; done`;
  const id = await rig.submit({ command: loggedCommand(log, body), max_attempts: 5, ...(leaseMs ? { lease_ms: leaseMs } : {}) });
  await fifo.waitFor(`${id}-1`, STEP_TIMEOUT_MS);
  const first = attemptSpans(readAttemptLog(log)).find((s) => s.task === id && s.attempt === 1);
  if (!first) throw new Error(`task ${id}'s first attempt signalled but did not log its start`);
  const workerId = await rig.taskWorker(id);

  const faultAt = performance.now();
  const restore = await rig.fault(fault, workerId);
  const gone = polledGone(first.pid, faultAt, faultAt + STEP_TIMEOUT_MS);
  let nextAt: number;
  try {
    nextAt = await fifo.waitFor(`${id}-again`, STEP_TIMEOUT_MS);
  } finally {
    // The old attempt, if still alive, ends at the gate: "old gone" then comes after "next".
    writeFileSync(gate, "");
  }
  const oldGoneMs = await gone;
  const next = attemptSpans(readAttemptLog(log)).find((s) => s.task === id && s.attempt > 1);
  await restore();
  await within(
    (async () => {
      for (;;) {
        if (["succeeded", "failed", "timed_out", "cancelled"].includes(await rig.taskState(id))) return;
        await Bun.sleep(50);
      }
    })(),
    STEP_TIMEOUT_MS,
    `task ${id} to finish`,
  );
  return { fault, oldGoneMs, nextStartedMs: nextAt - faultAt, oldGoneFirst: next !== undefined && next.aliveAtStart === 0 };
}

const connectsOf = (p: RoleProcess) => p.logged("worker.connected").length;
const reconnected = (p: RoleProcess, before: number) =>
  p.waitFor((l) => l.event === "worker.connected" && connectsOf(p) > before, "a reconnect", STEP_TIMEOUT_MS);

function netRig(cluster: NetCluster): Rig {
  const json = async (path: string) => {
    const response = await cluster.api(path);
    if (!response.ok) throw new Error(`GET ${path} answered ${response.status}`);
    return (await response.json()) as Record<string, unknown>;
  };
  return {
    describe: "workers on hosts of their own (network namespaces), TLS and a join token",
    submit: (body) => cluster.submit(body),
    taskWorker: async (id) => String((await json(`/tasks/${id}`)).worker_id),
    taskState: async (id) => String((await json(`/tasks/${id}`)).state),
    async fault(fault, workerId) {
      const worker = cluster.byId(workerId);
      if (!worker) throw new Error(`unknown worker ${workerId}`);
      const p = worker.process;
      const before = connectsOf(p);
      if (fault === "crash") {
        p.signalGroup("SIGKILL");
        return async () => {
          await p.exited;
          await cluster.startWorker(worker.host);
        };
      }
      if (fault === "freeze") {
        p.signalGroup("SIGSTOP");
        return async () => {
          p.signalGroup("SIGCONT");
          // Thawed, it reconnects, unless its watchdog killed it as frozen: then a new one.
          await Promise.race([reconnected(p, before).catch(() => {}), p.exited]);
          if (p.proc.exitCode !== null || p.proc.signalCode !== null) await cluster.startWorker(worker.host);
        };
      }
      const host = cluster.network.hosts[worker.host]!;
      host.cut();
      return async () => {
        host.heal();
        // A worker that never noticed the cut has nothing to reconnect.
        await Promise.race([reconnected(p, before), Bun.sleep(5000)]);
      };
    },
    logs: () => cluster.logs(),
  };
}

async function loopbackRig(scope: Scope, databaseUrl: string, env: Record<string, string>): Promise<Rig> {
  const cluster = await startBenchCluster(scope, databaseUrl, { workers: 2, slots: 1, env });
  scope.defer("thaw workers", () => {
    for (const w of cluster.workers) w.kill("SIGCONT");
  });
  const ids = new Map<string, RoleProcess>();
  for (const w of cluster.workers) ids.set(String((await w.waitForEvent("worker.starting")).id), w);
  const task = async (id: string) =>
    (await (await fetch(`${cluster.coordinatorUrl}/tasks/${id}`)).json()) as Record<string, unknown>;
  return {
    describe: "loopback, each worker process signalled alone (no network namespaces here)",
    async submit(body) {
      const response = await fetch(`${cluster.coordinatorUrl}/tasks`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.status !== 201) throw new Error(`POST /tasks answered ${response.status}: ${await response.text()}`);
      return ((await response.json()) as { id: string }).id;
    },
    taskWorker: async (id) => String((await task(id)).worker_id),
    taskState: async (id) => String((await task(id)).state),
    async fault(fault, workerId) {
      const p = ids.get(workerId);
      if (!p) throw new Error(`unknown worker ${workerId}`);
      const before = connectsOf(p);
      if (fault === "crash") {
        p.kill("SIGKILL");
        return async () => {
          cluster.workers.splice(cluster.workers.indexOf(p), 1);
          await p.exited;
          const added = await cluster.addWorker();
          ids.set(String((await added.waitForEvent("worker.starting")).id), added);
        };
      }
      if (fault === "freeze") {
        p.kill("SIGSTOP");
        return async () => {
          p.kill("SIGCONT");
          await reconnected(p, before);
        };
      }
      throw new Error("no partition on loopback");
    },
    logs: () => cluster.logs(),
  };
}

/** Restarts the coordinator (SIGKILL, down for `downMs`) under long tasks; counts tasks stopped and rerun. */
async function restartCase(cluster: NetCluster, log: string, tasks: number, downMs: number) {
  const body = `sleep ${Math.ceil((downMs + 6000) / 1000)}`;
  const ids = await Promise.all(Array.from({ length: tasks }, () => cluster.submit({ command: loggedCommand(log, body) })));
  const deadline = performance.now() + STEP_TIMEOUT_MS;
  while (!ids.every((id) => attemptSpans(readAttemptLog(log)).some((s) => s.task === id))) {
    if (performance.now() > deadline) throw new Error("the restart case's tasks did not all start");
    await Bun.sleep(20);
  }
  const stoppedBefore = cluster.workers.reduce((n, w) => n + w.process.logged("worker.task_stopped").length, 0);
  await cluster.restartCoordinator(downMs, { kill: true });
  const states = new Map<string, Record<string, unknown>>();
  await within(
    (async () => {
      for (;;) {
        for (const id of ids) states.set(id, (await (await cluster.api(`/tasks/${id}`)).json()) as Record<string, unknown>);
        if ([...states.values()].every((t) => ["succeeded", "failed", "timed_out", "cancelled"].includes(String(t.state))))
          return;
        await Bun.sleep(200);
      }
    })(),
    downMs + 60_000,
    "the restart case's tasks to finish",
  );
  const spans = attemptSpans(readAttemptLog(log)).filter((s) => ids.includes(s.task));
  const stoppedByWorkers =
    cluster.workers.reduce((n, w) => n + w.process.logged("worker.task_stopped").length, 0) - stoppedBefore;
  return {
    tasks,
    down_ms: downMs,
    tasks_stopped: stoppedByWorkers,
    tasks_rerun: new Set(spans.filter((s) => s.attempt > 1).map((s) => s.task)).size,
    extra_executions: spans.length - tasks,
    not_succeeded: [...states.values()].filter((t) => t.state !== "succeeded").length,
  };
}

function summarize(trials: Trial[]): {
  oldGone: Distribution | null;
  nextStarted: Distribution;
  inOrder: number;
  oldNeverGone: number;
} {
  const gone = trials.map((t) => t.oldGoneMs).filter((x): x is number => x !== null);
  return {
    oldGone: gone.length > 0 ? distribution(gone) : null,
    nextStarted: distribution(trials.map((t) => t.nextStartedMs)),
    inOrder: trials.filter((t) => t.oldGoneFirst).length,
    oldNeverGone: trials.length - gone.length,
  };
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const plan = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`failover: ${line}`));
    console.log(`failover: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const fifo = FifoSignals.open(scope);
    const gateDir = taskDir("tq-bench-gates-");
    scope.defer("remove the gates", () => existsSync(gateDir) && rmSync(gateDir, { recursive: true, force: true }));
    const logDir = taskDir("tq-bench-attempts-");
    scope.defer("remove the attempt log", () => rmSync(logDir, { recursive: true, force: true }));
    const log = createAttemptLog(logDir);
    const roleEnv = {
      TQ_HEARTBEAT_INTERVAL_MS: String(HEARTBEAT_INTERVAL_MS),
      TQ_HEARTBEAT_TIMEOUT_MS: String(HEARTBEAT_TIMEOUT_MS),
      TQ_LOG_LEVEL: "info",
    };
    const unavailable = netnsUnavailable();
    let cluster: NetCluster | null = null;
    let rig: Rig;
    if (unavailable === null) {
      cluster = await startNetCluster(db.url, { hosts: 2, slots: 2, env: roleEnv });
      const started = cluster;
      scope.defer("stop the cluster", () => started.stop());
      rig = netRig(cluster);
    } else {
      console.log(`failover: partition skipped, and crash/freeze on loopback: ${unavailable}`);
      rig = await loopbackRig(scope, db.url, roleEnv);
    }
    // A build without per-task leases refuses lease_ms: the partition then runs on its default lease.
    let partitionLease: number | undefined = PARTITION_LEASE_MS;
    if (cluster) {
      try {
        const probe = await rig.submit({ command: "true", lease_ms: PARTITION_LEASE_MS });
        void probe;
      } catch (error) {
        console.log(
          `failover: lease_ms refused (${error instanceof Error ? error.message : error}); partition on the default lease`,
        );
        partitionLease = undefined;
      }
    }
    const faults: Fault[] = cluster ? ["crash", "freeze", "partition"] : ["crash", "freeze"];
    console.log(`failover: ${rig.describe}; ${plan.trials} trials each of ${faults.join(", ")}`);
    const trials: Trial[] = [];
    let restart: Awaited<ReturnType<typeof restartCase>> | null = null;
    try {
      for (const fault of faults) {
        for (let i = 0; i < plan.trials; i++) {
          const t = await trial(rig, fifo, log, gateDir, fault, i, fault === "partition" ? partitionLease : undefined);
          trials.push(t);
          console.log(
            `failover: ${fault} #${i + 1}: old gone ${t.oldGoneMs === null ? "never" : `${ms(t.oldGoneMs)} ms`}, next started ${ms(t.nextStartedMs)} ms, old gone first: ${t.oldGoneFirst}`,
          );
        }
      }
      if (cluster) restart = await restartCase(cluster, log, plan.restartTasks, plan.restartDownMs);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new Error(`${message}\nrole process logs:\n${rig.logs()}`);
    }

    const figures: Record<string, unknown> = { trials };
    const summary: { metric: string; value: string }[] = [];
    const targets: Record<Fault, number> = {
      crash: TARGET_SLACK_MS,
      freeze: HEARTBEAT_TIMEOUT_MS + TARGET_SLACK_MS,
      partition: (partitionLease ?? 0) + TARGET_SLACK_MS,
    };
    console.log("\nfault -> old attempt gone / next attempt started (ms)");
    for (const fault of faults) {
      const mine = trials.filter((t) => t.fault === fault);
      const s = summarize(mine);
      // The issue's targets (+250 ms) and, for partition, the multihost test's bound (+500 ms).
      const within = (slack: number) => mine.filter((t) => t.nextStartedMs <= targets[fault] - TARGET_SLACK_MS + slack).length;
      figures[fault] = { ...s, target_ms: targets[fault], within_target: within(TARGET_SLACK_MS), within_500ms: within(500) };
      const gone = s.oldGone ? quartet(s.oldGone) : "never";
      const target = fault === "partition" && partitionLease === undefined ? "" : `; target next p99 <= ${targets[fault]} ms`;
      console.log(
        `  ${fault.padEnd(9)} old gone ${gone}; next started ${quartet(s.nextStarted)}; old gone first ${s.inOrder}/${s.nextStarted.n}`,
      );
      summary.push({
        metric: `${fault}: fault → old attempt's processes gone`,
        value: `${gone}${s.oldNeverGone ? ` (${s.oldNeverGone} never)` : ""}`,
      });
      summary.push({ metric: `${fault}: fault → next attempt started${target}`, value: quartet(s.nextStarted) });
      summary.push({ metric: `${fault}: old gone before next started`, value: `${s.inOrder} of ${s.nextStarted.n} trials` });
      if (target)
        summary.push({
          metric: `${fault}: next started within target`,
          value: `${within(TARGET_SLACK_MS)} of ${mine.length} trials`,
        });
    }
    if (restart) {
      figures.coordinator_restart = restart;
      console.log(`  coordinator restart (${restart.down_ms} ms, SIGKILL): ${JSON.stringify(restart)}`);
      summary.push({
        metric: `coordinator down ${restart.down_ms / 1000} s under ${restart.tasks} long tasks: tasks stopped / rerun (target 0)`,
        value: `${restart.tasks_stopped} / ${restart.tasks_rerun}`,
      });
    }
    // PostgreSQL's own failover, on Patroni (bench/postgres-failover.ts), after the cluster above is gone.
    await scope.close();
    const pg = await postgresFailover(plan.postgresTrials, (line) => console.log(`failover: ${line}`));
    if (typeof pg === "string") {
      console.log(`failover: postgres-failover skipped: ${pg}`);
      figures.postgres_failover = { skipped: pg };
    } else {
      const { postgres: _info, ...figuresOfPg } = pg;
      figures.postgres_failover = figuresOfPg;
      console.log(`  ${postgresFailoverLine(pg)}`);
      summary.push(...postgresFailoverSummary(pg));
    }
    return {
      name: "failover",
      description:
        "From a crash (SIGKILL of the worker's group), freeze (SIGSTOP) or partition (link cut) of the worker running a task: until its processes are gone and until the next attempt starts; and tasks stopped by a coordinator restart shorter than the lease.",
      settings: {
        trials_per_fault: plan.trials,
        layout: rig.describe,
        netns: unavailable ?? "available",
        processes: { coordinator: 1, workers: 2, worker_slots: cluster ? 2 : 1 },
        role_env: roleEnv,
        partition_lease_ms: partitionLease ?? "server default (lease_ms refused)",
        gone_observed_by: `polling /proc for the attempt's process group every ${GONE_POLL_MS} ms`,
        start_observed_by: "the attempt's shell writing to a FIFO the bench reads",
        in_order_observed_by: "the next attempt's shell counting the old attempt's live processes in /proc at its start",
        database: db.postgres.source,
        postgres_failover: { trials: plan.postgresTrials, ...POSTGRES_FAILOVER_SETTINGS },
      },
      figures,
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const failover: Bench = { name: "failover", run };
