// Real role processes for end-to-end tests. Each process's JSON log lines are parsed as they
// arrive, so tests wait on what a process says (its `event`: "coordinator.started",
// "worker.connected") rather than on time.
import type { Subprocess } from "bun";
import { freePort } from "./db";

export type LogLine = Record<string, unknown> & { msg?: string; event?: string };

const ROOT = new URL("../..", import.meta.url).pathname;

export class RoleProcess {
  readonly lines: LogLine[] = [];
  readonly raw: string[] = [];
  private waiters: { test: (line: LogLine) => boolean; resolve: (line: LogLine) => void; fail: (why: string) => void }[] = [];
  /** Set once the process has exited and its output has been read to the end. */
  private gone: string | null = null;
  readonly exited: Promise<number>;

  constructor(
    readonly role: string,
    readonly proc: Subprocess<"ignore", "pipe", "pipe">,
    /** Leads a process group of its own (started through `bun run`). */
    readonly grouped = false,
  ) {
    this.exited = proc.exited;
    // A line still awaited when the process is gone and its output read will never come.
    void Promise.all([this.pump(proc.stdout), this.pump(proc.stderr), proc.exited]).then(([, , code]) => {
      this.gone = `exited (code ${code}, signal ${proc.signalCode ?? "none"})`;
      for (const waiter of this.waiters.splice(0)) waiter.fail(this.gone);
    });
  }

  get pid(): number {
    return this.proc.pid;
  }

