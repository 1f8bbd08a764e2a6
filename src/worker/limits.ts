// How a worker limits its attempts: each task's `limits` clamped to this worker's maxima
// (a task cannot know which worker will run it, so a request above the maxima is clamped
// here, never refused at submit, and the attempt records what applied), then enforced by a
// cgroup of the attempt's own while it runs (pooled: src/worker/cgroup.ts) where the worker may
// create them, otherwise by rlimits set in the spawned shell.
//
// The process joins its cgroup itself, before it execs the task's command: the spawned
// `sh` writes its own pid into each cgroup.procs and only then execs `sh -c <command>`, so
// nothing the command starts can be born outside the cgroup. Moving the pid from the worker
// after spawn would leave a window in which the command could fork outside it.
import { readFileSync } from "node:fs";
import type { Logger } from "../log";
import type { AttemptUsage, EffectiveLimits, LimitsApplied, TaskLimits } from "../task/task";
import { type Cgroups, detectCgroups, type TaskCgroup } from "./cgroup";

/** This worker's most for any task; 0 means no maximum. */
export interface LimitMaxima {
  memoryMb: number;
  pids: number;
  nofile: number;
  cpu: number;
}

/** `auto`: cgroups where the worker may create them, else rlimits. */
export type LimitsMode = "auto" | "rlimit" | "none";

/** One attempt's limits: what to spawn, its cgroup if any, and what it used. */
export interface Confinement {
  readonly applied: LimitsApplied;
  readonly limits: EffectiveLimits;
  /** The cgroup every process of the attempt runs in, when limits are enforced by one. */
  readonly cgroup: TaskCgroup | null;
  /** The command line to spawn for `command`. */
  argv(command: string): string[];
  /** What the attempt used; reads the cgroup, so call before release(). */
  usage(rusage: ResourceUsageLike | undefined): AttemptUsage;
  /** Gives the cgroup back (its processes must be gone): kept for the next attempt if it is empty, else discarded. */
  release(): void;
}

/** The part of Bun's ResourceUsage read here. */
export interface ResourceUsageLike {
  cpuTime: { user: bigint; system: bigint };
  maxRSS: number;
}

/** Exit code of the wrapper when it could not join its cgroup or set a limit. */
export const CONFINE_FAILED_EXIT = 125;

export class Limiter {
  private readonly hardNofile: number | null;

  constructor(
    private readonly maxima: LimitMaxima,
    /** null: no cgroups (rlimits only). */
    readonly cgroups: Cgroups | null,
    private readonly mode: LimitsMode = "auto",
    private readonly onCgroupFailure: (why: string) => void = () => {},
  ) {
    this.hardNofile = readHardNofile();
  }

  /** Removes this worker's cgroup directory, once no attempt runs. */
  close(): void {
    this.cgroups?.close();
  }

  /** What this worker enforces with, for its start-up log. */
  get mechanism(): LimitsApplied {
    if (this.mode === "none") return "none";
    if (this.mode === "auto" && this.cgroups) return this.cgroups.version === "v1" ? "cgroup-v1" : "cgroup-v2";
    return "rlimit";
  }

  /** The limits an attempt gets: its request capped by the maxima, a missing one at the maximum. */
  effective(requested: TaskLimits | null): TaskLimits {
    const pick = (asked: number | undefined, most: number): number | undefined => {
      if (most > 0) return asked === undefined ? most : Math.min(asked, most);
      return asked;
    };
    const out: TaskLimits = {};
    const memory = pick(requested?.memory_mb, this.maxima.memoryMb);
    const pids = pick(requested?.pids, this.maxima.pids);
    let nofile = pick(requested?.nofile, this.maxima.nofile);
    const cpu = pick(requested?.cpu, this.maxima.cpu);
    // A task cannot raise its hard limit above the worker's own.
    if (nofile !== undefined && this.hardNofile !== null) nofile = Math.min(nofile, this.hardNofile);
    if (memory !== undefined) out.memory_mb = memory;
    if (pids !== undefined) out.pids = pids;
    if (nofile !== undefined) out.nofile = nofile;
    if (cpu !== undefined) out.cpu = cpu;
    return out;
  }

  /**
   * The confinement of one attempt. `owner`: the user the task runs as, when not the worker's
   * own, so that it may join its cgroup (a pooled cgroup only ever goes to one owner).
   */
  confine(requested: TaskLimits | null, owner?: { uid: number; gid: number }): Confinement {
    const wanted = this.effective(requested);
    if (this.mode === "none") return rlimitConfinement(NO_LIMITS, "none");
    if (this.mode === "auto" && this.cgroups) {
      try {
        const cgroup = this.cgroups.acquire(
          { memoryMb: wanted.memory_mb ?? null, pids: wanted.pids ?? null, cpu: wanted.cpu ?? null },
          owner,
        );
        const limits: EffectiveLimits = {
          memory_mb: cgroup.limits.memoryMb,
          pids: cgroup.limits.pids,
          nofile: wanted.nofile ?? null,
          cpu: cgroup.limits.cpu,
        };
        return cgroupConfinement(cgroup, this.cgroups.version === "v1" ? "cgroup-v1" : "cgroup-v2", limits);
      } catch (err) {
        this.onCgroupFailure(err instanceof Error ? err.message : String(err));
      }
    }
    // Without a cgroup only per-process limits exist: the address space for memory (larger
    // than what is resident, so a generous bound) and open files. RLIMIT_NPROC counts every
    // process of the user, the worker's own included, so it cannot bound one task's pids, and
    // no rlimit caps cores.
    const limits: EffectiveLimits = { memory_mb: wanted.memory_mb ?? null, pids: null, nofile: wanted.nofile ?? null, cpu: null };
    return rlimitConfinement(limits, limits.memory_mb === null && limits.nofile === null ? "none" : "rlimit");
  }
}

