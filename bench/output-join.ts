// How much reading a task's output from its current attempt costs a list page: the old read
// (output on the tasks row) against listTasks (joined to task_attempts), on N finished tasks.
// Run: DATABASE_URL=postgres://postgres@127.0.0.1:5432/x bun bench/output-join.ts [tasks]
import { listTasks, selectTasks } from "../src/db/tasks";
import { createTestDatabase, dropTestDatabase } from "../test/support/db";

const n = Number(process.argv[2] ?? 20_000);
const runs = 300;
const db = await createTestDatabase();
try {
  await db.sql`
    INSERT INTO tasks (id, command, state, scheduled_at, run_at, attempt, stdout, stderr)
    SELECT gen_random_uuid(), 'echo', 'succeeded', now(), now(), 1, repeat('x', 1000), ''
    FROM generate_series(1, ${n})`;
  await db.sql`
    INSERT INTO task_attempts (task_id, attempt, worker_id, dispatched_at, outcome, stdout, stderr)
    SELECT id, 1, 'w', now(), 'succeeded', stdout, stderr FROM tasks`;
  await db.sql`VACUUM ANALYZE tasks`;
  await db.sql`VACUUM ANALYZE task_attempts`;
  const time = async (label: string, read: () => Promise<unknown>) => {
    for (let i = 0; i < 30; i++) await read();
    const start = performance.now();
    for (let i = 0; i < runs; i++) await read();
    const ms = (performance.now() - start) / runs;
    console.log(`${label}: ${ms.toFixed(3)} ms per 101-row page (mean of ${runs}, round trip included)`);
    return ms;
  };
  const old = await time("output on tasks (before)", () => db.sql`SELECT * FROM tasks ORDER BY id DESC LIMIT 101`);
  const joined = await time("output from the attempt (listTasks)", () => listTasks(db.sql, { limit: 101 }));
  // The same statement as one fixed text: what building listTasks' fragments costs in JS.
  const { string: text } = await db.sql`${selectTasks(db.sql)} WHERE true ORDER BY tasks.id DESC LIMIT 101`.describe();
  await time("the same statement as fixed text", () => db.sql.unsafe(text, [], { prepare: true }));
  console.log(`difference: ${(joined - old).toFixed(3)} ms on ${n} tasks`);
  // Interleaved, so that the machine's load drifts over both alike.
  const pair: [number, number] = [0, 0];
  for (let i = 0; i < runs; i++) {
    let start = performance.now();
    await db.sql`SELECT * FROM tasks ORDER BY id DESC LIMIT 101`;
    pair[0] += performance.now() - start;
    start = performance.now();
    await listTasks(db.sql, { limit: 101 });
    pair[1] += performance.now() - start;
  }
  console.log(`interleaved: before ${(pair[0] / runs).toFixed(3)} ms, listTasks ${(pair[1] / runs).toFixed(3)} ms`);
  // Server side only: median execution time of each plan, interleaved.
  const execution = async (query: string) => {
    const plan = await db.sql.unsafe(`EXPLAIN (ANALYZE, FORMAT JSON) ${query}`);
    return (plan[0] as unknown as { "QUERY PLAN": { "Execution Time": number }[] })["QUERY PLAN"][0]!["Execution Time"];
  };
  const before = "SELECT * FROM tasks ORDER BY id DESC LIMIT 101";
  const after = `SELECT tasks.*, o.stdout AS attempt_stdout, o.stderr AS attempt_stderr FROM tasks
    LEFT JOIN task_attempts o ON o.task_id = tasks.id AND o.attempt = tasks.attempt ORDER BY tasks.id DESC LIMIT 101`;
  const times: [number[], number[]] = [[], []];
  for (let i = 0; i < 100; i++) {
    times[0].push(await execution(before));
    times[1].push(await execution(after));
  }
  const median = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1]!;
  console.log(
    `server execution, median of 100: before ${median(times[0]).toFixed(3)} ms, joined ${median(times[1]).toFixed(3)} ms`,
  );
  // listTasks' LIMIT is a parameter: the plan a prepared statement settles on is the generic one.
  const plan = await db.sql.begin(async (tx) => {
    await tx`SET LOCAL plan_cache_mode = force_generic_plan`;
    await tx.unsafe(`PREPARE page(int) AS ${after.replace("LIMIT 101", "LIMIT $1")}`);
    return tx.unsafe("EXPLAIN (ANALYZE, BUFFERS) EXECUTE page(101)");
  });
  for (const row of plan) console.log(Object.values(row)[0]);
} finally {
  await dropTestDatabase(db);
}
