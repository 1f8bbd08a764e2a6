// bench/support.ts's burn-down poll: unfinished means any task queued, dispatched, running or
// waiting, and it stays right when the statistics say most rows are queued (the state in which
// the EXISTS form it replaced took a sequential scan).
import { expect, setDefaultTimeout, test } from "bun:test";
import { anyUnfinished } from "../../bench/support";
import { createTestDatabase, dropTestDatabase, TEST_TIMEOUT_MS } from "../support/db";
import { createTask } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

test("anyUnfinished answers for each live state and is false once every task is final", async () => {
  const db = await createTestDatabase();
  try {
    const { sql } = db;
    expect(await anyUnfinished(sql)).toBe(false);
    const ids: string[] = [];
    for (let i = 0; i < 20; i++) ids.push((await createTask(sql)).id);
    // Statistics taken while every row is queued, then all but one finished.
    await sql`ANALYZE tasks`;
    await sql`UPDATE tasks SET state = 'succeeded' WHERE id <> ${ids[19]!}`;
    expect(await anyUnfinished(sql)).toBe(true);
    for (const state of ["dispatched", "running", "waiting"]) {
      await sql`UPDATE tasks SET state = ${state} WHERE id = ${ids[19]!}`;
      expect(await anyUnfinished(sql), state).toBe(true);
    }
    for (const state of ["succeeded", "failed", "timed_out", "cancelled"]) {
      await sql`UPDATE tasks SET state = ${state} WHERE id = ${ids[19]!}`;
      expect(await anyUnfinished(sql), state).toBe(false);
    }
  } finally {
    await dropTestDatabase(db);
  }
});
