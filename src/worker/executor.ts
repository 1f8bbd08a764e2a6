// Runs one command: `sh -c` in its own session and process group, with the task's env and cwd,
// a timeout, and a stop that reaches the whole group (SIGTERM, then SIGKILL after the grace).
// A result resolves only once nothing of the group runs and its pipes are read out; what the
// command wrote is captured by src/worker/output.ts.
import { readdirSync, readFileSync, statSync } from "node:fs";
import type { AttemptUsage } from "../task/task";
import { type CapturedOutput, NO_OUTPUT } from "../task/task";
import { searchDeniedRecently, type TaskIdentity } from "./identity";
import { type Confinement, oomError } from "./limits";
import { captureTail, type OutputSink } from "./output";

export type Outcome = "exited" | "spawn_failed" | "timed_out" | "cancelled" | "abandoned";

export interface RunSpec {
  /** Run as ["sh", "-c", command]. */
  command: string;
  /** Task env, layered over `baseEnv` after the worker's own variables are removed from it. */
  env: Record<string, string>;
  /** Defaults to the user's home, or without a user the worker's cwd, when undefined or "". */
  cwd?: string;
  /** 0 = no timeout. */
  timeoutMs: number;
  /** SIGTERM to the process group, then SIGKILL this long after if anything is still alive. */
  killGraceMs: number;
  /** Keep only the last maxOutputBytes of stdout and of stderr each. */
  maxOutputBytes: number;
  /** Hears every chunk of output as it is read (the live log); the tail is kept either way. */
  onOutput?: OutputSink;
  /** Env inherited by the task (the worker's environment, from src/config.ts). */
  baseEnv: Record<string, string | undefined>;
  /**
   * How long to keep reading output after the process group has been SIGKILLed, for
   * descendants that left the group (setsid) but still hold our pipes. Defaults to 1000 ms.
   */
  drainMs?: number;
  /**
   * Run as this slot user (src/worker/identity.ts): its home is the default cwd and HOME, and a
   * given cwd must be reachable by it. Unset: the command runs as the worker.
   */
  user?: TaskIdentity;
  /**
   * The attempt's limits (src/worker/limits.ts): what to spawn, and the cgroup that stopping
   * the task empties, setsid escapees included. None: plain `sh -c`, no usage beyond rusage.
   */
  confinement?: Confinement;
  /**
   * Spawn now, but hold the command until Execution.release(): the process (its group, its
   * cgroup) exists ahead of the start time and waits on its stdin for the word to go, so that
   * at the start time only a pipe write is left. A shell never released (stopped, or the worker
   * died and its end of the pipe closed) exits without running the command.
   */
  armed?: boolean;
  /**
   * With `armed`: the read end of a start gate (src/worker/start-gate.ts) to wait on, as fd 3,
   * instead of a pipe of its own on stdin. release() then writes nothing: the caller opens the
   * gate for every shell it released at once.
   */
  gate?: number;
  /**
   * With `gate`: a host gate (src/worker/start-gate.ts), which other workers may open too and
   * which no close ends: the shell also checks, once let go, that the worker that spawned it is
   * still its parent, and runs nothing if it is gone.
   */
  hostGate?: boolean;
}

/**
 * What an armed spawn runs ahead of the command (argv after it: the command line to exec). It
 * reads one line; only "go" runs the command, with stdin from /dev/null as an unarmed one has.
 */
const ARMED_SCRIPT = 'IFS= read -r go; [ "$go" = go ] || exit 0; exec "$@" </dev/null';
/**
 * An armed spawn on a start gate: one line (newlines only travel there) from fd 3 runs the
 * command, the pipe's end does not; fd 3 is closed before the command, which gets no gate.
 */
