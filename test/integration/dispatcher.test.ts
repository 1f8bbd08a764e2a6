import { describe, expect, jest, setDefaultTimeout, test } from "bun:test";
import { Dispatcher, KEYED_EXIT_FALLBACK_MS } from "../../src/coordinator/dispatcher";
import { type WorkerConnection, WorkerRegistry } from "../../src/coordinator/registry";
import type { Sql } from "../../src/db/sql";
import { finishAttempt } from "../../src/db/transitions";
import type { CoordinatorMessage } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { attemptResult, createTask, taskSpec } from "../support/factories";
import { expectNoTimersSince, timerMark } from "../support/leaks";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

/**
 * The test database's Sql, counting the statements run through it. `settled()` resolves once
 * every statement has answered and what the caller did with the answers has run (a turn of
 * the event loop after the last one, with no new statement meanwhile).
 */
function countingSql(): { sql: Sql; statements: () => number; settled: () => Promise<void> } {
  let count = 0;
  const open: PromiseLike<unknown>[] = [];
  const sql = new Proxy(db.sql, {
    apply(target, thisArg, args) {
      const query = Reflect.apply(target, thisArg, args);
      // A statement runs when awaited; a template that only becomes part of another statement
      // (a fragment, such as flow control's filters) is never awaited, so it is not counted.
      if (typeof query?.then === "function") {
        const then = query.then.bind(query);
        let awaited = false;
        // biome-ignore lint/suspicious/noThenProperty: the statement is counted when it is awaited.
        query.then = (onFulfilled?: (value: unknown) => unknown, onRejected?: (reason: unknown) => unknown) => {
          if (!awaited) {
            awaited = true;
            count++;
            open.push(query);
          }
          return then(onFulfilled, onRejected);
        };
      }
      return query;
    },
  });
  const settled = async () => {
    for (;;) {
      // setImmediate, which Bun's fake timers leave real: the microtasks queued so far run first.
      await new Promise((resolve) => setImmediate(resolve));
      const answering = open.splice(0);
      if (answering.length === 0) return;
      await Promise.allSettled(answering);
    }
  };
  return { sql, statements: () => count, settled };
}

function fakeWorker(registry: WorkerRegistry, id: string, onAssign: (message: CoordinatorMessage) => void): WorkerConnection {
  return registry.open(
    { id, name: id, slots: 1, held: [], features: new Set(["start_in_ms"] as const) },
    { write: (message) => onAssign(message), close() {} },
  );
}

function dispatcher(sql: Sql, registry: WorkerRegistry, aheadMs = 0): Dispatcher {
  return new Dispatcher({
    sql,
    registry,
    coordinatorId: "c-test",
    log: silentLogger,
    safetyPollMs: 60_000,
    leaseMs: 4000,
    aheadMs,
  });
}

describe("Dispatcher timer", () => {
  test("a task due in years does not make the timer fire at once and spin", async () => {
    await db.sql`TRUNCATE tasks CASCADE`;
    await createTask(db.sql, taskSpec({ scheduledAt: new Date("2099-01-01T00:00:00Z") }));
    const { sql, statements, settled } = countingSql();
    const subject = dispatcher(sql, new WorkerRegistry());
    // Fake time keeps setTimeout's limit: a delay past 2^31 - 1 ms fires after 1 ms, as it does
    // in real time. So ten seconds pass at once, and nothing but the dispatcher moves them.
    jest.useFakeTimers();
    try {
      const mark = timerMark();
      subject.start();
      // The start pass reads when the next task is due and arms its timer; a timer past
      // setTimeout's limit would fire after 1 ms and read it again, over and over.
      await settled();
      expect(statements()).toBe(1);
      jest.advanceTimersByTime(10_000);
      await settled();
      await subject.stop();
      expectNoTimersSince(mark, "Dispatcher.stop()", { besides: ["node_modules/postgres/"] });
    } finally {
      jest.useRealTimers();
    }
    expect(statements()).toBe(1);
  });

  test("a task due shortly is dispatched when it is due, not before", async () => {
    await db.sql`TRUNCATE tasks CASCADE`;
    const due = new Date(Date.now() + 300);
    const task = await createTask(db.sql, taskSpec({ scheduledAt: due }));
    const registry = new WorkerRegistry();
    const assigned = new Promise<{ taskId: string; at: number }>((resolve) =>
      registry.add(
        fakeWorker(registry, "w-1", (message) => {
          if (message.payload.case === "assign") resolve({ taskId: message.payload.value.ref?.taskId ?? "", at: Date.now() });
        }),
      ),
    );
    const subject = dispatcher(db.sql, registry);
    const mark = timerMark();
    subject.start();
    const { taskId, at } = await assigned;
    await subject.stop();
    expectNoTimersSince(mark, "Dispatcher.stop()", { besides: ["node_modules/postgres/"] });
    expect(taskId).toBe(task.id);
    expect(at).toBeGreaterThanOrEqual(due.getTime());
  });
});

