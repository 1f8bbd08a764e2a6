// Numbered, immutable migrations (src/db/migrations/NNNN_name.sql), applied at start-up in one
// transaction under an advisory lock, so several processes starting at once apply each
// exactly once. Written here rather than taken from a library: postgres-shift has no lock and
// wants a folder per migration; node-pg-migrate brings a second driver (pg).
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { connect, type Sql } from "./sql";

/** Arbitrary constant shared by every task-queue process: "tq" + "migr". */
const MIGRATION_LOCK_KEY = 0x7471_6d69_6772n;

export interface Migration {
  version: number;
  name: string;
  sql: string;
  checksum: string;
}

export const MIGRATIONS_DIR = join(import.meta.dir, "migrations");

export function readMigrations(dir = MIGRATIONS_DIR): Migration[] {
  const migrations = readdirSync(dir)
    .filter((file) => file.endsWith(".sql"))
    .sort()
    .map((file) => {
      const match = /^(\d{4})_([a-z0-9_]+)\.sql$/.exec(file);
      if (!match) throw new Error(`migration file ${file} is not named NNNN_name.sql`);
      const sql = readFileSync(join(dir, file), "utf8");
      return {
        version: Number(match[1]),
        name: match[2]!,
        sql,
        checksum: new Bun.CryptoHasher("sha256").update(sql).digest("hex"),
      };
    });
  migrations.forEach((m, i) => {
    if (m.version !== i + 1) throw new Error(`migration ${m.version}_${m.name} breaks the sequence (expected ${i + 1})`);
  });
  return migrations;
}

/** Applies pending migrations; returns the versions it applied. */
export async function migrate(sql: Sql, migrations = readMigrations()): Promise<number[]> {
  return sql.begin(async (tx) => {
    // A role's pool runs under TQ_DB_STATEMENT_TIMEOUT_MS and TQ_DB_LOCK_TIMEOUT_MS; a migration
    // may rewrite a big table, and a process starting beside one that migrates waits for the
    // advisory lock until it is done. Neither is a hang: lift both for this transaction only.
    await tx`SELECT set_config('statement_timeout', '0', true), set_config('lock_timeout', '0', true)`;
    await tx`SELECT pg_advisory_xact_lock(${MIGRATION_LOCK_KEY.toString()}::bigint)`;
    await tx`
      CREATE TABLE IF NOT EXISTS schema_migrations (
        version    integer PRIMARY KEY,
        name       text NOT NULL,
        checksum   text NOT NULL,
        applied_at timestamptz(3) NOT NULL DEFAULT clock_timestamp()
      )`;
    const applied = await tx<{ version: number; name: string; checksum: string }[]>`
      SELECT version, name, checksum FROM schema_migrations ORDER BY version`;
    const byVersion = new Map(applied.map((row) => [row.version, row]));
    const done: number[] = [];
    for (const migration of migrations) {
      const row = byVersion.get(migration.version);
      if (row) {
        if (row.checksum !== migration.checksum) {
          throw new Error(
            `migration ${migration.version}_${migration.name} changed after it was applied; add a new migration instead`,
          );
        }
        continue;
      }
      await tx.unsafe(migration.sql);
      await tx`
        INSERT INTO schema_migrations (version, name, checksum)
        VALUES (${migration.version}, ${migration.name}, ${migration.checksum})`;
      done.push(migration.version);
    }
    const known = new Set(migrations.map((m) => m.version));
    const unknown = applied.filter((row) => !known.has(row.version));
    if (unknown.length > 0) {
      throw new Error(
        `the database has migrations this build does not know (${unknown.map((r) => r.version).join(", ")}); run a newer build`,
      );
    }
    return done;
  });
}

/** Connects, applies pending migrations, disconnects: what each role does at start-up. */
export async function migrateDatabase(url: string): Promise<number[]> {
  const sql = connect(url, { max: 1, applicationName: "task-queue migrate" });
  try {
    return await migrate(sql);
  } finally {
    await sql.end({ timeout: 5 });
  }
}