const GATED_SCRIPT = 'IFS= read -r go <&3 || exit 0; exec 3<&-; exec "$@" </dev/null';
/**
 * On a host gate: as GATED_SCRIPT, and the command runs only if the shell's parent (field 4 of
 * /proc/<pid>/stat) is still the worker that spawned it ($1, the worker's pid: $PPID would be
 * read at the shell's start, after a worker that died at once): a shell whose worker died was
 * handed to another parent and exits.
 */
export const HOST_GATED_SCRIPT =
  'IFS= read -r go <&3 || exit 0; exec 3<&-; read -r _ _ _ p _ </proc/$$/stat && [ "$p" = "$1" ] || exit 0; shift; exec "$@" </dev/null';

export interface RunResult extends CapturedOutput {
  outcome: Outcome;
  /** null when killed by a signal or never spawned. */
  exitCode: number | null;
  /** Signal name (e.g. "SIGKILL") or number for unnamed signals; null when exited normally. */
  signal: string | null;
  /** Why the task did not run to completion; null for "exited", "cancelled" and "abandoned". */
  error: string | null;
  pid: number | null;
  startedAt: Date;
  finishedAt: Date;
  /** What the attempt used and how it was limited; null when it never spawned. */
  usage: AttemptUsage | null;
}

export interface Execution {
  readonly pid: number | null;
  /** When the command started: its spawn, or for an armed one its release (the spawn until then). */
  readonly startedAt: Date;
  /** False while an armed execution waits for release(); true otherwise. */
  readonly released: boolean;
  /**
   * Lets an armed execution's command run now (the timeout counts from here). Returns whether
   * it did: false when it was not armed, was released already, was stopped, or its process
   * ended meanwhile (then it never runs the command). On a start gate, `at` is the start (the
   * gate's opening) and `gateOpened` says the gate was written already: a shell that ended
   * then took its line and ran.
   */
  release(at?: Date, gateOpened?: boolean): boolean;
  /** The cgroup.procs files of the attempt's cgroup, if it has one: the worker's watchdog kills what they list. */
  readonly cgroupProcs: readonly string[];
  /** Never rejects. */
  readonly result: Promise<RunResult>;
  /**
   * Kill the whole process group: SIGTERM, then SIGKILL after killGraceMs (or `graceMs`, if
   * shorter: a lease fence). Outcome is the given reason unless the process already exited.
   * Idempotent: the first reason wins.
   */
  stop(reason: "cancelled" | "abandoned" | "timed_out", graceMs?: number): void;
  /** SIGKILL the whole process group at once, without grace: the worker is exiting now. */
  kill(): void;
}

const DEFAULT_DRAIN_MS = 1000;

/**
 * The environment a task sees. DATABASE_URL, DATABASE_READ_URL and TQ_* are the worker's own secrets and
 * configuration, so they are never inherited; the task env (which may carry TQ_TASK_ID and
 * TQ_TASK_ATTEMPT from the caller) is applied after that filter.
 */
export function taskEnv(baseEnv: Record<string, string | undefined>, env: Record<string, string>): Record<string, string> {
  return Object.assign({}, inheritable(baseEnv), env);
}

/** The part of a base environment tasks inherit; computed once per base object. */
const inheritedCache = new WeakMap<object, Record<string, string>>();
function inheritable(baseEnv: Record<string, string | undefined>): Record<string, string> {
  let out = inheritedCache.get(baseEnv);
  if (out) return out;
  out = {};
  for (const [key, value] of Object.entries(baseEnv)) {
    if (value === undefined || key === "DATABASE_URL" || key === "DATABASE_READ_URL" || key.startsWith("TQ_")) continue;
    out[key] = value;
  }
  inheritedCache.set(baseEnv, out);
  return out;
}

