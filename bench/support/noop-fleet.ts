// The no-op executor fleet: many simulated workers in one process, each the real Worker
// (src/worker/worker.ts) on its own gRPC stream (Hello, heartbeats, lease renewals and their
// confirmations, Started, Finished, Acks, reconnects), except that an assignment "runs" nothing:
// it is reported started and finished with exit 0 at once, without spawning. It measures what the
// control plane (coordinator + PostgreSQL) costs per task and per worker, with no command's cost
// in the way.
//
// In a bench:   const fleet = await startNoopFleet({ addresses: [grpc], workers: 100, slots: 8 });
//               ... await fleet.stop();
// As a process (so that its CPU is counted apart from the bench's, from /proc):
//   bun bench/support/noop-fleet.ts --address 127.0.0.1:7070 --workers 2000 --slots 1
//     [--heartbeat-interval-ms 1000 --heartbeat-timeout-ms 3000 --token T --queues a,b --labels k=v,..]
//     [--report-runs: one {"event":"fleet.run","task":id,"at":<epoch ms, fractional>} line per run]
//   prints one JSON line {"event":"fleet.ready",...} once every worker is welcomed, then one
//   {"event":"fleet.stats",...} line per second; drains and exits 0 on SIGTERM or SIGINT.
import { parseArgs } from "node:util";
import type { Logger } from "../../src/log";
import { silentLogger } from "../../src/log";
import { type AttemptUsage, NO_OUTPUT } from "../../src/task/task";
import type { Execution, RunResult, RunSpec } from "../../src/worker/executor";
import { Worker } from "../../src/worker/worker";

export interface NoopFleetOptions {
  /** Coordinator gRPC addresses (host:port), dialed as a real worker dials them. */
  addresses: string[];
  /** How many simulated workers (one stream each). */
  workers: number;
  /** Slots per worker. */
  slots: number;
  /** The product's defaults unless set (1000 / 3000 ms); the coordinator's Welcome overrides them. */
  heartbeatIntervalMs?: number;
  heartbeatTimeoutMs?: number;
  /** Join token (TQ_WORKER_TOKEN), when the coordinator requires one. */
  workerToken?: string;
  queues?: readonly string[];
  /** Labels of worker i (routing benches); none by default. */
  labels?: (i: number) => Readonly<Record<string, string>>;
  /** Name of worker i; `noop-<i>` by default. */
  name?: (i: number) => string;
  log?: Logger;
  /** Hears each assignment as it "runs" (spec.env has TQ_TASK_ID and TQ_TASK_ATTEMPT). */
  onRun?: (spec: RunSpec) => void;
}

export interface NoopFleet {
  readonly workers: readonly Worker[];
  /** Assignments run (reported finished, exit 0) since the start. */
  readonly executed: number;
  /** Drains every worker (results acknowledged) and closes its stream. */
  stop(): Promise<void>;
}

const NO_USAGE: AttemptUsage = {
  limitsApplied: "none",
  limits: { memory_mb: null, pids: null, nofile: null, cpu: null },
  cpuUserUs: 0,
  cpuSystemUs: 0,
  peakMemoryBytes: null,
  oomKilled: false,
};

/** An Execution that has already exited 0, with no output; pid is this process's (it ran here). */
function noopExecution(): Execution {
  const startedAt = new Date();
  const result: RunResult = {
    outcome: "exited",
    exitCode: 0,
    signal: null,
    ...NO_OUTPUT,
    error: null,
    pid: process.pid,
    startedAt,
    finishedAt: startedAt,
    usage: NO_USAGE,
  };
  return {
    pid: process.pid,
    startedAt,
    cgroupProcs: [],
    // Never armed: the fleet's workers spawn nothing ahead (Attempts arms only its own executor).
    released: true,
    release: () => false,
    result: Promise.resolve(result),
    stop: () => {},
    kill: () => {},
  };
}

/** Starts the fleet; resolves once a coordinator has welcomed every worker. */
export async function startNoopFleet(options: NoopFleetOptions): Promise<NoopFleet> {
  if (!Number.isInteger(options.workers) || options.workers < 1)
    throw new Error(`noop fleet: workers must be a positive integer, got ${options.workers}`);
  if (!Number.isInteger(options.slots) || options.slots < 1)
    throw new Error(`noop fleet: slots must be a positive integer, got ${options.slots}`);
  if (options.addresses.length === 0) throw new Error("noop fleet: no coordinator address");
  let executed = 0;
  const execute = (spec: RunSpec): Execution => {
    executed++;
    options.onRun?.(spec);
    return noopExecution();
  };
  const workers = Array.from(
    { length: options.workers },
    (_, i) =>
      new Worker({
        name: options.name?.(i) ?? `noop-${i}`,
        slots: options.slots,
        queues: options.queues,
        labels: options.labels?.(i),
        addresses: options.addresses,
        log: options.log ?? silentLogger,
        heartbeatIntervalMs: options.heartbeatIntervalMs ?? 1000,
        heartbeatTimeoutMs: options.heartbeatTimeoutMs ?? 3000,
        killGraceMs: 1000,
        drainGraceMs: 5000,
        maxOutputBytes: 1024,
        baseEnv: {},
        workerToken: options.workerToken,
        execute,
      }),
  );
  // Dialed in waves, so that 2,000 Hellos do not all land in the same tick.
  const WAVE = 100;
  for (let i = 0; i < workers.length; i += WAVE) {
    const wave = workers.slice(i, i + WAVE);
    for (const worker of wave) worker.start();
    await Promise.all(wave.map((worker) => worker.connected()));
  }
  return {
    workers,
    get executed() {
      return executed;
    },
    async stop() {
      await Promise.all(workers.map((worker) => worker.stop()));
    },
  };
}

