// A database per test file, on the server at TEST_DATABASE_URL / DATABASE_URL when set,
// otherwise on one embedded PostgreSQL cluster started for the whole run (stopped by
// preload.ts). Each file gets a fresh, migrated database, dropped once the file is done.
import { beforeAll } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { type EmbeddedDatabase, startEmbedded } from "../../src/db/embedded";
import { migrate } from "../../src/db/migrate";
import { connect, type Sql } from "../../src/db/sql";
import { atFileEnd, startForTheRun } from "./leaks";

let embedded: Promise<EmbeddedDatabase> | null = null;
let embeddedDir: string | null = null;

/** URL of a database on the server where test databases can be created. */
async function serverUrl(): Promise<string> {
  const configured = process.env.TEST_DATABASE_URL || process.env.DATABASE_URL;
  if (configured) return configured;
  if (!embedded) {
    embeddedDir = mkdtempSync(join(tmpdir(), "tq-test-pg-"));
    const dataDir = embeddedDir;
    embedded = startForTheRun(async () =>
      startEmbedded({
        dataDir,
        port: await freePort(),
        settings: { fsync: "off", synchronous_commit: "off", full_page_writes: "off" },
        // As bun start does: run by root, where the binaries go if user postgres cannot reach node_modules.
        ...(process.env.TQ_EMBEDDED_PG_HOME ? { home: process.env.TQ_EMBEDDED_PG_HOME } : {}),
      }),
    );
  }
  return (await embedded).adminUrl;
}

/** Stops the embedded cluster, if this run started one. */
export async function stopEmbeddedServer(): Promise<void> {
  if (!embedded) return;
  const db = await embedded;
  embedded = null;
  await db.stop();
  // The cluster's folder is the requested one unless root's postgres user could not reach it.
  for (const dir of [db.dataDir, embeddedDir]) if (dir) rmSync(dir, { recursive: true, force: true });
}

export async function freePort(): Promise<number> {
  const server = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = server.port;
  server.stop(true);
  return port;
}

/** Hooks that start or stop servers and databases get this long (Bun's default is 5 s). */
export const HOOK_TIMEOUT_MS = 30_000;
/**
 * Ceiling for a test that starts processes or PostgreSQL (it waits on signals). Each such
 * file sets it: setDefaultTimeout applies to the file that calls it, and the preload's call
 * did not reach every file of a full run (one fell back to Bun's 5 s).
 */
export const TEST_TIMEOUT_MS = 60_000;

export interface TestDatabase {
  /** Connection URL of this file's database, for child processes. */
  url: string;
  sql: Sql;
}

function withDatabase(url: string, database: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}

/** Creates and migrates a fresh database; drop it with dropTestDatabase. */
export async function createTestDatabase(options: { migrate?: boolean } = {}): Promise<TestDatabase> {
  const server = await serverUrl();
  const name = `tq_test_${process.pid}_${Math.random().toString(36).slice(2, 10)}`;
  const admin = postgres(server, { max: 1, onnotice: () => {} });
  try {
    await admin`CREATE DATABASE ${admin(name)}`;
  } finally {
    await admin.end();
  }
  const url = withDatabase(server, name);
  const sql = connect(url, { max: 10, applicationName: "task-queue-test" });
  if (options.migrate !== false) await migrate(sql);
  return { url, sql };
}

export async function dropTestDatabase(db: TestDatabase): Promise<void> {
  await db.sql.end({ timeout: 5 });
  const name = new URL(db.url).pathname.slice(1);
  const admin = postgres(await serverUrl(), { max: 1, onnotice: () => {} });
  try {
    await admin`DROP DATABASE IF EXISTS ${admin(name)} WITH (FORCE)`;
  } finally {
    await admin.end();
  }
}

/**
 * Ends the test's own pool, then drops the database; returns the connections still open to it
 * at that moment (a part that was not stopped, or stopped without closing its pool). Only
 * client connections count: PostgreSQL's own autovacuum worker analyzing the database's tables
 * (seen on embedded PostgreSQL after a busy file) is no leak of ours, and the drop ends it.
 */
async function releaseTestDatabase(db: TestDatabase): Promise<string[]> {
  await db.sql.end({ timeout: 5 });
  const name = new URL(db.url).pathname.slice(1);
  const admin = postgres(await serverUrl(), { max: 1, onnotice: () => {} });
  try {
    const open = await admin<{ pid: number; application_name: string; state: string | null; query: string }[]>`
      SELECT pid, application_name, state, query FROM pg_stat_activity
      WHERE datname = ${name} AND backend_type = 'client backend'`;
    await admin`DROP DATABASE IF EXISTS ${admin(name)} WITH (FORCE)`;
    return open.map(
      (c) =>
        `  a connection to its database: pid ${c.pid} "${c.application_name}" (${c.state ?? "?"}), last ${c.query.slice(0, 120)}`,
    );
  } finally {
    await admin.end();
  }
}

/**
 * The usual form: a database for the calling test file, created before its first test. It is
 * dropped once the file is done, after its own afterAll hooks have stopped what it started
 * (test/support/leaks.ts), and a connection still open to it then fails the file.
 */
export function useTestDatabase(): TestDatabase {
  const handle = {} as TestDatabase;
  beforeAll(async () => {
    const db = await createTestDatabase();
    Object.assign(handle, db);
    atFileEnd(() => releaseTestDatabase(db));
  }, HOOK_TIMEOUT_MS);
  return handle;
}
