// The worker-to-watchdog line format, the watchdog's timings and when the worker's side sends
// a state (src/worker/watchdog.ts).
import { expect, test } from "bun:test";
import { readFileSync, rmSync } from "node:fs";
import { createLogger } from "../../src/log";
import type { HeldProcess } from "../../src/worker/attempts";
import { parseStateLine, stateLine, Watchdog, type WatchdogState, watchdogTimings } from "../../src/worker/watchdog";

const state = {
  worker_id: "w1",
  credential: "secret",
  address: "127.0.0.1:50051",
  attempts: [
    { taskId: "t1", attempt: 1, pgid: 4242, cgroupProcs: ["/sys/fs/cgroup/freezer/x/cgroup.procs"] },
    { taskId: "t2", attempt: 3, pgid: null, cgroupProcs: [] },
  ],
};

test("a state line leads with the process groups for the bash half, then the state, and reads back", () => {
  const line = stateLine(state);
  expect(line.endsWith("\n")).toBe(true);
  expect(line.split("\t")[0]).toBe("4242");
  expect(parseStateLine(line.trim())).toEqual(state);
  expect(stateLine({ ...state, attempts: [] }).startsWith("\t")).toBe(true);
  expect(parseStateLine("4242\t{not json")).toBeNull();
});

test("the watchdog takes silence for a freeze before the coordinator's heartbeat timeout, beating four times per bound", () => {
  expect(watchdogTimings({ heartbeatIntervalMs: 1000, heartbeatTimeoutMs: 3000 })).toEqual({ silenceMs: 2000, beatMs: 500 });
  expect(watchdogTimings({ heartbeatIntervalMs: 200, heartbeatTimeoutMs: 1000 })).toEqual({ silenceMs: 800, beatMs: 200 });
  // An interval close to the timeout still leaves half the timeout.
  expect(watchdogTimings({ heartbeatIntervalMs: 900, heartbeatTimeoutMs: 1000 }).silenceMs).toBe(500);
});

test("a new process group is sent at once; attempts taken or ended go out together at the end of the turn", async () => {
  const file = `/tmp/tq-watchdog-lines-${Bun.randomUUIDv7()}`;
  let current: WatchdogState = { worker_id: "w1", credential: "", address: null, attempts: [] };
  const attempt = (taskId: string, pgid: number | null): HeldProcess => ({ taskId, attempt: 1, pgid, cgroupProcs: [] });
  const watchdog = new Watchdog({
    log: createLogger("test", "error"),
    silenceMs: 60_000,
    beatMs: 60_000,
    state: () => current,
    // Records every line it is sent (the beats are empty lines, none due within the test).
    command: ["sh", "-c", `cat > '${file}'`],
  });
  try {
    watchdog.start();
    // Taken, not spawned: waits.
    current = { ...current, attempts: [attempt("t1", null)] };
    watchdog.changed();
    current = { ...current, attempts: [attempt("t1", null), attempt("t2", null)] };
    watchdog.changed();
    // Spawned: a process group the watchdog must know before anything else happens.
    current = { ...current, attempts: [attempt("t1", 101), attempt("t2", null)] };
    watchdog.changed();
    // Ended: waits, and the ends of one turn go out as one line.
    current = { ...current, attempts: [attempt("t2", null)] };
    watchdog.changed();
    current = { ...current, attempts: [] };
    watchdog.changed();
    // A credential (a Welcome) is sent at once.
    current = { ...current, credential: "secret" };
    watchdog.changed();
    await new Promise((resolve) => setImmediate(resolve));
    current = { ...current, attempts: [attempt("t3", null)] };
    watchdog.changed();
    await new Promise((resolve) => setImmediate(resolve));
  } finally {
    await watchdog.stop();
  }
  const lines = readFileSync(file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((line) => parseStateLine(line)!);
  rmSync(file, { force: true });
  const seen = lines.map((s) => `${s.credential}:${s.attempts.map((a) => `${a.taskId}/${a.pgid}`).join(",")}`);
  expect(seen).toEqual([
    ":", // at start
    ":t1/101,t2/null", // the spawn, with what was taken before it
    "secret:", // the credential, with the ends before it
    "secret:t3/null", // the next turn's change
    "secret:t3/null", // stop sends the last state
  ]);
});
