// Recurring schedule firing: how late after its fire time each firing's task starts, over many
// schedules firing every second, and whether any started early, fired twice or was missed.
// One coordinator and one scheduler (both run the firing loop: two replicas sharing the
// schedules) and two workers run as real processes with the product's settings. Lateness is
// read from the rows: the task's started_at (the worker's clock at spawn) minus its fire_at.
// Beside it, the raw ceiling: as many Bun.spawn calls at the same instants, from timers in this
// process, nothing of the queue running.
import { connect } from "../src/db/sql";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  distribution,
  ms,
  PRODUCT_ROLE_ENV,
  quartet,
  rawSpawn,
  Scope,
  type SummaryRow,
  startBenchCluster,
  untilAllFinal,
} from "./support";

const FULL = { schedules: 100, seconds: 30 };
const QUICK = { schedules: 10, seconds: 5 };
const WORKERS = 2;
const WORKER_SLOTS = 64;
const POLL_MS = 100;
const STEP_TIMEOUT_MS = 120_000;

async function postJson(url: string, body: unknown): Promise<{ status: number; json: { id: string } }> {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: response.status, json: (await response.json()) as { id: string } };
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const { schedules, seconds } = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`schedules: ${line}`));
    const roleEnv = PRODUCT_ROLE_ENV;
    const cluster = await startBenchCluster(scope, db.url, { workers: WORKERS, slots: WORKER_SLOTS, env: roleEnv });
    const sql = connect(db.url, { max: 1, applicationName: "bench-schedules" });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));
    console.log(
      `schedules: cluster up (${WORKERS} workers x ${WORKER_SLOTS} slots); ${schedules} schedules every second for ${seconds} s`,
    );

    const ids: string[] = [];
    try {
      for (let i = 0; i < schedules; i++) {
        const created = await postJson(`${cluster.schedulerUrl}/schedules`, {
          name: `bench-${i}`,
          cron: "*/1 * * * * *",
          task: { command: "true", max_attempts: 1 },
          // A late pass still runs every fire time: a missed one is a fault, not a choice.
          catch_up: { window: "1h", mode: "all" },
        });
        if (created.status !== 201)
          throw new Error(`POST /schedules answered ${created.status}: ${JSON.stringify(created.json)}`);
        ids.push(created.json.id);
      }
    } catch (error) {
      throw new Error(`${error instanceof Error ? error.message : String(error)}\nrole process logs:\n${cluster.logs()}`);
    }
    // The measured fire times: whole seconds, from two seconds after the last schedule was
    // created (every schedule is planned by then) for `seconds` seconds.
    const [clock] = await sql<{ now: Date }[]>`SELECT clock_timestamp() AS now`;
    const from = new Date(Math.ceil(clock!.now.getTime() / 1000) * 1000 + 2000);
    const to = new Date(from.getTime() + (seconds - 1) * 1000);
    await Bun.sleep(to.getTime() - Date.now() + 1500);
    for (const id of ids) await postJson(`${cluster.schedulerUrl}/schedules/${id}/pause`, {});
    try {
      await untilAllFinal(sql, POLL_MS, STEP_TIMEOUT_MS);
    } catch (error) {
      const states = await sql`SELECT state, count(*)::int AS n, min(run_at) AS oldest FROM tasks GROUP BY state`;
      throw new Error(
        `${error instanceof Error ? error.message : String(error)}; tasks by state: ${JSON.stringify(states)}\nrole process logs:\n${cluster.logs(15)}`,
      );
    }

    const rows = await sql<{ schedule_id: string; fire_at: Date; tasks: number; late_ms: number | null; early: number }[]>`
      SELECT f.schedule_id, f.fire_at, count(t.id)::int AS tasks,
             (extract(epoch FROM min(t.started_at) - f.fire_at) * 1000)::float8 AS late_ms,
             count(*) FILTER (WHERE t.started_at < f.fire_at)::int AS early
      FROM schedule_firings f LEFT JOIN tasks t ON t.schedule_id = f.schedule_id AND t.fire_at = f.fire_at
      WHERE f.fire_at BETWEEN ${from} AND ${to}
      GROUP BY f.schedule_id, f.fire_at`;
    const [notCreated] = await sql<{ n: number }[]>`
      SELECT count(*)::int AS n FROM schedule_firings WHERE fire_at BETWEEN ${from} AND ${to} AND outcome <> 'created'`;
    const [failed] = await sql<{ n: number }[]>`
      SELECT count(*)::int AS n FROM tasks WHERE fire_at BETWEEN ${from} AND ${to} AND state <> 'succeeded'`;
    const expected = schedules * seconds;
    const doubled = rows.filter((row) => row.tasks > 1).length;
    const missed = expected - rows.filter((row) => row.tasks >= 1).length;
    const early = rows.reduce((sum, row) => sum + row.early, 0);
    const late = distribution(rows.filter((row) => row.late_ms !== null).map((row) => row.late_ms!));
    const raw = distribution(await rawSimultaneousSpawns(schedules, Math.min(seconds, 5)));
    const stages = await sql<{ created: number; picked: number }[]>`
      SELECT (extract(epoch FROM t.created_at - t.fire_at) * 1000)::float8 AS created,
             (extract(epoch FROM t.picked_at - t.fire_at) * 1000)::float8 AS picked
      FROM tasks t WHERE t.fire_at BETWEEN ${from} AND ${to}`;
    const written = distribution(stages.map((row) => row.created));
    const picked = distribution(stages.map((row) => row.picked));

    console.log(`\nfiring lateness: task started_at − fire_at, ${schedules} schedules × ${seconds} fire times`);
    console.log(`  p50 ${ms(late.p50)}  p90 ${ms(late.p90)}  p99 ${ms(late.p99)}  max ${ms(late.max)}  min ${ms(late.min)} ms`);
    console.log(
      `  raw ceiling (${schedules} timers + Bun.spawn at once, each second): p50 ${ms(raw.p50)}  p99 ${ms(raw.p99)}  max ${ms(raw.max)} ms`,
    );
    console.log(`  rows: created_at − fire_at ${quartet(written)}; picked_at − fire_at ${quartet(picked)}`);
    console.log(
      `  fire times ${expected}: early ${early}, doubled ${doubled}, missed ${missed}, not created ${notCreated!.n}, failed ${failed!.n}`,
    );
    if (early + doubled + missed > 0) console.error("schedules: FAIL: a fire time ran early, twice, or not at all");

    const summary: SummaryRow[] = [
      {
        metric: `firing lateness: task started_at − fire_at, ${schedules} schedules firing every second for ${seconds} s, ${WORKERS} workers × ${WORKER_SLOTS} slots`,
        value: quartet(late),
      },
      {
        metric: "raw ceiling: as many timers + Bun.spawn at once in the bench process, spawned − due",
        value: quartet(raw),
      },
      {
        metric: "by the rows: task written (created_at − fire_at; negative: ahead) / handed to a worker (picked_at − fire_at)",
        value: `${quartet(written)} / ${quartet(picked)}`,
      },
      {
        metric: "lateness p50 / p99 over the raw ceiling (negative: under it)",
        value: `${signed(late.p50 - raw.p50)} / ${signed(late.p99 - raw.p99)} ms`,
      },
      {
        metric: `fire times: early / doubled / missed (each must be 0), of ${expected}`,
        value: `${early} / ${doubled} / ${missed}${early + doubled + missed > 0 ? " — FAIL" : ""}`,
      },
    ];
    return {
      name: "schedules",
      description:
        "Recurring schedules: lateness of each firing's task start after its fire time, many schedules firing every second at once, with two firing replicas; none early, none doubled, none missed.",
      settings: {
        schedules,
        seconds,
        cron: "*/1 * * * * *",
        command: "true",
        processes: { coordinator: 1, scheduler: 1, workers: WORKERS, worker_slots: WORKER_SLOTS },
        firing_replicas: "the coordinator and the scheduler (TQ_SCHEDULES defaults to true on both)",
        role_env: roleEnv,
        lateness: "task started_at (the worker's wall clock as it spawned, ms resolution) minus fire_at, from the rows",
        database: db.postgres.source,
      },
      figures: {
        lateness: late,
        raw_ceiling_lateness: raw,
        rows_fire_to_created: written,
        rows_fire_to_picked: picked,
        fire_times: expected,
        early,
        doubled,
        missed,
        not_created: notCreated!.n,
        not_succeeded: failed!.n,
      },
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

/** A difference in ms with its sign. */
function signed(value: number): string {
  return `${value < 0 ? "−" : "+"}${ms(Math.abs(value))}`;
}

/** `count` Bun.spawn calls at each of `seconds` whole seconds, from timers; spawned − due, in ms. */
async function rawSimultaneousSpawns(count: number, seconds: number): Promise<number[]> {
  const lateness: number[] = [];
  const exits: Promise<number>[] = [];
  const first = Math.ceil(Date.now() / 1000) * 1000 + 1000;
  for (let s = 0; s < seconds; s++) {
    const due = first + s * 1000;
    await new Promise<void>((resolve) =>
      setTimeout(() => {
        for (let i = 0; i < count; i++) {
          const proc = rawSpawn("true");
          lateness.push(Date.now() - due);
          exits.push(proc.exited);
        }
        resolve();
      }, due - Date.now()),
    );
  }
  await Promise.all(exits);
  return lateness;
}

export const schedulesBench: Bench = { name: "schedules", run };
