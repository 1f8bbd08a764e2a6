// The completer under a database outage: its backlog of results is bounded. At the bound it
// holds back all new work (no worker has a free slot), nothing is acknowledged before it is
// written, and once the database is back every result is written and acknowledged and work
// resumes.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import pino from "pino";
import { Completer } from "../../src/coordinator/completer";
import { WorkerRegistry } from "../../src/coordinator/registry";
import { listAttempts } from "../../src/db/attempts";
import { claimDue } from "../../src/db/claim";
import { listTaskEvents } from "../../src/db/events";
import { connect, type Sql } from "../../src/db/sql";
import { getTask } from "../../src/db/tasks";
import {
  type CoordinatorMessage,
  Outcome,
  TaskFinishedSchema,
  TaskStartedSchema,
} from "../../src/gen/taskqueue/v1/worker_service_pb";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { createTask, taskSpec } from "../support/factories";
import { TcpProxy } from "../support/tcp-proxy";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let proxy: TcpProxy;
let sql: Sql;

beforeAll(async () => {
  const target = new URL(db.url);
  proxy = await TcpProxy.start(target.hostname, Number(target.port || 5432));
  sql = connect(proxy.url(db.url), { max: 2, connectTimeout: 1 });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  proxy?.restore();
  await sql?.end({ timeout: 1 });
  await proxy?.stop();
}, HOOK_TIMEOUT_MS);

/** A registry with one connected worker of `slots` slots, and the messages sent to it. */
function connectedWorker(id: string, slots: number) {
  const registry = new WorkerRegistry();
  const acks: CoordinatorMessage[] = [];
  const worker = registry.open(
    { id, name: id, slots, held: [], features: new Set() },
    { write: (m) => acks.push(m), close() {} },
  );
  registry.add(worker);
  return { registry, worker, acks };
}

/** The worker's TaskFinished of an attempt that exited 0. */
function exitedZero(task: { id: string; attempt: number }) {
  const now = timestampFromDate(new Date());
  return create(TaskFinishedSchema, {
    ref: { taskId: task.id, attempt: task.attempt },
    outcome: Outcome.EXITED,
    exitCode: 0,
    startedAt: now,
    finishedAt: now,
  });
}

test("a database outage fills the backlog to its bound: work is held back, then resumes once results are written", async () => {
  const { registry, worker, acks } = connectedWorker("w1", 4);
  let freed = 0;
  const lines: { event?: string }[] = [];
  const log = pino({ level: "info" }, { write: (line: string) => lines.push(JSON.parse(line)) });
  const logged = (event: string) => lines.filter((line) => line.event === event).length;
  const completer = new Completer({
    sql,
    registry,
    log,
    coordinatorId: "c1",
    onSlotFreed: () => freed++,
    retryMs: 50,
    maxPending: 2,
  });
  const tasks = await Promise.all(
    [1, 2, 3].map(() => createTask(db.sql, undefined, { assignTo: { workerId: "w1", coordinatorId: "c1", leaseMs: 60_000 } })),
  );
  for (const task of tasks) registry.reserve(worker, task.id, task.attempt);
  expect(registry.totalFree()).toBe(1);

  // An established connection that the cut resets: the write fails (a new one would only
  // hang until the restore, which holds the backlog just the same).
  await sql`SELECT 1`;
  proxy.cut();
  for (const task of tasks) completer.finished(worker, exitedZero(task));
  // Three results for a bound of two: every slot is free by the worker's count, yet none is
  // offered while they wait for the database.
  expect(completer.backlog).toBe(3);
  expect(registry.workHeldBack).not.toBeNull();
  expect(registry.totalFree()).toBe(0);
  expect(registry.reserveFreeSlot("another", 1)).toBeNull();
  // Kept for a retry while the database is away, never acknowledged, never grown.
  await eventually(() => logged("completer.record_failed") >= 1, { what: "the failed write retried", timeoutMs: 10_000 });
  expect(completer.backlog).toBe(3);
  expect(acks).toHaveLength(0);
  expect(freed).toBe(3);
  expect(logged("completer.backlog_full")).toBe(1);

  proxy.restore();
  await eventually(() => acks.length === 3, { what: "every result acknowledged", timeoutMs: 20_000 });
  expect(completer.backlog).toBe(0);
  expect(registry.workHeldBack).toBeNull();
  expect(registry.totalFree()).toBe(4);
  expect(logged("completer.backlog_cleared")).toBe(1);
  expect(freed).toBe(4);
  expect(logged("attempt.finished")).toBe(3);
  for (const task of tasks) expect((await getTask(db.sql, task.id))?.state).toBe("succeeded");
  await completer.stop();
});

