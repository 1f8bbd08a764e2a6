import { describe, expect, setDefaultTimeout, test } from "bun:test";
import type { TaskChangeRow } from "../../src/db/changes";
import { type RunNowPlacement, Submitter } from "../../src/db/submitter";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { newTaskId, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

/** A fast path that always has a slot, recording what the submitter told it. */
function slotHook() {
  const asked: string[] = [];
  const assigned: TaskChangeRow[] = [];
  const released: string[] = [];
  const placeRunNow = (id: string): RunNowPlacement => {
    asked.push(id);
    return {
      assignTo: { workerId: "w-fast", coordinatorId: "c-fast", leaseMs: 30_000 },
      assigned: (task) => assigned.push(task),
      release: () => released.push(id),
    };
  };
  return { placeRunNow, asked, assigned, released };
}

const stateOf = async (id: string) =>
  (
    await db.sql<{ state: string; worker_id: string | null; coordinator_id: string | null }[]>`
    SELECT state, worker_id, coordinator_id FROM tasks WHERE id = ${id}`
  )[0];

describe("Submitter", () => {
  test("without a fast path every task is written queued", async () => {
    const submitter = new Submitter({ sql: db.sql });
    const id = newTaskId();
    const outcome = await submitter.submit(id, taskSpec(), "someone");
    expect(outcome.kind).toBe("created");
    expect(outcome.task.id).toBe(id);
    expect(await stateOf(id)).toEqual({ state: "queued", worker_id: null, coordinator_id: null });
    await submitter.drained();
  });

  test("a run-now task given a slot is born dispatched to it and handed over after commit", async () => {
    const hook = slotHook();
    const submitter = new Submitter({ sql: db.sql, placeRunNow: hook.placeRunNow });
    const id = newTaskId();
    const outcome = await submitter.submit(id, taskSpec(), "someone");
    expect(outcome.kind).toBe("created");
    expect(hook.asked).toEqual([id]);
    expect(hook.assigned.map((task) => [task.id, task.state, task.worker_id, task.attempt])).toEqual([
      [id, "dispatched", "w-fast", 1],
    ]);
    expect(hook.released).toEqual([]);
    expect(await stateOf(id)).toEqual({ state: "dispatched", worker_id: "w-fast", coordinator_id: "c-fast" });
  });

  test("a task with a scheduled time never asks the fast path and is queued", async () => {
    const hook = slotHook();
    const submitter = new Submitter({ sql: db.sql, placeRunNow: hook.placeRunNow });
    const id = newTaskId();
    await submitter.submit(id, taskSpec({ scheduledAt: new Date(Date.now() + 60_000) }), "someone");
    expect(hook.asked).toEqual([]);
    expect((await stateOf(id))?.state).toBe("queued");
  });

  test("no slot (the hook answers null): the task is queued", async () => {
    let asked = 0;
    const submitter = new Submitter({
      sql: db.sql,
      placeRunNow: () => {
        asked++;
        return null;
      },
    });
    const id = newTaskId();
    await submitter.submit(id, taskSpec(), "someone");
    expect(asked).toBe(1);
    expect(await stateOf(id)).toEqual({ state: "queued", worker_id: null, coordinator_id: null });
  });

  test("a repeated idempotency key writes nothing and gives the slot back", async () => {
    const hook = slotHook();
    const submitter = new Submitter({ sql: db.sql, placeRunNow: hook.placeRunNow });
    const spec = taskSpec({ idempotencyKey: `key-${newTaskId()}` });
    const first = await submitter.submit(newTaskId(), spec, "someone");
    const repeatId = newTaskId();
    const repeat = await submitter.submit(repeatId, spec, "someone");
    expect(repeat).toMatchObject({ kind: "existing", sameRequest: true });
    expect(repeat.task.id).toBe(first.task.id);
    expect(hook.assigned.map((task) => task.id)).toEqual([first.task.id]);
    expect(hook.released).toEqual([repeatId]);
    expect(await stateOf(repeatId)).toBeUndefined();
  });

  test("a failed write gives the slot back and rejects with the database's error", async () => {
    const hook = slotHook();
    const submitter = new Submitter({ sql: db.sql, placeRunNow: hook.placeRunNow });
    const id = newTaskId();
    await submitter.submit(id, taskSpec(), "someone");
    // The same id again: the primary key refuses it.
    await expect(submitter.submit(id, taskSpec(), "someone")).rejects.toThrow(/duplicate key/);
    expect(hook.released).toEqual([id]);
    expect(hook.assigned).toHaveLength(1);
  });

  test("drained resolves once concurrent submits are all committed", async () => {
    const submitter = new Submitter({ sql: db.sql });
    const ids = Array.from({ length: 20 }, newTaskId);
    const pending = ids.map((id) => submitter.submit(id, taskSpec(), "someone"));
    await submitter.drained();
    const rows = await db.sql<{ id: string }[]>`SELECT id FROM tasks WHERE id = ANY(${ids}::uuid[])`;
    expect(rows.map((row) => row.id).sort()).toEqual([...ids].sort());
    expect((await Promise.all(pending)).every((outcome) => outcome.kind === "created")).toBe(true);
  });
});
