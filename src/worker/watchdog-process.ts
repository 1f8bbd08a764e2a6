// The worker's watchdog: a process of its own (in its own session and process group, started
// by src/worker/watchdog.ts), so that it outlives its worker's death or freeze. It reads the
// worker's state lines on stdin. When the pipe ends (the worker exited or died) or stays
// silent for `silence_ms` (the worker is frozen: it is killed, so that it cannot start or
// report anything once thawed), it kills every attempt the worker held (SIGKILL to each
// process group, and each cgroup's kill-all for what left its group), waits until none of
// their processes runs, and only then tells a coordinator which attempts it stopped
// (WorkerService.ReportWorkerLost, with the worker's credential), so that the coordinator can
// requeue them at once. Then it exits.
//
// Cheap by design: the steady state is one blocked read. The Bun watcher loads gRPC and dials
// its coordinator once, while it watches (a cold import and a TLS handshake cost a busy host
// a few hundred ms, all of which a crashed worker's next attempt would wait for); the bash
// watcher hands over to this file only when there is something to report.
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { type Config, coordinatorAddresses, loadConfig } from "../config";
import { createLogger } from "../log";
import type { HeldProcess } from "./attempts";
import { groupRunning } from "./executor";
import { parseStateLine, type WatchdogArgs, type WatchdogState } from "./watchdog";

/** How long the watchdog tries to reach a coordinator before it gives up (the leases lapse then). */
const REPORT_FOR_MS = 15_000;
/** How long it waits for the killed processes to be gone before it reports anyway, saying so. */
const GONE_WITHIN_MS = 5_000;

const args = JSON.parse(process.argv[2] ?? "{}") as WatchdogArgs;
const config: Config = loadConfig();
const log = createLogger("watchdog", config.TQ_LOG_LEVEL).child({ worker_pid: args.worker_pid });

/**
 * A silent worker that is not stopped (its event loop is stuck, or this process was itself
 * held up and has beats still unread) is given this many silence bounds before it is taken
 * for hung and killed as a frozen one is.
 */
const HUNG_AFTER_BOUNDS = 4;

let state: WatchdogState | null = null;
let lost = false;
let silence: ReturnType<typeof setTimeout> | undefined;
/** Silence bounds passed since the last beat. */
let silentBounds = 0;

/** How long after its start the watcher loads what a report needs (past the worker's own start-up). */
const WARM_AFTER_MS = 1000;

type ReportKit = {
  grpc: typeof import("@grpc/grpc-js");
  Client: ReturnType<typeof import("../rpc/definitions").clientConstructor>;
  credentials: import("@grpc/grpc-js").ChannelCredentials;
};
let kit: Promise<ReportKit> | null = null;
/** The channel to each address, kept from the warm-up to the report. */
const clients = new Map<string, InstanceType<ReportKit["Client"]>>();
/** The address whose channel was opened ahead. */
let warmed: string | null = null;

const armSilence = () => {
  clearTimeout(silence);
  silentBounds = 0;
  silence = setTimeout(onSilence, args.silence_ms);
};

/**
 * Beats missing for the bound: a worker stopped as a whole (SIGSTOP, state T in /proc) is
 * frozen now; any other silence is given more bounds, so that neither a busy worker nor a
 * watchdog that was itself descheduled (its unread beats queue behind this timer) is killed.
 */
function onSilence(): void {
  silentBounds++;
  if (workerStopped() || silentBounds >= HUNG_AFTER_BOUNDS) {
    void workerLost("frozen");
    return;
  }
  silence = setTimeout(onSilence, args.silence_ms);
}

function workerStopped(): boolean {
  try {
    const stat = readFileSync(`/proc/${args.worker_pid}/stat`, "utf8");
    const status = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return status === "T" || status === "t";
  } catch {
    return false; // gone: the pipe's end says so
  }
}

