// Numbered, immutable migrations (src/db/migrations/NNNN_name.sql), applied at start-up under an
// advisory lock, so several processes starting at once apply each exactly once. Written here
// rather than taken from a library: postgres-shift has no lock and wants a folder per
// migration; node-pg-migrate brings a second driver (pg).
//
// Migrations are expand/contract: each must be safe while roles of the build before it still
// run. A migration's leading comments may carry two headers:
//
//   -- migrate: no-transaction   run outside a transaction, one statement at a time (for
//                                CREATE INDEX CONCURRENTLY on a big table, which a transaction
//                                cannot hold); every CREATE INDEX in it must be CONCURRENTLY
//                                IF NOT EXISTS, so that running it again after a crash is safe
//   -- compatible-with: N        the oldest build schema version (a build's highest migration)
//                                that still works with this migration applied; without it,
//                                only builds that know the migration do
//
// Consecutive transactional migrations still commit together.
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "../log";
import { connect, type Sql } from "./sql";

/** Arbitrary constant shared by every task-queue process: "tq" + "migr". */
const MIGRATION_LOCK_KEY = 0x7471_6d69_6772n;

export interface Migration {
  version: number;
  name: string;
  sql: string;
  checksum: string;
  /** `-- migrate: no-transaction`: applied statement by statement, outside a transaction. */
  noTransaction: boolean;
  /** `-- compatible-with: N`: the oldest build schema version that works with it; its own version without. */
  compatibleWith: number;
}

export const MIGRATIONS_DIR = join(import.meta.dir, "migrations");

/** A build's schema version refused by a newer database that does not declare itself compatible. */
export class SchemaTooNew extends Error {
  readonly code = "schema_too_new";
}

export function readMigrations(dir = MIGRATIONS_DIR): Migration[] {
  const migrations = readdirSync(dir)
    .filter((file) => file.endsWith(".sql"))
    .sort()
    .map((file) => {
      const match = /^(\d{4})_([a-z0-9_]+)\.sql$/.exec(file);
      if (!match) throw new Error(`migration file ${file} is not named NNNN_name.sql`);
      const sql = readFileSync(join(dir, file), "utf8");
      return parseMigration(Number(match[1]), match[2]!, sql);
    });
  migrations.forEach((m, i) => {
    if (m.version !== i + 1) throw new Error(`migration ${m.version}_${m.name} breaks the sequence (expected ${i + 1})`);
  });
  return migrations;
}

/** A migration's headers, read from its leading comment lines; checked here so a bad one fails every build at once. */
export function parseMigration(version: number, name: string, sql: string): Migration {
  const label = `migration ${version}_${name}`;
  const headers = new Map<string, string>();
  for (const line of sql.split("\n")) {
    const text = line.trim();
    if (text === "") continue;
    if (!text.startsWith("--")) break;
    const header = /^--\s*(migrate|compatible-with):\s*(.+?)\s*$/.exec(text);
    if (header) headers.set(header[1]!, header[2]!);
  }
  const mode = headers.get("migrate");
  if (mode !== undefined && mode !== "no-transaction") throw new Error(`${label}: unknown header "migrate: ${mode}"`);
  const compat = headers.get("compatible-with");
  const compatibleWith = compat === undefined ? version : Number(compat);
  if (!Number.isInteger(compatibleWith) || compatibleWith < 0 || compatibleWith > version) {
    throw new Error(`${label}: compatible-with must be a schema version from 0 to ${version}, not "${compat}"`);
  }
  const noTransaction = mode === "no-transaction";
  if (noTransaction) {
    for (const statement of statements(sql)) {
      if (/^CREATE\s+(UNIQUE\s+)?INDEX\b/i.test(statement) && !INDEX_CONCURRENTLY.test(statement)) {
        throw new Error(`${label}: in a no-transaction migration every CREATE INDEX must be CONCURRENTLY IF NOT EXISTS`);
      }
    }
  }
  return {
    version,
    name,
    sql,
    checksum: new Bun.CryptoHasher("sha256").update(sql).digest("hex"),
    noTransaction,
    compatibleWith,
  };
}

const INDEX_CONCURRENTLY = /^CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+("[^"]+"|[\w.]+)/i;

/**
 * The statements of a no-transaction migration: its text without comment lines, split where a
 * line ends in a semicolon. Such a migration holds plain DDL (no function bodies).
 */
function statements(sql: string): string[] {
  return sql
    .split("\n")
    .filter((line) => !line.trim().startsWith("--"))
    .join("\n")
    .split(/;\s*$/m)
    .map((statement) => statement.trim())
    .filter((statement) => statement !== "");
}

export interface MigrateOptions {
  /** Where a newer, compatible schema is reported. Defaults to silence. */
  log?: Pick<Logger, "warn">;
  /** How often to try the lock while another process migrates. Defaults to 100 ms. */
  lockPollMs?: number;
}

/** Applies pending migrations; returns the versions it applied. */
export async function migrate(sql: Sql, migrations = readMigrations(), options: MigrateOptions = {}): Promise<number[]> {
  const conn = await sql.reserve();
  try {
    // A role's pool runs under TQ_DB_STATEMENT_TIMEOUT_MS and TQ_DB_LOCK_TIMEOUT_MS; a migration
    // may rewrite a big table or build an index concurrently. Neither is a hang: lift both for
    // this session while it migrates (RESET below gives the pool its own settings back).
    await conn`SELECT set_config('statement_timeout', '0', false), set_config('lock_timeout', '0', false)`;
    await lock(conn, options.lockPollMs ?? 100);
    try {
      return await applyPending(conn, migrations, options);
    } finally {
      // If the connection is gone, so is its lock.
      await conn`SELECT pg_advisory_unlock(${MIGRATION_LOCK_KEY.toString()}::bigint)`.catch(() => {});
    }
  } finally {
    await conn`RESET statement_timeout`.catch(() => {});
    await conn`RESET lock_timeout`.catch(() => {});
    conn.release();
  }
}

