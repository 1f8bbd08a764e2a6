// The worker's side of its watchdog (src/worker/watchdog-process.ts): starts the watchdog in a
// session and process group of its own, so that neither a signal to the worker's group (kill -9
// -<pgid>, SIGSTOP) nor the worker's death reaches it, and feeds it over its stdin: the full
// state (our id, credential, coordinator and every held attempt's process group and cgroup)
// when it changes (at once for a new process group, else at the end of the event loop's turn),
// and an empty line every `beatMs` otherwise. The watchdog takes the pipe's
// end for the worker's death and a silence of `silenceMs` for a freeze.
import type { Subprocess } from "bun";
import type { Logger } from "../log";
import type { HeldProcess } from "./attempts";

/** One state line on the pipe (JSON); an empty line is a beat that changes nothing. */
export interface WatchdogState {
  worker_id: string;
  /** The credential from our last Welcome ("" before the first): the watchdog's report carries it. */
  credential: string;
  /** The coordinator address we last dialed: the watchdog reports there first. */
  address: string | null;
  attempts: HeldProcess[];
}

/**
 * A state line: the process groups first, for the bash half to kill at once, then a tab and
 * the state as JSON. Lines stay well under PIPE_BUF for a few dozen slots, so a write is atomic.
 */
export function stateLine(state: WatchdogState): string {
  const pgids = state.attempts.flatMap((a) => (a.pgid === null ? [] : [a.pgid]));
  return `${pgids.join(" ")}\t${JSON.stringify(state)}\n`;
}

/** The state in a line, or null when it is not one. */
export function parseStateLine(line: string): WatchdogState | null {
  const tab = line.indexOf("\t");
  try {
    return JSON.parse(tab >= 0 ? line.slice(tab + 1) : line) as WatchdogState;
  } catch {
    return null;
  }
}

/** The worker's own fields of a state, compared as one string. */
function headOf(state: WatchdogState): string {
  return `${state.worker_id}\n${state.credential}\n${state.address ?? ""}`;
}

/** What the watchdog process is started with (argv[2], JSON). */
export interface WatchdogArgs {
  worker_pid: number;
  silence_ms: number;
}

export interface WatchdogOptions {
  log: Logger;
  /** Beats missing this long: the watchdog takes the worker for frozen (shorter than the heartbeat timeout). */
  silenceMs: number;
  /** How often an empty beat goes out when nothing changed. */
  beatMs: number;
  /** The state sent on every change. */
  state: () => WatchdogState;
  /**
   * Who watches: `bun` (watchdog-process.ts throughout: ~67 MB RSS with gRPC loaded ahead, it reacts and reports at
   * once) or `bash` (watchdog.sh: ~3 MB and next to no CPU while it waits; it kills the process
   * groups at once, but the report waits for Bun to start). Defaults to bun; bash falls back to
   * bun where there is no bash.
   */
  watcher?: "bun" | "bash";
  /** The watchdog's argv (tests). Defaults to what `watcher` says. */
  command?: string[];
}

/**
 * How long a silent worker is given before its watchdog takes it for frozen: the heartbeat
 * timeout less one interval, so that its tasks are stopped (and reported) before any
 * coordinator gives up on the worker, and sent four beats per bound.
 */
export function watchdogTimings(timings: { heartbeatIntervalMs: number; heartbeatTimeoutMs: number }): {
  silenceMs: number;
  beatMs: number;
} {
  const silenceMs = Math.max(timings.heartbeatTimeoutMs - timings.heartbeatIntervalMs, timings.heartbeatTimeoutMs / 2);
  return { silenceMs: Math.round(silenceMs), beatMs: Math.max(10, Math.round(silenceMs / 4)) };
}

export class Watchdog {
  private proc: Subprocess<"pipe", "inherit", "inherit"> | null = null;
  private timer: ReturnType<typeof setInterval> | null = null;
  private dirty = true;
  /** The process groups and the worker fields of the last state sent: a change past them is sent at once. */
  private sentPgids = new Set<number>();
  private sentHead = "";
  /** A send at the end of this turn of the event loop, for changes that may wait that long. */
  private deferred: ReturnType<typeof setImmediate> | null = null;