export function execute(spec: RunSpec): Execution {
  let startedAt = new Date();
  const user = spec.user;
  const cwd = spec.cwd === undefined || spec.cwd === "" ? user?.home : spec.cwd;

  const cwdProblem = cwd === undefined ? null : checkDirectory(cwd, user);
  const confinement = spec.confinement;
  if (cwdProblem !== null) {
    confinement?.release();
    return failed(startedAt, cwdProblem);
  }
  const cgroup = confinement?.cgroup ?? null;
  const env = taskEnv(spec.baseEnv, spec.env);
  // The worker's own HOME is out of the slot user's reach.
  if (user && spec.env.HOME === undefined) env.HOME = user.home;

  let proc: Bun.Subprocess<"ignore" | "pipe", "pipe", "pipe">;
  const argv = confinement?.argv(spec.command) ?? ["sh", "-c", spec.command];
  try {
    const gated = spec.armed && spec.gate !== undefined;
    const script = gated ? (spec.hostGate ? HOST_GATED_SCRIPT : GATED_SCRIPT) : ARMED_SCRIPT;
    const head = spec.armed ? ["sh", "-c", script, "sh", ...(gated && spec.hostGate ? [String(process.pid)] : [])] : [];
    proc = Bun.spawn([...head, ...argv], {
      cwd,
      env,
      // The spawn changes directory before it changes user, so checkDirectory vouched for cwd.
      uid: user?.uid,
      gid: user?.gid,
      ...(gated
        ? { stdio: ["ignore", "pipe", "pipe", spec.gate!] as ["ignore", "pipe", "pipe", number] }
        : { stdin: spec.armed ? ("pipe" as const) : ("ignore" as const), stdout: "pipe" as const, stderr: "pipe" as const }),
      // setsid(): the child leads its own process group, so -pid reaches every descendant
      // that does not deliberately leave it.
      detached: true,
    });
  } catch (err) {
    confinement?.release();
    return failed(startedAt, `spawn failed: ${errorText(err)}`);
  }

  const pid = proc.pid;
  const grace = Math.max(0, spec.killGraceMs);
  const output = captureTail(proc.stdout, proc.stderr, spec.maxOutputBytes, spec.onOutput);

  let stopReason: "cancelled" | "abandoned" | "timed_out" | null = null;
  let leaderExited = false;
  let termSent = false;
  let killSent = false;
  let timeoutTimer: ReturnType<typeof setTimeout> | undefined;
  let killTimer: ReturnType<typeof setTimeout> | undefined;
  let cgroupEmptied: Promise<void> = Promise.resolve();
  let signalKilled!: () => void;
  const killed = new Promise<void>((resolve) => (signalKilled = resolve));

  const kill = (): void => {
    if (killSent) return;
    killSent = true;
    clearTimeout(killTimer);
    signalGroup(pid, "SIGKILL");
    // Hook: the cgroup reaches what left the group (setsid); the result awaits its emptying.
    if (cgroup) cgroupEmptied = cgroup.killAll();
    signalKilled();
  };
  const terminate = (graceMs = grace): void => {
    if (termSent) return;
    termSent = true;
    signalGroup(pid, "SIGTERM");
    cgroup?.signal("SIGTERM");
    killTimer = setTimeout(kill, Math.min(grace, graceMs));
  };
  let timedOutAfter = 0;
  const stop = (reason: "cancelled" | "abandoned" | "timed_out", graceMs?: number): void => {
    if (leaderExited || stopReason !== null) return;
    stopReason = reason;
    // A caller may enforce its own deadline through stop("timed_out").
    timedOutAfter = spec.timeoutMs > 0 ? spec.timeoutMs : Date.now() - startedAt.getTime();
    clearTimeout(timeoutTimer);
    terminate(graceMs);
  };

  let released = !spec.armed;
  const armTimeout = () => {
    if (spec.timeoutMs > 0) timeoutTimer = setTimeout(() => stop("timed_out"), spec.timeoutMs);
  };
  if (released) armTimeout();
  const release = (at?: Date, gateOpened = false): boolean => {
    if (released || stopReason !== null) return false;
    if (spec.gate !== undefined) {
      // The caller's gate write lets it go, with the others due with it (at `at`, taken just
      // before that write; never before the spawn). Told after the gate was opened, a shell that
      // ended already took its line and ran its command (a host gate's other worker, or this
      // one, opened it before this): that run is its result, and no fresh spawn follows.
      if (leaderExited && !gateOpened) return false;
      released = true;
      startedAt = at ? new Date(Math.max(at.getTime(), startedAt.getTime())) : new Date();
      if (!leaderExited) armTimeout();
      return true;
    }
    if (leaderExited) return false;
    const stdin = proc.stdin;
    if (!stdin || typeof stdin === "number") return false;
    try {
      stdin.write("go\n");
      void stdin.end();
    } catch {
      return false;
    }
    released = true;
    startedAt = new Date();
    armTimeout();
    return true;
  };
  // Unreleased, the shell waits on its stdin: closing it (at exit or a stop) ends the wait.
  const closeStdin = () => {
    const stdin = proc.stdin;
    if (released || !stdin || typeof stdin === "number") return;
    try {
      void stdin.end();
    } catch {
      // closed already
    }
  };

  const result = (async (): Promise<RunResult> => {
    await proc.exited.catch(() => undefined);
    leaderExited = true;
    clearTimeout(timeoutTimer);
    closeStdin();

    let drained: boolean;
    // Hook: with a cgroup, what is left of the task is whatever is still in it.
    if (!groupExists(pid) && !cgroup?.populated()) {
      // The usual case: the group ended with its leader. Nothing to signal; read the pipes out
      // (bounded, as a descendant that left the group may still hold them).
      drained = await settledWithin(output.done, grace + (spec.drainMs ?? DEFAULT_DRAIN_MS));
    } else {
      // The task ends with its leader: anything it left running in the group gets SIGTERM and
      // the same grace (ended early once nothing holds our pipes), then SIGKILL. The group id
      // cannot be reused while any member lives, and pids are allocated sequentially, so
      // signalling it here is safe in practice.
      terminate();
      await Promise.race([output.done, killed]);
      kill();
      // SIGKILL is delivered asynchronously; wait until the group has really stopped running
      // so that a resolved result means nothing of the task is left, and until our pipes are
      // closed.
      let draining = true;
      drained = await settledWithin(
        Promise.all([output.done, groupGone(pid, () => draining), cgroupEmptied]),
        spec.drainMs ?? DEFAULT_DRAIN_MS,
      );
      draining = false;
    }
    clearTimeout(killTimer);
    if (!drained) {
      // A descendant escaped the group (setsid) and still holds a pipe; keep what we have.
      await output.cancel();
    }

    const signal = proc.signalCode === null ? null : String(proc.signalCode);
    // Hook: usage is read before the cgroup goes.
    const usage = confinement?.usage(proc.resourceUsage()) ?? plainUsage(proc.resourceUsage());
    confinement?.release();
    let error = stopReason === "timed_out" ? `timed out after ${timedOutAfter} ms` : null;
    if (usage.oomKilled && stopReason === null) error = oomError(usage.limits);
    return {
      outcome: stopReason ?? "exited",
      exitCode: proc.exitCode,
      signal,
      ...output.collect(),
      usage,
      error,
      pid,
      // Read when asked: a shell on a start gate may have run and ended before its worker let
      // it go (another worker opened the gate first), and its start is that opening.
      get startedAt() {
        return startedAt;
      },
      finishedAt: new Date(),
    };
  })();

  const killNow = (): void => {
    if (leaderExited) return;
    stopReason ??= "abandoned";
    kill();
  };

  return {
    pid,
    get startedAt() {
      return startedAt;
    },
    get released() {
      return released;
    },
    release,
    cgroupProcs: cgroup?.procsFiles ?? [],
    result,
    stop,
    kill: killNow,
  };
}

