// Control groups for attempts: one cgroup per attempt, under a directory of this worker's own
// beneath the cgroup the worker itself runs in, on cgroup v1 (memory, pids and freezer
// controllers; cpu and cpuacct when mounted) or a delegated cgroup v2 hierarchy. The executor
// only sees TaskCgroup: the files a process writes its pid into to join, the usage, kill all,
// remove. Everything here needs write access to the hierarchy (root, for v1 on these hosts);
// detectCgroups says why when it cannot have it, and the worker falls back to rlimits.
import { chownSync, existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";

export type CgroupVersion = "v1" | "v2";

/** What a cgroup enforces; null: no limit from the cgroup. */
export interface CgroupLimits {
  memoryMb: number | null;
  pids: number | null;
  /** CPU cores (cpu.cfs_quota_us / cpu.max); null when the host has no cpu controller. */
  cpu: number | null;
}

export interface CgroupUsage {
  /** Highest memory charged to the cgroup (memory.max_usage_in_bytes, memory.peak). */
  peakMemoryBytes: number | null;
  /** The kernel's OOM killer killed a process of the cgroup (memory.oom_control / memory.events oom_kill). */
  oomKilled: boolean;
  /** CPU time of everything that ran in the cgroup, escaped descendants included. */
  cpuUserUs: number | null;
  cpuSystemUs: number | null;
}

export interface TaskCgroup {
  /** Every cgroup.procs file a process writes its own pid into to join this cgroup. */
  readonly procsFiles: readonly string[];
  /** The limits set (cpu null when the host has no cpu controller). */
  readonly limits: CgroupLimits;
  /** Whether any process is in the cgroup. */
  populated(): boolean;
  /** Sends a signal to every process in the cgroup (a best effort: one that forks meanwhile may miss it). */
  signal(signal: "SIGTERM" | "SIGKILL"): void;
  /**
   * Kills every process in the cgroup, including those that left the process group or the
   * session (setsid): v2 writes cgroup.kill; v1 freezes the cgroup, so nothing forks while it
   * is read, SIGKILLs what it lists and thaws it so the kills are delivered. Resolves once the
   * cgroup is empty.
   */
  killAll(): Promise<void>;
  usage(): CgroupUsage;
  /** Removes the cgroup (after killAll); a cgroup that cannot be removed is left and logged by the caller. */
  remove(): void;
}

export interface Cgroups {
  readonly version: CgroupVersion;
  /** Whether memory, pids and cpu limits can be set (cpu only where the host has the controller). */
  readonly hasCpu: boolean;
  /** Creates the cgroup of one attempt; `owner` may join it (a task run as another user). Throws when it cannot. */
  create(name: string, limits: CgroupLimits, owner?: { uid: number; gid: number }): TaskCgroup;
  /** Removes this worker's directory (every attempt's cgroup must be removed first). */
  close(): void;
}

export type Detected = { ok: true; cgroups: Cgroups } | { ok: false; why: string };

export interface DetectOptions {
  /**
   * Name of this worker's directory under its own cgroup: `taskqueue-<pid>-<anything>`, so
   * that a later worker can tell a dead one's leftovers and remove them. Defaults to `taskqueue-<pid>-worker`.
   */
  dirName?: string;
  /** Read instead of /proc/self (tests). */
  procSelf?: string;
}

const V1_REQUIRED = ["memory", "pids", "freezer"] as const;
const V1_OPTIONAL = ["cpu", "cpuacct"] as const;
type V1Controller = (typeof V1_REQUIRED)[number] | (typeof V1_OPTIONAL)[number];

interface Membership {
  /** cgroup v1: controller name to the worker's path in that hierarchy. */
  v1: Map<string, string>;
  /** cgroup v2: the worker's path in the unified hierarchy, if any. */
  v2: string | null;
}

interface Mounts {
  v1: Map<string, string>;
  v2: string | null;
}

/** Finds a hierarchy the worker may create cgroups in; v1 first, as on these hosts. */
export function detectCgroups(options: DetectOptions = {}): Detected {
  const self = options.procSelf ?? "/proc/self";
  const dirName = options.dirName ?? `taskqueue-${process.pid}-worker`;
  let membership: Membership;
  let mounts: Mounts;
  try {
    membership = parseMembership(readFileSync(join(self, "cgroup"), "utf8"));
    mounts = parseMounts(readFileSync(join(self, "mountinfo"), "utf8"));
  } catch (err) {
    return { ok: false, why: `cannot read ${self}/cgroup or mountinfo: ${errorText(err)}` };
  }
  const missing = V1_REQUIRED.filter((c) => !mounts.v1.has(c) || !membership.v1.has(c));
  if (missing.length === 0) {
    const dirs = new Map<V1Controller, string>();
    for (const c of [...V1_REQUIRED, ...V1_OPTIONAL]) {
      const mount = mounts.v1.get(c);
      const path = membership.v1.get(c);
      if (mount !== undefined && path !== undefined) dirs.set(c, join(mount, path, dirName));
    }
    try {
      for (const dir of dirs.values()) {
        sweepSiblings(dir);
        mkdirSync(dir, { recursive: true });
      }
    } catch (err) {
      removeDirs([...dirs.values()]);
      return { ok: false, why: `cgroup v1 is mounted but ${errorText(err)} (the worker needs root to create cgroups)` };
    }
    return { ok: true, cgroups: new V1Cgroups(dirs) };
  }
  if (mounts.v2 !== null && membership.v2 !== null) {
    return detectV2(join(mounts.v2, membership.v2), dirName);
  }
  return { ok: false, why: `no cgroup v1 ${missing.join(", ")} controller and no cgroup v2 hierarchy for this process` };
}

function detectV2(own: string, dirName: string): Detected {
  const wanted = ["memory", "pids"];
  const controllers = readWords(join(own, "cgroup.controllers"));
  const lacking = wanted.filter((c) => !controllers.includes(c));
  if (lacking.length > 0) {
    return { ok: false, why: `cgroup v2 at ${own} has no ${lacking.join(", ")} controller delegated to this process` };
  }
  const enable = [...wanted, ...(controllers.includes("cpu") ? ["cpu"] : [])];
  const dir = join(own, dirName);
  try {
    // "No internal processes": a cgroup that hands controllers to its children holds no
    // process itself, so the worker moves into a leaf of its own first.
    if (readWords(join(own, "cgroup.procs")).length > 0) {
      const leaf = join(own, `${dirName}-worker`);
      mkdirSync(leaf, { recursive: true });
      for (const pid of readWords(join(own, "cgroup.procs"))) tryWrite(join(leaf, "cgroup.procs"), pid);
    }
    writeFileSync(join(own, "cgroup.subtree_control"), enable.map((c) => `+${c}`).join(" "));
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "cgroup.subtree_control"), enable.map((c) => `+${c}`).join(" "));
  } catch (err) {
    return { ok: false, why: `cgroup v2 at ${own} is not writable here: ${errorText(err)}` };
  }
  return { ok: true, cgroups: new V2Cgroups(dir, enable.includes("cpu")) };
}

