// Control groups for attempts: one cgroup at a time per attempt, under a directory of this
// worker's own beneath the cgroup the worker itself runs in, on cgroup v1 (memory, pids and
// freezer controllers; cpu and cpuacct when mounted) or a delegated cgroup v2 hierarchy. The
// executor only sees TaskCgroup: the files a process writes its pid into to join, the usage,
// kill all, release. Everything here needs write access to the hierarchy (root, for v1 on these
// hosts); detectCgroups says why when it cannot have it, and the worker falls back to rlimits.
//
// On v1 the cgroups are pooled: a released one that is empty (no process, next to no memory
// charged) goes back to a free list of its owner and the next attempt of that owner gets it,
// its limits rewritten only where they differ, its peak memory reset and its cumulative
// counters (CPU, OOM kills) read as differences from where the last attempt left them. Making
// and removing five cgroups per attempt (a mkdir, a chown and an rmdir in each hierarchy) cost
// the worker more CPU than the rest of an attempt's handling. On v2 (memory.peak cannot be
// reset before Linux 6.12) each attempt still gets a cgroup of its own.
import {
  chownSync,
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmdirSync,
  writeFileSync,
  writeSync,
} from "node:fs";
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
  /** The limits set for this attempt (cpu null when the host has no cpu controller). */
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
  /** What this attempt used (not what earlier attempts in a pooled cgroup did). */
  usage(): CgroupUsage;
  /**
   * The attempt is done with the cgroup (after killAll, usage read): an empty one is kept for
   * the next attempt (v1) or removed (v2); one that still holds a process or much memory is
   * discarded (removed if it can be, else left) and never handed out again.
   */
  release(): void;
}

export interface Cgroups {
  readonly version: CgroupVersion;
  /** Whether memory, pids and cpu limits can be set (cpu only where the host has the controller). */
  readonly hasCpu: boolean;
  /**
   * The cgroup of one attempt, with these limits: a pooled one of the same owner, or a new
   * one. `owner` may join it (a task run as another user). Throws when it cannot.
   */
  acquire(limits: CgroupLimits, owner?: { uid: number; gid: number }): TaskCgroup;
  /** Removes this worker's directory and the cgroups in it (every attempt's must be released first). */
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

/**
 * Memory a released v1 cgroup may still have charged and go back to the pool: the kernel's
 * per-CPU charge batches and the slab an exited `sh` leaves (a few hundred KB). Page cache an
 * attempt left is reclaimed first (memory.force_empty); one still holding more (tmpfs files)
 * is discarded instead, so that the next attempt's
 * peak and limit are not another's leftovers (rmdir hands the charges to the parent, as it
 * did when every attempt had a cgroup of its own).
 */
const POOL_RESIDUE_BYTES = 1024 * 1024;

/** No limit, as v1 writes it (memory, cpu quota); pids take "max". */
const V1_UNLIMITED = "-1";

/** What the kernel counts up over a cgroup's life, read at an attempt's end. */
interface V1Counters {
  oomKills: number;
  /** ns from cpuacct.usage_user/usage_sys, or USER_HZ ticks from cpuacct.stat; null without cpuacct. */
  cpuUser: number | null;
  cpuSystem: number | null;
  /** Whether cpuUser/cpuSystem are ns (usage_user) or ticks (stat). */
  ns: boolean;
}

const ZERO_COUNTERS: V1Counters = { oomKills: 0, cpuUser: 0, cpuSystem: 0, ns: true };

/**
 * The counter files of a pooled cgroup that every attempt reads (and one it resets), kept open:
 * a pread on an open cgroupfs file costs a fraction of the open, read and close (and path walk)
 * of each, and a read from offset 0 shows the value of the moment. Never cgroup.procs (see
 * V1TaskCgroup.pids). Opened close-on-exec (as Node and Bun open files), so no task inherits them.
 */
class KeptFiles {
  private readonly fds = new Map<string, number>();
  /** Closed (the cgroup was discarded): files are opened for each read again, and not kept. */
  private closed = false;
  private static readonly buffer = Buffer.alloc(16 * 1024);