const handedOver = process.argv[3];
if (handedOver === "exited" || handedOver === "frozen") {
  // From src/worker/watchdog.sh, which watched, has killed the process groups (and a frozen
  // worker) already, and passes the last state line on stdin.
  silentBounds = Number(process.argv[4] ?? 0);
  state = parseStateLine((await Bun.stdin.text()).trim());
  lost = false;
  await workerLost(handedOver);
} else {
  // No bash: this process watches itself.
  armSilence();
  // Ready to report before anything is lost: the report's modules loaded, its channel open.
  setTimeout(() => void warm(null), WARM_AFTER_MS).unref();
  let buffer = "";
  const decoder = new TextDecoder();
  for await (const chunk of Bun.stdin.stream()) {
    if (lost) break;
    armSilence();
    buffer += decoder.decode(chunk, { stream: true });
    const newline = buffer.lastIndexOf("\n");
    if (newline < 0) continue;
    // Only the last complete state line matters; the empty lines are beats.
    const lines = buffer.slice(0, newline).split("\n");
    buffer = buffer.slice(newline + 1);
    const last = lines.findLast((line) => line !== "");
    if (last !== undefined) state = parseStateLine(last) ?? state;
    if (state?.address && state.address !== warmed) void warm(state.address);
  }
  if (!lost) await workerLost("exited");
}

async function workerLost(how: "exited" | "frozen"): Promise<void> {
  if (lost) return;
  lost = true;
  clearTimeout(silence);
  if (how === "frozen") {
    // First, so that it cannot spawn anything past the state we hold. SIGKILL reaches a
    // stopped process; a thawed one would only find its tasks gone and requeued.
    try {
      process.kill(args.worker_pid, "SIGKILL");
    } catch {
      // gone already
    }
  }
  const attempts = state?.attempts ?? [];
  if (attempts.length === 0) {
    log.info({ event: "watchdog.stopped", worker_id: state?.worker_id, how }, "the worker ended holding nothing; exiting");
    process.exit(0);
  }
  const reason =
    how === "exited"
      ? "the worker exited"
      : `no heartbeat from the worker for ${silentBounds * args.silence_ms} ms (frozen); the watchdog killed it`;
  const startedAt = performance.now();
  const allGone = await killAll(attempts);
  const fields = {
    worker_id: state!.worker_id,
    how,
    attempts: attempts.map((a) => `${a.taskId}:${a.attempt}`),
    pgids: attempts.map((a) => a.pgid).filter((p) => p !== null),
    all_gone: allGone,
    kill_ms: Math.round(performance.now() - startedAt),
  };
  log.warn({ event: "watchdog.worker_lost", ...fields, reason }, "the worker is lost: its tasks are stopped");
  if (!allGone) {
    // A process that would not die must not run beside the next attempt: the leases lapse instead.
    log.error({ event: "watchdog.not_reported", ...fields }, "some task processes survived SIGKILL: not reporting them stopped");
    process.exit(1);
  }
  process.exit((await report(state!, reason)) ? 0 : 1);
}

/** SIGKILLs every attempt's process group and cgroup; resolves whether all are gone. */
async function killAll(attempts: readonly HeldProcess[]): Promise<boolean> {
  const deadline = performance.now() + GONE_WITHIN_MS;
  for (;;) {
    let running = false;
    for (const attempt of attempts) {
      if (attempt.pgid !== null) {
        try {
          process.kill(-attempt.pgid, "SIGKILL");
        } catch {
          // gone already
        }
        if (groupRunning(attempt.pgid)) running = true;
      }
      for (const procs of attempt.cgroupProcs) if (killCgroup(procs)) running = true;
    }
    if (!running) return true;
    if (performance.now() > deadline) return false;
    await Bun.sleep(5);
  }
}

/**
 * Kills what a cgroup.procs file lists (cgroup v2: cgroup.kill does it all; v1: frozen while
 * it is read, so that nothing forks past it). Returns whether anything was still in it.
 */
function killCgroup(procsFile: string): boolean {
  const dir = dirname(procsFile);
  if (!existsSync(procsFile)) return false;
  const killFile = join(dir, "cgroup.kill");
  if (existsSync(killFile)) tryWrite(killFile, "1");
  const freezer = join(dir, "freezer.state");
  const frozen = existsSync(freezer) && tryWrite(freezer, "FROZEN");
  let pids: string[] = [];
  try {
    pids = readFileSync(procsFile, "utf8").split("\n").filter(Boolean);
  } catch {
    // removed meanwhile: empty
  }
  for (const pid of pids) {
    try {
      process.kill(Number(pid), "SIGKILL");
    } catch {
      // gone already
    }
  }
  if (frozen) tryWrite(freezer, "THAWED");
  return pids.length > 0;
}