describe("Dispatcher on a process's exit", () => {
  /** One worker with one slot, the tasks assigned to it in order, and a dispatcher counting its statements. */
  async function oneSlot() {
    const registry = new WorkerRegistry();
    const assigned: string[] = [];
    const worker = fakeWorker(registry, "w-1", (message) => {
      if (message.payload.case === "assign") assigned.push(message.payload.value.ref?.taskId ?? "");
    });
    registry.add(worker);
    const counting = countingSql();
    const subject = dispatcher(counting.sql, registry);
    return { registry, worker, assigned, subject, ...counting };
  }

  test("a keyed task's exit with nothing else admitted claims nothing until its result is written", async () => {
    await db.sql`TRUNCATE tasks, concurrency_keys CASCADE`;
    const spec = taskSpec({ concurrency: { key: "exit-key", max: 1, strategy: "queue" } });
    const first = await createTask(db.sql, spec);
    const second = await createTask(db.sql, spec);
    const { registry, worker, assigned, subject, statements, settled } = await oneSlot();
    subject.start();
    await eventually(() => assigned.length === 1 || null, { what: "the first keyed task assigned" });
    await settled();
    expect(assigned).toEqual([first.id]);
    const mark = timerMark();
    jest.useFakeTimers();
    try {
      // Its process is gone, its result not yet written: the key still counts it live, so a
      // claim would find nothing. None runs.
      registry.release(worker, first.id, first.attempt + 1);
      const before = statements();
      subject.slotFreed();
      await settled();
      expect(statements()).toBe(before);
      // No wake came (a stale result brings none): the fallback claims, and finds nothing.
      jest.advanceTimersByTime(KEYED_EXIT_FALLBACK_MS);
      await settled();
      expect(statements()).toBeGreaterThan(before);
      expect(assigned).toEqual([first.id]);
    } finally {
      jest.useRealTimers();
    }
    // The result written, the completer's wake claims the key's next task.
    await finishAttempt(db.sql, { taskId: first.id, attempt: first.attempt + 1, workerId: "w-1" }, attemptResult());
    subject.wake();
    await eventually(() => assigned.length === 2 || null, { what: "the second keyed task assigned" });
    expect(assigned).toEqual([first.id, second.id]);
    await subject.stop();
    expectNoTimersSince(mark, "Dispatcher.stop()", { besides: ["node_modules/postgres/"] });
  });

  test("a plain task's exit claims at once", async () => {
    await db.sql`TRUNCATE tasks, concurrency_keys CASCADE`;
    const first = await createTask(db.sql, taskSpec());
    const { registry, worker, assigned, subject, statements, settled } = await oneSlot();
    subject.start();
    await eventually(() => assigned.length === 1 || null, { what: "the plain task assigned" });
    await settled();
    const second = await createTask(db.sql, taskSpec());
    const before = statements();
    registry.release(worker, first.id, first.attempt + 1);
    subject.slotFreed();
    await eventually(() => assigned.length === 2 || null, { what: "the next plain task assigned" });
    expect(statements()).toBeGreaterThan(before);
    expect(assigned).toEqual([first.id, second.id]);
    await subject.stop();
  });
});