  /** The file's text, trimmed; "" when it cannot be read (gone: the cgroup was removed). */
  text(file: string): string {
    if (this.closed) return readText(file);
    const buffer = KeptFiles.buffer;
    try {
      const fd = this.open(file, "r");
      let text = "";
      // A short read is the end of a seq_file's text.
      for (let at = 0; ; ) {
        const n = readSync(fd, buffer, 0, buffer.length, at);
        text += buffer.toString("utf8", 0, n);
        at += n;
        if (n < buffer.length) break;
      }
      return text.trim();
    } catch {
      this.drop(file);
      return "";
    }
  }

  number(file: string): number | null {
    const text = this.text(file);
    return /^\d+$/.test(text) ? Number(text) : null;
  }

  /** Writes `text` to the file; false when it could not. */
  write(file: string, text: string): boolean {
    if (this.closed) return tryWrite(file, text);
    try {
      writeSync(this.open(file, "r+"), text);
      return true;
    } catch {
      this.drop(`r+${file}`);
      return false;
    }
  }

  close(): void {
    this.closed = true;
    for (const fd of this.fds.values()) tryClose(fd);
    this.fds.clear();
  }

  private open(file: string, mode: "r" | "r+"): number {
    const key = mode === "r" ? file : `r+${file}`;
    let fd = this.fds.get(key);
    if (fd === undefined) {
      fd = openSync(file, mode);
      this.fds.set(key, fd);
    }
    return fd;
  }

  private drop(key: string): void {
    const fd = this.fds.get(key);
    if (fd !== undefined) tryClose(fd);
    this.fds.delete(key);
  }
}

function tryClose(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // closed already
  }
}

class V1Cgroups implements Cgroups {
  readonly version = "v1";
  readonly hasCpu: boolean;
  private readonly hasMemsw: boolean;
  /** Released, empty cgroups by owner ("" for the worker's own user), the last released on top. */
  private readonly free = new Map<string, V1TaskCgroup[]>();
  /** Every cgroup made and not discarded, for close(). */
  private readonly live = new Set<V1TaskCgroup>();
  private made = 0;

  constructor(private readonly dirs: Map<V1Controller, string>) {
    this.hasCpu = dirs.has("cpu");
    this.hasMemsw = existsSync(join(dirs.get("memory")!, "memory.memsw.limit_in_bytes"));
  }

  acquire(limits: CgroupLimits, owner?: { uid: number; gid: number }): TaskCgroup {
    const key = owner ? `${owner.uid}:${owner.gid}` : "";
    const free = this.free.get(key);
    for (let pooled = free?.pop(); pooled !== undefined; pooled = free?.pop()) {
      // Another worker's sweep may have removed an idle one (it only spares live workers'
      // directories by pid, which a pid namespace of its own does not see).
      if (!pooled.intact()) {
        pooled.discard();
        continue;
      }
      try {
        pooled.begin(limits, this.hasCpu ? limits.cpu : null);
        return pooled;
      } catch {
        // A limit the kernel refused here (below what is still charged): a fresh one takes it.
        pooled.discard();
      }
    }
    return this.make(key, limits, owner);
  }

  private make(key: string, limits: CgroupLimits, owner?: { uid: number; gid: number }): V1TaskCgroup {
    const name = `c${++this.made}`;
    const dirs = new Map<V1Controller, string>();
    try {
      for (const [c, parent] of this.dirs) {
        const dir = join(parent, name);
        // Controllers mounted together (cpu,cpuacct) share one directory.
        if (![...dirs.values()].includes(dir)) {
          // recursive: the worker's own directory comes back if another worker swept it while empty.
          mkdirSync(parent, { recursive: true });
          mkdirSync(dir);
        }
        dirs.set(c, dir);
      }
      const cgroup = new V1TaskCgroup(
        dirs,
        this.hasMemsw,
        (released) => this.pool(key, released),
        (discarded) => this.live.delete(discarded),
      );
      this.live.add(cgroup);
      cgroup.begin(limits, this.hasCpu ? limits.cpu : null);
      // Once per cgroup: it only ever goes to attempts of this owner.
      if (owner) for (const file of cgroup.procsFiles) chownSync(file, owner.uid, owner.gid);
      return cgroup;
    } catch (err) {
      removeDirs([...dirs.values()]);
      throw err;
    }
  }

  private pool(key: string, cgroup: V1TaskCgroup): void {
    const free = this.free.get(key);
    if (free) free.push(cgroup);
    else this.free.set(key, [cgroup]);
  }

  close(): void {
    for (const cgroup of this.live) cgroup.closeFiles();
    this.live.clear();
    this.free.clear();
    removeDirs([...this.dirs.values()]);
  }
}

