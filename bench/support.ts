// What every bench shares: the result shape, a clean-up scope that also runs on Ctrl-C, a
// throwaway database (on DATABASE_URL's server, or on embedded PostgreSQL in a temp folder),
// a FIFO that spawned shells write to, and percentiles.
import { chmodSync, closeSync, mkdtempSync, openSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { startEmbedded } from "../src/db/embedded";
import type { Sql } from "../src/db/sql";
import { FINAL_STATES } from "../src/task/state";
import { freePort } from "../test/support/db";
import { type RoleProcess, spawnRole } from "../test/support/processes";

export interface BenchOptions {
  /** A few iterations only: a smoke run for CI, whose figures mean nothing. */
  quick: boolean;
}

/** One line of the results table: a metric and its value, already formatted. */
export interface SummaryRow {
  metric: string;
  value: string;
}

export interface BenchResult {
  name: string;
  /** One sentence: what is measured. */
  description: string;
  /** What the figures depend on: iterations, process layout, database. */
  settings: Record<string, unknown>;
  /** The raw figures, in milliseconds unless a key says otherwise. */
  figures: Record<string, unknown>;
  /** The rows shown in bench/results/README.md and the project README. */
  summary: SummaryRow[];
  /** `SELECT version()` and the durability settings of the server the bench ran against. */
  postgres: PostgresInfo;
}

export interface Bench {
  name: string;
  run(options: BenchOptions): Promise<BenchResult>;
}

// ---- clean-up ------------------------------------------------------------------------------

const openScopes = new Set<Scope>();

/**
 * Clean-ups run last-in first-out, once, whether the bench ends, throws, or the runner is
 * interrupted (closeAllScopes): a bench must not leave processes, databases or folders behind.
 */
export class Scope {
  private readonly cleanups: { what: string; fn: () => unknown }[] = [];
  private closing: Promise<void> | null = null;

  constructor() {
    openScopes.add(this);
  }

  defer(what: string, fn: () => unknown): void {
    this.cleanups.push({ what, fn });
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      const problems: string[] = [];
      for (const { what, fn } of this.cleanups.reverse()) {
        try {
          await fn();
        } catch (error) {
          problems.push(`${what}: ${error instanceof Error ? error.message : String(error)}`);
        }
      }
      this.cleanups.length = 0;
      openScopes.delete(this);
      if (problems.length > 0) console.error(`bench clean-up problems:\n  ${problems.join("\n  ")}`);
    })();
    return this.closing;
  }
}

export async function closeAllScopes(): Promise<void> {
  await Promise.all([...openScopes].map((scope) => scope.close()));
}

/** Rejects with `what` if `promise` has not settled within `ms`: every wait is bounded. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not happen within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---- database ------------------------------------------------------------------------------

export interface PostgresInfo {
  version: string;
  /** "DATABASE_URL" or "embedded". */
  source: string;
  fsync: string;
  synchronous_commit: string;
}

export interface BenchDatabase {
  /** URL of the fresh database the roles run on (they migrate it at start-up). */
  url: string;
  postgres: PostgresInfo;
  /** The embedded cluster's data folder (its postmaster.pid names the server's process). */
  dataDir?: string;
}

function withDatabase(url: string, database: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}

/**
 * A fresh database `bench_<random>`, on the server at DATABASE_URL when set, otherwise on an
 * embedded cluster in a temp folder on a free port with PostgreSQL's default durability (the
 * figures then include a real fsync per commit, like `bun start`). Everything it creates is
 * removed when `scope` closes.
 */
