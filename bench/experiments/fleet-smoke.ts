import postgres from "postgres";
import {
  createBenchDatabase,
  PRODUCT_ROLE_ENV,
  Scope,
  startBenchCluster,
  stateReport,
  submitBatch,
  untilAllFinal,
} from "../support";
import { startNoopFleet } from "../support/noop-fleet";

const scope = new Scope();
try {
  const db = await createBenchDatabase(scope);
  const cluster = await startBenchCluster(scope, db.url, { workers: 0, slots: 8, env: { ...PRODUCT_ROLE_ENV } });
  const grpc = cluster.processes[0]!.lines.find((l) => l.event === "coordinator.started");
  console.log(JSON.stringify(grpc));
  const addr = String((grpc as any).grpc ?? (grpc as any).grpcAddress ?? "");
  const fleet = await startNoopFleet({
    addresses: [addr],
    workers: Number(process.argv[2] ?? 4),
    slots: Number(process.argv[4] ?? 8),
  });
  const sql = postgres(db.url, { max: 2, onnotice: () => {} });
  const t0 = performance.now();
  const N = Number(process.argv[3] ?? 2000);
  for (let i = 0; i < N; i += 500)
    await submitBatch(
      cluster.coordinatorUrl,
      Array.from({ length: Math.min(500, N - i) }, () => ({ command: "true" })),
    );
  await untilAllFinal(sql, 20, 120_000);
  const dt = performance.now() - t0;
  console.log({ N, ms: dt, perSec: (N / dt) * 1000, executed: fleet.executed, report: await stateReport(sql) });
  await fleet.stop();
  await sql.end();
} finally {
  await scope.close();
}
