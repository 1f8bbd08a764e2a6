// bun start: the whole system in one process — scheduler, coordinator and TQ_WORKERS
// workers — on embedded PostgreSQL kept in TQ_DATA_DIR unless DATABASE_URL is set.
import { hostname } from "node:os";
import { tracingEndpoint } from "./config";
import { Coordinator } from "./coordinator/coordinator";
import { type EmbeddedDatabase, startEmbedded } from "./db/embedded";
import { migrateDatabase } from "./db/migrate";
import { runRole } from "./role";
import { Scheduler } from "./scheduler/scheduler";
import { inProcessWorkerCredentials } from "./tls";
import { tracingFor } from "./trace/tracing";
import { taskIdentities, workerOptions } from "./worker/options";
import { Worker } from "./worker/worker";

await runRole("start", async (config, log) => {
  // Our workers dial this process over its own TLS: without TQ_TLS_CA they trust TQ_TLS_CERT
  // itself, so that a self-signed certificate works out of the box.
  const credentials = inProcessWorkerCredentials(config);
  // Before the database: a worker that cannot isolate as asked stops the start at once.
  const identities = taskIdentities(config, log.child({ component: "worker" }), config.TQ_WORKERS);
  let embedded: EmbeddedDatabase | null = null;
  let url = config.DATABASE_URL;
  if (!url) {
    log.info({ dataDir: config.TQ_DATA_DIR, port: config.TQ_EMBEDDED_PG_PORT }, "starting embedded PostgreSQL");
    const pgLog = log.child({ component: "postgres" });
    embedded = await startEmbedded({
      dataDir: config.TQ_DATA_DIR,
      port: config.TQ_EMBEDDED_PG_PORT,
      home: config.TQ_EMBEDDED_PG_HOME,
      onLog: (line) => pgLog.debug(line),
    });
    url = embedded.url;
  }
  await migrateDatabase(url, log);
  const coordinator = new Coordinator(config, url, log.child({ component: "coordinator" }));
  const scheduler = new Scheduler(config, url, log.child({ component: "scheduler" }));
  const info = await coordinator.start();
  const schedulerUrl = await scheduler.start();
  // The in-process workers share one tracer provider, their role's own (not the servers').
  const tracing = tracingFor(tracingEndpoint(config), "worker");
  const workers = Array.from(
    { length: config.TQ_WORKERS },
    (_, i) =>
      new Worker({
        ...workerOptions(config, log.child({ component: "worker", index: i }), {
          name: `${hostname()}/${process.pid}/worker-${i + 1}`,
          addresses: [info.grpcAddress],
          identities: identities[i],
        }),
        credentials,
        tracing,
      }),
  );
  for (const worker of workers) worker.start();
  await Promise.all(workers.map((worker) => worker.connected()));
  console.log(
    [
      "task-queue is running",
      `  scheduler    ${schedulerUrl}   (POST /schedule, GET /status, /openapi)`,
      `  coordinator  ${info.httpUrl}   (POST /submit, /tasks, /workers, /openapi)`,
      `  dashboard    ${info.httpUrl}/ui`,
      `  gRPC         ${info.grpcAddress}`,
      `  workers      ${workers.length} x ${config.TQ_WORKER_SLOTS} slots`,
      `  database     ${embedded ? describeEmbedded(embedded, config.TQ_EMBEDDED_PG_PORT) : "DATABASE_URL"}`,
      "Press Ctrl+C to stop.",
    ].join("\n"),
  );
  return {
    async stop() {
      await Promise.all(workers.map((worker) => worker.stop()));
      await tracing?.stop();
      await scheduler.stop();
      await coordinator.stop();
      await embedded?.stop();
    },
    abort() {
      for (const worker of workers) worker.abort();
    },
  };
});

function describeEmbedded(embedded: EmbeddedDatabase, port: number): string {
  const where = `embedded PostgreSQL in ${embedded.dataDir} (port ${port})`;
  // Started by root in a private folder: say where the data went instead, and why.
  return embedded.unreachable ? `${where}, as user postgres cannot reach ${embedded.unreachable}` : where;
}
