// Sustained load, not a burst. One coordinator, one scheduler and one worker of 8 slots; every
// task is `echo $TQ_TASK_ID > fifo` (start = the shell's write, read by the bench). First, in
// the same run: the raw ceiling (the same command from Bun.spawn, 8 at a time) and the queue's
// burn-down rate (a backlog submitted in batches, until all are final). Then tasks arrive at
// 80% of that burn-down rate, open loop (in small batches on a fixed beat, never waiting for
// earlier tasks), for 10 minutes (--quick: 30 s), with retention on and short, so that the
// tables reach the size where deletes keep pace with inserts. Reported: submit-to-start p50 and
// p99 in the first and in the last minute (target: the last p99 within 1.5x of the first), per
// window, and table sizes, dead tuples and autovacuum runs over time (pg_stat_user_tables).
import postgres from "postgres";
import { prunedRows } from "./retention";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  countUnfinished,
  createBenchDatabase,
  type Distribution,
  distribution,
  FifoSignals,
  PRODUCT_ROLE_ENV,
  quartet,
  rawSpawn,
  Scope,
  type SummaryRow,
  startBenchCluster,
  submitBatch,
  untilAllFinal,
  within,
} from "./support";

// The burn-down backlog is sized from a probe of `probe` tasks to last about `burnDownS`
// seconds (within 500 to 20,000 tasks): long enough to measure a rate, whatever the machine.
const FULL = { durationS: 600, windowS: 60, sampleEveryS: 15, probe: 300, burnDownS: 20, raw: 2000, retention: "2m" };
const QUICK = { durationS: 30, windowS: 6, sampleEveryS: 3, probe: 100, burnDownS: 5, raw: 400, retention: "10s" };
const WORKER_SLOTS = 8;
/** Share of the measured burn-down rate the sustained phase submits at. */
const LOAD_SHARE = 0.8;
/** The beat of the open-loop submitter. */
const BEAT_MS = 20;
/** A task that has not started this long after its submit is a fault to report (burn-down, raw). */
const START_TIMEOUT_MS = 60_000;
/**
 * After the load phase, how long tasks still waiting may take to start. Past it, those not yet
 * started are counted as such (the queue did not keep up), not waited for.
 */
const GRACE_MS = 60_000;
const TABLES = ["tasks", "task_events", "task_attempts"] as const;

interface TableSample {
  at_s: number;
  table: string;
  live: number;
  dead: number;
  total_bytes: number;
  index_bytes: number;
  autovacuums: number;
  autoanalyzes: number;
}

/** pg_stat_user_tables and the relation sizes of the task tables, now. */
async function sampleTables(sql: postgres.Sql, atS: number): Promise<TableSample[]> {
  const rows = await sql<Omit<TableSample, "at_s">[]>`
    SELECT relname AS table, n_live_tup::bigint AS live, n_dead_tup::bigint AS dead,
           pg_total_relation_size(relid) AS total_bytes, pg_indexes_size(relid) AS index_bytes,
           autovacuum_count AS autovacuums, autoanalyze_count AS autoanalyzes
    FROM pg_stat_user_tables WHERE relname IN ${sql([...TABLES])} ORDER BY relname`;
  return rows.map((row) => ({
    at_s: atS,
    table: row.table,
    live: Number(row.live),
    dead: Number(row.dead),
    total_bytes: Number(row.total_bytes),
    index_bytes: Number(row.index_bytes),
    autovacuums: Number(row.autovacuums),
    autoanalyzes: Number(row.autoanalyzes),
  }));
}

