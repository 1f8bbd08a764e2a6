// bun run coordinator: HTTP :8080 and gRPC :50051 against DATABASE_URL.
import { requireDatabaseUrl } from "../config";
import { migrateDatabase } from "../db/migrate";
import { runRole } from "../role";
import { Coordinator } from "./coordinator";

await runRole("coordinator", async (config, log) => {
  const url = requireDatabaseUrl(config, "coordinator");
  await migrateDatabase(url, log);
  const coordinator = new Coordinator(config, url, log);
  await coordinator.start();
  return coordinator;
});
