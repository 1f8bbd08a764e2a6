// A start gate: one pipe that every armed shell due at one instant waits on (its read end is
// each one's fd 3), so that the start is one write of as many newlines as shells released, not
// one pipe write per shell. With a pipe each, the shells released first woke on the other core
// and on this one and preempted the worker, and the last of 50 due at once was released 40-60
// ms after the first on 2 cores; one write wakes them all at once (about 0.05 ms for 50).
//
// Each shell reads one line, byte by byte, as sh does from a pipe; the gate carries newlines
// only, so shells reading at once cannot split one another's lines. A shell that reads the
// pipe's end instead (the worker closed the gate, or died) exits without running its command.
// The gate's fds are close-on-exec: no other spawn inherits them, and the shell closes its fd 3
// before it execs the command, so no task holds a gate.
//
// A host gate (StartGate.host) is the same gate shared by every worker of one user on a host:
// a FIFO named after the start instant (the task's due time, the same for every worker) in a
// folder of that user's only. The first worker at the instant lets every shell due then go,
// its own and the others' (on 2 cores, one worker's 50 shells woken kept the other worker off
// the cores for 25-35 ms, and its own shells waited that long). See HostGates.
import {
  chmodSync,
  closeSync,
  constants,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";

const O_CLOEXEC = 0o2000000;

const F_GETFL = 3;
const F_SETFL = 4;
const LOCK_EX = 2;

interface Libc {
  pipe2(fds: Int32Array): number;
  mkfifo(path: string, mode: number): number;
  fcntl(fd: number, command: number, arg: number): number;
  flock(fd: number, operation: number): number;
}

let libc: Libc | null | undefined;

/** pipe2(2), mkfifo(3), fcntl(2) and flock(2) through bun:ffi, or null where libc cannot be loaded (the per-shell pipe is used then). */
function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  libc = null;
  if (process.platform !== "linux") return null;
  try {
    const { dlopen, FFIType, ptr } = require("bun:ffi") as typeof import("bun:ffi");
    for (const name of ["libc.so.6", "libc.musl-x86_64.so.1", "libc.musl-aarch64.so.1", "libc.so"]) {
      try {
        const lib = dlopen(name, {
          pipe2: { args: [FFIType.ptr, FFIType.i32], returns: FFIType.i32 },
          mkfifo: { args: [FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
          fcntl: { args: [FFIType.i32, FFIType.i32, FFIType.i32], returns: FFIType.i32 },
          flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 },
        });
        libc = {
          pipe2: (fds) => lib.symbols.pipe2(ptr(fds), O_CLOEXEC) as number,
          mkfifo: (path, mode) => lib.symbols.mkfifo(ptr(Buffer.from(`${path}\0`)), mode) as number,
          fcntl: (fd, command, arg) => lib.symbols.fcntl(fd, command, arg) as number,
          flock: (fd, operation) => lib.symbols.flock(fd, operation) as number,
        };
        return libc;
      } catch {
        // the next name
      }
    }
  } catch {
    // no bun:ffi
  }
  return null;
}

/**
 * Lines a host gate's write carries beyond its own shells' count: enough for every other
 * worker's shells due at that instant on the host. What no shell takes stays in the FIFO (only
 * shells of that instant read it) until its last descriptor closes.
 */
export const HOST_GATE_LINES = 1024;

/**
 * How long after its instant (as the worker places it) a worker may still open a host gate. One
 * later than that, finding it not opened, gives it up for every worker (HostOpening.giveUp):
 * each kills its shells there and spawns them afresh. An attempt goes on a host gate only if its
 * lease, by its worker's count, outlasts the instant by this and a second more (Attempts), so
 * whoever lets it go does so within its lease.
 */
export const HOST_GATE_WINDOW_MS = 100;

/** A host gate's files are removed this long after their instant (every worker is long past it). */
const HOST_GATE_KEEP_MS = 60_000;

/**
 * A host gate's instant as its lock holder sees it (StartGate.enter): opened (at the first
 * opening's time: every shell on it went then), given up (a worker came after the window and
 * nothing had opened it: no one may now), or neither (the holder decides: open or giveUp).
 */
export class HostOpening {
  /** The first opening, ms since the epoch: a worker's wall clock just before its write. */
  readonly openedAt: number | null;
  readonly givenUp: boolean;
  private left = false;

  constructor(
    private readonly fd: number,
    record: string,
    private readonly gate: StartGate,
  ) {
    let first: number | null = null;
    let givenUp = false;
    for (const line of record.split("\n")) {
      if (line === "given up") givenUp = true;
      const at = Number(line);
      if (line === "" || !Number.isSafeInteger(at)) continue;
      if (first === null || at < first) first = at;
    }
    this.openedAt = first;
    this.givenUp = givenUp && first === null;
  }

  /** Records the opening at `at` (before the write, as start times are taken before it) and writes the lines. */
  open(at: number): void {
    if (this.openedAt === null && !this.givenUp) writeSync(this.fd, `${at}\n`);
    this.gate.open();
  }

  /** No one opens this instant from now on: its shells are killed and spawned afresh by their workers. */
  giveUp(): void {
    if (this.openedAt === null && !this.givenUp) writeSync(this.fd, "given up\n");
  }

  /** Unlocks. */
  leave(): void {
    if (this.left) return;
    this.left = true;
    try {
      closeSync(this.fd);
    } catch {
      // closed already
    }
  }
}

export class StartGate {
  /** Attempts (by key) armed on this gate and not yet released or gone. */
  readonly members = new Set<string>();
  /** Shells spawned on the gate, and lines written for them. */
  private added = 0;
  private written = 0;
  private closed = false;

  private constructor(
    /** The read end, passed to each armed shell as its fd 3. */
    readonly readFd: number,
    private readonly writeFd: number,
    /** A host gate's file its instant's decision is recorded in (and locked by). */
    private readonly host?: { openedPath: string },
  ) {}

  /** A new gate, or null where pipes cannot be made here (each shell then has its own). */
  static create(): StartGate | null {
    const lib = loadLibc();
    if (!lib) return null;
    const fds = new Int32Array(2);
    if (lib.pipe2(fds) !== 0) return null;
    return new StartGate(fds[0]!, fds[1]!);
  }

  /**
   * The host gate of the instant `instantMs` in `dir` (HostGates.path): the FIFO `<instantMs>`
   * there, made by whichever worker comes first. Null where it cannot be made or opened (the
   * caller uses a gate of its own then).
   */
  static host(dir: string, instantMs: number): StartGate | null {
    const lib = loadLibc();
    if (!lib) return null;
    const path = join(dir, String(instantMs));
    lib.mkfifo(path, 0o600);
    let readFd: number | null = null;
    try {
      // What is there must be our own FIFO (the folder is ours alone; this is the second lock).
      const stat = lstatSync(path);
      if (!stat.isFIFO() || stat.uid !== process.getuid?.()) return null;
      // The read end first (a FIFO's write end opens only with a reader), both without
      // blocking; the shells then read the read end blocking, as from a pipe.
      readFd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | O_CLOEXEC);
      const writeFd = openSync(path, constants.O_WRONLY | constants.O_NONBLOCK | O_CLOEXEC);
      const flags = lib.fcntl(readFd, F_GETFL, 0);
      if (flags < 0 || lib.fcntl(readFd, F_SETFL, flags & ~constants.O_NONBLOCK) < 0) {
        closeSync(writeFd);
        throw new Error("fcntl failed");
      }
      return new StartGate(readFd, writeFd, { openedPath: `${path}.opened` });
    } catch {
      if (readFd !== null) closeSync(readFd);
      return null;
    }
  }

  /** Whether this is a host gate (shared with the other workers of the host). */
  get isHost(): boolean {
    return this.host !== undefined;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Counts a shell spawned on the gate. */
  add(): void {
    this.added++;
  }

  /**
   * Writes a line for every shell spawned on the gate and not yet written for, in one write;
   * returns how many. Any shell may take any line, so the caller releases every one of them
   * first, or has killed it: a shell that takes a line with a kill pending dies before it can
   * run anything, and the lines are enough for all the others whatever order they read in. A
   * host gate writes more (HOST_GATE_LINES), for the other workers' shells; it is opened
   * through enter() (once per host), this only writes.
   */
  open(): number {
    const count = this.added - this.written;
    if (count <= 0 || this.closed) return 0;
    this.written = this.added;
    try {
      writeSync(this.writeFd, "\n".repeat(this.host ? count + HOST_GATE_LINES : count));
    } catch {
      // No reader left (every shell is gone), or a host gate's FIFO full of lines already.
    }
    return count;
  }

  /**
   * A host gate's instant, decided once for the host: under its lock (flock of its
   * `<instant>.opened` file, which records each decision), what was decided, and how to decide
   * it if nothing was. The caller leaves (unlocks) once it has decided. Null: not a host gate,
   * or the lock could not be had (the caller then treats the gate as given up).
   */
  enter(): HostOpening | null {
    if (!this.host) return null;
    const lib = loadLibc();
    let fd: number | null = null;
    try {
      fd = openSync(this.host.openedPath, constants.O_RDWR | constants.O_CREAT | constants.O_APPEND | O_CLOEXEC, 0o600);
      if (!lib || lib.flock(fd, LOCK_EX) !== 0) throw new Error("flock failed");
      return new HostOpening(fd, readFileSync(fd, "utf8"), this);
    } catch {
      if (fd !== null) closeSync(fd);
      return null;
    }
  }

  /** Closes both ends: a shell still waiting reads the end and exits without its command. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const fd of [this.readFd, this.writeFd]) {
      try {
        closeSync(fd);
      } catch {
        // closed already
      }
    }
  }
}

/**
 * The folder of a worker user's host gates: made 0700 if missing, and used only if it is a
 * folder of this user's that no one else can enter. `gate()` also removes the files of
 * instants long past (a worker that died leaves its own).
 */
export class HostGates {
  private lastSweep = 0;

  private constructor(readonly path: string) {}

  /** The folder, or the reason it cannot be used (the worker then keeps its gates to itself). */
  static open(path: string): HostGates | string {
    if (!loadLibc()) return "no libc through bun:ffi";
    try {
      mkdirSync(path, { recursive: true, mode: 0o700 });
      const stat = lstatSync(path);
      if (!stat.isDirectory()) return `${path} is not a folder`;
      if (stat.uid !== process.getuid?.()) return `${path} belongs to uid ${stat.uid}, not this worker's`;
      if ((stat.mode & 0o077) !== 0) chmodSync(path, 0o700);
      // A shell on a host gate checks its parent from /proc before its command.
      readFileSync("/proc/self/stat");
    } catch (error) {
      return (error as Error).message;
    }
    return new HostGates(path);
  }

  /** The gate of the instant, swept of what is long past first (once a minute at most). */
  gate(instantMs: number, now = Date.now()): StartGate | null {
    if (now - this.lastSweep >= HOST_GATE_KEEP_MS) {
      this.lastSweep = now;
      this.sweep(now);
    }
    return StartGate.host(this.path, instantMs);
  }

  private sweep(now: number): void {
    let names: string[];
    try {
      names = readdirSync(this.path);
    } catch {
      return;
    }
    for (const name of names) {
      const instant = Number(name.replace(/\.opened$/, ""));
      if (!Number.isSafeInteger(instant) || now - instant < HOST_GATE_KEEP_MS) continue;
      try {
        rmSync(join(this.path, name), { force: true });
      } catch {
        // another worker's sweep took it
      }
    }
  }
}