/** An execution that never spawned: its result is spawn_failed with this error. */
export function notRun(error: string): Execution {
  return failed(new Date(), error);
}

function failed(startedAt: Date, error: string): Execution {
  const result: RunResult = {
    outcome: "spawn_failed",
    exitCode: null,
    signal: null,
    ...NO_OUTPUT,
    error,
    pid: null,
    startedAt,
    finishedAt: new Date(),
    usage: null,
  };
  return {
    pid: null,
    startedAt,
    released: true,
    release: () => false,
    cgroupProcs: [],
    result: Promise.resolve(result),
    stop: () => {},
    kill: () => {},
  };
}

/** Usage of an attempt run without a confinement: rusage only. */
function plainUsage(rusage: ReturnType<Bun.Subprocess["resourceUsage"]>): AttemptUsage {
  return {
    limitsApplied: "none",
    limits: { memory_mb: null, pids: null, nofile: null, cpu: null },
    cpuUserUs: rusage ? Number(rusage.cpuTime.user) : null,
    cpuSystemUs: rusage ? Number(rusage.cpuTime.system) : null,
    peakMemoryBytes: rusage ? rusage.maxRSS : null,
    oomKilled: false,
  };
}

// Bun reports a missing cwd as "ENOENT ... posix_spawn 'sh'", which blames the shell.
function checkDirectory(cwd: string, user: TaskIdentity | undefined): string | null {
  try {
    if (!statSync(cwd).isDirectory()) return `cwd ${cwd} is not a directory`;
    const denied = user ? searchDeniedRecently(cwd, user) : null;
    return denied === null ? null : `cwd ${cwd} is not accessible to the task's user (uid ${user?.uid}): ${denied} denies it`;
  } catch (err) {
    const code = errorCode(err);
    if (code === "ENOENT") return `cwd ${cwd} does not exist`;
    return `cwd ${cwd} is not accessible: ${errorText(err)}`;
  }
}