const CPU_PERIOD_US = 100_000;
/** Rounds of kill-and-wait (each up to ~200 ms) before killAll gives up on a cgroup that will not empty. */
const KILL_ROUNDS = 25;
/** How long freezeAndKill waits for FREEZING to become FROZEN before it kills what it sees anyway. */
const FREEZE_WAIT_MS = 50;

class V1Cgroups implements Cgroups {
  readonly version = "v1";
  readonly hasCpu: boolean;

  constructor(private readonly dirs: Map<V1Controller, string>) {
    this.hasCpu = dirs.has("cpu");
  }

  create(name: string, limits: CgroupLimits, owner?: { uid: number; gid: number }): TaskCgroup {
    const dirs = new Map<V1Controller, string>();
    try {
      for (const [c, parent] of this.dirs) {
        const dir = join(parent, name);
        // recursive: the worker's own directory comes back if another worker swept it while empty.
        mkdirSync(parent, { recursive: true });
        mkdirSync(dir);
        dirs.set(c, dir);
      }
      const memory = dirs.get("memory")!;
      if (limits.memoryMb !== null) {
        const bytes = String(limits.memoryMb * 1024 * 1024);
        writeFileSync(join(memory, "memory.limit_in_bytes"), bytes);
        // With swap accounting, memory+swap gets the same cap, so a hog cannot spill into swap.
        if (existsSync(join(memory, "memory.memsw.limit_in_bytes"))) tryWrite(join(memory, "memory.memsw.limit_in_bytes"), bytes);
      }
      if (limits.pids !== null) writeFileSync(join(dirs.get("pids")!, "pids.max"), String(limits.pids));
      const cpu = dirs.get("cpu");
      if (limits.cpu !== null && cpu !== undefined) {
        writeFileSync(join(cpu, "cpu.cfs_period_us"), String(CPU_PERIOD_US));
        writeFileSync(join(cpu, "cpu.cfs_quota_us"), String(Math.max(1000, Math.round(limits.cpu * CPU_PERIOD_US))));
      }
      const procsFiles = [...dirs.values()].map((dir) => join(dir, "cgroup.procs"));
      if (owner) for (const file of procsFiles) chownSync(file, owner.uid, owner.gid);
      return new V1TaskCgroup(dirs, { ...limits, cpu: cpu === undefined ? null : limits.cpu }, procsFiles);
    } catch (err) {
      removeDirs([...dirs.values()]);
      throw err;
    }
  }

