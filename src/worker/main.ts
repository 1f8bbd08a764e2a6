// bun run worker: dials TQ_COORDINATOR_ADDRESSES and runs up to TQ_WORKER_SLOTS commands at
// once. It holds no database credentials. SIGTERM drains (see Worker.stop).
import { hostname } from "node:os";
import { checkWorkerExposure } from "../auth/exposure";
import { coordinatorAddresses, tracingEndpoint } from "../config";
import { workerMetrics } from "../metrics/worker-metrics";
import { runRole } from "../role";
import { tracingFor } from "../trace/tracing";
import { WorkerHealthServer } from "./health";
import { taskIdentities, workerOptions } from "./options";
import { Watchdog, watchdogTimings } from "./watchdog";
import { Worker } from "./worker";

await runRole("worker", async (config, log) => {
  checkWorkerExposure(config, coordinatorAddresses(config), log);
  const [identities] = taskIdentities(config, log);
  const tracing = tracingFor(tracingEndpoint(config), "worker");
  // Started before any task, outside our process group: our tasks die with us (src/worker/watchdog.ts).
  const watchdog =
    config.TQ_WORKER_WATCHDOG !== "off"
      ? new Watchdog({
          watcher: config.TQ_WORKER_WATCHDOG === "lean" ? "bash" : "bun",
          ...watchdogTimings({
            heartbeatIntervalMs: config.TQ_HEARTBEAT_INTERVAL_MS,
            heartbeatTimeoutMs: config.TQ_HEARTBEAT_TIMEOUT_MS,
          }),
          log,
          state: () => worker.watchState(),
        })
      : null;
  const worker = new Worker({
    tracing,
    ...workerOptions(config, log, {
      name: config.TQ_WORKER_NAME ?? `${hostname()}/${process.pid}`,
      addresses: coordinatorAddresses(config),
      identities,
    }),
    onWatchedChange: () => watchdog?.changed(),
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
  if (watchdog) watchdog.start();
  else
    log.warn(
      { event: "worker.no_watchdog" },
      "TQ_WORKER_WATCHDOG=off: if this worker dies or freezes, its tasks run on until their lease lapses",
    );
  worker.start();
  const health =
    config.TQ_WORKER_HEALTH_PORT > 0
      ? new WorkerHealthServer({
          host: config.TQ_HOST,
          port: config.TQ_WORKER_HEALTH_PORT,
          health: () => worker.health(),
          heartbeatTimeoutMs: config.TQ_HEARTBEAT_TIMEOUT_MS,
          log,
          metrics: workerMetrics(config.TQ_WORKER_SLOTS, () => worker.health()),
        })
      : null;
  health?.start();
  return {
    // /healthz answers through the drain, so a probe sees it draining rather than gone.
    async stop() {
      await worker.stop();
      await watchdog?.stop();
      await health?.stop();
      await tracing?.stop();
    },
    abort: () => worker.abort(),
  };
});