class V1TaskCgroup implements TaskCgroup {
  readonly procsFiles: readonly string[];
  limits: CgroupLimits = { memoryMb: null, pids: null, cpu: null };
  /** What the limit files hold now (a new cgroup has none). */
  private readonly written = { memory: V1_UNLIMITED, pids: "max", cpu: V1_UNLIMITED, period: false };
  /** The counters as the last attempt left them (zero for a new cgroup): this attempt's usage is past them. */
  private base: V1Counters = ZERO_COUNTERS;
  /** The counters read by usage() once the cgroup was seen empty: final, the next attempt's base. */
  private final: V1Counters | null = null;
  /** Seen without a process in this attempt: none can join it since (only the owner's could, and all were in it). */
  private emptied = false;
  private held = false;
  /** Counts the attempts given this cgroup: a kill-all of an earlier one stops at the next. */
  private epoch = 0;
  private readonly files = new KeptFiles();

  constructor(
    private readonly dirs: Map<V1Controller, string>,
    private readonly hasMemsw: boolean,
    private readonly toPool: (cgroup: V1TaskCgroup) => void,
    private readonly onDiscard: (cgroup: V1TaskCgroup) => void,
  ) {
    this.procsFiles = [...new Set(dirs.values())].map((dir) => join(dir, "cgroup.procs"));
  }

  private get freezer(): string {
    return this.dirs.get("freezer")!;
  }

  private get memory(): string {
    return this.dirs.get("memory")!;
  }

  /** Whether every hierarchy's directory is still there. */
  intact(): boolean {
    return this.procsFiles.every((file) => existsSync(file));
  }

  /** Takes the cgroup for an attempt with these limits, writing only those that changed. Throws when one cannot be set. */
  begin(limits: CgroupLimits, cpu: number | null): void {
    const memory = limits.memoryMb === null ? V1_UNLIMITED : String(limits.memoryMb * 1024 * 1024);
    if (memory !== this.written.memory) {
      // With swap accounting, memory+swap gets the same cap, so a hog cannot spill into swap.
      // memsw may never be below the memory limit: raised first when the limit goes up.
      const raising =
        memory === V1_UNLIMITED || (this.written.memory !== V1_UNLIMITED && Number(memory) > Number(this.written.memory));
      if (this.hasMemsw && raising) tryWrite(join(this.memory, "memory.memsw.limit_in_bytes"), memory);
      writeFileSync(join(this.memory, "memory.limit_in_bytes"), memory);
      if (this.hasMemsw && !raising) tryWrite(join(this.memory, "memory.memsw.limit_in_bytes"), memory);
      this.written.memory = memory;
    }
    const pids = limits.pids === null ? "max" : String(limits.pids);
    if (pids !== this.written.pids) {
      writeFileSync(join(this.dirs.get("pids")!, "pids.max"), pids);
      this.written.pids = pids;
    }
    const cpuDir = this.dirs.get("cpu");
    const quota = cpu === null || cpuDir === undefined ? V1_UNLIMITED : String(Math.max(1000, Math.round(cpu * CPU_PERIOD_US)));
    if (cpuDir !== undefined && quota !== this.written.cpu) {
      if (!this.written.period) writeFileSync(join(cpuDir, "cpu.cfs_period_us"), String(CPU_PERIOD_US));
      this.written.period = true;
      writeFileSync(join(cpuDir, "cpu.cfs_quota_us"), quota);
      this.written.cpu = quota;
    }
    this.limits = { ...limits, cpu: cpuDir === undefined ? null : cpu };
    this.final = null;
    this.emptied = false;
    this.held = true;
    this.epoch++;
  }

  private pids(): number[] {
    // Opened afresh each time: v1 keeps a cgroup.procs list per open file, which a re-read
    // through the same file serves again, stale.
    return readWords(join(this.freezer, "cgroup.procs")).map(Number);
  }

  populated(): boolean {
    const populated = this.pids().length > 0;
    if (!populated) this.emptied = true;
    return populated;
  }

  signal(signal: "SIGTERM" | "SIGKILL"): void {
    for (const pid of this.pids()) trySignal(pid, signal);
  }