test("a keyed task's result wakes the dispatcher again once durable: only then is its key's slot free", async () => {
  const { registry, worker, acks } = connectedWorker("wk", 2);
  const wakes: string[] = [];
  const completer = new Completer({
    sql: db.sql,
    registry,
    log: pino({ level: "silent" }),
    coordinatorId: "c1",
    onSlotFreed: () => wakes.push("wake"),
  });
  const spec = taskSpec({ concurrency: { key: "completer-key", max: 1, strategy: "queue" } });
  const first = await createTask(db.sql, spec);
  const second = await createTask(db.sql, spec);
  const plain = await createTask(db.sql, taskSpec(), { assignTo: { workerId: "wk", coordinatorId: "c1", leaseMs: 60_000 } });
  const [claimed] = await claimDue(db.sql, "c1", ["wk"], 60_000);
  expect(claimed?.id).toBe(first.id);
  for (const task of [claimed!, plain]) registry.reserve(worker, task.id, task.attempt);
  const finish = (task: { id: string; attempt: number }) => completer.finished(worker, exitedZero(task));

  // A plain task: one wake, when its process is gone.
  finish(plain);
  await eventually(() => acks.length === 1, { what: "the plain result acknowledged" });
  expect(wakes).toHaveLength(1);
  // A keyed one: that wake, and one more once the result is written.
  finish(claimed!);
  expect(wakes).toHaveLength(2);
  await eventually(() => acks.length === 2, { what: "the keyed result acknowledged" });
  expect(wakes).toHaveLength(3);
  // What that wake's pass finds: the key's next task.
  const next = await claimDue(db.sql, "c1", ["wk"], 60_000);
  expect(next.map((t) => t.id)).toEqual([second.id]);
  await completer.stop();
});

test("a start still waiting when its finish comes is written with it: one statement, both events, in order", async () => {
  const { registry, worker, acks } = connectedWorker("wm", 2);
  // Counts the statements that record a start on its own.
  let startStatements = 0;
  const counted = new Proxy(db.sql, {
    apply(target, self, args: unknown[]) {
      const strings = args[0] as readonly string[] | undefined;
      if (Array.isArray(strings) && strings.join("?").includes("UPDATE tasks SET state = 'running'")) startStatements++;
      return Reflect.apply(target, self, args);
    },
  });
  const completer = new Completer({
    sql: counted,
    registry,
    log: pino({ level: "silent" }),
    coordinatorId: "c1",
    onSlotFreed() {},
  });
  const assignTo = { workerId: "wm", coordinatorId: "c1", leaseMs: 60_000 };
  const [busy, short] = await Promise.all([
    createTask(db.sql, undefined, { assignTo }),
    createTask(db.sql, undefined, { assignTo }),
  ]);
  for (const task of [busy!, short!]) registry.reserve(worker, task.id, task.attempt);
  const started = (task: { id: string; attempt: number }, pid: number) =>
    completer.started(
      worker,
      create(TaskStartedSchema, {
        ref: { taskId: task.id, attempt: task.attempt },
        startedAt: timestampFromDate(new Date()),
        pid,
      }),
    );
  // The short task's finish comes within its start's window: they go together. The other
  // start has no finish: it is written on its own once its window is over.
  started(busy!, 100);
  started(short!, 200);
  completer.finished(worker, exitedZero(short!));
  await eventually(() => acks.length === 1, { what: "the short task's result acknowledged" });
  await eventually(async () => (await getTask(db.sql, busy!.id))?.state === "running", { what: "the other start recorded" });
  expect(startStatements).toBe(1);
  const events = await listTaskEvents(db.sql, short!.id);
  expect(events.map((e) => [e.kind, e.state])).toEqual([
    ["submitted+dispatched", "dispatched"],
    ["started", "running"],
    ["succeeded", "succeeded"],
  ]);
  expect(events[1]?.detail).toEqual({ pid: 200 });
  const [attempt] = await listAttempts(db.sql, short!.id);
  expect(attempt?.pid).toBe(200);
  expect(attempt?.outcome).toBe("succeeded");
  expect(attempt?.started_at).not.toBeNull();
  const task = await getTask(db.sql, short!.id);
  expect(task?.state).toBe("succeeded");
  expect(task?.started_at).not.toBeNull();
  expect((await listAttempts(db.sql, busy!.id))[0]?.pid).toBe(100);
  await completer.stop();
});

test("a start with no finish after it is written once its window is over", async () => {
  const { registry, worker } = connectedWorker("ww", 1);
  const completer = new Completer({
    sql: db.sql,
    registry,
    log: pino({ level: "silent" }),
    coordinatorId: "c1",
    onSlotFreed() {},
  });
  const task = await createTask(db.sql, undefined, { assignTo: { workerId: "ww", coordinatorId: "c1", leaseMs: 60_000 } });
  registry.reserve(worker, task.id, task.attempt);
  completer.started(
    worker,
    create(TaskStartedSchema, {
      ref: { taskId: task.id, attempt: task.attempt },
      startedAt: timestampFromDate(new Date()),
      pid: 7,
    }),
  );
  await eventually(async () => (await getTask(db.sql, task.id))?.state === "running", { what: "the start recorded" });
  expect((await listAttempts(db.sql, task.id))[0]?.pid).toBe(7);
  expect(completer.backlog).toBe(0);
  await completer.stop();
});