  constructor(private readonly options: WatchdogOptions) {}

  /** The watchdog's pid, once started. */
  get pid(): number | null {
    return this.proc?.pid ?? null;
  }

  start(): void {
    const args: WatchdogArgs = { worker_pid: process.pid, silence_ms: this.options.silenceMs };
    const report = [process.execPath, new URL("./watchdog-process.ts", import.meta.url).pathname, JSON.stringify(args)];
    // The bash half watches for a few MB and hands over to Bun only when there is work to do.
    const bash = this.options.watcher === "bash" ? Bun.which("bash") : null;
    const command =
      this.options.command ??
      (bash
        ? [
            bash,
            new URL("./watchdog.sh", import.meta.url).pathname,
            String(this.options.silenceMs / 1000),
            String(process.pid),
            ...report,
          ]
        : report);
    this.proc = Bun.spawn(command, {
      stdin: "pipe",
      stdout: "inherit",
      stderr: "inherit",
      // setsid(): out of the worker's session and process group.
      detached: true,
    });
    // Our exit must not wait for it: it outlives us on purpose.
    this.proc.unref();
    const proc = this.proc;
    void proc.exited.then((code) => {
      if (this.proc === proc) this.gone(`it exited (code ${code})`);
    });
    this.options.log.info(
      { event: "watchdog.started", watchdog_pid: proc.pid, silence_ms: this.options.silenceMs, watcher: bash ? "bash" : "bun" },
      "the watchdog is watching this worker",
    );
    this.send();
    this.timer = setInterval(() => this.send(), this.options.beatMs);
  }

  /**
   * What the watchdog must know changed (an attempt taken, spawned or ended; a Welcome). A new
   * process group, or a new id, credential or address, is sent now, before anything else can
   * happen: a process the watchdog does not know of would outlive our death. Anything else (an
   * attempt taken but not spawned, one ended) waits for the end of this turn of the event loop,
   * so that the changes of a batch of assignments and results go out as one line: a death in
   * between at worst leaves out an attempt that never ran (its lease lapses instead) or names
   * one that has ended (its process group gone, its cgroup empty or another held attempt's).
   */
  changed(): void {
    this.dirty = true;
    if (!this.proc) return;
    const state = this.options.state();
    if (this.mustSendNow(state)) {
      this.send(state);
      return;
    }
    this.deferred ??= setImmediate(() => {
      this.deferred = null;
      if (this.dirty) this.send();
    });
  }

  private mustSendNow(state: WatchdogState): boolean {
    if (headOf(state) !== this.sentHead) return true;
    for (const attempt of state.attempts) if (attempt.pgid !== null && !this.sentPgids.has(attempt.pgid)) return true;
    return false;
  }

  /**
   * The worker is done (drained, or exiting at once): the last state goes out and the pipe is
   * closed. The watchdog stops what is still listed (nothing, after a drain), reports it, and
   * exits; this waits for that, briefly.
   */
  async stop(waitMs = 5000): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    if (this.deferred) clearImmediate(this.deferred);
    this.deferred = null;
    const proc = this.proc;
    if (!proc) return;
    this.dirty = true;
    this.send();
    this.proc = null;
    try {
      await proc.stdin.end();
    } catch {
      // already gone
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([proc.exited, new Promise((resolve) => (timer = setTimeout(resolve, waitMs)))]);
    clearTimeout(timer);
  }

  private send(known?: WatchdogState): void {
    const proc = this.proc;
    if (!proc) return;
    let line = "\n";
    if (this.dirty) {
      const state = known ?? this.options.state();
      line = stateLine(state);
      this.sentHead = headOf(state);
      this.sentPgids = new Set(state.attempts.flatMap((a) => (a.pgid === null ? [] : [a.pgid])));
    }
    this.dirty = false;
    try {
      proc.stdin.write(line);
      void proc.stdin.flush();
    } catch (error) {
      this.gone(error instanceof Error ? error.message : String(error));
    }
  }

  /** The watchdog is gone before us: the worker runs on unwatched, which is logged once. */
  private gone(why: string): void {
    this.options.log.error({ event: "worker.watchdog_gone", why }, "the watchdog is gone: tasks are no longer watched");
    this.proc = null;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}
