// A superseded hand-back leaves a `stale` row in the task's history, as a superseded result
// does (issue 12 item 5): the completer answers the worker and the history says it came. And
// the lease statements with per-task leases (issue 12 item 1).
import { expect, setDefaultTimeout, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import pino from "pino";
import { Completer } from "../../src/coordinator/completer";
import { WorkerRegistry } from "../../src/coordinator/registry";
import { Rescuer } from "../../src/coordinator/rescuer";
import { listTaskEvents } from "../../src/db/events";
import { getTask } from "../../src/db/tasks";
import { renewLeases, requeueExpiredLeases, requeueWorkerTasks } from "../../src/db/transitions";
import { type CoordinatorMessage, Outcome, TaskFinishedSchema } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { createTask, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

test("a superseded hand-back writes a stale row and changes nothing", async () => {
  const registry = new WorkerRegistry();
  const sent: CoordinatorMessage[] = [];
  const worker = registry.open(
    { id: "w1", name: "w1", slots: 1, held: [], features: new Set() },
    { write: (m) => sent.push(m), close() {} },
  );
  registry.add(worker);
  const completer = new Completer({
    sql: db.sql,
    registry,
    log: pino({ level: "silent" }),
    coordinatorId: "c1",
    onSlotFreed: () => {},
    retryMs: 50,
  });
  const task = await createTask(db.sql, undefined, { assignTo: { workerId: "w1", coordinatorId: "c1", leaseMs: 60_000 } });
  registry.reserve(worker, task.id, task.attempt);
  // The attempt is rescued (requeued) before the worker's hand-back arrives.
  expect(await requeueWorkerTasks(db.sql, "w1", "worker lost (test)", "lost")).toHaveLength(1);
  const now = timestampFromDate(new Date());
  completer.finished(
    worker,
    create(TaskFinishedSchema, {
      ref: { taskId: task.id, attempt: task.attempt },
      outcome: Outcome.ABANDONED,
      error: "the lease ran out on the worker",
      startedAt: now,
      finishedAt: now,
    }),
  );
  await eventually(() => sent.some((m) => m.payload.case === "ack" && m.payload.value.stale), { what: "the stale ack" });
  await completer.stop();
  const events = await listTaskEvents(db.sql, task.id);
  const stale = events.filter((e) => e.kind === "stale");
  expect(stale).toHaveLength(1);
  expect(stale[0]!.attempt).toBe(task.attempt);
  expect(stale[0]!.detail).toMatchObject({ reported: "handed_back", cause: "lost", current_attempt: task.attempt });
  expect((await getTask(db.sql, task.id))?.state).toBe("queued");
});

test("each task's own lease_ms is granted and renewed; a lapse is believed only by a coordinator renewing for that long", async () => {
  const assignTo = { workerId: "gone-worker", coordinatorId: "c1", leaseMs: 30_000 };
  const own = await createTask(db.sql, taskSpec({ leaseMs: 60_000 }), { assignTo });
  const byDefault = await createTask(db.sql, taskSpec(), { assignTo });
  expect(own.lease_ms).toBe(60_000);
  expect(byDefault.lease_ms).toBeNull();
  const leaseLeft = async (id: string) => {
    const [row] = await db.sql<{ ms: number }[]>`
      SELECT extract(epoch FROM lease_expires_at - clock_timestamp()) * 1000 AS ms FROM tasks WHERE id = ${id}`;
    return Number(row!.ms);
  };
  // Born dispatched: the task's own lease, or the default.
  expect(await leaseLeft(own.id)).toBeGreaterThan(30_000);
  expect(await leaseLeft(byDefault.id)).toBeLessThanOrEqual(30_000);
  const renewed = await renewLeases(
    db.sql,
    [own, byDefault].map((t) => ({ taskId: t.id, attempt: t.attempt, workerId: "gone-worker" })),
    20_000,
  );
  expect(renewed).toEqual(
    new Map([
      [`${own.id}:1`, 60_000],
      [`${byDefault.id}:1`, 20_000],
    ]),
  );
  // Both lapse (an unknown worker: nobody vouches for it).
  await db.sql`UPDATE tasks SET lease_expires_at = clock_timestamp() - interval '1 second' WHERE id IN (${own.id}, ${byDefault.id})`;
  // A coordinator renewing for 25 s believes the default (20 s) lapse, not the 60 s one.
  const first = await requeueExpiredLeases(db.sql, 20_000, 25_000);
  expect(first.map((t) => t.id)).toEqual([byDefault.id]);
  expect((await getTask(db.sql, own.id))?.state).toBe("dispatched");
  const later = await requeueExpiredLeases(db.sql, 20_000, 60_000);
  expect(later.map((t) => t.id)).toEqual([own.id]);
});

test("the rescuer checks again when the soonest lease runs out, not only at its next pass", async () => {
  // Passes a minute apart: only the check armed for the lease's end can requeue within the test.
  const leaseMs = 400;
  let requeued: () => void = () => {};
  const woken = new Promise<void>((resolve) => (requeued = resolve));
  const rescuer = new Rescuer({
    sql: db.sql,
    registry: new WorkerRegistry(),
    coordinatorId: "c1",
    log: pino({ level: "silent" }),
    heartbeatIntervalMs: 60_000,
    heartbeatTimeoutMs: 180_000,
    leaseMs,
    onSilent: () => {},
    requeued: () => requeued(),
  });
  // Assigned after the rescuer began renewing: by the lease's end it has renewed for a whole
  // lease, so it believes the lapse (nobody renews this worker's attempt).
  const task = await createTask(db.sql, taskSpec(), {
    assignTo: { workerId: "cut-off-worker", coordinatorId: "c1", leaseMs },
  });
  await rescuer.renewAndRescue();
  expect((await getTask(db.sql, task.id))?.state).toBe("dispatched");
  await woken;
  expect((await getTask(db.sql, task.id))?.state).toBe("queued");
  const events = await listTaskEvents(db.sql, task.id);
  expect(events.at(-1)?.kind).toBe("requeued");
  await rescuer.stop();
});
