// Clocks: a worker whose wall clock is off its coordinator's still runs what it is given (the
// lease travels as a duration), and the skew it says in Hello is logged and shown in
// GET /workers. A real coordinator and a real worker, in this process, on a real database.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import pino from "pino";
import { loadConfig } from "../../src/config";
import { Coordinator } from "../../src/coordinator/coordinator";
import { AssignSchema } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { type Logger, silentLogger } from "../../src/log";
import { leaseLapsed, Worker } from "../../src/worker/worker";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { getJson, postJson, watchTask } from "../support/http";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const FAST_MS = 10_000;

/** A logger that keeps every line, and resolves the waits of the events it logs. */
function recordingLogger(): {
  log: Logger;
  lines: Record<string, unknown>[];
  waitFor(event: string): Promise<Record<string, unknown>>;
} {
  const lines: Record<string, unknown>[] = [];
  const waiters: { event: string; resolve: (line: Record<string, unknown>) => void }[] = [];
  const log = pino(
    { level: "info" },
    {
      write(text: string) {
        const line = JSON.parse(text) as Record<string, unknown>;
        lines.push(line);
        for (const w of waiters.splice(0)) {
          if (line.event === w.event) w.resolve(line);
          else waiters.push(w);
        }
      },
    },
  );
  const waitFor = (event: string) => {
    const seen = lines.find((line) => line.event === event);
    if (seen) return Promise.resolve(seen);
    return new Promise<Record<string, unknown>>((resolve) => waiters.push({ event, resolve }));
  };
  return { log, lines, waitFor };
}

const recorded = recordingLogger();
let coordinator: Coordinator;
let url: string;
let worker: Worker;

beforeAll(async () => {
  const config = loadConfig({
    TQ_COORDINATOR_PORT: String(await freePort()),
    TQ_GRPC_PORT: String(await freePort()),
    TQ_HEARTBEAT_INTERVAL_MS: "200",
    TQ_HEARTBEAT_TIMEOUT_MS: "1000",
  });
  coordinator = new Coordinator(config, db.url, recorded.log);
  const info = await coordinator.start();
  url = info.httpUrl;
  worker = new Worker({
    name: "fast-clock",
    slots: 2,
    addresses: [info.grpcAddress],
    log: silentLogger,
    heartbeatIntervalMs: 200,
    heartbeatTimeoutMs: 1000,
    killGraceMs: 500,
    drainGraceMs: 1000,
    maxOutputBytes: 10_000,
    baseEnv: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
    // Its wall clock runs 10 s ahead of everyone else's; its monotonic clock is the host's.
    now: () => Date.now() + FAST_MS,
  });
  worker.start();
  await worker.connected();
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await worker?.stop();
  await coordinator?.stop();
}, HOOK_TIMEOUT_MS);

test("a worker whose clock runs 10 s fast still runs its tasks, run-now and claimed alike", async () => {
  // The first goes the run-now fast path (born dispatched); the batch is claimed by the dispatcher.
  const { json: one } = await postJson(`${url}/tasks`, { command: "echo one", max_attempts: 1 });
  const { status, json: batch } = await postJson(`${url}/tasks/batch`, {
    tasks: [1, 2, 3].map((n) => ({ command: `echo ${n}`, max_attempts: 1 })),
  });
  expect(status).toBe(201);
  const ids: string[] = [one.id, ...batch.tasks.map((t: { id: string }) => t.id)];
  for (const id of ids) {
    const done = await watchTask(url, id);
    // Before lease_ms, each was refused ("arrived after its lease lapsed") and failed.
    expect(done).toMatchObject({ state: "succeeded", attempt: 1, error: null });
  }
});

test("the worker's skew is logged as coordinator.worker_clock_skew and shown in GET /workers", async () => {
  const line = await recorded.waitFor("coordinator.worker_clock_skew");
  expect(line).toMatchObject({ level: 40, worker: worker.id });
  // Its Hello spent a moment in transit, which counts against it.
  expect(Number(line.skewMs)).toBeGreaterThan(FAST_MS - 1000);
  expect(Number(line.skewMs)).toBeLessThanOrEqual(FAST_MS);
  const { json } = await getJson(`${url}/workers`);
  const shown = json.workers.find((w: { id: string }) => w.id === worker.id);
  expect(shown.clock_skew_ms).toBe(line.skewMs);
});

test("a lease is judged by lease_ms when the coordinator sends it, else by the old wall-clock comparison", () => {
  const now = () => Date.parse("2030-01-01T00:00:10Z");
  const past = timestampFromDate(new Date("2030-01-01T00:00:00Z"));
  const future = timestampFromDate(new Date("2030-01-01T00:00:20Z"));
  // What is left on the coordinator's clock decides, whatever our wall clock says.
  expect(leaseLapsed(create(AssignSchema, { leaseMs: 1200, leaseExpiresAt: past }), now)).toBe(false);
  expect(leaseLapsed(create(AssignSchema, { leaseMs: 0, leaseExpiresAt: future }), now)).toBe(true);
  // An older coordinator sends no lease_ms.
  expect(leaseLapsed(create(AssignSchema, { leaseExpiresAt: past }), now)).toBe(true);
  expect(leaseLapsed(create(AssignSchema, { leaseExpiresAt: future }), now)).toBe(false);
  expect(leaseLapsed(create(AssignSchema, {}), now)).toBe(false);
});
