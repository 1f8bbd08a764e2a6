// Who a worker's tasks run as. A worker that may switch users (root, or CAP_SETUID and
// CAP_SETGID) runs each slot's tasks as that slot's own unprivileged uid and gid, with a home
// folder only that uid can use: the kernel lets a process read /proc/<pid>/environ of another
// only with the same uid (or as root), so a task can read neither the worker's environment
// (its join token) nor a concurrent task's (its secret_env), nor signal either. A worker that
// cannot switch runs its tasks as itself, and says so at start.
import { chmodSync, chownSync, lstatSync, mkdirSync, readFileSync, realpathSync, statSync } from "node:fs";
import { dirname, join, sep } from "node:path";

/** The user a task runs as: one per slot. */
export interface TaskIdentity {
  uid: number;
  gid: number;
  /** Owned by uid, mode 0700: the task's default cwd and its HOME. */
  home: string;
}

export interface IsolationSettings {
  /** auto: isolate when able, warn otherwise; required: refuse to start unless able; off: run tasks as the worker. */
  mode: "auto" | "required" | "off";
  /** Slot i runs as uid first+i and gid first+i. */
  ids: { first: number; last: number };
  /** Each slot's home is <homeDir>/<uid>. */
  homeDir: string;
}

export class IsolationError extends Error {
  override name = "IsolationError";
}

/** Linux capability bits (capability.h). */
const CAP_SETGID = 6;
const CAP_SETUID = 7;

/**
 * Why this process cannot run commands as other users, or null when it can. It needs both
 * CAP_SETUID and CAP_SETGID in its effective set (root has them unless a container dropped them).
 */
export function cannotSwitchUsers(procStatus: string | null = readOwnStatus()): string | null {
  const line = procStatus === null ? undefined : /^CapEff:\s*([0-9a-fA-F]+)$/m.exec(procStatus)?.[1];
  if (line === undefined) {
    return process.geteuid?.() === 0 ? null : "it is not root (and its capabilities cannot be read from /proc)";
  }
  const caps = BigInt(`0x${line}`);
  const has = (bit: number) => (caps >> BigInt(bit)) & 1n;
  if (has(CAP_SETUID) && has(CAP_SETGID)) return null;
  const uid = process.geteuid?.();
  return uid === 0
    ? "it runs as root without CAP_SETUID and CAP_SETGID"
    : `it runs as uid ${uid} without CAP_SETUID and CAP_SETGID`;
}

function readOwnStatus(): string | null {
  try {
    return readFileSync("/proc/self/status", "utf8");
  } catch {
    return null;
  }
}

/**
 * The identities for `slots` slots (slot i: first+i), each with its home prepared, or an
 * IsolationError saying what is wrong. `slotsSetting` names the setting that asked for them.
 */
export function prepareIdentities(settings: IsolationSettings, slots: number, slotsSetting: string): TaskIdentity[] {
  const { first, last } = settings.ids;
  const available = last - first + 1;
  if (slots > available) {
    throw new IsolationError(
      `${slotsSetting} needs ${slots} task users but TQ_TASK_UIDS=${first}-${last} has ${available}: widen the range or run fewer slots`,
    );
  }
  const ownUid = process.getuid?.() ?? -1;
  const ownGid = process.getgid?.() ?? -1;
  if (ownUid >= first && ownUid < first + slots) {
    throw new IsolationError(
      `TQ_TASK_UIDS=${first}-${last} includes the worker's own uid ${ownUid}: tasks must run as other users`,
    );
  }
  if (ownGid >= first && ownGid < first + slots) {
    throw new IsolationError(
      `TQ_TASK_UIDS=${first}-${last} includes the worker's own gid ${ownGid}: tasks must run as other groups`,
    );
  }
  const base = prepareHomeDir(settings.homeDir);
  const identities: TaskIdentity[] = [];
  for (let i = 0; i < slots; i++) {
    const identity = { uid: first + i, gid: first + i, home: join(base, String(first + i)) };
    prepareHome(identity);
    identities.push(identity);
  }
  return identities;
}

/**
 * The folder the homes live in: created if missing (mode 0711), and refused unless it is a real
 * folder owned by the worker that no one else may write, since the worker chowns what is in it.
 */
