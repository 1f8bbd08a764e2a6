// bun run migrate: applies pending migrations to DATABASE_URL (roles also do this at start-up).
import { loadConfig, requireDatabaseUrl } from "../src/config";
import { migrateDatabase } from "../src/db/migrate";

try {
  const url = requireDatabaseUrl(loadConfig(), "migrate");
  const applied = await migrateDatabase(url);
  console.log(applied.length > 0 ? `applied migrations ${applied.join(", ")}` : "the database is up to date");
} catch (error) {
  console.error(`migrate: ${error instanceof Error ? error.message : String(error)}`);
  process.exit(1);
}
