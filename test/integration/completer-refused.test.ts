// The completer against real PostgreSQL: a result the database refuses fails only its own task,
// beside a healthy one in the same batch, and the database being away is not mistaken for that.
import { afterEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import pino from "pino";
import { Completer } from "../../src/coordinator/completer";
import { type WorkerConnection, WorkerRegistry } from "../../src/coordinator/registry";
import { listAttempts } from "../../src/db/attempts";
import { connect, type Sql } from "../../src/db/sql";
import { getTask } from "../../src/db/tasks";
import {
  type CoordinatorMessage,
  Outcome,
  type TaskFinished,
  TaskFinishedSchema,
  TaskStartedSchema,
} from "../../src/gen/taskqueue/v1/worker_service_pb";
import { UNSTORABLE_RESULT_ERROR } from "../../src/task/retry";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { createTask, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const WORKER = "w-completer";

/** A logger whose lines (parsed) the test reads, and a wait for one with a given event. */
function capturingLogger() {
  const lines: Record<string, unknown>[] = [];
  const waiters: { event: string; resolve: (line: Record<string, unknown>) => void }[] = [];
  const log = pino(
    { level: "debug" },
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
  const waitFor = (event: string) =>
    new Promise<Record<string, unknown>>((resolve) => {
      const seen = lines.find((line) => line.event === event);
      if (seen) resolve(seen);
      else waiters.push({ event, resolve });
    });
  return { log, lines, waitFor };
}

interface Harness {
  completer: Completer;
  worker: WorkerConnection;
  acks: () => string[];
  log: ReturnType<typeof capturingLogger>;
}

const stops: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const stop of stops.splice(0).reverse()) await stop();
});

function harness(sql: Sql): Harness {
  const registry = new WorkerRegistry();
  const sent: CoordinatorMessage[] = [];
  const worker = registry.open(
    { id: WORKER, name: WORKER, slots: 8, held: [], features: new Set() },
    { write: (m) => sent.push(m), close() {} },
  );
  registry.add(worker);
  const log = capturingLogger();
  const completer = new Completer({ sql, registry, log: log.log, coordinatorId: "c-test", onSlotFreed: () => {}, retryMs: 20 });
  stops.push(() => completer.stop());
  const acks = () => sent.flatMap((m) => (m.payload.case === "ack" && m.payload.value.ref ? [m.payload.value.ref.taskId] : []));
  return { completer, worker, acks, log };
}

async function dispatchedTask(): Promise<string> {
  const row = await createTask(db.sql, taskSpec({ maxAttempts: 3 }), {
    assignTo: { workerId: WORKER, coordinatorId: "c-test", leaseMs: 60_000 },
  });
  return row.id;
}

function finished(taskId: string, fields: Partial<Pick<TaskFinished, "stdout" | "startedAt" | "finishedAt">> = {}): TaskFinished {
  const now = new Date();
  return create(TaskFinishedSchema, {
    ref: { taskId, attempt: 1 },
    outcome: Outcome.EXITED,
    exitCode: 0,
    stdout: "ok\n",
    startedAt: timestampFromDate(now),
    finishedAt: timestampFromDate(now),
    ...fields,
  });
}

/**
 * Reports `poisoned` and `healthy` so that they go in one batch: a start is written first, and
 * both results arrive while it is in flight (a flush takes whatever has queued up meanwhile).
 */
function reportTogether(h: Harness, reports: TaskFinished[], startOf: string): void {
  h.completer.started(h.worker, create(TaskStartedSchema, { ref: { taskId: startOf, attempt: 1 }, pid: 42 }));
  for (const report of reports) h.completer.finished(h.worker, report);
}

async function expectRefusedBesideHealthy(h: Harness, poisoned: string, healthy: string) {
  await eventually(async () => h.acks().includes(poisoned) && h.acks().includes(healthy), {
    what: "both results acknowledged",
    timeoutMs: 20_000,
  });
  const ok = await getTask(db.sql, healthy);
  expect(ok?.state).toBe("succeeded");
  expect(ok?.stdout).toBe("ok\n");
  const bad = await getTask(db.sql, poisoned);
  // Final despite max_attempts 3 and retry_on_failure: the same result would be refused again.
  expect(bad?.state).toBe("failed");
  expect(bad?.error).toBe(UNSTORABLE_RESULT_ERROR);
  expect(bad?.failed_at).not.toBeNull();
  const [attempt] = await listAttempts(db.sql, poisoned);
  expect(attempt?.outcome).toBe("failed");
  expect(attempt?.error).toBe(UNSTORABLE_RESULT_ERROR);
  // The database's own words are logged, with the task, and never stored on it.
  const refused = h.log.lines.filter((line) => line.event === "completer.result_refused");
  expect(refused.map((line) => line.task_id)).toEqual([poisoned]);
  const reason = (refused[0]?.err as { message?: string } | undefined)?.message;
  expect(reason).toBeString();
  expect(JSON.stringify(bad)).not.toContain(reason ?? "");
}