  /** Resolves with the first log line (already seen or still to come) that matches. */
  waitFor(test: (line: LogLine) => boolean, what = "a matching log line", timeoutMs = 30_000): Promise<LogLine> {
    const seen = this.lines.find(test);
    if (seen) return Promise.resolve(seen);
    const failure = (why: string) =>
      new Error(`${this.role} (pid ${this.pid}) did not log ${what}: ${why}; it logged:\n${this.raw.slice(-30).join("\n")}`);
    if (this.gone) return Promise.reject(failure(this.gone));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.resolve !== done);
        reject(failure(`not within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (line: LogLine) => {
        clearTimeout(timer);
        resolve(line);
      };
      const fail = (why: string) => {
        clearTimeout(timer);
        reject(failure(why));
      };
      this.waiters.push({ test, resolve: done, fail });
    });
  }

  /**
   * Resolves with the first log line carrying this `event` (see "Log events tests rely on" in
   * ARCHITECTURE.md) and, if given, matching `where`. The message text is for humans and may
   * change; the event name is what tests hold a role to.
   */
  waitForEvent(
    event: string,
    options: { where?: (line: LogLine) => boolean; what?: string; timeoutMs?: number } = {},
  ): Promise<LogLine> {
    const where = options.where ?? (() => true);
    return this.waitFor((line) => line.event === event && where(line), options.what ?? `event ${event}`, options.timeoutMs);
  }

  /** The log lines seen so far that carry this `event`. */
  logged(event: string): LogLine[] {
    return this.lines.filter((line) => line.event === event);
  }

  /**
   * Resolves with the first plain-text (not JSON) line that is `text`: what a role prints for
   * people rather than logs, such as a start-up failure on stderr or `bun start`'s banner.
   */
  waitForText(text: string, timeoutMs?: number): Promise<LogLine> {
    return this.waitFor((line) => line.text === true && line.msg === text, `the line "${text}"`, timeoutMs);
  }

  kill(signal: NodeJS.Signals = "SIGTERM"): void {
    try {
      this.proc.kill(signal);
    } catch {
      // already gone
    }
  }

  /**
   * Signals the process's whole group, as systemd and a terminal's Ctrl+C do: for a role
   * started with `viaBunRun`, both `bun run` and the role receive it.
   */
  signalGroup(signal: NodeJS.Signals): void {
    try {
      process.kill(-this.pid, signal);
    } catch {
      // already gone
    }
  }

  /** SIGTERM, then SIGKILL if it has not exited within the grace period. */
  async stop(graceMs = 10_000): Promise<number> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return this.proc.exitCode ?? -1;
    this.kill("SIGTERM");
    // `bun run` does not forward SIGKILL: kill its role with it.
    const timer = setTimeout(() => (this.grouped ? this.signalGroup("SIGKILL") : this.kill("SIGKILL")), graceMs);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }

  private async pump(stream: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of stream) {
      buffer += decoder.decode(chunk, { stream: true });
      let newline: number;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const text = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        this.raw.push(text);
        let line: LogLine;
        try {
          line = JSON.parse(text) as LogLine;
        } catch {
          line = { msg: text, text: true };
        }
        this.lines.push(line);
        for (const waiter of [...this.waiters]) {
          if (waiter.test(line)) {
            this.waiters = this.waiters.filter((w) => w !== waiter);
            waiter.resolve(line);
          }
        }
      }
    }
  }
}

/**
 * Starts a role as `bun <entry>`, or with `viaBunRun` as the README does, `bun run <role>`
 * (which forwards the signals it gets to the role), leading a process group of its own.
 */
/**
 * TQ_BENCH_ROLE_ENV="K=V,K=V": settings laid over every role this harness starts, for
 * before-and-after measurements of one setting (TQ_WORKER_LIMITS=none, say) without editing a bench.
 */
function experimentEnv(): Record<string, string> {
  const spec = process.env.TQ_BENCH_ROLE_ENV;
  if (!spec) return {};
  const env: Record<string, string> = {};
  for (const pair of spec.split(",")) {
    const at = pair.indexOf("=");
    if (at <= 0) throw new Error(`TQ_BENCH_ROLE_ENV: "${pair}" is not K=V`);
    env[pair.slice(0, at).trim()] = pair.slice(at + 1);
  }
  return env;
}

export function spawnRole(
  role: "scheduler" | "coordinator" | "worker" | "start",
  env: Record<string, string>,
  options: {
    viaBunRun?: boolean;
    /** Run the role as this uid and gid (the tests run as root). */
    user?: { uid: number; gid: number };
  } = {},
): RoleProcess {
  const entry = role === "start" ? "src/start.ts" : `src/${role}/main.ts`;
  // TQ_BENCH_CPU_PROF=<folder>: each role writes a CPU profile there on exit (bench/cost.ts's profiles).
  const profile = process.env.TQ_BENCH_CPU_PROF
    ? [
        "--cpu-prof",
        "--cpu-prof-md",
        `--cpu-prof-dir=${process.env.TQ_BENCH_CPU_PROF}`,
        `--cpu-prof-name=${role}-${Date.now()}.cpuprofile`,
      ]
    : [];
  const proc = Bun.spawn(options.viaBunRun ? ["bun", "run", role] : ["bun", ...profile, entry], {
    cwd: ROOT,
    // setsid(): the group is the role's alone, so a group signal reaches nothing else.
    detached: options.viaBunRun === true,
    env: {
      PATH: process.env.PATH ?? "/usr/bin:/bin",
      HOME: process.env.HOME ?? "/tmp",
      TQ_LOG_LEVEL: "info",
      ...env,
      ...experimentEnv(),
    },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    uid: options.user?.uid,
    gid: options.user?.gid,
  });
  return new RoleProcess(role, proc, options.viaBunRun === true);
}

export interface Cluster {
  coordinatorUrl: string;
  /** The settings every process of the cluster got (ports included). */
  coordinatorEnv: Record<string, string>;
  schedulerUrl: string;
  grpcAddress: string;
  coordinator: RoleProcess;
  /** Starts a new coordinator process on the same ports (after the old one exited). */
  restartCoordinator(): Promise<RoleProcess>;
  scheduler: RoleProcess | null;
  workers: RoleProcess[];
  /** Starts one more worker process and waits until it is connected. */
  addWorker(env?: Record<string, string>, options?: { viaBunRun?: boolean }): Promise<RoleProcess>;
  stop(): Promise<void>;
}

/** A coordinator, optionally a scheduler, and `workers` worker processes on `databaseUrl`. */
export async function startCluster(
  databaseUrl: string,
  options: { workers: number; slots?: number; scheduler?: boolean; env?: Record<string, string> },
): Promise<Cluster> {
  const [httpPort, grpcPort, schedulerPort] = await Promise.all([freePort(), freePort(), freePort()]);
  const common = { DATABASE_URL: databaseUrl, TQ_HEARTBEAT_INTERVAL_MS: "200", TQ_HEARTBEAT_TIMEOUT_MS: "1000", ...options.env };
  const coordinatorEnv = { ...common, TQ_COORDINATOR_PORT: String(httpPort), TQ_GRPC_PORT: String(grpcPort) };
  let coordinator = spawnRole("coordinator", coordinatorEnv);
  const scheduler =
    options.scheduler === false ? null : spawnRole("scheduler", { ...common, TQ_SCHEDULER_PORT: String(schedulerPort) });
  const all: RoleProcess[] = [coordinator, ...(scheduler ? [scheduler] : [])];
  const restartCoordinator = async () => {
    coordinator = spawnRole("coordinator", coordinatorEnv);
    all.push(coordinator);
    cluster.coordinator = coordinator;
    await coordinator.waitForEvent("coordinator.started");
    return coordinator;
  };
  await Promise.all([coordinator.waitForEvent("coordinator.started"), scheduler?.waitForEvent("scheduler.started")]);
  const grpcAddress = `127.0.0.1:${grpcPort}`;
  const workers: RoleProcess[] = [];
  const addWorker = async (env: Record<string, string> = {}, spawnOptions: { viaBunRun?: boolean } = {}) => {
    const { DATABASE_URL: _, ...workerEnv } = common;
    const worker = spawnRole(
      "worker",
      {
        ...workerEnv,
        TQ_COORDINATOR_ADDRESSES: grpcAddress,
        TQ_WORKER_SLOTS: String(options.slots ?? 2),
        ...env,
      },
      spawnOptions,
    );
    all.push(worker);
    workers.push(worker);
    await worker.waitForEvent("worker.connected");
    return worker;
  };
  try {
    await Promise.all(Array.from({ length: options.workers }, () => addWorker()));
  } catch (error) {
    await Promise.all(all.map((p) => p.stop(2000)));
    throw error;
  }
  const cluster: Cluster = {
    coordinatorUrl: `http://127.0.0.1:${httpPort}`,
    coordinatorEnv,
    restartCoordinator,
    schedulerUrl: `http://127.0.0.1:${schedulerPort}`,
    grpcAddress,
    coordinator,
    scheduler,
    workers,
    addWorker,
    /** Workers first (they drain and say goodbye), then the servers. */
    async stop() {
      await Promise.all(workers.map((p) => p.stop(5000)));
      await Promise.all(all.filter((p) => !workers.includes(p)).map((p) => p.stop(5000)));
    },
  };
  return cluster;
}