  close(): void {
    removeDirs([...this.dirs.values()]);
  }
}

class V1TaskCgroup implements TaskCgroup {
  constructor(
    private readonly dirs: Map<V1Controller, string>,
    readonly limits: CgroupLimits,
    readonly procsFiles: readonly string[],
  ) {}

  private get freezer(): string {
    return this.dirs.get("freezer")!;
  }

  private pids(): number[] {
    return readWords(join(this.freezer, "cgroup.procs")).map(Number);
  }

  populated(): boolean {
    return this.pids().length > 0;
  }

  signal(signal: "SIGTERM" | "SIGKILL"): void {
    for (const pid of this.pids()) trySignal(pid, signal);
  }

  async killAll(): Promise<void> {
    // Everything listed now gets SIGKILL before anything is awaited: a worker exiting at once
    // may never come back from the await.
    this.signal("SIGKILL");
    for (let round = 0; round < KILL_ROUNDS && this.populated(); round++) {
      for (let i = 0; i < 200 && this.populated(); i++) await Bun.sleep(1);
      if (this.populated()) this.freezeAndKill();
    }
  }

  /**
   * What forked past the first SIGKILL: freeze the cgroup so that nothing forks while it is
   * read, SIGKILL what it lists, thaw it so the kills are delivered. Synchronous from freeze to
   * thaw, so the cgroup is never left frozen by a worker that exits meanwhile.
   */
  private freezeAndKill(): void {
    const state = join(this.freezer, "freezer.state");
    tryWrite(state, "FROZEN");
    const deadline = performance.now() + FREEZE_WAIT_MS;
    while (readText(state) === "FREEZING" && performance.now() < deadline) {
      // Spin: a frozen cgroup must not wait on the event loop.
    }
    this.signal("SIGKILL");
    tryWrite(state, "THAWED");
  }