/** Whether `work` settled within `ms`. */
async function settledWithin(work: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      work.then(() => true),
      new Promise<false>((resolve) => {
        timer = setTimeout(() => resolve(false), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Whether any process (a zombie included) is in group pgid: one kill(0) probe. */
function groupExists(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
    return true;
  } catch (err) {
    return errorCode(err) !== "ESRCH";
  }
}

const GROUP_POLL_MS = 5;

/**
 * Resolves once no process of group pgid is running, or when keepWaiting() turns false.
 * There is no exit notification for processes that are not our children, hence the poll; it
 * only runs when the leader left stragglers behind.
 */
async function groupGone(pgid: number, keepWaiting: () => boolean): Promise<void> {
  while (keepWaiting() && groupRunning(pgid)) await Bun.sleep(GROUP_POLL_MS);
}

/** Whether any process of group pgid still runs (zombies do not count, where /proc shows them). */
export function groupRunning(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
  } catch {
    return false; // ESRCH: empty; EPERM: not ours to wait for
  }
  // Zombies still count for kill(0) until their new parent reaps them, which a container's
  // PID 1 may do late or never; they run nothing, so look past them where /proc exists.
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return true;
  }
  for (const entry of entries) {
    if (!/^[0-9]+$/.test(entry)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${entry}/stat`, "utf8");
    } catch {
      continue; // exited while we looked
    }
    // "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const state = fields[0];
    if (Number(fields[2]) === pgid && state !== "Z" && state !== "X") return true;
  }
  return false;
}

function signalGroup(pid: number, signal: "SIGTERM" | "SIGKILL"): void {
  try {
    process.kill(-pid, signal);
  } catch (err) {
    if (errorCode(err) === "ESRCH") return; // group already gone
    // EPERM and the like: at least reach the leader.
    try {
      process.kill(pid, signal);
    } catch {
      // Nothing more we can do from here.
    }
  }
}

function errorCode(err: unknown): string | undefined {
  if (typeof err === "object" && err !== null && "code" in err && typeof err.code === "string") {
    return err.code;
  }
  return undefined;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