function prepareHomeDir(homeDir: string): string {
  try {
    mkdirSync(homeDir, { recursive: true, mode: 0o711 });
  } catch (err) {
    throw new IsolationError(`TQ_TASK_HOME_DIR ${homeDir} cannot be created: ${errorText(err)}`);
  }
  const real = realpathSync(homeDir);
  const stat = lstatSync(real);
  const ownUid = process.geteuid?.();
  if (!stat.isDirectory() || stat.uid !== ownUid || (stat.mode & 0o022) !== 0) {
    throw new IsolationError(
      `TQ_TASK_HOME_DIR ${homeDir} must be a folder owned by the worker's user (uid ${ownUid}) that no one else may write`,
    );
  }
  return real;
}

function prepareHome(identity: TaskIdentity): void {
  try {
    mkdirSync(identity.home, { mode: 0o700 });
  } catch (err) {
    if (errorCode(err) !== "EEXIST") throw new IsolationError(`task home ${identity.home} cannot be created: ${errorText(err)}`);
  }
  // The parent is ours and no one else may write it, so what lstat saw is what chown changes.
  const stat = lstatSync(identity.home);
  if (!stat.isDirectory()) throw new IsolationError(`task home ${identity.home} is not a folder`);
  try {
    chownSync(identity.home, identity.uid, identity.gid);
    chmodSync(identity.home, 0o700);
  } catch (err) {
    throw new IsolationError(`task home ${identity.home} cannot be given to uid ${identity.uid}: ${errorText(err)}`);
  }
  const denied = searchDenied(identity.home, identity);
  if (denied !== null) {
    throw new IsolationError(
      `task home ${identity.home} is out of reach of uid ${identity.uid}: ${denied} does not let it through (chmod o+x, or set TQ_TASK_HOME_DIR)`,
    );
  }
}

/**
 * The first folder on the way to `path` (itself included) that `who` may not search, or null
 * when it may reach it: what chdir(2) as that user needs. Symbolic links are resolved first;
 * the mode bits decide (ACLs are not consulted), with `who` in no supplementary group, as
 * tasks are spawned.
 */
export function searchDenied(path: string, who: { uid: number; gid: number }): string | null {
  const real = realpathSync(path);
  let current: string = sep;
  const steps = [current, ...real.split(sep).filter(Boolean)];
  for (let i = 0; i < steps.length; i++) {
    if (i > 0) current = join(current, steps[i]!);
    if (!permits(statSync(current), who, 0o1)) return current;
  }
  return null;
}

/** How long a searchDenied answer is reused for the same folder and user. */
const SEARCH_CACHE_MS = 1000;
/** Entries past which the cache starts afresh (tasks with ever new cwds). */
const SEARCH_CACHE_MAX = 256;
const searchCache = new Map<string, { until: number; denied: string | null }>();

/**
 * searchDenied, its answer reused for a second: an attempt's cwd (most often its slot's home)
 * is checked at every spawn, and walking the path is a realpath and a stat per folder. A
 * folder that changes mode is seen within the second; one that is gone still fails its stat.
 */
export function searchDeniedRecently(path: string, who: { uid: number; gid: number }, now = performance.now()): string | null {
  const key = `${who.uid}:${who.gid}:${path}`;
  const cached = searchCache.get(key);
  if (cached && cached.until > now) return cached.denied;
  const denied = searchDenied(path, who);
  if (searchCache.size >= SEARCH_CACHE_MAX) searchCache.clear();
  searchCache.set(key, { until: now + SEARCH_CACHE_MS, denied });
  return denied;
}

/** Whether `who` can read the file at `path` (mode bits, as searchDenied). */
export function readableBy(path: string, who: { uid: number; gid: number }): boolean {
  try {
    return searchDenied(dirname(path), who) === null && permits(statSync(path), who, 0o4);
  } catch {
    return false;
  }
}

function permits(stat: { uid: number; gid: number; mode: number }, who: { uid: number; gid: number }, bit: number): boolean {
  if (who.uid === 0) return true;
  if (stat.uid === who.uid) return (stat.mode & (bit << 6)) !== 0;
  if (stat.gid === who.gid) return (stat.mode & (bit << 3)) !== 0;
  return (stat.mode & bit) !== 0;
}

function errorCode(err: unknown): string | undefined {
  return typeof err === "object" && err !== null && "code" in err && typeof err.code === "string" ? err.code : undefined;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
