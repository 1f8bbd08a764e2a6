// The guard of test/support/leaks.ts: a file that leaves a timer, a child process or a
// connection to its database behind fails, and the failure names the file and each leftover.
import { expect, setDefaultTimeout, test } from "bun:test";
import { TEST_TIMEOUT_MS } from "../support/db";
import { isRunning } from "../support/is-running";

setDefaultTimeout(TEST_TIMEOUT_MS);

const ROOT = new URL("../..", import.meta.url).pathname;

test("a file that leaves a timer, a process and a connection behind fails, naming each", async () => {
  const run = Bun.spawn(["bun", "test", "./test/support/leaky-file.ts"], {
    cwd: ROOT,
    env: process.env,
    stdout: "pipe",
    stderr: "pipe",
  });
  const [code, out, err] = await Promise.all([run.exited, new Response(run.stdout).text(), new Response(run.stderr).text()]);
  const output = out + err;
  expect(code).not.toBe(0);
  expect(output).toContain("(pass) leaves a timer, a process and a connection behind");
  expect(output).toContain("test/support/leaky-file.ts left behind once its tests and hooks were done");
  expect(output).toMatch(/timeout of 123456 ms, created at <anonymous> \(.*test\/support\/leaky-file\.ts:10/);
  expect(output).toMatch(/process \d+ still running: sleep 30/);
  expect(output).toMatch(/a connection to its database: pid \d+ "leaky-file" \(idle\), last SELECT 1/);
  // The guard stops what it found, so the rest of a run is not disturbed.
  const sleeper = Number(/sleeper pid (\d+)/.exec(output)?.[1]);
  expect(sleeper).toBeGreaterThan(0);
  expect(isRunning(sleeper)).toBe(false);
});
