// The attempt log's shell wrapper and its overlap count, on real shells: an attempt still
// running when the next starts is an overlap; one that ended, or was killed, before is not.
import { afterAll, expect, test } from "bun:test";
import { rmSync } from "node:fs";
import { createAttemptLog, loggedCommand, overlaps, readAttemptLog } from "../support/attempt-log";
import { taskDir } from "../support/task-dir";

const dir = taskDir("tq-attempt-log-");
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function run(command: string, task: string, attempt: number) {
  return Bun.spawn(["sh", "-c", command], {
    env: { ...process.env, TQ_TASK_ID: task, TQ_TASK_ATTEMPT: String(attempt) },
    detached: true,
    stdout: "ignore",
    stderr: "inherit",
  });
}

test("attempts one after the other do not overlap; a killed one that is gone does not either", async () => {
  const log = createAttemptLog(dir, "sequential.log");
  expect(await run(loggedCommand(log, "true", "a"), "t1", 1).exited).toBe(0);
  expect(await run(loggedCommand(log, "exit 3", "b"), "t1", 2).exited).toBe(3);
  const killed = run(loggedCommand(log, "sleep 30"), "t2", 1);
  while (!readAttemptLog(log).some((r) => r.task === "t2")) await Bun.sleep(5);
  process.kill(-killed.pid, "SIGKILL");
  await killed.exited;
  expect(await run(loggedCommand(log, "true"), "t2", 2).exited).toBe(0);
  const records = readAttemptLog(log);
  expect(records.filter((r) => r.kind === "start").map((r) => [r.task, r.attempt, r.alive, r.tag])).toEqual([
    ["t1", 1, 0, "a"],
    ["t1", 2, 0, "b"],
    ["t2", 1, 0, "-"],
    ["t2", 2, 0, "-"],
  ]);
  expect(overlaps(records)).toEqual([]);
});

test("an attempt whose predecessor still runs is counted, by its span and by its live processes", async () => {
  const log = createAttemptLog(dir, "overlap.log");
  const first = run(loggedCommand(log, "sleep 30"), "t3", 1);
  while (!readAttemptLog(log).some((r) => r.task === "t3")) await Bun.sleep(5);
  expect(await run(loggedCommand(log, "true"), "t3", 2).exited).toBe(0);
  process.kill(-first.pid, "SIGKILL");
  await first.exited;
  const records = readAttemptLog(log);
  const second = records.find((r) => r.kind === "start" && r.attempt === 2);
  expect(second?.alive).toBeGreaterThan(0);
  expect(overlaps(records).map((o) => [o.task, o.earlier.attempt, o.later.attempt, o.why])).toEqual([
    ["t3", 1, 2, "earlier attempt's processes alive at the later start"],
  ]);
});