export async function createBenchDatabase(
  scope: Scope,
  log: (line: string) => void = () => {},
  /**
   * Server settings that need a server of the bench's own (e.g. pg_stat_statements preloaded):
   * given, the bench always starts embedded PostgreSQL, whatever DATABASE_URL says.
   */
  embeddedSettings?: Record<string, string>,
): Promise<BenchDatabase> {
  let serverUrl = embeddedSettings ? undefined : process.env.DATABASE_URL;
  let source = "DATABASE_URL";
  let dataDirOf: string | undefined;
  if (!serverUrl) {
    source = "embedded";
    const dataDir = mkdtempSync(join(tmpdir(), "tq-bench-pg-"));
    scope.defer("remove the embedded data folder", () => rmSync(dataDir, { recursive: true, force: true }));
    const port = await freePort();
    log(`starting embedded PostgreSQL on 127.0.0.1:${port} in ${dataDir}`);
    const embedded = await within(
      startEmbedded({ dataDir, port, settings: embeddedSettings }),
      120_000,
      "embedded PostgreSQL start",
    );
    dataDirOf = embedded.dataDir;
    scope.defer("stop embedded PostgreSQL", () => within(embedded.stop(), 30_000, "embedded PostgreSQL stop"));
    serverUrl = embedded.adminUrl;
  }
  const name = `bench_${Math.random().toString(36).slice(2, 10)}`;
  const admin = postgres(serverUrl, { max: 1, onnotice: () => {}, connect_timeout: 10 });
  try {
    await admin`CREATE DATABASE ${admin(name)}`;
    scope.defer(`drop database ${name}`, async () => {
      const dropper = postgres(serverUrl, { max: 1, onnotice: () => {}, connect_timeout: 10 });
      try {
        await dropper`DROP DATABASE IF EXISTS ${dropper(name)} WITH (FORCE)`;
      } finally {
        await dropper.end({ timeout: 5 });
      }
    });
    const [row] = await admin<{ version: string }[]>`SELECT version() AS version`;
    const [fsync] = await admin<{ fsync: string }[]>`SHOW fsync`;
    const [commit] = await admin<{ synchronous_commit: string }[]>`SHOW synchronous_commit`;
    return {
      url: withDatabase(serverUrl, name),
      ...(dataDirOf ? { dataDir: dataDirOf } : {}),
      postgres: {
        version: row?.version ?? "unknown",
        source,
        fsync: fsync?.fsync ?? "unknown",
        synchronous_commit: commit?.synchronous_commit ?? "unknown",
      },
    };
  } finally {
    await admin.end({ timeout: 5 });
  }
}

// ---- role processes ------------------------------------------------------------------------

export interface BenchCluster {
  coordinatorUrl: string;
  schedulerUrl: string;
  processes: RoleProcess[];
  workers: RoleProcess[];
  /** Starts one more worker process; resolves once it is connected. */
  addWorker(): Promise<RoleProcess>;
  /** The last lines each process logged, for a failure report. */
  logs(lines?: number): string;
}

/** Resolves when `proc` logs `event`; fails at once, with its output, if it exits first. */
async function ready(proc: RoleProcess, event: string): Promise<void> {
  let settled = false;
  const logged = proc.waitForEvent(event, { timeoutMs: 30_000 });
  const exitedFirst = proc.exited.then(async (code) => {
    if (settled) return;
    // Let the pipes deliver the last lines the process wrote.
    await Bun.sleep(100);
    throw new Error(
      `${proc.role} (pid ${proc.pid}) exited with ${code} before logging ${event}; it logged:\n${proc.raw.slice(-30).join("\n")}`,
    );
  });
  // The loser of the race must not surface later as an unhandled rejection.
  logged.catch(() => {});
  exitedFirst.catch(() => {});
  try {
    await Promise.race([logged, exitedFirst]);
  } finally {
    settled = true;
  }
}

/**
 * One coordinator, one scheduler and `workers` worker processes on `databaseUrl`, the real
 * role entry points. Each process is stopped when `scope` closes, including when start-up
 * fails half way.
 */
