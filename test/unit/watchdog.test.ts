// The worker-to-watchdog line format and the watchdog's timings (src/worker/watchdog.ts).
import { expect, test } from "bun:test";
import { parseStateLine, stateLine, watchdogTimings } from "../../src/worker/watchdog";

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