function tryWrite(path: string, text: string): boolean {
  try {
    writeFileSync(path, text);
    return true;
  } catch {
    return false;
  }
}

/** The one call the watchdog makes, as grpc-js's generic client exposes it. */
interface ReportClient {
  reportWorkerLost(
    request: unknown,
    metadata: unknown,
    options: { deadline: number },
    callback: (error: { code: number; details?: string; message: string } | null, response: { requeued: number }) => void,
  ): void;
}

/** The report's modules and credentials, loaded once. */
function reportKit(): Promise<ReportKit> {
  kit ??= (async () => {
    const [grpc, { grpcClientCredentials }, { clientConstructor }, { WorkerService }] = await Promise.all([
      import("@grpc/grpc-js"),
      import("../tls"),
      import("../rpc/definitions"),
      import("../gen/taskqueue/v1/worker_service_pb"),
    ]);
    return { grpc, Client: clientConstructor(WorkerService), credentials: grpcClientCredentials(config) };
  })();
  return kit;
}

async function clientFor(address: string): Promise<InstanceType<ReportKit["Client"]>> {
  const { Client, credentials } = await reportKit();
  let client = clients.get(address);
  if (!client) {
    client = new Client(address, credentials);
    clients.set(address, client);
  }
  return client;
}

/** A channel that failed a report is dropped: the next round dials afresh. */
function dropClient(address: string): void {
  clients.get(address)?.close();
  clients.delete(address);
}

/**
 * Loads the report's modules and, once the worker has said where it is connected, opens a
 * channel there (grpc-js keeps it, and dials again on the report if it was lost meanwhile).
 * Failures here are only a slower report later.
 */
async function warm(address: string | null): Promise<void> {
  try {
    if (address === null) {
      await reportKit();
      return;
    }
    if (warmed !== null && warmed !== address) dropClient(warmed);
    warmed = address;
    const client = await clientFor(address);
    client.waitForReady(Date.now() + 5000, () => {});
  } catch (error) {
    log.debug({ event: "watchdog.warm_failed", err: error }, "could not prepare the report ahead; it is prepared when needed");
  }
}

/** Tells a coordinator (the worker's own first, then the others) which attempts were stopped. */
async function report(lostState: WatchdogState, reason: string): Promise<boolean> {
  const fields = { worker_id: lostState.worker_id, attempts: lostState.attempts.length };
  if (!lostState.credential) {
    log.warn({ event: "watchdog.not_reported", ...fields }, "the worker was never welcomed: nothing to report with");
    return false;
  }
  const { grpc } = await reportKit();
  const addresses = [...new Set([...(lostState.address ? [lostState.address] : []), ...coordinatorAddresses(config)])];
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${lostState.credential}`);
  const request = {
    workerId: lostState.worker_id,
    attempts: lostState.attempts.map((a) => ({ taskId: a.taskId, attempt: a.attempt })),
    reason,
  };
  const until = performance.now() + REPORT_FOR_MS;
  for (let round = 0; performance.now() < until; round++) {
    for (const address of addresses) {
      const client = await clientFor(address);
      const outcome = await new Promise<{ requeued: number } | { error: string; final: boolean }>((resolve) => {
        (client as unknown as ReportClient).reportWorkerLost(
          request,
          metadata,
          { deadline: Date.now() + 2000 },
          (error, response) => {
            if (!error) resolve({ requeued: response.requeued });
            // Refused (a credential not accepted): no other coordinator would accept it either.
            else
              resolve({
                error: error.details || error.message,
                final: error.code === grpc.status.UNAUTHENTICATED || error.code === grpc.status.INVALID_ARGUMENT,
              });
          },
        );
      });
      if ("requeued" in outcome) {
        log.info({ event: "watchdog.reported", ...fields, address, requeued: outcome.requeued }, "reported the stopped tasks");
        return true;
      }
      log.warn({ ...fields, address, error: outcome.error }, "reporting the stopped tasks failed");
      dropClient(address);
      if (outcome.final) {
        log.error({ event: "watchdog.not_reported", ...fields, error: outcome.error }, "the coordinator refused the report");
        return false;
      }
    }
    await Bun.sleep(Math.min(1000, 100 * 2 ** round));
  }
  log.error({ event: "watchdog.not_reported", ...fields }, "no coordinator took the report: the leases will lapse");
  return false;
}