export async function startBenchCluster(
  scope: Scope,
  databaseUrl: string,
  options: {
    workers: number;
    slots: number;
    env: Record<string, string>;
    /** Extra settings of the i-th worker (labels, queues). */
    workerEnv?: (i: number) => Record<string, string>;
  },
): Promise<BenchCluster> {
  const [httpPort, grpcPort, schedulerPort] = await Promise.all([freePort(), freePort(), freePort()]);
  const processes: RoleProcess[] = [];
  const spawn = (role: "coordinator" | "scheduler" | "worker", env: Record<string, string>) => {
    const proc = spawnRole(role, env);
    processes.push(proc);
    scope.defer(`stop ${role} pid ${proc.pid}`, () => proc.stop(10_000));
    return proc;
  };
  const coordinator = spawn("coordinator", {
    ...options.env,
    DATABASE_URL: databaseUrl,
    TQ_COORDINATOR_PORT: String(httpPort),
    TQ_GRPC_PORT: String(grpcPort),
  });
  const scheduler = spawn("scheduler", { ...options.env, DATABASE_URL: databaseUrl, TQ_SCHEDULER_PORT: String(schedulerPort) });
  await Promise.all([ready(coordinator, "coordinator.started"), ready(scheduler, "scheduler.started")]);
  const workers: RoleProcess[] = [];
  let workerIndex = 0;
  const addWorker = async () => {
    // No DATABASE_URL: workers hold no database credentials.
    const worker = spawn("worker", {
      ...options.env,
      TQ_COORDINATOR_ADDRESSES: `127.0.0.1:${grpcPort}`,
      TQ_WORKER_SLOTS: String(options.slots),
      ...options.workerEnv?.(workerIndex++),
    });
    workers.push(worker);
    await ready(worker, "worker.connected");
    return worker;
  };
  await Promise.all(Array.from({ length: options.workers }, addWorker));
  return {
    coordinatorUrl: `http://127.0.0.1:${httpPort}`,
    schedulerUrl: `http://127.0.0.1:${schedulerPort}`,
    processes,
    workers,
    addWorker,
    logs(lines = 40) {
      return processes
        .map(
          (p) =>
            `--- ${p.role} (pid ${p.pid}), last ${Math.min(lines, p.raw.length)} of ${p.raw.length} lines:\n${p.raw.slice(-lines).join("\n")}`,
        )
        .join("\n");
    },
  };
}

/** The product's heartbeat defaults (not the test suite's fast ones), logging what benches wait on. */
export const PRODUCT_ROLE_ENV: Readonly<Record<string, string>> = {
  TQ_HEARTBEAT_INTERVAL_MS: "1000",
  TQ_HEARTBEAT_TIMEOUT_MS: "3000",
  TQ_LOG_LEVEL: "info",
};

/**
 * The raw ceiling's spawn: `sh -c command` from Bun.spawn with the worker executor's options
 * (own process group, piped output), TQ_TASK_ID set as a worker sets it.
 */
export function rawSpawn(command: string, taskId?: string): Bun.Subprocess<"ignore", "pipe", "pipe"> {
  return Bun.spawn(["sh", "-c", command], {
    env: taskId === undefined ? undefined : { ...process.env, TQ_TASK_ID: taskId },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    detached: true,
  });
}

// ---- FIFO signals --------------------------------------------------------------------------

/**
 * A named pipe that spawned shells write one line to (`echo "$TQ_TASK_ID" > fifo`: echo is a
 * shell builtin, so the write costs no exec). The bench holds it open read-write, so it never
 * sees end-of-file between writers, and stamps each line with performance.now() as the chunk
 * holding it arrives. Lines shorter than PIPE_BUF are written atomically, so concurrent
 * writers cannot interleave.
 */