const NO_LIMITS: EffectiveLimits = { memory_mb: null, pids: null, nofile: null, cpu: null };

/** `sh -c` lines that set the rlimits of the shell that then execs the command. */
function rlimitLines(limits: EffectiveLimits, withMemory: boolean): string[] {
  const fail = `|| exit ${CONFINE_FAILED_EXIT}`;
  const lines: string[] = [];
  if (limits.nofile !== null) lines.push(`ulimit -n ${Math.trunc(limits.nofile)} ${fail}`);
  if (withMemory && limits.memory_mb !== null) lines.push(`ulimit -v ${Math.trunc(limits.memory_mb) * 1024} ${fail}`);
  return lines;
}

/**
 * The wrapper: `sh -c <script> sh <command> <procs files...>`. The script joins each cgroup
 * (writing its own pid, $$), sets the rlimits and execs `sh -c <command>`, so the command
 * runs as before (its $0 is "sh") in a process that is already confined. The command travels
 * as an argument, never through the environment or the script's text.
 */
function wrapper(command: string, lines: string[], procsFiles: readonly string[]): string[] {
  const join =
    procsFiles.length === 0
      ? []
      : [
          `for f do echo $$ > "$f" || { echo "taskqueue: cannot join the task's cgroup" >&2; exit ${CONFINE_FAILED_EXIT}; }; done`,
        ];
  const script = ["cmd=$1; shift", ...join, ...lines, 'exec sh -c "$cmd"'].join("\n");
  return ["sh", "-c", script, "sh", command, ...procsFiles];
}

function rlimitConfinement(limits: EffectiveLimits, applied: LimitsApplied): Confinement {
  const lines = rlimitLines(limits, true);
  return {
    applied,
    limits,
    cgroup: null,
    argv: (command) => (lines.length === 0 ? ["sh", "-c", command] : wrapper(command, lines, [])),
    usage: (rusage) => ({
      limitsApplied: applied,
      limits,
      cpuUserUs: rusage ? Number(rusage.cpuTime.user) : null,
      cpuSystemUs: rusage ? Number(rusage.cpuTime.system) : null,
      peakMemoryBytes: rusage ? rusage.maxRSS : null,
      oomKilled: false,
    }),
    release: () => {},
  };
}

function cgroupConfinement(cgroup: TaskCgroup, applied: LimitsApplied, limits: EffectiveLimits): Confinement {
  const lines = rlimitLines(limits, false);
  return {
    applied,
    limits,
    cgroup,
    argv: (command) => wrapper(command, lines, cgroup.procsFiles),
    usage: (rusage) => {
      const used = cgroup.usage();
      return {
        limitsApplied: applied,
        limits,
        // The cgroup counts processes that left the shell's tree too; rusage only the waited-for ones.
        cpuUserUs: used.cpuUserUs ?? (rusage ? Number(rusage.cpuTime.user) : null),
        cpuSystemUs: used.cpuSystemUs ?? (rusage ? Number(rusage.cpuTime.system) : null),
        peakMemoryBytes: used.peakMemoryBytes ?? (rusage ? rusage.maxRSS : null),
        oomKilled: used.oomKilled,
      };
    },
    release: () => cgroup.release(),
  };
}

/** The worker's own hard limit of open files (from /proc/self/limits); null when unknown or unlimited. */
function readHardNofile(): number | null {
  try {
    const line = readFileSync("/proc/self/limits", "utf8")
      .split("\n")
      .find((l) => l.startsWith("Max open files"));
    const hard = line?.trim().split(/\s+/)[4];
    return hard !== undefined && /^\d+$/.test(hard) ? Number(hard) : null;
  } catch {
    return null;
  }
}

/** The error of an attempt the OOM killer ended. */
export function oomError(limits: EffectiveLimits): string {
  return limits.memory_mb === null ? "killed: out of memory" : `killed: out of memory (memory_mb ${limits.memory_mb})`;
}

/**
 * The worker's Limiter: with mode `auto` it looks for a cgroup hierarchy it may write (creating
 * its own directory, `name`, there) and logs which mechanism its tasks get, and why not
 * cgroups when it falls back to rlimits.
 */
export function createLimiter(options: {
  mode: LimitsMode;
  maxima: LimitMaxima;
  /** Unique among the workers of this process (the worker id). */
  name: string;
  log: Logger;
}): Limiter {
  const { mode, maxima, log } = options;
  let cgroups: Cgroups | null = null;
  let why: string | undefined;
  if (mode === "auto") {
    const detected = detectCgroups({ dirName: `taskqueue-${process.pid}-${options.name}` });
    if (detected.ok) cgroups = detected.cgroups;
    else why = detected.why;
  }
  const limiter = new Limiter(maxima, cgroups, mode, (failure) =>
    log.warn({ event: "worker.cgroup_failed", why: failure }, "could not create a task's cgroup; using rlimits for it"),
  );
  const fields = { event: "worker.limits", mechanism: limiter.mechanism, maxima, ...(why === undefined ? {} : { why }) };
  if (why === undefined) log.info(fields, `task limits enforced by ${limiter.mechanism}`);
  else {
    log.warn(
      fields,
      "no cgroups for tasks: limits are per-process rlimits (no pids or cpu limit, no peak memory of the whole task), " +
        "and a process that leaves the task's process group (setsid) survives its stop",
    );
  }
  return limiter;
}
