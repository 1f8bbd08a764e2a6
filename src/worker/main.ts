// bun run worker: dials TQ_COORDINATOR_ADDRESSES and runs up to TQ_WORKER_SLOTS commands at
// once. It holds no database credentials. SIGTERM drains (see Worker.stop).
import { hostname } from "node:os";
import { checkWorkerExposure } from "../auth/exposure";
import { coordinatorAddresses } from "../config";
import { runRole } from "../role";
import { workerOptions } from "./options";
import { Worker } from "./worker";

await runRole("worker", async (config, log) => {
  checkWorkerExposure(config, coordinatorAddresses(config), log);
  const worker = new Worker({
    ...workerOptions(config, log, {
      name: config.TQ_WORKER_NAME ?? `${hostname()}/${process.pid}`,
      addresses: coordinatorAddresses(config),
    }),
    // Shut out: its tasks are killed already. A supervisor that restarts it gets a new worker,
    // which needs an accepted join token to get in.
    onRevoked: () => {
      console.error("worker: the coordinator revoked this worker's credential; exiting");
      process.exit(3);
    },
  });
  log.info(
    { event: "worker.starting", id: worker.id, addresses: coordinatorAddresses(config), slots: config.TQ_WORKER_SLOTS },
    "worker starting",
  );
  worker.start();
  return worker;
});
