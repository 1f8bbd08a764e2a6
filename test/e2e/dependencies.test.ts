// Task dependencies on real processes: a DAG of 20 tasks over two coordinators runs in a valid
// order (from the rows) with sibling branches at once, and the parent-failure policies and
// TQ_PARENT_<ref>_EXIT as the commands themselves see them.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { getJson, postJson, type TaskJson, watchTask } from "../support/http";
import { type Cluster, startCluster } from "../support/processes";
import { readmeCurls, runReadmeCommand } from "../support/readme";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS * 2);

const db = useTestDatabase();
let dir: string;

beforeAll(() => {
  dir = taskDir("tq-deps-");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/**
 * Two tasks that succeed only if they run at the same time: each marks its arrival and waits
 * for the other's (a file signal, no timing). Run one after the other, the first would wait
 * until the test's timeout.
 */
const meet = (self: string, other: string) =>
  `touch '${join(dir, self)}'; while [ ! -e '${join(dir, other)}' ]; do sleep 0.02; done`;

interface Item {
  ref: string;
  command: string;
  depends_on?: string[];
  on_parent_failure?: string;
  max_attempts?: number;
}

/** setup; a1..a6 after setup; b_i after a_i and a_(i+1); c_i after b_i; done after every c: 20 tasks. */
function twentyTaskDag(): Item[] {
  const items: Item[] = [{ ref: "setup", command: "exit 0" }];
  for (let i = 1; i <= 6; i++) {
    const command = i === 1 ? meet("a1", "a2") : i === 2 ? meet("a2", "a1") : "exit 0";
    items.push({ ref: `a${i}`, command, depends_on: ["setup"] });
  }
  for (let i = 1; i <= 6; i++) items.push({ ref: `b${i}`, command: "exit 0", depends_on: [`a${i}`, `a${(i % 6) + 1}`] });
  for (let i = 1; i <= 6; i++) {
    const command = i === 3 ? meet("c3", "c4") : i === 4 ? meet("c4", "c3") : "exit 0";
    items.push({ ref: `c${i}`, command, depends_on: [`b${i}`] });
  }
  items.push({ ref: "done", command: 'echo "c1 exited $TQ_PARENT_c1_EXIT"', depends_on: ["c1", "c2", "c3", "c4", "c5", "c6"] });
  return items;
}

/** Slower to declare a worker dead than the suite's default: 20 tasks on a loaded machine must not be rescued away. */
const PATIENT = { TQ_HEARTBEAT_TIMEOUT_MS: "5000" };

async function startTwoCoordinators(): Promise<Cluster[]> {
  const first = await startCluster(db.url, { workers: 1, slots: 3, env: PATIENT });
  try {
    return [first, await startCluster(db.url, { workers: 1, slots: 3, scheduler: false, env: PATIENT })];
  } catch (error) {
    await first.stop();
    throw error;
  }
}

test("a DAG of 20 tasks over two coordinators runs every child after all its parents, sibling branches at once", async () => {
  const clusters = await startTwoCoordinators();
  try {
    const items = twentyTaskDag();
    expect(items).toHaveLength(20);
    const answer = await postJson(`${clusters[0]!.coordinatorUrl}/tasks/batch`, { tasks: items });
    expect(answer.status).toBe(201);
    const ids = new Map<string, string>(answer.json.tasks.map((task: TaskJson) => [task.ref as string, task.id]));
    const done = await watchTask(clusters[1]!.coordinatorUrl, ids.get("done")!, undefined, 90_000);
    expect(done).toMatchObject({ state: "succeeded", stdout: "c1 exited 0\n" });

    const rows = new Map<string, TaskJson>();
    for (const [ref, id] of ids) rows.set(ref, (await getJson(`${clusters[0]!.coordinatorUrl}/tasks/${id}`)).json);
    for (const item of items) {
      const child = rows.get(item.ref)!;
      expect(child.state, item.ref).toBe("succeeded");
      for (const parent of item.depends_on ?? []) {
        const before = rows.get(parent)!;
        expect(Date.parse(child.started_at as string), `${item.ref} starts after ${parent} ends`).toBeGreaterThanOrEqual(
          Date.parse(before.completed_at as string),
        );
      }
    }
    // The rendezvous pairs could only succeed together; their rows say they overlapped.
    for (const [x, y] of [
      ["a1", "a2"],
      ["c3", "c4"],
    ] as const) {
      const [p, q] = [rows.get(x)!, rows.get(y)!];
      expect(Date.parse(p.started_at as string)).toBeLessThan(Date.parse(q.completed_at as string));
      expect(Date.parse(q.started_at as string)).toBeLessThan(Date.parse(p.completed_at as string));
    }
    // Parents ending on either coordinator, at once or not, released each child exactly once.
    for (const item of items.filter((it) => it.depends_on)) {
      const history = (await getJson(`${clusters[0]!.coordinatorUrl}/tasks/${ids.get(item.ref)}/history`)).json;
      const kinds: string[] = history.events.map((event: { kind: string }) => event.kind);
      expect(
        kinds.filter((kind) => kind === "released"),
        item.ref,
      ).toHaveLength(1);
    }
  } finally {
    await Promise.all(clusters.map((cluster) => cluster.stop()));
  }
});

test("a failed parent: cancel and skip end the child, run runs it with the parent's exit code in TQ_PARENT_<ref>_EXIT", async () => {
  const cluster = await startCluster(db.url, { workers: 1, slots: 2, scheduler: false });
  try {
    const answer = await postJson(`${cluster.coordinatorUrl}/tasks/batch`, {
      tasks: [
        { ref: "build", command: "exit 4", max_attempts: 1 },
        { ref: "cancelled", command: "echo never", depends_on: ["build"] },
        { ref: "skipped", command: "echo never", depends_on: ["build"], on_parent_failure: "skip" },
        { ref: "cleanup", command: 'echo "build exited $TQ_PARENT_build_EXIT"', depends_on: ["build"], on_parent_failure: "run" },
      ],
    });
    expect(answer.status).toBe(201);
    const [build, cancelled, skipped, cleanup] = answer.json.tasks as TaskJson[];
    const ran = await watchTask(cluster.coordinatorUrl, cleanup!.id);
    expect(ran).toMatchObject({ state: "succeeded", stdout: "build exited 4\n" });
    const cancelledRow = (await getJson(`${cluster.coordinatorUrl}/tasks/${cancelled!.id}`)).json;
    expect(cancelledRow).toMatchObject({ state: "cancelled", error: `parent ${build!.id} (build) ended failed`, attempt: 0 });
    const skippedRow = (await getJson(`${cluster.coordinatorUrl}/tasks/${skipped!.id}`)).json;
    expect(skippedRow).toMatchObject({ state: "cancelled", error: `skipped: parent ${build!.id} (build) ended failed` });
    const history = (await getJson(`${cluster.coordinatorUrl}/tasks/${skipped!.id}/history`)).json;
    expect(history.events.map((event: { kind: string }) => event.kind)).toEqual(["submitted", "skipped"]);
  } finally {
    await cluster.stop();
  }
});

test("the README's batch DAG runs as printed", async () => {
  const cluster = await startCluster(db.url, { workers: 1, slots: 2, scheduler: false });
  try {
    const [dag] = readmeCurls("Dependencies");
    expect(dag).toContain("/tasks/batch");
    const port = Number(new URL(cluster.coordinatorUrl).port);
    const answer = JSON.parse(await runReadmeCommand(dag!, { scheduler: port, coordinator: port }));
    const [build, lint, testTask, report] = answer.tasks as TaskJson[];
    expect(testTask!.state).toBe("waiting");
    expect(await watchTask(cluster.coordinatorUrl, report!.id)).toMatchObject({
      state: "succeeded",
      stdout: "lint exited 3\n",
    });
    expect(await watchTask(cluster.coordinatorUrl, testTask!.id)).toMatchObject({
      state: "succeeded",
      stdout: "build exited 0\n",
    });
    expect((await getJson(`${cluster.coordinatorUrl}/tasks/${lint!.id}`)).json.state).toBe("failed");
    const shown = (await getJson(`${cluster.coordinatorUrl}/tasks/${report!.id}`)).json;
    expect(shown.parents.map((p: { ref: string }) => p.ref).sort()).toEqual(["lint", "test"]);
    const parent = (await getJson(`${cluster.coordinatorUrl}/tasks/${build!.id}`)).json;
    expect(parent.children).toEqual([{ id: testTask!.id, ref: "test", state: "succeeded" }]);
  } finally {
    await cluster.stop();
  }
});