describe("a result the database refuses fails only its own task", () => {
  test("a NUL byte (from a worker that does not replace it) beside a healthy result", async () => {
    const [poisoned, healthy] = [await dispatchedTask(), await dispatchedTask()];
    const h = harness(db.sql);
    reportTogether(h, [finished(poisoned, { stdout: "a\0b" }), finished(healthy)], healthy);
    await expectRefusedBesideHealthy(h, poisoned, healthy);
    const refused = h.log.lines.find((line) => line.event === "completer.result_refused");
    // 22021: invalid byte sequence for encoding "UTF8": 0x00.
    expect((refused?.err as { code?: string } | undefined)?.code).toBe("22021");
  });

  test("a time PostgreSQL cannot hold (a worker with a broken clock) beside a healthy result", async () => {
    const [poisoned, healthy] = [await dispatchedTask(), await dispatchedTask()];
    const h = harness(db.sql);
    // 5000 BC: a valid Date and a valid protobuf Timestamp, before timestamptz's 4713 BC.
    const brokenClock = timestampFromDate(new Date(Date.UTC(-5000, 0, 1)));
    reportTogether(h, [finished(poisoned, { startedAt: brokenClock, finishedAt: brokenClock }), finished(healthy)], healthy);
    await expectRefusedBesideHealthy(h, poisoned, healthy);
  });

  test("a value a CHECK constraint refuses beside a healthy result", async () => {
    // A constraint of the test's own, on the attempt rows the finish statement writes: the
    // database refuses one row of the batch as it would any check violation (23514).
    await db.sql`ALTER TABLE task_attempts ADD CONSTRAINT test_no_forbidden_output CHECK (stdout IS DISTINCT FROM 'forbidden')`;
    try {
      const [poisoned, healthy] = [await dispatchedTask(), await dispatchedTask()];
      const h = harness(db.sql);
      reportTogether(h, [finished(poisoned, { stdout: "forbidden" }), finished(healthy)], healthy);
      await expectRefusedBesideHealthy(h, poisoned, healthy);
      const refused = h.log.lines.find((line) => line.event === "completer.result_refused");
      expect((refused?.err as { code?: string } | undefined)?.code).toBe("23514");
    } finally {
      await db.sql`ALTER TABLE task_attempts DROP CONSTRAINT test_no_forbidden_output`;
    }
  });

  test("a start the database refuses does not lose the other starts of its batch", async () => {
    const [first, refused, healthy] = [await dispatchedTask(), await dispatchedTask(), await dispatchedTask()];
    const h = harness(db.sql);
    const start = (taskId: string, pid: number) => create(TaskStartedSchema, { ref: { taskId, attempt: 1 }, pid });
    h.completer.started(h.worker, start(first, 1));
    // pid is a uint32 on the wire and an integer column: 2^31 is out of range (22003).
    h.completer.started(h.worker, start(refused, 2 ** 31));
    h.completer.started(h.worker, start(healthy, 3));
    await eventually(async () => (await getTask(db.sql, healthy))?.state === "running", {
      what: "the healthy start recorded",
      timeoutMs: 20_000,
    });
    expect((await getTask(db.sql, first))?.state).toBe("running");
    expect((await getTask(db.sql, refused))?.state).toBe("dispatched");
  });

  test("a start the database refuses, merged into its finish, does not cost the result", async () => {
    const [refused, healthy] = [await dispatchedTask(), await dispatchedTask()];
    const h = harness(db.sql);
    const start = (taskId: string, pid: number) => create(TaskStartedSchema, { ref: { taskId, attempt: 1 }, pid });
    // Each start waits for its finish, and goes with it (2^31 is out of the pid column's range).
    h.completer.started(h.worker, start(refused, 2 ** 31));
    h.completer.started(h.worker, start(healthy, 3));
    h.completer.finished(h.worker, finished(refused));
    h.completer.finished(h.worker, finished(healthy));
    await eventually(() => h.acks().length === 2, { what: "both results acknowledged", timeoutMs: 20_000 });
    for (const id of [refused, healthy]) expect((await getTask(db.sql, id))?.state).toBe("succeeded");
    expect((await listAttempts(db.sql, refused))[0]?.pid).toBeNull();
    expect((await listAttempts(db.sql, healthy))[0]?.pid).toBe(3);
  });
});

describe("a database that is away is not a refused result", () => {
  test("a batch cut off by a lost connection is retried whole, and nothing is failed for it", async () => {
    const [poisoned, healthy] = [await dispatchedTask(), await dispatchedTask()];
    // The completer's own connection, so that ending it leaves the test's alone.
    const own = connect(db.url, { max: 1, applicationName: "completer-under-test" });
    stops.push(() => own.end({ timeout: 5 }));
    const h = harness(own);
    // The batch's statement waits on this lock; its connection is then terminated (57P01),
    // exactly as when the server shuts down under it.
    const holder = await db.sql.reserve();
    try {
      await holder`BEGIN`;
      await holder`LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE`;
      // The first result is written alone and waits; the second queues behind it, and both go
      // together when the first is retried.
      h.completer.finished(h.worker, finished(poisoned, { stdout: "a\0b" }));
      h.completer.finished(h.worker, finished(healthy));
      await eventually(
        async () => {
          const [waiting] = await db.sql<{ n: number }[]>`
            SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE application_name = 'completer-under-test' AND wait_event_type = 'Lock'`;
          return (waiting?.n ?? 0) > 0;
        },
        { what: "the completer's statement waiting on the lock", timeoutMs: 20_000 },
      );
      await db.sql`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'completer-under-test'`;
      const failed = await h.log.waitFor("completer.record_failed");
      expect((failed.err as { code?: string } | undefined)?.code).toBeDefined();
      // Nothing was acknowledged or refused while the database was away.
      expect(h.acks()).toEqual([]);
      expect(h.log.lines.some((line) => line.event === "completer.result_refused")).toBe(false);
    } finally {
      await holder`ROLLBACK`;
      holder.release();
    }
    // Back: the batch is written again, and only then is the NUL result refused on its own.
    await expectRefusedBesideHealthy(h, poisoned, healthy);
  });
});