function parseKeyValues(text: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const pair of (text ?? "").split(",").filter(Boolean)) {
    const at = pair.indexOf("=");
    if (at <= 0) throw new Error(`noop fleet: --labels wants key=value pairs, got "${pair}"`);
    out[pair.slice(0, at)] = pair.slice(at + 1);
  }
  return out;
}

function positive(name: string, text: string | undefined, fallback: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) throw new Error(`noop fleet: --${name} must be a positive integer, got "${text}"`);
  return n;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      address: { type: "string", multiple: true },
      workers: { type: "string" },
      slots: { type: "string" },
      "heartbeat-interval-ms": { type: "string" },
      "heartbeat-timeout-ms": { type: "string" },
      token: { type: "string" },
      queues: { type: "string" },
      labels: { type: "string" },
      "report-runs": { type: "boolean" },
    },
  });
  const addresses = (values.address ?? []).flatMap((a) => a.split(",")).filter(Boolean);
  if (addresses.length === 0) throw new Error("noop fleet: give --address host:port (one or more)");
  const labels = parseKeyValues(values.labels);
  const say = (fields: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(fields)}\n`);
  const startedAt = performance.now();
  const reportRuns = values["report-runs"] === true;
  const fleet = await startNoopFleet({
    addresses,
    workers: positive("workers", values.workers, 1),
    slots: positive("slots", values.slots, 1),
    heartbeatIntervalMs: positive("heartbeat-interval-ms", values["heartbeat-interval-ms"], 1000),
    heartbeatTimeoutMs: positive("heartbeat-timeout-ms", values["heartbeat-timeout-ms"], 3000),
    workerToken: values.token,
    queues: values.queues?.split(",").filter(Boolean),
    labels: () => labels,
    // The wall clock with sub-ms precision: the bench on this host compares it with its own.
    onRun: reportRuns
      ? (spec) => say({ event: "fleet.run", task: spec.env.TQ_TASK_ID, at: performance.timeOrigin + performance.now() })
      : undefined,
  });
  say({ event: "fleet.ready", workers: fleet.workers.length, connectMs: Math.round(performance.now() - startedAt) });
  const stats = setInterval(() => {
    const mem = process.memoryUsage();
    say({ event: "fleet.stats", executed: fleet.executed, rssBytes: mem.rss });
  }, 1000);
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    clearInterval(stats);
    await fleet.stop();
    say({ event: "fleet.stopped", executed: fleet.executed });
    process.exit(0);
  };
  process.on("SIGTERM", () => void stop());
  process.on("SIGINT", () => void stop());
}

if (import.meta.main) {
  main().catch((error) => {
    process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n`);
    process.exit(2);
  });
}

/** The fleet as a process of its own (its CPU apart from the bench's); `lines` are its JSON lines. */
export interface FleetProcess {
  proc: Bun.Subprocess<"ignore", "pipe", "pipe">;
  /** Resolves with fleet.ready's fields once every worker is welcomed. */
  ready: Promise<Record<string, unknown>>;
  /** Hears every JSON line the fleet prints. */
  onLine(listener: (line: Record<string, unknown>) => void): void;
  /** SIGTERM (drain), then SIGKILL if it has not exited within 15 s. */
  stop(): Promise<void>;
}

export function spawnNoopFleet(args: {
  address: string;
  workers: number;
  slots: number;
  reportRuns?: boolean;
  heartbeatIntervalMs?: number;
  heartbeatTimeoutMs?: number;
}): FleetProcess {
  const argv = [
    "bun",
    import.meta.path,
    "--address",
    args.address,
    "--workers",
    String(args.workers),
    "--slots",
    String(args.slots),
    ...(args.reportRuns ? ["--report-runs"] : []),
    ...(args.heartbeatIntervalMs ? ["--heartbeat-interval-ms", String(args.heartbeatIntervalMs)] : []),
    ...(args.heartbeatTimeoutMs ? ["--heartbeat-timeout-ms", String(args.heartbeatTimeoutMs)] : []),
  ];
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const listeners: ((line: Record<string, unknown>) => void)[] = [];
  let stderr = "";
  void (async () => {
    for await (const chunk of proc.stderr) stderr += new TextDecoder().decode(chunk);
  })();
  const ready = new Promise<Record<string, unknown>>((resolve, reject) => {
    listeners.push((line) => {
      if (line.event === "fleet.ready") resolve(line);
    });
    void proc.exited.then((code) => reject(new Error(`noop fleet exited ${code} before it was ready: ${stderr.slice(-2000)}`)));
  });
  ready.catch(() => {});
  void (async () => {
    let buffered = "";
    const decoder = new TextDecoder();
    for await (const chunk of proc.stdout) {
      buffered += decoder.decode(chunk, { stream: true });
      let at = buffered.indexOf("\n");
      while (at >= 0) {
        const text = buffered.slice(0, at);
        buffered = buffered.slice(at + 1);
        at = buffered.indexOf("\n");
        if (!text.startsWith("{")) continue;
        const line = JSON.parse(text) as Record<string, unknown>;
        for (const listener of listeners) listener(line);
      }
    }
  })();
  return {
    proc,
    ready,
    onLine: (listener) => {
      listeners.push(listener);
    },
    async stop() {
      if (proc.exitCode !== null) return;
      proc.kill("SIGTERM");
      const timer = setTimeout(() => proc.kill("SIGKILL"), 15_000);
      await proc.exited;
      clearTimeout(timer);
    },
  };
}
