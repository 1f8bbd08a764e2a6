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
import { closeSync, writeSync } from "node:fs";

const O_CLOEXEC = 0o2000000;

type Pipe2 = (fds: Int32Array) => number;

let pipe2: Pipe2 | null | undefined;

/** pipe2(2) through bun:ffi, or null where libc cannot be loaded (the per-shell pipe is used then). */
function loadPipe2(): Pipe2 | null {
  if (pipe2 !== undefined) return pipe2;
  pipe2 = null;
  if (process.platform !== "linux") return null;
  try {
    const { dlopen, FFIType, ptr } = require("bun:ffi") as typeof import("bun:ffi");
    for (const name of ["libc.so.6", "libc.musl-x86_64.so.1", "libc.musl-aarch64.so.1", "libc.so"]) {
      try {
        const lib = dlopen(name, { pipe2: { args: [FFIType.ptr, FFIType.i32], returns: FFIType.i32 } });
        pipe2 = (fds) => lib.symbols.pipe2(ptr(fds), O_CLOEXEC) as number;
        return pipe2;
      } catch {
        // the next name
      }
    }
  } catch {
    // no bun:ffi
  }
  return null;
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
  ) {}

  /** A new gate, or null where pipes cannot be made here (each shell then has its own). */
  static create(): StartGate | null {
    const make = loadPipe2();
    if (!make) return null;
    const fds = new Int32Array(2);
    if (make(fds) !== 0) return null;
    return new StartGate(fds[0]!, fds[1]!);
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
   * run anything, and the lines are enough for all the others whatever order they read in.
   */
  open(): number {
    const count = this.added - this.written;
    if (count <= 0 || this.closed) return 0;
    this.written = this.added;
    try {
      writeSync(this.writeFd, "\n".repeat(count));
    } catch {
      // No reader left (every shell is gone): nothing to let go.
    }
    return count;
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