  async killAll(): Promise<void> {
    // Everything listed now gets SIGKILL before anything is awaited: a worker exiting at once
    // may never come back from the await.
    this.signal("SIGKILL");
    // Only this attempt's: released empty (the executor stops waiting after its drain), the
    // cgroup may go to the next attempt, whose processes this must never reach. One discarded
    // with processes in it is killed on, as long as the rounds last.
    const epoch = this.epoch;
    const mine = () => this.epoch === epoch;
    for (let round = 0; round < KILL_ROUNDS && mine() && this.populated(); round++) {
      for (let i = 0; i < 200 && mine() && this.populated(); i++) await Bun.sleep(1);
      if (mine() && this.populated()) this.freezeAndKill();
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

  private counters(): V1Counters {
    const oom = keyedNumbers(this.files.text(join(this.memory, "memory.oom_control")));
    const out: V1Counters = { oomKills: oom.oom_kill ?? 0, cpuUser: null, cpuSystem: null, ns: true };
    const cpuacct = this.dirs.get("cpuacct");
    if (cpuacct !== undefined) {
      const user = this.files.number(join(cpuacct, "cpuacct.usage_user"));
      const system = this.files.number(join(cpuacct, "cpuacct.usage_sys"));
      if (user !== null && system !== null) {
        out.cpuUser = user;
        out.cpuSystem = system;
      } else {
        // cpuacct.stat counts USER_HZ ticks (100 per second on Linux).
        const stat = keyedNumbers(readText(join(cpuacct, "cpuacct.stat")));
        out.ns = false;
        out.cpuUser = stat.user ?? null;
        out.cpuSystem = stat.system ?? null;
      }
    }
    return out;
  }

  usage(): CgroupUsage {
    // Counters of a cgroup seen empty no longer move: they are where the next attempt starts.
    const emptied = this.emptied;
    const now = this.counters();
    if (emptied) this.final = now;
    const base = this.base.ns === now.ns ? this.base : { ...ZERO_COUNTERS, ns: now.ns };
    const since = (a: number | null, b: number | null) => (a === null ? null : Math.max(0, a - (b ?? 0)));
    const toUs = (x: number | null) => (x === null ? null : now.ns ? Math.round(x / 1000) : x * 10_000);
    return {
      peakMemoryBytes: this.files.number(join(this.memory, "memory.max_usage_in_bytes")),
      oomKilled: now.oomKills > base.oomKills,
      cpuUserUs: toUs(since(now.cpuUser, base.cpuUser)),
      cpuSystemUs: toUs(since(now.cpuSystem, base.cpuSystem)),
    };
  }

  release(): void {
    if (!this.held) return;
    this.held = false;
    // Reused only once nothing of this attempt is left in it: no process, and next to no
    // memory still charged to it.
    if (!this.emptied && this.populated()) {
      this.discard();
      return;
    }
    const usage = join(this.memory, "memory.usage_in_bytes");
    let charged = this.files.number(usage);
    if (charged !== null && charged > POOL_RESIDUE_BYTES) {
      // Mostly page cache the attempt read or wrote: force_empty reclaims what can be (an
      // empty cgroup only, which this one is), and what cannot (tmpfs files) still discards it.
      tryWrite(join(this.memory, "memory.force_empty"), "0");
      charged = this.files.number(usage);
    }
    if (charged === null || charged > POOL_RESIDUE_BYTES) {
      this.discard();
      return;
    }
    this.base = this.final ?? this.counters();
    // The next attempt's peak starts from what is charged now (tryWrite: a failure shows in
    // the next peak, which is then the cgroup's, as high or higher).
    this.files.write(join(this.memory, "memory.max_usage_in_bytes"), "0");
    this.toPool(this);
  }

  /** Never handed out again: removed, or left where a process is still in it. */
  discard(): void {
    this.held = false;
    this.closeFiles();
    this.onDiscard(this);
    removeDirs([...this.dirs.values()]);
  }

  closeFiles(): void {
    this.files.close();
  }
}

class V2Cgroups implements Cgroups {
  readonly version = "v2";

  private made = 0;

  constructor(
    private readonly dir: string,
    readonly hasCpu: boolean,
  ) {}

  acquire(limits: CgroupLimits, owner?: { uid: number; gid: number }): TaskCgroup {
    const dir = join(this.dir, `a${++this.made}`);
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

  release(): void {
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

function tryWrite(file: string, text: string): boolean {
  try {
    writeFileSync(file, text);
    return true;
  } catch {
    // The caller checks the outcome (the cgroup's state or membership) itself.
    return false;
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
