// Version skew for real: a worker built from the previous release (commit 3e51992, before
// protocol versions) against a coordinator of this build. The coordinator treats it as
// protocol 0 with no features, so it never hands it a task early (an older worker may ignore
// start_in_ms), and its tasks run to success.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { postJson, watchTask } from "../support/http";
import { type Cluster, RoleProcess, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

/** The previous release: the last commit before protocol versions and features. */
const PREVIOUS_RELEASE = "3e51992";
const ROOT = new URL("../..", import.meta.url).pathname;
const AHEAD_MS = 1000;

// A shallow clone (CI checkouts often are) does not have the release: say so and skip.
const hasRelease = Bun.spawnSync(["git", "-C", ROOT, "cat-file", "-e", `${PREVIOUS_RELEASE}^{commit}`]).exitCode === 0;
if (!hasRelease) {
  console.warn(`old-worker.test.ts skipped: commit ${PREVIOUS_RELEASE} is not in this checkout's history (shallow clone?)`);
}

const db = useTestDatabase();
let dir = "";
let cluster: Cluster | null = null;
let oldWorker: RoleProcess | null = null;

function run(cmd: string[], cwd: string): void {
  const result = Bun.spawnSync(cmd, { cwd, stdout: "pipe", stderr: "pipe" });
  if (result.exitCode !== 0) throw new Error(`${cmd.join(" ")} failed: ${result.stderr.toString()}`);
}

beforeAll(async () => {
  if (!hasRelease) return;
  // Once per run: a detached worktree of the release and its dependencies (from bun's cache).
  dir = join(mkdtempSync(join(tmpdir(), "tq-release-")), "tree");
  run(["git", "-C", ROOT, "worktree", "add", "--detach", dir, PREVIOUS_RELEASE], ROOT);
  run(["bun", "install", "--frozen-lockfile"], dir);
  cluster = await startCluster(db.url, { workers: 0, scheduler: false, env: { TQ_DISPATCH_AHEAD_MS: String(AHEAD_MS) } });
  const proc = Bun.spawn(["bun", "src/worker/main.ts"], {
    cwd: dir,
    env: {
      PATH: process.env.PATH ?? "/usr/bin:/bin",
      HOME: process.env.HOME ?? "/tmp",
      TQ_LOG_LEVEL: "info",
      TQ_COORDINATOR_ADDRESSES: cluster.grpcAddress,
      TQ_WORKER_SLOTS: "2",
      TQ_WORKER_NAME: "previous-release",
      TQ_HEARTBEAT_INTERVAL_MS: "200",
      TQ_HEARTBEAT_TIMEOUT_MS: "1000",
    },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  oldWorker = new RoleProcess("worker@release", proc);
}, HOOK_TIMEOUT_MS * 4);

afterAll(async () => {
  await oldWorker?.stop(5000);
  await cluster?.stop();
  if (dir) {
    Bun.spawnSync(["git", "-C", ROOT, "worktree", "remove", "--force", dir]);
    rmSync(join(dir, ".."), { recursive: true, force: true });
  }
}, HOOK_TIMEOUT_MS);

describe.skipIf(!hasRelease)(`a worker from release ${PREVIOUS_RELEASE}`, () => {
  test("joins as protocol 0 with no features", async () => {
    const joined = await cluster!.coordinator.waitForEvent("coordinator.worker_joined", {
      where: (line) => line.name === "previous-release",
    });
    expect(joined.protocol).toBe(0);
    expect(joined.features).toEqual([]);
    // Its own log: connected (the release logged no event names yet).
    await oldWorker!.waitFor((line) => line.msg === "connected", "connected");
  });

  test("runs a run-now task and a scheduled one to success, the scheduled one handed over only once due", async () => {
    const now = await postJson(`${cluster!.coordinatorUrl}/tasks`, { command: "echo now" });
    const scheduledAt = new Date(Date.now() + 1500).toISOString();
    const later = await postJson(`${cluster!.coordinatorUrl}/tasks`, { command: "echo later", scheduled_at: scheduledAt });
    expect(now.status).toBe(201);
    expect(later.status).toBe(201);
    const [first, second] = await Promise.all([
      watchTask(cluster!.coordinatorUrl, now.json.id),
      watchTask(cluster!.coordinatorUrl, later.json.id),
    ]);
    expect(first).toMatchObject({ state: "succeeded", stdout: "now\n" });
    expect(second).toMatchObject({ state: "succeeded", stdout: "later\n" });
    // With TQ_DISPATCH_AHEAD_MS=1000 a current worker would get it about a second early.
    const [row] = await db.sql<{ early_ms: number; worker: string }[]>`
      SELECT (extract(epoch FROM t.run_at - a.dispatched_at) * 1000)::float8 AS early_ms, w.name AS worker
      FROM tasks t JOIN task_attempts a ON a.task_id = t.id AND a.attempt = t.attempt JOIN workers w ON w.id = a.worker_id
      WHERE t.id = ${later.json.id}`;
    expect(row!.worker).toBe("previous-release");
    expect(row!.early_ms).toBeLessThanOrEqual(0);
  });
});