/**
 * Takes the session's migration lock. Tried, not waited for: a session blocked in
 * pg_advisory_lock holds a snapshot, and a CREATE INDEX CONCURRENTLY under the lock waits for
 * every older snapshot to end, so the two would wait on each other.
 */
async function lock(conn: Sql, pollMs: number): Promise<void> {
  for (;;) {
    const [row] = await conn<
      { locked: boolean }[]
    >`SELECT pg_try_advisory_lock(${MIGRATION_LOCK_KEY.toString()}::bigint) AS locked`;
    if (row?.locked) return;
    await Bun.sleep(pollMs);
  }
}

async function applyPending(conn: Sql, migrations: Migration[], options: MigrateOptions): Promise<number[]> {
  await conn`
    CREATE TABLE IF NOT EXISTS schema_migrations (
      version    integer PRIMARY KEY,
      name       text NOT NULL,
      checksum   text NOT NULL,
      applied_at timestamptz(3) NOT NULL DEFAULT clock_timestamp()
    )`;
  // What an older build reads to decide whether it may run against this schema. Builds from
  // before it leave it null: compatible with nothing older than the migration itself.
  await conn`ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS compatible_with integer`;
  const applied = await conn<{ version: number; name: string; checksum: string; compatible_with: number | null }[]>`
    SELECT version, name, checksum, compatible_with FROM schema_migrations ORDER BY version`;
  const byVersion = new Map(applied.map((row) => [row.version, row]));
  for (const migration of migrations) {
    const row = byVersion.get(migration.version);
    if (row && row.checksum !== migration.checksum) {
      throw new Error(
        `migration ${migration.version}_${migration.name} changed after it was applied; add a new migration instead`,
      );
    }
  }
  const known = new Set(migrations.map((m) => m.version));
  const unknown = applied.filter((row) => !known.has(row.version));
  if (unknown.length > 0) {
    checkCompatible(migrations, unknown, options);
    return [];
  }
  const pending = migrations.filter((m) => !byVersion.has(m.version));
  const done: number[] = [];
  for (let i = 0; i < pending.length; ) {
    const migration = pending[i]!;
    if (migration.noTransaction) {
      await applyOutsideTransaction(conn, migration);
      done.push(migration.version);
      i++;
      continue;
    }
    // Consecutive transactional migrations commit together.
    let end = i;
    while (end < pending.length && !pending[end]!.noTransaction) end++;
    const batch = pending.slice(i, end);
    await conn.unsafe("BEGIN");
    try {
      for (const m of batch) {
        await conn.unsafe(m.sql);
        await record(conn, m);
      }
      await conn.unsafe("COMMIT");
    } catch (error) {
      await conn.unsafe("ROLLBACK").catch(() => {});
      throw error;
    }
    done.push(...batch.map((m) => m.version));
    i = end;
  }
  return done;
}

/** The database is ahead of this build: run if every newer migration declares this build's version compatible. */
function checkCompatible(
  migrations: Migration[],
  unknown: { version: number; name: string; compatible_with: number | null }[],
  options: MigrateOptions,
): void {
  const buildVersion = migrations.reduce((max, m) => Math.max(max, m.version), 0);
  const schemaVersion = unknown.reduce((max, row) => Math.max(max, row.version), 0);
  const needs = unknown.reduce((max, row) => Math.max(max, row.compatible_with ?? row.version), 0);
  if (needs > buildVersion) {
    throw new SchemaTooNew(
      `the database schema is at version ${schemaVersion}, newer than this build's ${buildVersion}, and works only with builds from schema version ${needs}; run a newer build`,
    );
  }
  options.log?.warn(
    { event: "migrate.schema_newer", schemaVersion, buildVersion, compatibleFrom: needs },
    `the database schema is at version ${schemaVersion}, newer than this build's ${buildVersion}; it declares builds from ${needs} compatible, so this one runs`,
  );
}

async function record(conn: Sql, migration: Migration): Promise<void> {
  await conn`
    INSERT INTO schema_migrations (version, name, checksum, compatible_with)
    VALUES (${migration.version}, ${migration.name}, ${migration.checksum}, ${migration.compatibleWith})`;
}

/**
 * Statement by statement, in autocommit, and recorded only once all have run: a crash part way
 * runs it again from the start, which IF NOT EXISTS makes safe. A concurrent index build that
 * failed (or was interrupted) leaves an INVALID index that IF NOT EXISTS would keep: it is
 * dropped and built again.
 */
async function applyOutsideTransaction(conn: Sql, migration: Migration): Promise<void> {
  for (const statement of statements(migration.sql)) {
    const index = INDEX_CONCURRENTLY.exec(statement)?.[1];
    if (index !== undefined) await dropIfInvalid(conn, index);
    await conn.unsafe(statement);
  }
  await record(conn, migration);
}

async function dropIfInvalid(conn: Sql, index: string): Promise<void> {
  const [row] = await conn<{ valid: boolean }[]>`
    SELECT i.indisvalid AS valid FROM pg_index i WHERE i.indexrelid = to_regclass(${index})`;
  if (row && !row.valid) await conn.unsafe(`DROP INDEX CONCURRENTLY IF EXISTS ${index}`);
}

/** Connects, applies pending migrations, disconnects: what each role does at start-up. */
export async function migrateDatabase(url: string, log?: Logger): Promise<number[]> {
  const sql = connect(url, { max: 1, applicationName: "task-queue migrate" });
  try {
    return await migrate(sql, readMigrations(), { log });
  } finally {
    await sql.end({ timeout: 5 });
  }
}