/** Autovacuum workers busy on this database now. */
async function autovacuumsRunning(sql: postgres.Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    SELECT count(*)::int AS n FROM pg_stat_activity
    WHERE backend_type = 'autovacuum worker' AND datname = current_database()`;
  return row?.n ?? 0;
}

/** The raw ceiling: `count` spawns of the command, `slots` at a time; tasks/s and spawn-to-start. */
async function rawBurnDown(fifo: FifoSignals, count: number, slots: number): Promise<{ perSecond: number; start: Distribution }> {
  const command = fifo.command();
  const starts: number[] = [];
  let next = 0;
  const began = performance.now();
  const lane = async () => {
    while (next < count) {
      const id = `raw-${next++}`;
      const before = performance.now();
      const proc = rawSpawn(command, id);
      starts.push((await fifo.waitFor(id, START_TIMEOUT_MS)) - before);
      await within(proc.exited, START_TIMEOUT_MS, `exit of raw spawn ${id}`);
    }
  };
  await Promise.all(Array.from({ length: slots }, lane));
  return { perSecond: count / ((performance.now() - began) / 1000), start: distribution(starts) };
}

/** Submits `count` tasks in batches of 1000 and waits until all are final; tasks/s. */
async function burnDown(baseUrl: string, sql: postgres.Sql, fifo: FifoSignals, count: number): Promise<number> {
  const command = fifo.command();
  const began = performance.now();
  const created: { id: string }[] = [];
  for (let sent = 0; sent < count; sent += 1000) {
    const n = Math.min(1000, count - sent);
    created.push(
      ...(await submitBatch(
        baseUrl,
        Array.from({ length: n }, () => ({ command })),
      )),
    );
  }
  const ended = await untilAllFinal(sql, 20, 15 * 60_000);
  // Their FIFO lines, so that none is left over for the phase after.
  for (const { id } of created) await fifo.waitFor(id, START_TIMEOUT_MS);
  return count / ((ended - began) / 1000);
}

const mb = (bytes: number) => `${(bytes / 1024 / 1024).toFixed(1)} MB`;

async function run(options: BenchOptions): Promise<BenchResult> {
  const settings = options.quick ? QUICK : FULL;
  const { durationS, windowS, sampleEveryS } = settings;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`sustained: ${line}`));
    console.log(`sustained: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const fifo = FifoSignals.open(scope);
    const sql = postgres(db.url, { max: 2, onnotice: () => {} });
    scope.defer("close the bench's connection", () => sql.end({ timeout: 5 }));
    // Whether autovacuum runs at all on this server: with it off, dead rows are never reclaimed.
    const [vacuumSetting] = await sql<{ autovacuum: string }[]>`SHOW autovacuum`;
    const autovacuum = vacuumSetting?.autovacuum ?? "unknown";
    console.log(`sustained: autovacuum ${autovacuum}`);
    const roleEnv = {
      ...PRODUCT_ROLE_ENV,
      TQ_RETENTION: settings.retention,
      TQ_RETENTION_INTERVAL_MS: "5000",
      TQ_MAX_BATCH: "5000",
    };
    const cluster = await startBenchCluster(scope, db.url, { workers: 1, slots: WORKER_SLOTS, env: roleEnv });
    const command = fifo.command();
    try {
      // 1. The ceilings of this run: raw spawns, then the queue's burn-down of a backlog.
      const raw = await rawBurnDown(fifo, settings.raw, WORKER_SLOTS);
      console.log(`sustained: raw spawn ${raw.perSecond.toFixed(0)}/s, start ${quartet(raw.start)}`);
      const probe = await burnDown(cluster.coordinatorUrl, sql, fifo, settings.probe);
      const backlog = Math.round(Math.min(20_000, Math.max(500, probe * settings.burnDownS)));
      const burnPerSecond = await burnDown(cluster.coordinatorUrl, sql, fifo, backlog);
      const rate = burnPerSecond * LOAD_SHARE;
      console.log(
        `sustained: burn-down ${burnPerSecond.toFixed(0)}/s (${(burnPerSecond / raw.perSecond).toFixed(2)} of raw); sustained phase at ${rate.toFixed(0)}/s for ${durationS} s`,
      );

      // 2. Open loop at `rate` for `durationS`, sampling the tables as it goes.
      const samples: { atS: number; latency: number }[] = [];
      const submitted: number[] = [];
      const pending: Promise<void>[] = [];
      const tableSamples: TableSample[] = [];
      const vacuumsRunning: { at_s: number; n: number }[] = [];
      /** Tasks not yet final at each table sample: whether the queue keeps up. */
      const unfinished: { at_s: number; n: number }[] = [];
      const began = performance.now();
      const endAt = began + durationS * 1000;
      let sent = 0;
      let nextSample = 0;
      let submitErrors = 0;
      while (performance.now() < endAt) {
        const now = performance.now();
        const elapsedS = (now - began) / 1000;
        if (elapsedS >= nextSample) {
          nextSample += sampleEveryS;
          tableSamples.push(...(await sampleTables(sql, Math.round(elapsedS))));
          vacuumsRunning.push({ at_s: Math.round(elapsedS), n: await autovacuumsRunning(sql) });
          unfinished.push({ at_s: Math.round(elapsedS), n: await countUnfinished(sql) });
          console.log(`sustained: ${Math.round(elapsedS)} s, ${sent} sent, ${unfinished.at(-1)!.n} unfinished`);
        }
        const due = Math.floor(rate * elapsedS) - sent;
        if (due > 0) {
          const n = Math.min(due, 2000);
          const submittedAt = performance.now();
          let created: { id: string }[];
          try {
            created = await submitBatch(
              cluster.coordinatorUrl,
              Array.from({ length: n }, () => ({ command })),
            );
          } catch (error) {
            submitErrors++;
            if (submitErrors > 5) throw error;
            continue;
          }
          sent += n;
          const atS = (submittedAt - began) / 1000;
          for (const { id } of created) {
            submitted.push(atS);
            pending.push(
              fifo.waitFor(id, durationS * 1000 + GRACE_MS).then(
                (startedAt) => {
                  samples.push({ atS, latency: startedAt - submittedAt });
                },
                () => {},
              ),
            );
          }
        }
        const wait = BEAT_MS - (performance.now() - now);
        if (wait > 0) await Bun.sleep(wait);
      }
      const actualS = (performance.now() - began) / 1000;
      await Promise.race([Promise.all(pending), Bun.sleep(GRACE_MS)]);
      const notStarted = sent - samples.length;
      tableSamples.push(...(await sampleTables(sql, Math.round(actualS))));
      vacuumsRunning.push({ at_s: Math.round(actualS), n: await autovacuumsRunning(sql) });
      if (samples.length === 0) throw new Error(`none of ${sent} tasks started`);

      // 3. Windows: the first and the last, and each one between.
      // A window's tasks that never started (before the grace ran out) are counted beside it:
      // its latencies are those of the ones that did.
      const windows: { from_s: number; submitted: number; n: number; submit_to_start: Distribution }[] = [];
      for (let from = 0; from < durationS; from += windowS) {
        const inWindow = samples.filter((s) => s.atS >= from && s.atS < from + windowS).map((s) => s.latency);
        const sentInWindow = submitted.filter((at) => at >= from && at < from + windowS).length;
        if (inWindow.length > 0)
          windows.push({ from_s: from, submitted: sentInWindow, n: inWindow.length, submit_to_start: distribution(inWindow) });
      }
      const first = windows[0]!;
      const last = windows[windows.length - 1]!;
      const p99Ratio = Math.round((last.submit_to_start.p99 / first.submit_to_start.p99) * 100) / 100;
      const byTable = (table: string) => tableSamples.filter((s) => s.table === table);
      const growth = Object.fromEntries(
        TABLES.map((table) => {
          const rows = byTable(table);
          const a = rows[0]!;
          const b = rows[rows.length - 1]!;
          const peak = Math.max(...rows.map((r) => r.total_bytes));
          return [
            table,
            {
              live_first: a.live,
              live_last: b.live,
              live_peak: Math.max(...rows.map((r) => r.live)),
              dead_peak: Math.max(...rows.map((r) => r.dead)),
              bytes_first: a.total_bytes,
              bytes_last: b.total_bytes,
              bytes_peak: peak,
              autovacuums: b.autovacuums - a.autovacuums,
              autoanalyzes: b.autoanalyzes - a.autoanalyzes,
            },
          ];
        }),
      );
      const pruned = await prunedRows(cluster.coordinatorUrl);

      console.log(`\nsubmit -> shell running at ${rate.toFixed(0)}/s, per ${windowS} s window (ms)`);
      for (const w of windows)
        console.log(`  ${String(w.from_s).padStart(4)} s  started ${w.n} of ${w.submitted}  ${quartet(w.submit_to_start)}`);
      if (notStarted > 0) console.log(`  ${notStarted} of ${sent} tasks had not started ${GRACE_MS} ms after the load ended`);
      console.log(`  last p99 / first p99: x${p99Ratio} (target <= 1.5)`);
      console.log("\ntables (live / dead rows, size) over time");
      for (const s of tableSamples)
        console.log(
          `  ${String(s.at_s).padStart(4)} s ${s.table.padEnd(14)} ${s.live} / ${s.dead}, ${mb(s.total_bytes)}, autovacuums ${s.autovacuums}`,
        );
      console.log(`  retention pruned: ${JSON.stringify(pruned)}`);

      const summary: SummaryRow[] = [
        {
          metric: "raw spawn ceiling, 8 at a time (tasks/s; start p50 / p90 / p99 / max)",
          value: `${raw.perSecond.toFixed(0)}/s; ${quartet(raw.start)}`,
        },
        {
          metric: "burn-down, 1 worker × 8 slots (share of raw)",
          value: `${burnPerSecond.toFixed(0)}/s (${(burnPerSecond / raw.perSecond).toFixed(2)})`,
        },
        {
          metric: `sustained load: ${Math.round(LOAD_SHARE * 100)}% of burn-down for ${durationS} s`,
          value: `${rate.toFixed(0)}/s, ${sent} tasks`,
        },
        { metric: `submit→start, first ${windowS} s (p50 / p90 / p99 / max)`, value: quartet(first.submit_to_start) },
        { metric: `submit→start, last ${windowS} s (of its tasks that started)`, value: quartet(last.submit_to_start) },
        {
          metric: `tasks not started ${GRACE_MS / 1000} s after the load ended (the queue did not keep up)`,
          value: `${notStarted} of ${sent}`,
        },
        { metric: "last p99 / first p99 (target ≤ 1.5)", value: `×${p99Ratio}` },
        ...TABLES.map((table) => {
          const g = growth[table]!;
          return {
            metric: `${table}: live rows first → last (peak); dead peak; size first → last; autovacuums`,
            value: `${g.live_first} → ${g.live_last} (${g.live_peak}); ${g.dead_peak}; ${mb(g.bytes_first)} → ${mb(g.bytes_last)}; ${g.autovacuums}`,
          };
        }),
        {
          metric: `rows pruned by retention (TQ_RETENTION=${settings.retention})`,
          value: `${Object.values(pruned).reduce((a, b) => a + b, 0)}`,
        },
      ];
      return {
        name: "sustained",
        description:
          "Open-loop load at 80% of the burn-down rate measured in the same run, with short retention: submit-to-start per window (first vs last), table sizes, dead tuples and autovacuum runs over time.",
        settings: {
          duration_s: durationS,
          actual_duration_s: Math.round(actualS * 10) / 10,
          window_s: windowS,
          table_sample_every_s: sampleEveryS,
          burn_down_probe_tasks: settings.probe,
          burn_down_backlog_s: settings.burnDownS,
          raw_spawns: settings.raw,
          load_share: LOAD_SHARE,
          submit: `POST /tasks/batch every ${BEAT_MS} ms with the tasks due by then (open loop)`,
          processes: { coordinator: 1, scheduler: 1, workers: 1, worker_slots: WORKER_SLOTS },
          role_env: roleEnv,
          command: 'echo "$TQ_TASK_ID" > <fifo>',
          database: db.postgres.source,
          autovacuum,
        },
        figures: {
          raw: { tasks_per_second: Math.round(raw.perSecond), spawn_to_start: raw.start },
          burn_down_per_second: Math.round(burnPerSecond),
          burn_down_tasks: backlog,
          rate_per_second: Math.round(rate),
          tasks_sent: sent,
          tasks_not_started_after_grace: notStarted,
          grace_ms: GRACE_MS,
          windows,
          last_over_first_p99: p99Ratio,
          tables: growth,
          table_samples: tableSamples,
          autovacuum_workers_running: vacuumsRunning,
          unfinished_over_time: unfinished,
          retention_pruned_rows: pruned,
        },
        summary,
        postgres: db.postgres,
      };
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new Error(`${message}\nrole process logs:\n${cluster.logs()}`);
    }
  } finally {
    await scope.close();
  }
}

export const sustained: Bench = { name: "sustained", run };
