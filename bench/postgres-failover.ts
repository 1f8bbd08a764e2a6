// The failover bench's postgres-failover case: task-queue on Patroni (3 etcd, 2 PostgreSQL
// nodes in synchronous_mode, 2 coordinators, a scheduler, 3 workers, each on a host of its own:
// test/support/ha-stack.ts) under a steady submit load with idempotency keys. Each trial
// SIGKILLs the primary's postmaster and measures, from the kill:
// - promoted: until Patroni's REST on the standby answers 200 on /primary (polled every 50 ms);
// - first 2xx submit: until the first submit sent after the kill was acknowledged;
// - first dispatch: until the first task submitted after the kill started on a worker (its
//   command's own start line, test/support/attempt-log.ts).
// Target (issue 17): submit and dispatch within 2 s of Patroni's promotion.
// Part of `bun run bench failover`, and a bench of its own: `bun run bench postgres-failover`
// (10 trials, 2 with --quick; TQ_BENCH_POSTGRES_TRIALS=N for another count).
// TQ_BENCH_POSTGRES_TRACE=<folder> writes, per trial, every submit's try (sent, answered,
// status, coordinator) and the Patroni logs there, relative to the kill.
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import postgres from "postgres";
import { createAttemptLog, readAttemptLog } from "../test/support/attempt-log";
import { type HaStack, Load, loadCommand, startHaStack } from "../test/support/ha-stack";
import { patroniUnavailable, restStatus } from "../test/support/patroni";
import { taskDir } from "../test/support/task-dir";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  type Distribution,
  distribution,
  ms,
  type PostgresInfo,
  type SummaryRow,
  within,
} from "./support";

export interface PostgresFailoverTrial {
  promoted_ms: number;
  first_submit_ms: number;
  first_dispatch_ms: number;
  /** first submit / dispatch minus promoted. */
  submit_after_promotion_ms: number;
  dispatch_after_promotion_ms: number;
  /** Answers to submits sent between the kill and the first 2xx, by status. */
  statuses: Record<string, number>;
}

export interface PostgresFailoverResult {
  trials: PostgresFailoverTrial[];
  promoted: Distribution;
  first_submit: Distribution;
  first_dispatch: Distribution;
  submit_after_promotion: Distribution;
  dispatch_after_promotion: Distribution;
  target_ms_after_promotion: number;
  within_target: number;
  statuses_other_than_2xx_503: number;
  /** The Patroni cluster's PostgreSQL. */
  postgres: PostgresInfo;
}

const TARGET_MS = 2000;
const STEP_MS = 90_000;

async function until<T>(fn: () => T | null | undefined | Promise<T | null | undefined>, what: string, pollMs = 20): Promise<T> {
  return within(
    (async () => {
      for (;;) {
        const value = await fn();
        if (value !== null && value !== undefined) return value;
        await Bun.sleep(pollMs);
      }
    })(),
    STEP_MS,
    what,
  );
}

