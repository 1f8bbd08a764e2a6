// bun run scheduler: HTTP :8081 against DATABASE_URL.
import { requireDatabaseUrl } from "../config";
import { migrateDatabase } from "../db/migrate";
import { runRole } from "../role";
import { Scheduler } from "./scheduler";

await runRole("scheduler", async (config, log) => {
  const url = requireDatabaseUrl(config, "scheduler");
  await migrateDatabase(url, log);
  const scheduler = new Scheduler(config, url, log);
  await scheduler.start();
  return scheduler;
});
