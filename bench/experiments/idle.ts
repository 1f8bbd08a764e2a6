// What an idle cluster (coordinator, scheduler, one worker) does per second: statements from
// pg_stat_statements and CPU from /proc over a quiet window.
import { connect } from "../../src/db/sql";
import { createBenchDatabase, PRODUCT_ROLE_ENV, Scope, startBenchCluster } from "../support";
import { idleSample, postmasterPid } from "../support/proc-cpu";

const scope = new Scope();
try {
  const db = await createBenchDatabase(scope, () => {}, { shared_preload_libraries: "pg_stat_statements" });
  const cluster = await startBenchCluster(scope, db.url, {
    workers: Number(process.argv[2] ?? 1),
    slots: 8,
    env: { ...PRODUCT_ROLE_ENV },
  });
  const sql = connect(db.url, { max: 1 });
  scope.defer("end", () => sql.end({ timeout: 5 }));
  await sql`CREATE EXTENSION IF NOT EXISTS pg_stat_statements`;
  await Bun.sleep(2000);
  await sql`SELECT pg_stat_statements_reset()`;
  const roles = Object.fromEntries(cluster.processes.map((p, i) => [`${p.role}${i}`, p.pid]));
  const ms = 5000;
  const idle = await idleSample(roles, postmasterPid(db.dataDir!), ms);
  for (const k of Object.keys(idle.after.cpu))
    console.log(k, (((idle.after.cpu[k]! - idle.before.cpu[k]!) / ms) * 1000).toFixed(1), "ms/s");
  const rows = await sql<
    { calls: number; query: string }[]
  >`SELECT calls::int, left(regexp_replace(query, '\\s+', ' ', 'g'), 130) AS query FROM pg_stat_statements ORDER BY calls DESC LIMIT 12`;
  for (const r of rows) console.log((r.calls / (ms / 1000)).toFixed(1), "/s", r.query);
} finally {
  await scope.close();
}