/** Runs the case, or returns the reason it cannot run on this machine. */
export async function postgresFailover(trials: number, say: (line: string) => void): Promise<PostgresFailoverResult | string> {
  const unavailable = patroniUnavailable();
  if (unavailable) return unavailable;
  const trace = process.env.TQ_BENCH_POSTGRES_TRACE;
  if (trace) mkdirSync(trace, { recursive: true });
  const dir = taskDir("tq-bench-patroni-");
  const log = createAttemptLog(dir);
  let stack: HaStack | null = null;
  let load: Load | null = null;
  try {
    stack = await startHaStack({ workers: 3 });
    const ha = stack;
    const info = await postgresInfo(ha);
    const exited = new Set<unknown>();
    for (const p of [...ha.coordinators.map((c) => c.process), ha.scheduler.process]) void p.exited.then(() => exited.add(p));
    load = new Load(
      ha.coordinators.map((c) => c.url),
      loadCommand(log),
      3,
      50,
    );
    const running = load;
    const results: PostgresFailoverTrial[] = [];
    for (let i = 0; i < trials; i++) {
      const primary = await ha.cluster.waitHealthy(120_000);
      const standby = ha.cluster.nodes.find((n) => n !== primary)!;
      const before = running.acked.size;
      await until(() => (running.acked.size >= before + 5 ? true : null), "5 acknowledged submits before the kill");
      const fault = Date.now();
      ha.cluster.killPostmaster(primary);
      const promoted = await until(
        async () => ((await restStatus(`${standby.rest}/primary`, 200)) === 200 ? Date.now() : null),
        `Patroni promoting ${standby.name}`,
        50,
      );
      const submitted = await until(() => running.firstAckAfter(fault), "a 2xx submit sent after the kill");
      const dispatched = await until(() => {
        const after = new Set([...running.sentAtById].filter(([, sentAt]) => sentAt >= fault).map(([id]) => id));
        const starts = readAttemptLog(log).filter((r) => r.kind === "start" && after.has(r.task));
        return starts.length === 0 ? null : Math.min(...starts.map((r) => Number(r.ns / 1_000_000n)));
      }, "a dispatch of a task submitted after the kill");
      const statuses: Record<string, number> = {};
      for (const a of running.answers)
        if (a.sentAt >= fault && a.at <= submitted) statuses[a.status] = (statuses[a.status] ?? 0) + 1;
      const trial: PostgresFailoverTrial = {
        promoted_ms: promoted - fault,
        first_submit_ms: submitted - fault,
        first_dispatch_ms: dispatched - fault,
        submit_after_promotion_ms: submitted - promoted,
        dispatch_after_promotion_ms: dispatched - promoted,
        statuses,
      };
      results.push(trial);
      // A role that died would make every try sent to it an instant failure: the figures would
      // then be of a smaller stack. Stop, with its log.
      const dead = [...ha.coordinators.map((c) => c.process), ha.scheduler.process].filter((p) => exited.has(p));
      if (dead.length > 0) throw new Error(`${dead.map((p) => `${p.role} (pid ${p.pid})`).join(", ")} exited by trial ${i + 1}`);
      if (trace) {
        const rel = (t: number) => t - fault;
        const tries = running.answers
          .filter((a) => a.at >= fault - 1000 && a.sentAt <= dispatched + 1000)
          .map((a) => ({ sent: rel(a.sentAt), at: rel(a.at), status: a.status, url: a.url }));
        writeFileSync(
          join(trace, `trial-${i + 1}.json`),
          JSON.stringify(
            { fault, primary: primary.name, ...trial, tries, patroni: ha.cluster.nodes.map((n) => ha.cluster.log(n)) },
            null,
            1,
          ),
        );
      }
      say(
        `postgres-failover #${i + 1}: promoted ${ms(trial.promoted_ms)} ms, first 2xx submit ${ms(trial.first_submit_ms)} ms, first dispatch ${ms(trial.first_dispatch_ms)} ms (answers meanwhile ${JSON.stringify(statuses)})`,
      );
    }
    await running.stop();
    const other = running.answers.filter((a) => ![200, 201, 503].includes(a.status)).length;
    return {
      trials: results,
      promoted: distribution(results.map((t) => t.promoted_ms)),
      first_submit: distribution(results.map((t) => t.first_submit_ms)),
      first_dispatch: distribution(results.map((t) => t.first_dispatch_ms)),
      submit_after_promotion: distribution(results.map((t) => t.submit_after_promotion_ms)),
      dispatch_after_promotion: distribution(results.map((t) => t.dispatch_after_promotion_ms)),
      target_ms_after_promotion: TARGET_MS,
      within_target: results.filter((t) => t.submit_after_promotion_ms <= TARGET_MS && t.dispatch_after_promotion_ms <= TARGET_MS)
        .length,
      statuses_other_than_2xx_503: other,
      postgres: info,
    };
  } catch (error) {
    if (stack) say(stack.logs(trace ? 400 : 20));
    throw error;
  } finally {
    await load?.stop();
    await stack?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function postgresInfo(ha: HaStack): Promise<PostgresInfo> {
  const primary = await ha.cluster.waitHealthy(120_000);
  const sql = postgres(`postgres://postgres@${primary.host.ip}:5432/postgres`, { max: 1, onnotice: () => {} });
  try {
    const [row] = await sql<{ version: string; fsync: string; synchronous_commit: string }[]>`
      SELECT version(), current_setting('fsync') AS fsync, current_setting('synchronous_commit') AS synchronous_commit`;
    return {
      version: row?.version ?? "unknown",
      source: "Patroni (2 nodes, synchronous_mode)",
      fsync: row?.fsync ?? "unknown",
      synchronous_commit: row?.synchronous_commit ?? "unknown",
    };
  } finally {
    await sql.end({ timeout: 1 });
  }
}

/** How the case is set up (the `settings` of its result). */
export const POSTGRES_FAILOVER_SETTINGS = {
  layout:
    "3 etcd, 2 Patroni PostgreSQL 15 nodes (synchronous_mode, ttl 10, loop_wait 1, primary_start_timeout 0), 2 coordinators, a scheduler, 3 workers, each in its own network namespace",
  fault: "SIGKILL of the primary's postmaster",
  load: "3 submit loops, 50 ms apart, idempotency keys, each key retried until acknowledged",
};

/** The case's rows of the results table. */
export function postgresFailoverSummary(pg: PostgresFailoverResult): SummaryRow[] {
  const p50max = (d: { p50: number; max: number }) => `${ms(d.p50)} / ${ms(d.max)} ms`;
  return [
    { metric: "postgres-failover: primary's postmaster killed → Patroni promoted (p50 / max)", value: p50max(pg.promoted) },
    { metric: "postgres-failover: kill → first 2xx submit (p50 / max)", value: p50max(pg.first_submit) },
    { metric: "postgres-failover: kill → first dispatch (p50 / max)", value: p50max(pg.first_dispatch) },
    { metric: "postgres-failover: promoted → first 2xx submit (p50 / max)", value: p50max(pg.submit_after_promotion) },
    { metric: "postgres-failover: promoted → first dispatch (p50 / max)", value: p50max(pg.dispatch_after_promotion) },
    {
      metric: `postgres-failover: submit and dispatch within ${pg.target_ms_after_promotion / 1000} s of promotion`,
      value: `${pg.within_target} of ${pg.trials.length} trials`,
    },
    { metric: "postgres-failover: answers other than 2xx/503 (target 0)", value: String(pg.statuses_other_than_2xx_503) },
  ];
}

/** One line of the case's figures, for the console. */
export function postgresFailoverLine(pg: PostgresFailoverResult): string {
  const p50max = (d: { p50: number; max: number }) => `${ms(d.p50)} / ${ms(d.max)} ms`;
  return `postgres-failover (${pg.trials.length} trials, p50 / max): promoted ${p50max(pg.promoted)}; first 2xx submit ${p50max(pg.first_submit)}; first dispatch ${p50max(pg.first_dispatch)}; after promotion: submit ${p50max(pg.submit_after_promotion)}, dispatch ${p50max(pg.dispatch_after_promotion)}; within target ${pg.within_target}/${pg.trials.length}`;
}

function trialsFromEnv(quick: boolean): number {
  const spec = process.env.TQ_BENCH_POSTGRES_TRIALS;
  if (!spec) return quick ? 2 : 10;
  const n = Number(spec);
  if (!Number.isInteger(n) || n < 1)
    throw new Error(`TQ_BENCH_POSTGRES_TRIALS: "${spec}" is not a whole number of trials (1 or more)`);
  return n;
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const trials = trialsFromEnv(options.quick);
  const say = (line: string) => console.log(`postgres-failover: ${line}`);
  const pg = await postgresFailover(trials, say);
  if (typeof pg === "string") throw new Error(`postgres-failover cannot run on this machine: ${pg}`);
  say(postgresFailoverLine(pg));
  const { postgres: info, ...figures } = pg;
  return {
    name: "postgres-failover",
    description:
      "task-queue on Patroni: from a SIGKILL of the primary's postmaster until Patroni's promotion, the first 2xx submit and the first dispatch after it (target: both within 2 s of the promotion).",
    settings: { trials, ...POSTGRES_FAILOVER_SETTINGS },
    figures,
    summary: postgresFailoverSummary(pg),
    postgres: info,
  };
}

export const postgresFailoverBench: Bench = { name: "postgres-failover", run };
