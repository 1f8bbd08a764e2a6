// CPU time of processes from /proc (Linux): what a role's process and its long-lived helpers
// (a worker's watchdog) used, and what a PostgreSQL cluster used, backends that have exited
// included (the postmaster has waited for them: they are in its children's times). A task's own
// processes are not counted: a worker's cutime/cstime (the shells it waited for) is left out.
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

/** Clock ticks per second of /proc/<pid>/stat's times (USER_HZ; 100 on every Linux we run). */
const HZ = 100;

interface Stat {
  pid: number;
  ppid: number;
  comm: string;
  /** utime + stime, ms. */
  self: number;
  /** cutime + cstime (children waited for), ms. */
  children: number;
}

function readStat(pid: number): Stat | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return null;
  }
  // comm is in parentheses and may hold spaces: the fields after the last ")" are fixed.
  const close = text.lastIndexOf(")");
  const comm = text.slice(text.indexOf("(") + 1, close);
  const f = text
    .slice(close + 2)
    .split(" ")
    .map(Number);
  // f[0] is field 3 (state); utime is field 14 -> f[11].
  return {
    pid,
    ppid: f[1]!,
    comm,
    self: ((f[11]! + f[12]!) * 1000) / HZ,
    children: ((f[13]! + f[14]!) * 1000) / HZ,
  };
}

function allStats(): Stat[] {
  const out: Stat[] = [];
  for (const name of readdirSync("/proc")) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    const stat = readStat(pid);
    if (stat) out.push(stat);
  }
  return out;
}

/** CPU ms used so far by `pid` itself and its live descendants named `bun` (watchdogs), not tasks. */
export function roleCpuMs(pid: number, stats: Stat[] = allStats()): number {
  const byParent = new Map<number, Stat[]>();
  for (const s of stats) byParent.set(s.ppid, [...(byParent.get(s.ppid) ?? []), s]);
  const root = stats.find((s) => s.pid === pid);
  if (!root) return Number.NaN;
  let total = root.self;
  const walk = (p: number) => {
    for (const child of byParent.get(p) ?? []) {
      if (child.comm === "bun") total += child.self;
      walk(child.pid);
    }
  };
  walk(pid);
  return total;
}

/** The postmaster's pid, from the data folder's postmaster.pid. */
export function postmasterPid(dataDir: string): number {
  const pid = Number(readFileSync(join(dataDir, "postmaster.pid"), "utf8").split("\n")[0]);
  if (!Number.isInteger(pid) || pid <= 0) throw new Error(`no postmaster pid in ${dataDir}/postmaster.pid`);
  return pid;
}

/** CPU ms used so far by a PostgreSQL cluster: the postmaster, its live children, and those it has reaped. */
export function clusterCpuMs(postmaster: number, stats: Stat[] = allStats()): number {
  const root = stats.find((s) => s.pid === postmaster);
  if (!root) return Number.NaN;
  return root.self + root.children + stats.filter((s) => s.ppid === postmaster).reduce((sum, s) => sum + s.self, 0);
}

export interface CpuSample {
  /** performance.now() when read. */
  at: number;
  /** CPU ms by name (role names, "postgres"). */
  cpu: Record<string, number>;
}

/** Reads every named process's CPU at once (one pass over /proc). */
export function sampleCpu(roles: Record<string, number>, postmaster?: number): CpuSample {
  const stats = allStats();
  const cpu: Record<string, number> = {};
  for (const [name, pid] of Object.entries(roles)) cpu[name] = roleCpuMs(pid, stats);
  if (postmaster !== undefined) cpu.postgres = clusterCpuMs(postmaster, stats);
  return { at: performance.now(), cpu };
}

/** CPU ms per unit (task) of each name between two samples, and their sum as `total`. */
export function cpuPer(before: CpuSample, after: CpuSample, units: number): Record<string, number> {
  const out: Record<string, number> = {};
  let total = 0;
  for (const name of Object.keys(after.cpu)) {
    const used = (after.cpu[name] ?? 0) - (before.cpu[name] ?? 0);
    out[name] = Math.round((used / units) * 1000) / 1000;
    total += used;
  }
  out.total = Math.round((total / units) * 1000) / 1000;
  return out;
}

/**
 * CPU ms per unit net of what the processes use when idle (heartbeats, polls, timers), measured
 * over `idle` (two samples with no work between them): on a machine shared with other loads a
 * burn-down takes longer, and the idle cost of the longer window would otherwise count as the
 * tasks'. Both figures are reported; the net one is what a task adds.
 */
export function cpuPerNetOfIdle(
  idle: { before: CpuSample; after: CpuSample },
  before: CpuSample,
  after: CpuSample,
  units: number,
): Record<string, number> {
  const idleMs = idle.after.at - idle.before.at;
  const windowMs = after.at - before.at;
  const out: Record<string, number> = {};
  let total = 0;
  for (const name of Object.keys(after.cpu)) {
    const idleRate = ((idle.after.cpu[name] ?? 0) - (idle.before.cpu[name] ?? 0)) / idleMs;
    const used = (after.cpu[name] ?? 0) - (before.cpu[name] ?? 0) - idleRate * windowMs;
    out[name] = Math.round((Math.max(0, used) / units) * 1000) / 1000;
    total += Math.max(0, used);
  }
  out.total = Math.round((total / units) * 1000) / 1000;
  return out;
}

/** Two samples `ms` apart with nothing submitted between them (for cpuPerNetOfIdle). */
export async function idleSample(
  roles: Record<string, number>,
  postmaster: number | undefined,
  ms: number,
): Promise<{ before: CpuSample; after: CpuSample }> {
  const before = sampleCpu(roles, postmaster);
  await Bun.sleep(ms);
  return { before, after: sampleCpu(roles, postmaster) };
}