  usage(): CgroupUsage {
    const memory = this.dirs.get("memory")!;
    const oom = keyedNumbers(readText(join(memory, "memory.oom_control")));
    const cpuacct = this.dirs.get("cpuacct");
    let cpuUserUs: number | null = null;
    let cpuSystemUs: number | null = null;
    if (cpuacct !== undefined) {
      // cpuacct.stat counts USER_HZ ticks (100 per second on Linux); usage_user/sys are ns.
      const user = readNumber(join(cpuacct, "cpuacct.usage_user"));
      const system = readNumber(join(cpuacct, "cpuacct.usage_sys"));
      if (user !== null && system !== null) {
        cpuUserUs = Math.round(user / 1000);
        cpuSystemUs = Math.round(system / 1000);
      } else {
        const stat = keyedNumbers(readText(join(cpuacct, "cpuacct.stat")));
        if (stat.user !== undefined) cpuUserUs = stat.user * 10_000;
        if (stat.system !== undefined) cpuSystemUs = stat.system * 10_000;
      }
    }
    return {
      peakMemoryBytes: readNumber(join(memory, "memory.max_usage_in_bytes")),
      oomKilled: (oom.oom_kill ?? 0) > 0,
      cpuUserUs,
      cpuSystemUs,
    };
  }

  remove(): void {
    removeDirs([...this.dirs.values()]);
  }
}

class V2Cgroups implements Cgroups {
  readonly version = "v2";

  constructor(
    private readonly dir: string,
    readonly hasCpu: boolean,
  ) {}

  create(name: string, limits: CgroupLimits, owner?: { uid: number; gid: number }): TaskCgroup {
    const dir = join(this.dir, name);
    mkdirSync(dir);
    try {
      if (limits.memoryMb !== null) {
        writeFileSync(join(dir, "memory.max"), String(limits.memoryMb * 1024 * 1024));
        tryWrite(join(dir, "memory.swap.max"), "0");
      }
      if (limits.pids !== null) writeFileSync(join(dir, "pids.max"), String(limits.pids));
      if (limits.cpu !== null && this.hasCpu) {
        writeFileSync(join(dir, "cpu.max"), `${Math.max(1000, Math.round(limits.cpu * CPU_PERIOD_US))} ${CPU_PERIOD_US}`);
      }
      if (owner) chownSync(join(dir, "cgroup.procs"), owner.uid, owner.gid);
    } catch (err) {
      removeDirs([dir]);
      throw err;
    }
    return new V2TaskCgroup(dir, { ...limits, cpu: this.hasCpu ? limits.cpu : null });
  }

  close(): void {
    removeDirs([this.dir]);
  }
}

class V2TaskCgroup implements TaskCgroup {
  readonly procsFiles: readonly string[];

  constructor(
    private readonly dir: string,
    readonly limits: CgroupLimits,
  ) {
    this.procsFiles = [join(dir, "cgroup.procs")];
  }

  private pids(): number[] {
    return readWords(join(this.dir, "cgroup.procs")).map(Number);
  }

  populated(): boolean {
    return this.pids().length > 0;
  }

  signal(signal: "SIGTERM" | "SIGKILL"): void {
    for (const pid of this.pids()) trySignal(pid, signal);
  }

  async killAll(): Promise<void> {
    const kill = join(this.dir, "cgroup.kill");
    const atomic = existsSync(kill);
    for (let round = 0; round < KILL_ROUNDS && this.populated(); round++) {
      if (atomic) tryWrite(kill, "1");
      else this.signal("SIGKILL"); // kernels before 5.14
      for (let i = 0; i < 200 && this.populated(); i++) await Bun.sleep(1);
    }
  }

  usage(): CgroupUsage {
    const events = keyedNumbers(readText(join(this.dir, "memory.events")));
    const cpu = keyedNumbers(readText(join(this.dir, "cpu.stat")));
    return {
      peakMemoryBytes: readNumber(join(this.dir, "memory.peak")),
      oomKilled: (events.oom_kill ?? 0) > 0,
      cpuUserUs: cpu.user_usec ?? null,
      cpuSystemUs: cpu.system_usec ?? null,
    };
  }

  remove(): void {
    removeDirs([this.dir]);
  }
}