export class FifoSignals {
  readonly path: string;
  private readonly dir: string;
  private fd: number | null = null;
  private cancelRead: (() => Promise<void>) | null = null;
  private readonly arrived = new Map<string, number>();
  private readonly waiters = new Map<string, (at: number) => void>();
  private pumping: Promise<void> = Promise.resolve();

  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "tq-bench-fifo-"));
    // A worker started as root runs tasks as its slots' own users: they must reach the FIFO.
    chmodSync(this.dir, 0o711);
    this.path = join(this.dir, "signals");
  }

  start(): void {
    const made = Bun.spawnSync(["mkfifo", "-m", "622", this.path]);
    if (made.exitCode !== 0) throw new Error(`mkfifo ${this.path} failed: ${made.stderr.toString().trim()}`);
    this.fd = openSync(this.path, "r+");
    const reader = Bun.file(this.fd).stream().getReader();
    this.cancelRead = () => reader.cancel();
    this.pumping = this.pump(reader);
  }

  /** The shell command that signals `$TQ_TASK_ID` on this FIFO. */
  command(): string {
    return `echo "$TQ_TASK_ID" > '${this.path.replaceAll("'", `'\\''`)}'`;
  }

  /** performance.now() at which `id` arrived (it may have arrived already). */
  waitFor(id: string, timeoutMs: number): Promise<number> {
    const at = this.arrived.get(id);
    if (at !== undefined) {
      this.arrived.delete(id);
      return Promise.resolve(at);
    }
    const arrival = new Promise<number>((resolve) => this.waiters.set(id, resolve));
    return within(arrival, timeoutMs, `the signal of ${id} on the FIFO`).finally(() => this.waiters.delete(id));
  }

  /** A started FIFO, closed when `scope` closes. */
  static open(scope: Scope): FifoSignals {
    const fifo = new FifoSignals();
    scope.defer("close the FIFO", () => fifo.stop());
    fifo.start();
    return fifo;
  }

  async stop(): Promise<void> {
    await this.cancelRead?.().catch(() => {});
    await this.pumping;
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
    rmSync(this.dir, { recursive: true, force: true });
  }

  private async pump(reader: { read(): Promise<{ done: boolean; value?: Uint8Array }> }): Promise<void> {
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        const at = performance.now();
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        let newline: number;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const id = buffer.slice(0, newline).trim();
          buffer = buffer.slice(newline + 1);
          const waiter = this.waiters.get(id);
          if (waiter) waiter(at);
          else this.arrived.set(id, at);
        }
      }
    } catch {
      // cancelled by stop()
    }
  }
}

// ---- statistics ----------------------------------------------------------------------------

export interface Distribution {
  n: number;
  min: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

/** Nearest-rank percentiles, in the unit of the samples, rounded to microseconds for ms. */
export function distribution(samples: readonly number[]): Distribution {
  if (samples.length === 0) throw new Error("no samples");
  const sorted = [...samples].sort((a, b) => a - b);
  const rank = (p: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
  const round = (x: number) => Math.round(x * 1000) / 1000;
  return {
    n: sorted.length,
    min: round(sorted[0]!),
    mean: round(sorted.reduce((sum, x) => sum + x, 0) / sorted.length),
    p50: round(rank(50)),
    p90: round(rank(90)),
    p99: round(rank(99)),
    max: round(sorted[sorted.length - 1]!),
  };
}

export function ms(x: number): string {
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

/** "p50 / p90 / p99 / max" in ms. */
export function quartet(d: Distribution): string {
  return `${ms(d.p50)} / ${ms(d.p90)} / ${ms(d.p99)} / ${ms(d.max)} ms`;
}

// ---- task-table helpers shared by the load benches ---------------------------------------

/** A 1000-task batch slower than this is a fault to report, not a figure. */
const BATCH_TIMEOUT_MS = 30_000;

export interface BatchTask {
  command: string;
  scheduled_at?: string;
  queue?: string;
  priority?: number;
  require?: { key: string; op: string; value?: string }[];
  prefer?: { key: string; op: string; value?: string; weight: number }[];
}

/** POST /tasks/batch; returns the created tasks' ids and scheduled_at, in the order sent. */
export async function submitBatch(baseUrl: string, tasks: readonly BatchTask[]): Promise<{ id: string; scheduled_at: string }[]> {
  const response = await within(
    fetch(`${baseUrl}/tasks/batch`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ tasks }),
    }),
    BATCH_TIMEOUT_MS,
    `POST ${baseUrl}/tasks/batch`,
  );
  const answer = (await response.json()) as { tasks?: { id: string; scheduled_at: string }[] };
  if (response.status !== 201 || !Array.isArray(answer.tasks) || answer.tasks.length !== tasks.length) {
    throw new Error(
      `POST ${baseUrl}/tasks/batch of ${tasks.length} answered ${response.status}: ${JSON.stringify(answer).slice(0, 500)}`,
    );
  }
  return answer.tasks;
}

/** Tasks not yet in a final state (queued, dispatched, running). */
export async function countUnfinished(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks WHERE state NOT IN ${sql([...FINAL_STATES])}`;
  return row?.n ?? 0;
}

/**
 * Polls every `pollMs` (on a fixed beat, not drifting by the query time) until no task is
 * unfinished; returns performance.now() at which that answer arrived.
 */
/**
 * Whether any task is unfinished, read from the partial indexes of the live states (queued,
 * dispatched/running, waiting): a few index pages, where count(*) reads the whole table. The
 * poll of a burn-down runs every few ms, and a count of a table of thousands of rows was the
 * largest part of what the database did per task in the benches (issue 16's "600 tuples read
 * per task" was mostly this poll).
 */
