// Task dependencies against real PostgreSQL: batch DAGs through the HTTP app, the edges'
// resolution as parents end (every policy, retries, cascades), parents that ended before the
// child was inserted, and two parents ending at once on two connections.
import { beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { claimDue } from "../../src/db/claim";
import { sweepDependencies } from "../../src/db/dependencies";
import { connect, type Sql } from "../../src/db/sql";
import { getTask } from "../../src/db/tasks";
import { cancelTask, finishAttempt } from "../../src/db/transitions";
import { assignMessage } from "../../src/rpc/messages";
import type { AttemptResult, Task } from "../../src/task/task";
import { useApiApp } from "../support/api";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { attemptResult } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const api = useApiApp(db);
const call = api.call;

beforeEach(async () => {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers, task_batches, task_dependencies`;
});

const batch = (tasks: unknown[], headers: Record<string, string> = {}) => call("POST", "/tasks/batch", { tasks }, headers);

/** Claims every due task (one slot each, worker w1) and returns them by id. */
async function claimAll(sql: Sql = db.sql): Promise<Map<string, Task>> {
  const claimed = await claimDue(sql, "c1", Array(50).fill("w1"), 30_000);
  return new Map(claimed.map((task) => [task.id, task]));
}

async function finish(id: string, result: Partial<AttemptResult> = {}, sql: Sql = db.sql, attempt = 1) {
  return finishAttempt(sql, { taskId: id, attempt, workerId: "w1" }, attemptResult(result));
}

const failed = { state: "failed", exitCode: 3 } as const;

async function state(id: string) {
  return (await getTask(db.sql, id))?.state;
}

async function eventKinds(id: string): Promise<string[]> {
  const rows = await db.sql<{ kind: string }[]>`SELECT kind FROM task_events WHERE task_id = ${id} ORDER BY id`;
  return rows.map((row) => row.kind);
}

describe("a batch DAG", () => {
  test("is created in one request; a child waits for its parents and says so, and GET shows both ends", async () => {
    const answer = await batch([
      { ref: "build", command: "make" },
      { ref: "lint", command: "make lint" },
      { ref: "test", command: "make test", depends_on: ["build", "lint"] },
    ]);
    expect(answer.status).toBe(201);
    const [build, lint, testTask] = answer.json.tasks;
    expect([build.state, lint.state, testTask.state]).toEqual(["queued", "queued", "waiting"]);
    expect(testTask).toMatchObject({ ref: "test", on_parent_failure: "cancel" });

    const child = await call("GET", `/tasks/${testTask.id}`);
    const parentIds = [build.id, lint.id].sort();
    expect(child.json.parents).toEqual(
      [
        { id: build.id, ref: "build", state: "queued" },
        { id: lint.id, ref: "lint", state: "queued" },
      ].sort((a, b) => a.id.localeCompare(b.id)),
    );
    expect(child.json.waiting).toEqual({ kind: "parents", message: `parents ${parentIds.join(", ")}` });
    const parent = await call("GET", `/tasks/${build.id}`);
    expect(parent.json.children).toEqual([{ id: testTask.id, ref: "test", state: "waiting" }]);
    expect(parent.json.waiting?.kind).not.toBe("parents");

    // One parent done: still waiting, on the other only; then released, with both exit codes.
    await claimAll();
    await finish(build.id);
    expect(await state(testTask.id)).toBe("waiting");
    expect((await call("GET", `/tasks/${testTask.id}`)).json.waiting).toEqual({ kind: "parents", message: `parents ${lint.id}` });
    await finish(lint.id);
    const released = await getTask(db.sql, testTask.id);
    expect(released?.state).toBe("queued");
    expect(released?.parent_env).toEqual({ TQ_PARENT_build_EXIT: "0", TQ_PARENT_lint_EXIT: "0" });
    expect(await eventKinds(testTask.id)).toEqual(["submitted", "parent_ended", "released"]);
    // The claim hands the exit codes to the worker in the assignment's env.
    const claimed = (await claimAll()).get(testTask.id);
    expect(claimed).toBeDefined();
    const assign = assignMessage(claimed!, 0, 30_000);
    expect(assign.payload.case === "assign" && assign.payload.value.env).toMatchObject({ TQ_PARENT_build_EXIT: "0" });
  });

  test("a cycle is a 400 naming it, and nothing is written", async () => {
    const answer = await batch([
      { ref: "build", command: "make", depends_on: ["test"] },
      { ref: "test", command: "make test", depends_on: ["build"] },
    ]);
    expect(answer.status).toBe(400);
    expect(answer.json.error.code).toBe("invalid_argument");
    expect(answer.json.error.message).toMatch(/^cycle: (build -> test -> build|test -> build -> test)$/);
    expect(answer.json.error.field).toMatch(/^tasks\[\d\]\.depends_on$/);
    const self = await batch([{ ref: "a", command: "true", depends_on: ["a"] }]);
    expect(self.json.error.message).toBe("cycle: a -> a");
    expect((await db.sql`SELECT count(*)::int AS n FROM tasks`)[0]?.n).toBe(0);
  });

  test("an unknown ref or task id is a 400 naming it, and nothing is written", async () => {
    const ref = await batch([
      { ref: "build", command: "make" },
      { command: "make test", depends_on: ["biuld"] },
    ]);
    expect(ref.status).toBe(400);
    expect(ref.json.error).toMatchObject({ field: "tasks[1].depends_on" });
    expect(ref.json.error.message).toContain('"biuld"');

    const ghost = Bun.randomUUIDv7();
    const id = await batch([
      { ref: "build", command: "make" },
      { command: "make test", depends_on: ["build", ghost] },
    ]);
    expect(id.status).toBe(400);
    expect(id.json.error).toMatchObject({ code: "invalid_argument", field: "tasks[1].depends_on" });
    expect(id.json.error.message).toContain(ghost);

    const single = await call("POST", "/tasks", { command: "true", depends_on: [ghost] });
    expect(single.status).toBe(400);
    expect(single.json.error).toMatchObject({ field: "depends_on" });
    expect(single.json.error.message).toContain(ghost);
    const notId = await call("POST", "/submit", { command: "true", depends_on: ["build"] });
    expect(notId.status).toBe(400);
    expect(notId.json.error.field).toBe("depends_on");
    expect((await db.sql`SELECT count(*)::int AS n FROM tasks`)[0]?.n).toBe(0);
  });

  test("refs and ids mix; a repeated batch key replays the DAG without new tasks or edges", async () => {
    const earlier = (await call("POST", "/tasks", { command: "make deps" })).json;
    const key = { "idempotency-key": "dag-1" };
    const items = [
      { ref: "build", command: "make", depends_on: [earlier.id] },
      { ref: "test", command: "make test", depends_on: ["build", earlier.id] },
    ];
    const first = await batch(items, key);
    expect(first.status).toBe(201);
    const again = await batch(items, key);
    expect(again.status).toBe(200);
    expect(again.json.tasks.map((t: Task) => t.id)).toEqual(first.json.tasks.map((t: Task) => t.id));
    expect((await db.sql`SELECT count(*)::int AS n FROM task_dependencies`)[0]?.n).toBe(3);
    const child = await call("GET", `/tasks/${first.json.tasks[1].id}`);
    const refs = child.json.parents.map((p: { ref: string }) => p.ref).sort();
    expect(refs).toEqual(["build", earlier.id.replaceAll("-", "_")].sort());
  });
});

describe("a parent that ends other than succeeded", () => {
  async function dag(policy: string) {
    const answer = await batch([
      { ref: "build", command: "make", max_attempts: 1 },
      { ref: "ok", command: "true" },
      { ref: "child", command: "make test", depends_on: ["build", "ok"], on_parent_failure: policy },
      { ref: "grandchild", command: "deploy", depends_on: ["child"] },
    ]);
    expect(answer.status).toBe(201);
    const [build, ok, child, grandchild] = answer.json.tasks;
    await claimAll();
    return { build: build.id, ok: ok.id, child: child.id, grandchild: grandchild.id };
  }

  test("cancel (the default): the child ends cancelled at once, naming the parent, and so do its own children", async () => {
    const ids = await dag("cancel");
    await finish(ids.build, failed);
    const child = await getTask(db.sql, ids.child);
    expect(child?.state).toBe("cancelled");
    expect(child?.error).toBe(`parent ${ids.build} (build) ended failed`);
    const [event] = await db.sql<{ kind: string; detail: Record<string, unknown> }[]>`
      SELECT kind, detail FROM task_events WHERE task_id = ${ids.child} AND kind = 'parent_failed'`;
    expect(event?.detail).toMatchObject({ failed_parent: ids.build, failed_parent_state: "failed", policy: "cancel" });
    const grandchild = await getTask(db.sql, ids.grandchild);
    expect(grandchild?.state).toBe("cancelled");
    expect(grandchild?.error).toBe(`parent ${ids.child} (child) ended cancelled`);
    // The other parent ending later changes nothing more.
    await finish(ids.ok);
    expect(await eventKinds(ids.child)).toEqual(["submitted", "parent_failed"]);
  });

  test("skip: the child ends cancelled as skipped", async () => {
    const ids = await dag("skip");
    await finish(ids.build, { state: "timed_out", exitCode: null, signal: "SIGKILL" });
    const child = await getTask(db.sql, ids.child);
    expect(child?.state).toBe("cancelled");
    expect(child?.error).toBe(`skipped: parent ${ids.build} (build) ended timed_out`);
    expect(await eventKinds(ids.child)).toEqual(["submitted", "skipped"]);
    expect(await state(ids.grandchild)).toBe("cancelled");
  });

  test("run: the child runs anyway once every parent has ended, and sees the failed exit code", async () => {
    const ids = await dag("run");
    await finish(ids.build, failed);
    expect(await state(ids.child)).toBe("waiting");
    await finish(ids.ok);
    const child = await getTask(db.sql, ids.child);
    expect(child?.state).toBe("queued");
    expect(child?.parent_env).toEqual({ TQ_PARENT_build_EXIT: "3", TQ_PARENT_ok_EXIT: "0" });
    expect(await state(ids.grandchild)).toBe("waiting");
  });

  test("a cancelled parent counts as failed; cancelling a waiting child leaves its parent alone", async () => {
    const ids = await dag("cancel");
    await cancelTask(db.sql, ids.ok);
    expect((await getTask(db.sql, ids.child))?.error).toBe(`parent ${ids.ok} (ok) ended cancelled`);
    expect(await state(ids.grandchild)).toBe("cancelled");

    const other = (
      await batch([
        { ref: "a", command: "true" },
        { ref: "b", command: "true", depends_on: ["a"] },
      ])
    ).json;
    await cancelTask(db.sql, other.tasks[1].id);
    expect(await state(other.tasks[1].id)).toBe("cancelled");
    expect(await state(other.tasks[0].id)).toBe("queued");
  });

  test("a failure that will be retried is not a failure yet: only the parent's final state counts", async () => {
    const answer = await batch([
      { ref: "flaky", command: "flaky", max_attempts: 2, retry: { backoff_base_ms: 0, backoff_cap_ms: 0 } },
      { ref: "after", command: "true", depends_on: ["flaky"] },
    ]);
    const [flaky, after] = answer.json.tasks;
    await claimAll();
    const retried = await finish(flaky.id, failed);
    expect(retried.applied?.state).toBe("queued");
    expect(await state(after.id)).toBe("waiting");
    await claimAll();
    await finish(flaky.id, {}, db.sql, 2);
    expect(await state(after.id)).toBe("queued");
  });
});

describe("parents that ended before the child", () => {
  test("a child of parents already succeeded is released by its own submit; of a failed one, ended by it", async () => {
    const [parent] = (await batch([{ command: "true", max_attempts: 1 }])).json.tasks;
    const [other] = (await batch([{ command: "false", max_attempts: 1 }])).json.tasks;
    await claimAll();
    await finish(parent.id);
    await finish(other.id, failed);
    const child = await call("POST", "/tasks", { command: "true", depends_on: [parent.id] });
    expect(child.status).toBe(201);
    expect(child.json.state).toBe("queued");
    const stored = await getTask(db.sql, child.json.id);
    expect(stored?.parent_env).toEqual({ [`TQ_PARENT_${parent.id.replaceAll("-", "_")}_EXIT`]: "0" });
    const doomed = await call("POST", "/submit", { command: "true", depends_on: [other.id] });
    expect(doomed.json.state).toBe("cancelled");
    expect(doomed.json.error).toContain(other.id);
  });
});

describe("concurrency", () => {
  test("two parents ending at once on two connections release their child exactly once", async () => {
    const second = connect(db.url, { max: 2 });
    try {
      for (let round = 0; round < 15; round++) {
        const answer = await batch([
          { ref: "left", command: "true" },
          { ref: "right", command: "true" },
          { ref: "join", command: "true", depends_on: ["left", "right"] },
        ]);
        const [left, right, join] = answer.json.tasks;
        await claimAll();
        await Promise.all([finish(left.id, {}, db.sql), finish(right.id, {}, second)]);
        expect(await state(join.id)).toBe("queued");
        expect((await eventKinds(join.id)).filter((kind) => kind === "released")).toHaveLength(1);
        await claimAll();
        await finish(join.id);
      }
    } finally {
      await second.end();
    }
  });

  test("a child submitted while its parent ends is released all the same", async () => {
    const second = connect(db.url, { max: 2 });
    try {
      for (let round = 0; round < 15; round++) {
        const [parent] = (await batch([{ command: "true" }])).json.tasks;
        await claimAll();
        const [, child] = await Promise.all([
          finish(parent.id, {}, second),
          call("POST", "/tasks", { command: "true", depends_on: [parent.id] }),
        ]);
        expect(await state(child.json.id)).toBe("queued");
        await claimAll();
        await finish(child.json.id);
      }
    } finally {
      await second.end();
    }
  });

  test("the sweep resolves an edge whose parent ended without resolving it (a process died between)", async () => {
    const answer = await batch([
      { ref: "p", command: "true" },
      { ref: "c", command: "true", depends_on: ["p"] },
    ]);
    const [parent, child] = answer.json.tasks;
    // What a finish leaves when its process dies before resolving: the parent ended, the edge not.
    await db.sql`UPDATE tasks SET state = 'succeeded', exit_code = 0 WHERE id = ${parent.id}`;
    expect(await state(child.id)).toBe("waiting");
    const resolved = await sweepDependencies(db.sql);
    expect(resolved.map((row) => row.id)).toEqual([child.id]);
    expect(await state(child.id)).toBe("queued");
    expect(await sweepDependencies(db.sql)).toEqual([]);
  });
});
