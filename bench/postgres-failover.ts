// The failover bench's postgres-failover case: task-queue on Patroni (3 etcd, 2 PostgreSQL
// nodes in synchronous_mode, 2 coordinators, a scheduler, 3 workers, each on a host of its own:
// test/support/ha-stack.ts) under a steady submit load with idempotency keys. Each trial
// SIGKILLs the primary's postmaster and measures, from the kill:
// - promoted: until Patroni's REST on the standby answers 200 on /primary (polled every 50 ms);
// - first 2xx submit: until the first submit sent after the kill was acknowledged;
// - first dispatch: until the first task submitted after the kill started on a worker (its
//   command's own start line, test/support/attempt-log.ts).
// Target (issue 17): submit and dispatch within 2 s of Patroni's promotion.
import { rmSync } from "node:fs";
import { createAttemptLog, readAttemptLog } from "../test/support/attempt-log";
import { type HaStack, Load, loadCommand, startHaStack } from "../test/support/ha-stack";
import { patroniUnavailable, restStatus } from "../test/support/patroni";
import { taskDir } from "../test/support/task-dir";
import { type Distribution, distribution, ms, within } from "./support";

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
  const dir = taskDir("tq-bench-patroni-");
  const log = createAttemptLog(dir);
  let stack: HaStack | null = null;
  let load: Load | null = null;
  try {
    stack = await startHaStack({ workers: 3 });
    const ha = stack;
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
    };
  } catch (error) {
    if (stack) say(stack.logs(20));
    throw error;
  } finally {
    await load?.stop();
    await stack?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
