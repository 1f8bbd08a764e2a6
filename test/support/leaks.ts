// What a test file leaves behind: timers still armed, child processes still running, and
// connections still open to its database once everything it started should have stopped.
// graphile-worker fails a test that "failed to release all workers"; this is that guard.
//
// Bun has no active-handle API (process.getActiveResourcesInfo() is always empty), so the
// preload wraps setTimeout/setInterval, Bun.sleep and Bun.spawn, and tags what each creates with the test
// file then running (Bun.main). Bun runs the preload's afterAll once per run, not per file, so
// a file is checked when the next file's first test begins, and the last one at the end of the
// run; a check that finds something fails loudly, naming the file that left it.
import { runningInGroup } from "./is-running";

interface LiveTimer {
  id: number;
  kind: "timeout" | "interval" | "Bun.sleep";
  delayMs: number;
  file: string;
  /** Where it was created, from the stack at creation. */
  origin: Error;
}

interface SpawnedProcess {
  proc: { pid: number; exitCode: number | null; signalCode: string | null };
  file: string;
  command: string;
  /** Started with setsid(): it leads a group, whose other members must be gone too. */
  grouped: boolean;
}

/**
 * Timers a library keeps for the whole process, tied to nothing a test starts: Elysia re-arms
 * one (unref'd) to clear its handler-analysis cache a few minutes after the last app compiled.
 */
const PROCESS_WIDE = [/node_modules\/elysia\/dist\/sucrose\.mjs/];

const timers = new Map<object, LiveTimer>();
let timerSeq = 0;
const spawned: SpawnedProcess[] = [];
const fileEnds = new Map<string, (() => Promise<string[]>)[]>();
let installed = false;

/** Set while something the whole run shares is being started (the embedded test server). */
let runWideStarts = 0;
const RUN = "(the whole run)";
const currentFile = () => (runWideStarts > 0 ? RUN : Bun.main);

/**
 * Starts something the whole run shares (it outlives the file that happened to start it):
 * the timers and processes created meanwhile belong to no file.
 */
export async function startForTheRun<T>(start: () => Promise<T>): Promise<T> {
  runWideStarts++;
  try {
    return await start();
  } finally {
    runWideStarts--;
  }
}

/** Wraps the timer functions, Bun.sleep and Bun.spawn; the preload calls this once, before any test file. */
export function installLeakTracking(): void {
  if (installed) return;
  installed = true;
  const realSetTimeout = globalThis.setTimeout;
  const realSetInterval = globalThis.setInterval;
  const realClearTimeout = globalThis.clearTimeout;
  const realClearInterval = globalThis.clearInterval;
  const track = (kind: LiveTimer["kind"], handle: object, delayMs: unknown) => {
    const origin = new Error("created here");
    const caller = origin.stack?.split("\n")[3] ?? "";
    if (PROCESS_WIDE.some((pattern) => pattern.test(caller))) return;
    timers.set(handle, {
      id: ++timerSeq,
      kind,
      delayMs: Number(delayMs ?? 0),
      file: currentFile(),
      origin,
    });
  };
  const untrack = (handle: unknown) => {
    if (handle !== null && typeof handle === "object") timers.delete(handle);
  };
  const wrappedSetTimeout = (callback: unknown, delayMs?: number, ...args: unknown[]) => {
    if (typeof callback !== "function") return realSetTimeout(callback as () => void, delayMs, ...args);
    let handle: object | null = null;
    handle = realSetTimeout(
      (...callArgs: unknown[]) => {
        if (handle) timers.delete(handle);
        return callback(...callArgs);
      },
      delayMs,
      ...args,
    );
    track("timeout", handle, delayMs);
    return handle;
  };
  const wrappedSetInterval = (callback: unknown, delayMs?: number, ...args: unknown[]) => {
    const handle = realSetInterval(callback as () => void, delayMs, ...args);
    track("interval", handle, delayMs);
    return handle;
  };
  Object.assign(globalThis, {
    setTimeout: Object.assign(wrappedSetTimeout, realSetTimeout),
    setInterval: Object.assign(wrappedSetInterval, realSetInterval),
    clearTimeout: (handle?: unknown) => {
      untrack(handle);
      return realClearTimeout(handle as Timer);
    },
    clearInterval: (handle?: unknown) => {
      untrack(handle);
      return realClearInterval(handle as Timer);
    },
  });

  // A loop that sleeps (a retry, a backoff) is as much left behind as a timer.
  const realSleep = Bun.sleep;
  Bun.sleep = ((ms: number | Date) => {
    const handle = {};
    track("Bun.sleep", handle, ms instanceof Date ? ms.getTime() - Date.now() : ms);
    return realSleep(ms).finally(() => timers.delete(handle));
  }) as typeof Bun.sleep;

  const realSpawn = Bun.spawn;
  Bun.spawn = ((...args: Parameters<typeof Bun.spawn>) => {
    const proc = (realSpawn as (...a: unknown[]) => SpawnedProcess["proc"])(...args);
    const [first, second] = args as unknown[];
    const options = (Array.isArray(first) ? second : first) as { cmd?: string[]; detached?: boolean } | undefined;
    const cmd = Array.isArray(first) ? (first as string[]) : (options?.cmd ?? []);
    spawned.push({ proc, file: currentFile(), command: cmd.join(" ").slice(0, 200), grouped: options?.detached === true });
    return proc;
  }) as typeof Bun.spawn;
}

