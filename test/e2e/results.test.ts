// Results that used to stop a coordinator, with real processes: output PostgreSQL text cannot
// hold, and a result larger than the coordinator's gRPC limit. Each runs beside a healthy task
// that must still finish, on the same worker.
import { expect, setDefaultTimeout, test } from "bun:test";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { getJson, postJson, watchTask } from "../support/http";
import { startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

test("NUL bytes and invalid UTF-8 in output are replaced and flagged; the task beside them finishes", async () => {
  const cluster = await startCluster(db.url, { workers: 1, slots: 4, scheduler: false });
  try {
    const submit = async (command: string) => (await postJson(`${cluster.coordinatorUrl}/tasks`, { command })).json.id as string;
    // A NUL used to fail the completer's whole batch, retried every 500 ms for ever: this
    // task, the healthy one and every later one stayed running.
    const [nul, binary, healthy] = await Promise.all([
      submit("printf 'a\\0b'; printf 'c\\0' >&2"),
      submit("printf 'x\\377\\376y' >&2; printf 'fine'"),
      submit("echo ok"),
    ]);
    const done = await Promise.all([nul, binary, healthy].map((id) => watchTask(cluster.coordinatorUrl, id)));
    expect(done.map((task) => task.state)).toEqual(["succeeded", "succeeded", "succeeded"]);
    const [nulTask, binaryTask, healthyTask] = await Promise.all(
      [nul, binary, healthy].map(async (id) => (await getJson(`${cluster.coordinatorUrl}/tasks/${id}`)).json),
    );
    expect(nulTask).toMatchObject({ stdout: "a\uFFFDb", stderr: "c\uFFFD", stdout_replaced: true, stderr_replaced: true });
    expect(binaryTask).toMatchObject({ stdout: "fine", stderr: "x\uFFFD\uFFFDy", stdout_replaced: false, stderr_replaced: true });
    expect(healthyTask).toMatchObject({ stdout: "ok\n", stdout_replaced: false, stderr_replaced: false });
    const attempts = (await getJson(`${cluster.coordinatorUrl}/tasks/${nul}/attempts`)).json.attempts;
    expect(attempts[0]).toMatchObject({ stdout: "a\uFFFDb", stdout_replaced: true, stderr_replaced: true });
    expect(cluster.coordinator.logged("completer.record_failed")).toEqual([]);
  } finally {
    await cluster.stop();
  }
});

test("a result larger than the coordinator accepts is cut to fit; the worker stays connected", async () => {
  // The coordinator keeps gRPC's default 4 MiB; this worker may keep 3 MiB of each stream (its
  // own limit allows 16 MiB), so an uncut result would be over 6 MiB. Before, the coordinator
  // refused it, the worker reconnected, re-sent it and was refused again, in a loop, requeueing
  // its other tasks each time.
  const cluster = await startCluster(db.url, { workers: 0, slots: 2, scheduler: false });
  try {
    const worker = await cluster.addWorker({
      TQ_MAX_OUTPUT_BYTES: String(3 * 1024 * 1024),
      TQ_GRPC_MAX_MESSAGE_BYTES: String(16 * 1024 * 1024),
    });
    const submit = async (command: string) => (await postJson(`${cluster.coordinatorUrl}/tasks`, { command })).json.id as string;
    const [big, healthy] = await Promise.all([
      submit("head -c 3145728 /dev/zero | tr '\\0' a; printf END; head -c 3145728 /dev/zero | tr '\\0' b >&2"),
      submit("echo ok"),
    ]);
    const [bigDone, healthyDone] = await Promise.all([big, healthy].map((id) => watchTask(cluster.coordinatorUrl, id)));
    expect(healthyDone).toMatchObject({ state: "succeeded", attempt: 1 });
    expect(bigDone).toMatchObject({ state: "succeeded", attempt: 1 });
    const task = (await getJson(`${cluster.coordinatorUrl}/tasks/${big}`)).json;
    expect(task.stdout_truncated).toBe(true);
    expect(task.stdout.endsWith("aaaEND")).toBe(true);
    const kept = Buffer.byteLength(task.stdout) + Buffer.byteLength(task.stderr);
    expect(kept).toBeLessThanOrEqual(4 * 1024 * 1024);
    // Most of what fits is kept: only the excess was cut.
    expect(kept).toBeGreaterThan(3.5 * 1024 * 1024);
    expect(worker.logged("worker.disconnected")).toEqual([]);
    expect(worker.logged("worker.connected")).toHaveLength(1);
  } finally {
    await cluster.stop();
  }
});