/** /proc/self/cgroup: "id:controllers:path" per hierarchy; v2 is id 0 with no controllers. */
export function parseMembership(text: string): Membership {
  const v1 = new Map<string, string>();
  let v2: string | null = null;
  for (const line of text.split("\n")) {
    const match = /^(\d+):([^:]*):(.*)$/.exec(line);
    if (!match) continue;
    const [, id, controllers, path] = match as unknown as [string, string, string, string];
    if (id === "0" && controllers === "") v2 = path;
    else for (const c of controllers.split(",")) v1.set(c, path);
  }
  return { v1, v2 };
}

/**
 * /proc/self/mountinfo: where each hierarchy is mounted. Only mounts of a hierarchy's root
 * ("/" as the mount's root) are used, so a path from /proc/self/cgroup appends to them.
 */
export function parseMounts(text: string): Mounts {
  const v1 = new Map<string, string>();
  let v2: string | null = null;
  for (const line of text.split("\n")) {
    const [before, after] = line.split(" - ");
    if (!before || !after) continue;
    const fields = before.split(" ");
    const root = fields[3];
    const point = fields[4];
    const [fsType, , superOptions = ""] = after.split(" ");
    if (root !== "/" || point === undefined) continue;
    if (fsType === "cgroup2") v2 ??= point;
    else if (fsType === "cgroup") {
      for (const option of superOptions.split(","))
        if ([...V1_REQUIRED, ...V1_OPTIONAL].includes(option as V1Controller)) v1.set(option, point);
    }
  }
  return { v1, v2 };
}

/**
 * Removes what workers killed outright left beside `dir`: a directory named
 * `<prefix>-<pid>-...` whose pid no longer runs, with its attempts' cgroups (rmdir refuses one
 * a process is still in). A live worker's directory is never touched.
 */
function sweepSiblings(dir: string): void {
  const parent = dirname(dir);
  const prefix = /^([a-z]+)-\d+-/.exec(basename(dir))?.[1];
  if (prefix === undefined) return;
  const pattern = new RegExp(`^${prefix}-(\\d+)-`);
  try {
    for (const entry of readdirSync(parent, { withFileTypes: true })) {
      const pid = pattern.exec(entry.name)?.[1];
      if (!entry.isDirectory() || pid === undefined || join(parent, entry.name) === dir || processExists(Number(pid))) continue;
      removeDirs([join(parent, entry.name)]);
    }
  } catch {
    // Not readable: nothing to sweep.
  }
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === "EPERM";
  }
}

function removeDirs(dirs: string[]): void {
  for (const dir of dirs) {
    try {
      // A cgroup directory holds only the kernel's files: rmdir, never a recursive delete.
      for (const child of readdirSync(dir, { withFileTypes: true })) if (child.isDirectory()) rmdirSync(join(dir, child.name));
      rmdirSync(dir);
    } catch {
      // Busy (a process still in it) or gone already.
    }
  }
}

function readText(file: string): string {
  try {
    return readFileSync(file, "utf8").trim();
  } catch {
    return "";
  }
}

function readWords(file: string): string[] {
  const text = readText(file);
  return text === "" ? [] : text.split(/\s+/);
}

function readNumber(file: string): number | null {
  const text = readText(file);
  if (!/^\d+$/.test(text)) return null;
  return Number(text);
}

/** "key value" lines (memory.oom_control, memory.events, cpu.stat, cpuacct.stat). */
function keyedNumbers(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const [key, value] = line.trim().split(/\s+/);
    if (key && value && /^\d+$/.test(value)) out[key] = Number(value);
  }
  return out;
}

function tryWrite(file: string, text: string): void {
  try {
    writeFileSync(file, text);
  } catch {
    // The caller checks the outcome (the cgroup's state or membership) itself.
  }
}

function trySignal(pid: number, signal: "SIGTERM" | "SIGKILL"): void {
  try {
    process.kill(pid, signal);
  } catch {
    // Exited meanwhile.
  }
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