/** Runs `release` when the calling test file is checked; it returns what it found left over. */
export function atFileEnd(release: () => Promise<string[]>): void {
  const file = currentFile();
  fileEnds.set(file, [...(fileEnds.get(file) ?? []), release]);
}

/** A mark in time for {@link timersSince}. */
export function timerMark(): number {
  return timerSeq;
}

/**
 * The timers created after `mark` that are still armed, described for a failure message;
 * `besides` leaves out those created by code under these paths (its first frame).
 */
export function timersSince(mark: number, besides: string[] = []): string[] {
  return [...timers.values()]
    .filter((timer) => timer.id > mark && !besides.some((path) => firstFrame(timer).includes(path)))
    .map(describeTimer);
}

/**
 * Fails unless every timer created since `mark` is gone: for a part's start/stop test, take the
 * mark before start() and call this after stop(). A part that borrows the test's pool passes
 * `besides: ["node_modules/postgres/"]`: the pool's idle timers are the test's, not the part's.
 */
export function expectNoTimersSince(mark: number, what: string, options: { besides?: string[] } = {}): void {
  const left = timersSince(mark, options.besides);
  if (left.length > 0) throw new Error(`${what} left ${left.length} timer(s) armed:\n${left.join("\n")}`);
}

function frames(timer: LiveTimer): string[] {
  return (timer.origin.stack ?? "")
    .split("\n")
    .slice(1)
    .map((line) => line.trim())
    .filter((line) => !line.includes("test/support/leaks.ts"));
}

const firstFrame = (timer: LiveTimer) => frames(timer)[0] ?? "";

function describeTimer(timer: LiveTimer): string {
  return `  ${timer.kind} of ${timer.delayMs} ms, created ${frames(timer).slice(0, 4).join(" < ")}`;
}

/** What `file` left behind: armed timers and running processes it created, and its own leftovers. */
async function leftBy(file: string): Promise<string[]> {
  const found: string[] = [];
  for (const release of fileEnds.get(file) ?? []) found.push(...(await release()));
  fileEnds.delete(file);
  for (const [handle, timer] of timers) {
    if (timer.file !== file) continue;
    found.push(describeTimer(timer));
    timers.delete(handle);
  }
  for (const child of spawned.filter((p) => p.file === file)) {
    const alive = child.grouped ? runningInGroup(child.proc.pid) : [];
    const leaderAlive = child.proc.exitCode === null && child.proc.signalCode === null;
    if (leaderAlive) found.push(`  process ${child.proc.pid} still running: ${child.command}`);
    const others = alive.filter((pid) => pid !== child.proc.pid);
    if (others.length > 0) found.push(`  process group ${child.proc.pid} (${child.command}) still has ${others.join(", ")}`);
    // Found once is enough: kill it so the rest of the run is not disturbed.
    if (leaderAlive || others.length > 0) {
      try {
        process.kill(child.grouped ? -child.proc.pid : child.proc.pid, "SIGKILL");
      } catch {
        // gone meanwhile
      }
    }
  }
  for (let i = spawned.length - 1; i >= 0; i--) if (spawned[i]!.file === file) spawned.splice(i, 1);
  return found;
}

let lastFile: string | null = null;

/**
 * Called before each test: when a new file has begun, checks the one before it. Throws, naming
 * that file, when it left something behind.
 */
export async function checkPreviousFile(): Promise<void> {
  const file = currentFile();
  if (lastFile === null || lastFile === file) {
    lastFile = file;
    return;
  }
  const previous = lastFile;
  lastFile = file;
  await failIfLeft(previous, "checked as the next file began");
}

/** Called once the run is over: checks the last file. */
export async function checkLastFile(): Promise<void> {
  if (lastFile !== null) await failIfLeft(lastFile, "checked at the end of the run");
  lastFile = null;
}

async function failIfLeft(file: string, when: string): Promise<void> {
  const found = await leftBy(file);
  if (found.length > 0) {
    throw new Error(`${file} left behind once its tests and hooks were done (${when}):\n${found.join("\n")}`);
  }
}