export async function anyUnfinished(sql: Sql): Promise<boolean> {
  // Each probe is ordered by its partial index's key, LIMIT 1: as EXISTS, the planner took a
  // sequential scan whenever the statistics (from the backlog's submit) said most rows were
  // queued, and that scan read every finished row ahead of the first queued one (issue 16's
  // ~0.3 seq scans and ~170 tuples read per task in bench cost were this poll).
  const [row] = await sql<{ any: boolean }[]>`
    SELECT (SELECT id FROM tasks WHERE state = 'queued' ORDER BY rank, id LIMIT 1) IS NOT NULL
        OR (SELECT id FROM tasks WHERE state IN ('dispatched', 'running') ORDER BY lease_expires_at LIMIT 1) IS NOT NULL
        OR (SELECT id FROM tasks WHERE state = 'waiting' ORDER BY id LIMIT 1) IS NOT NULL AS any`;
  return row?.any === true;
}

export async function untilAllFinal(sql: Sql, pollMs: number, timeoutMs: number): Promise<number> {
  const deadline = performance.now() + timeoutMs;
  let beat = performance.now();
  for (;;) {
    const unfinished = await anyUnfinished(sql);
    const at = performance.now();
    if (!unfinished) return at;
    if (at > deadline) throw new Error(`${await countUnfinished(sql)} tasks still unfinished after ${timeoutMs} ms`);
    beat += pollMs;
    if (beat < at) beat = at;
    await Bun.sleep(beat - at);
  }
}

export interface StateReport {
  /** Tasks per state. */
  states: Record<string, number>;
  /** Tasks that needed more than one attempt, whatever their end. */
  retried: number;
  /** A few tasks that did not succeed, for the failure message. */
  examples: { id: string; state: string; attempt: number; exit_code: number | null; error: string | null }[];
}

export async function stateReport(sql: Sql): Promise<StateReport> {
  const rows = await sql<{ state: string; n: number; retried: number }[]>`
    SELECT state, count(*)::int AS n, count(*) FILTER (WHERE attempt > 1)::int AS retried FROM tasks GROUP BY state ORDER BY state`;
  const examples = await sql<StateReport["examples"]>`
    SELECT id, state, attempt, exit_code, error FROM tasks WHERE state <> 'succeeded' ORDER BY id LIMIT 5`;
  return {
    states: Object.fromEntries(rows.map((r) => [r.state, r.n])),
    retried: rows.reduce((sum, r) => sum + r.retried, 0),
    examples: [...examples],
  };
}

export function notSucceeded(report: StateReport): number {
  return Object.entries(report.states).reduce((sum, [state, n]) => (state === "succeeded" ? sum : sum + n), 0);
}

/** The state report once every task is final; throws, naming a few, if any did not succeed. */
export async function requireAllSucceeded(sql: Sql): Promise<StateReport> {
  const report = await stateReport(sql);
  const failed = notSucceeded(report);
  if (failed > 0) {
    throw new Error(`${failed} tasks did not succeed: ${JSON.stringify(report.states)}; e.g. ${JSON.stringify(report.examples)}`);
  }
  return report;
}

export interface TimelineRow {
  id: string;
  scheduled_at: Date;
  picked_at: Date | null;
  started_at: Date | null;
  completed_at: Date | null;
}

/**
 * The rows' own timestamps (millisecond resolution): scheduled_at as submitted, picked_at by
 * the database's clock at the claim, started_at and completed_at by the worker's clock.
 */
export async function taskTimeline(sql: Sql, ids: readonly string[]): Promise<TimelineRow[]> {
  return sql<TimelineRow[]>`SELECT id, scheduled_at, picked_at, started_at, completed_at FROM tasks WHERE id IN ${sql(ids)}`;
}

type Stamp = "scheduled_at" | "picked_at" | "started_at" | "completed_at";

/** `to - from` of each row, in ms; a missing stamp is a fault. */
export function spans(rows: readonly TimelineRow[], from: Stamp, to: Stamp): number[] {
  return rows.map((row) => {
    const a = row[from];
    const b = row[to];
    if (!a || !b) throw new Error(`task ${row.id} has no ${a ? to : from}: ${JSON.stringify(row)}`);
    return b.getTime() - a.getTime();
  });
}
