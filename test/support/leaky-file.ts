// A test file that leaves a timer, a process and a database connection behind, for
// test/integration/leaks.test.ts to run (its name keeps it out of a plain `bun test`).
import { test } from "bun:test";
import { connect } from "../../src/db/sql";
import { useTestDatabase } from "./db";

const db = useTestDatabase();

test("leaves a timer, a process and a connection behind", async () => {
  setTimeout(() => {}, 123_456);
  const sleeper = Bun.spawn(["sleep", "30"]);
  console.log(`sleeper pid ${sleeper.pid}`);
  const pool = connect(db.url, { max: 1, applicationName: "leaky-file" });
  await pool`SELECT 1`;
});
