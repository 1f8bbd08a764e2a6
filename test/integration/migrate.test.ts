// Migrations that are safe while older roles run: a no-transaction migration (CREATE INDEX
// CONCURRENTLY) applied outside a transaction under the lock, an INVALID index left by a failed
// concurrent build rebuilt, and a build older than the schema that runs when the newer
// migrations declare it compatible (and is refused, naming both versions, when they do not).
import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { migrate, parseMigration, readMigrations, SchemaTooNew } from "../../src/db/migrate";
import type { Sql } from "../../src/db/sql";
import { createTestDatabase, dropTestDatabase, TEST_TIMEOUT_MS, type TestDatabase, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

async function withFreshDatabase(fn: (fresh: TestDatabase) => Promise<void>): Promise<void> {
  const fresh = await createTestDatabase({ migrate: false });
  try {
    await fn(fresh);
  } finally {
    await dropTestDatabase(fresh);
  }
}

/** The message a promise rejected with (awaited to the end, so the migration's lock is released). */
async function failure(promise: Promise<unknown>): Promise<string> {
  try {
    await promise;
    return "resolved";
  } catch (error) {
    return error instanceof Error ? error.message : String(error);
  }
}

async function indexValid(sql: Sql, name: string): Promise<boolean | null> {
  const [row] = await sql<{ valid: boolean }[]>`
    SELECT indisvalid AS valid FROM pg_index WHERE indexrelid = to_regclass(${name})`;
  return row ? row.valid : null;
}

const table = parseMigration(
  1,
  "things",
  "CREATE TABLE things (x integer NOT NULL);\nINSERT INTO things VALUES (1), (1), (2);\n",
);
const uniqueIndex = parseMigration(
  2,
  "things_index",
  "-- migrate: no-transaction\n-- compatible-with: 1\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS things_x_idx ON things (x);\n",
);

describe("no-transaction migrations", () => {
  test("CREATE INDEX CONCURRENTLY is applied outside a transaction, and recorded", async () => {
    await withFreshDatabase(async (fresh) => {
      const index = parseMigration(
        2,
        "things_index",
        "-- migrate: no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS things_x_idx ON things (x);\n",
      );
      expect(index.noTransaction).toBe(true);
      expect(await migrate(fresh.sql, [table, index])).toEqual([1, 2]);
      expect(await indexValid(fresh.sql, "things_x_idx")).toBe(true);
      expect(await migrate(fresh.sql, [table, index])).toEqual([]);
    });
  });

  test("a failed concurrent build's INVALID index is dropped and built again on the next run", async () => {
    await withFreshDatabase(async (fresh) => {
      // The duplicate 1s make the unique build fail part way, as an interrupted build would.
      expect(await failure(migrate(fresh.sql, [table, uniqueIndex]))).toMatch(/could not create unique index/);
      expect(await indexValid(fresh.sql, "things_x_idx")).toBe(false);
      const recorded = await fresh.sql`SELECT version FROM schema_migrations ORDER BY version`;
      expect(recorded.map((r) => r.version)).toEqual([1]);
      await fresh.sql`DELETE FROM things WHERE ctid = (SELECT min(ctid) FROM things WHERE x = 1)`;
      // IF NOT EXISTS alone would keep the invalid index and record the migration as done.
      expect(await migrate(fresh.sql, [table, uniqueIndex])).toEqual([2]);
      expect(await indexValid(fresh.sql, "things_x_idx")).toBe(true);
    });
  });

  test("a no-transaction migration must build its indexes CONCURRENTLY IF NOT EXISTS", () => {
    expect(() => parseMigration(3, "bad", "-- migrate: no-transaction\nCREATE INDEX things_x_idx ON things (x);\n")).toThrow(
      /CONCURRENTLY IF NOT EXISTS/,
    );
    expect(() => parseMigration(3, "bad", "-- migrate: sometimes\nSELECT 1;\n")).toThrow(/unknown header/);
  });

  test("this build's run_at index is built concurrently by its own migration and is valid", async () => {
    const concurrent = readMigrations().filter((m) => m.noTransaction);
    expect(concurrent.some((m) => m.sql.includes("CONCURRENTLY IF NOT EXISTS tasks_run_at_idx"))).toBe(true);
    // No transactional migration builds it (a big tasks table would be locked for the build).
    expect(readMigrations().filter((m) => !m.noTransaction && m.sql.includes("INDEX tasks_run_at_idx"))).toEqual([]);
    expect(await indexValid(db.sql, "tasks_run_at_idx")).toBe(true);
    expect(await indexValid(db.sql, "tasks_due_idx")).toBe(null);
  });
});

describe("a build older than the schema", () => {
  const later = parseMigration(2, "later", "-- compatible-with: 1\nCREATE TABLE later_things (y integer);\n");
  const breaking = parseMigration(2, "breaking", "ALTER TABLE things ADD COLUMN z integer NOT NULL DEFAULT 0;\n");

  test("runs, with a warning, when every newer migration declares its version compatible", async () => {
    await withFreshDatabase(async (fresh) => {
      expect(await migrate(fresh.sql, [table, later])).toEqual([1, 2]);
      const warnings: { fields: Record<string, unknown>; message: string }[] = [];
      const log = { warn: (fields: Record<string, unknown>, message: string) => warnings.push({ fields, message }) };
      expect(await migrate(fresh.sql, [table], { log: log as never })).toEqual([]);
      expect(warnings).toHaveLength(1);
      expect(warnings[0]!.fields).toMatchObject({
        event: "migrate.schema_newer",
        schemaVersion: 2,
        buildVersion: 1,
        compatibleFrom: 1,
      });
    });
  });

  test("is refused, naming both versions, when a newer migration does not declare it compatible", async () => {
    await withFreshDatabase(async (fresh) => {
      expect(await migrate(fresh.sql, [table, breaking])).toEqual([1, 2]);
      const refused = await migrate(fresh.sql, [table]).catch((error: unknown) => error);
      expect(refused).toBeInstanceOf(SchemaTooNew);
      expect((refused as Error).message).toContain("schema is at version 2, newer than this build's 1");
      expect((refused as Error).message).toContain("works only with builds from schema version 2");
    });
  });

  test("compatible-with must name a version up to the migration's own", () => {
    expect(() => parseMigration(2, "bad", "-- compatible-with: 3\nSELECT 1;\n")).toThrow(/compatible-with/);
    expect(() => parseMigration(2, "bad", "-- compatible-with: soon\nSELECT 1;\n")).toThrow(/compatible-with/);
    expect(parseMigration(2, "plain", "SELECT 1;\n").compatibleWith).toBe(2);
  });
});
