// Task limits through the real roles: a coordinator and worker processes, tasks submitted over
// HTTP, what applied read back from GET /tasks/:id/attempts. The cgroup cases need root and a
// cgroup hierarchy the worker may write (cgroup v1 memory, pids and freezer here); without
// them they skip, saying so, and the usage case runs on whatever the worker falls back to.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { detectCgroups } from "../../src/worker/cgroup";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { getJson, postJson, watchTask } from "../support/http";
import { isRunning } from "../support/is-running";
import { type Cluster, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

/** Why the cgroup cases cannot run here, or null when they can. */
function cgroupsUnavailable(): string | null {
  if (process.getuid?.() !== 0) return "not root";
  const probe = detectCgroups({ dirName: `taskqueue-${process.pid}-probe` });
  if (!probe.ok) return probe.why;
  probe.cgroups.close();
  return null;
}
const unavailable = cgroupsUnavailable();
if (unavailable !== null) console.warn(`test/e2e/limits.test.ts: skipping the cgroup cases: ${unavailable}`);

let cluster: Cluster;
let dir: string;

beforeAll(async () => {
  // Tasks may run as their slots' own users, who need to write here.
  dir = taskDir("tq-limits-");
  // One worker, its maxima set so that clamping shows: 64 MiB at most, 32 processes.
  cluster = await startCluster(db.url, {
    workers: 1,
    slots: 2,
    scheduler: false,
    env: { TQ_WORKER_MAX_MEMORY_MB: "64", TQ_WORKER_MAX_PIDS: "32", TQ_KILL_GRACE_MS: "300" },
  });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await cluster?.stop();
  rmSync(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

async function submit(body: Record<string, unknown>) {
  const { status, json } = await postJson(`${cluster.coordinatorUrl}/tasks`, body);
  expect(status).toBe(201);
  return json as { id: string; limits: unknown };
}

async function lastAttempt(id: string) {
  const { status, json } = await getJson(`${cluster.coordinatorUrl}/tasks/${id}/attempts`);
  expect(status).toBe(200);
  return json.attempts.at(-1);
}

test("a normal task's attempt records its CPU time, peak memory and how it was limited", async () => {
  // A busy loop in the shell: user CPU time well above a tick.
  const task = await submit({ command: "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo $i" });
  expect(task.limits).toBeNull();
  const done = await watchTask(cluster.coordinatorUrl, task.id);
  expect(done).toMatchObject({ state: "succeeded", stdout: "200000\n" });
  const attempt = await lastAttempt(task.id);
  expect(attempt.cpu_user_us).toBeGreaterThan(0);
  expect(attempt.cpu_system_us).toBeGreaterThanOrEqual(0);
  expect(attempt.peak_memory_bytes).toBeGreaterThan(0);
  expect(attempt.oom_killed).toBe(false);
  // A task that asks nothing gets the worker's maxima.
  if (unavailable === null) {
    expect(attempt.limits_applied).toMatch(/^cgroup-v[12]$/);
    expect(attempt.limits).toMatchObject({ memory_mb: 64, pids: 32 });
  } else {
    expect(attempt.limits_applied).toBe("rlimit");
    expect(attempt.limits).toMatchObject({ memory_mb: 64, pids: null, cpu: null });
  }
});

describe.skipIf(unavailable !== null)("with cgroups", () => {
  test("a memory hog over memory_mb is OOM-killed: its attempt fails naming oom", async () => {
    // tail holds every byte of a file with no newline: 200 MiB against a 32 MiB limit.
    const task = await submit({ command: "head -c 200M /dev/zero | tail", limits: { memory_mb: 32 }, max_attempts: 1 });
    expect(task.limits).toEqual({ memory_mb: 32 });
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done.state).toBe("failed");
    expect(String(done.error)).toContain("out of memory (memory_mb 32)");
    const attempt = await lastAttempt(task.id);
    expect(attempt).toMatchObject({ outcome: "failed", oom_killed: true, error: "killed: out of memory (memory_mb 32)" });
    expect(attempt.limits.memory_mb).toBe(32);
    expect(attempt.peak_memory_bytes).toBeLessThanOrEqual(32 * 1024 * 1024);
  });

  test("a request above the worker's maximum is clamped to it, and the attempt says so", async () => {
    const task = await submit({ command: "true", limits: { memory_mb: 4096, pids: 1000, nofile: 256 } });
    expect(task.limits).toEqual({ memory_mb: 4096, pids: 1000, nofile: 256 });
    await watchTask(cluster.coordinatorUrl, task.id);
    const attempt = await lastAttempt(task.id);
    expect(attempt.limits).toEqual({ memory_mb: 64, pids: 32, nofile: 256, cpu: null });
  });

  test("a bounded fork bomb is capped at pids: its forks beyond the limit fail", async () => {
    // Tries to start 100 sleeps, counting each started one on stdout (echo is a builtin).
    const task = await submit({
      command: "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); echo $i; done",
      limits: { pids: 16 },
      max_attempts: 1,
    });
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    const started = Number(String(done.stdout).trim().split("\n").at(-1));
    // The shell itself is one of the 16.
    expect(started).toBeLessThanOrEqual(15);
    expect(String(done.stderr)).toMatch(/fork/i);
    expect(done.state).toBe("failed");
    const attempt = await lastAttempt(task.id);
    expect(attempt.limits.pids).toBe(16);
  });

  test("a setsid escapee dies with its task when the task times out", async () => {
    const task = await submit({ command: "setsid sleep 300 & echo $!; sleep 60", timeout_ms: 500, max_attempts: 1 });
    const done = await watchTask(cluster.coordinatorUrl, task.id);
    expect(done.state).toBe("timed_out");
    const pid = Number(String(done.stdout).trim());
    expect(pid).toBeGreaterThan(1);
    // The worker reports only once the cgroup is empty.
    expect(isRunning(pid)).toBe(false);
  });

  test("a setsid escapee dies with its task when the task is cancelled", async () => {
    const pidFile = join(dir, "escapee.pid");
    const task = await submit({
      command: `setsid sleep 300 & echo $! > '${pidFile}.tmp'; mv '${pidFile}.tmp' '${pidFile}'; sleep 60`,
    });
    await watchTask(cluster.coordinatorUrl, task.id, (t) => t.state === "running");
    const pid = await eventually(() => (existsSync(pidFile) ? Number(readFileSync(pidFile, "utf8").trim()) : null), {
      what: "the escapee's pid file",
    });
    expect(isRunning(pid)).toBe(true);
    const { status } = await postJson(`${cluster.coordinatorUrl}/tasks/${task.id}/cancel`, {});
    expect(status).toBe(200);
    // The stopped attempt is recorded from the worker's report, sent once the cgroup is empty.
    const attempt = await eventually(
      async () => {
        const a = await lastAttempt(task.id);
        return a.outcome === "stopped" && a.limits_applied !== null ? a : null;
      },
      { what: "the cancelled attempt's report" },
    );
    expect(attempt.limits_applied).toMatch(/^cgroup-v[12]$/);
    expect(isRunning(pid)).toBe(false);
  });
});

test("limits outside their bounds are refused at submit, naming the field", async () => {
  for (const [limits, field] of [
    [{ memory_mb: 0 }, "limits.memory_mb"],
    [{ pids: -1 }, "limits.pids"],
    [{ cpu: 0 }, "limits.cpu"],
    [{ swap: 1 }, "limits"],
  ] as const) {
    const { status, json } = await postJson(`${cluster.coordinatorUrl}/tasks`, { command: "true", limits });
    expect(status).toBe(400);
    expect(String(json.error.field)).toContain(field);
  }
});
