// Tasks cannot read the worker's or each other's secrets: a worker started as root runs each
// slot's tasks as the slot's own user, so /proc/<pid>/environ of the worker and of a sibling
// task is out of their reach; the worker takes its token from a file and keeps it out of its
// environment; a worker that cannot switch users says so. Real processes, as root (skipped,
// saying so, otherwise).
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { postJson, watchTask } from "../support/http";
import { type Cluster, spawnRole, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

const isRoot = process.getuid?.() === 0;
if (!isRoot) console.warn("isolation.test.ts: not root, so a worker cannot switch users here; these tests are skipped");

// A range of this file's own, so that workers other test files start cannot share its users.
const FIRST = 29_200;
const TOKEN = "join-token-from-a-file-4f1c9a7e";

const db = useTestDatabase();
let dir: string;
let shared: string;
let tokenFile: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "tq-isolation-"));
  chmodSync(dir, 0o711); // the slot users must reach their homes below it
  shared = join(dir, "shared");
  mkdirSync(shared);
  chmodSync(shared, 0o1777); // where concurrent tasks of different users meet
  tokenFile = join(dir, "worker-token");
  writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.skipIf(!isRoot)("a worker started as root", () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster(db.url, {
      workers: 1,
      slots: 2,
      env: {
        // Coordinator and worker both take the token from the file; a worker without it is refused.
        TQ_WORKER_TOKEN_FILE: tokenFile,
        TQ_TASK_UIDS: `${FIRST}-${FIRST + 9}`,
        TQ_TASK_HOME_DIR: join(dir, "slots"),
      },
    });
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await cluster?.stop();
  }, HOOK_TIMEOUT_MS);

  const submit = async (body: Record<string, unknown>) => {
    const created = await postJson(`${cluster.coordinatorUrl}/tasks`, { max_attempts: 1, ...body });
    expect(created.status).toBe(201);
    return created.json.id as string;
  };

  test("joined with the token from its file, which is in neither its environment nor its log", async () => {
    const worker = cluster.workers[0]!;
    const isolated = await worker.waitForEvent("worker.isolated");
    expect(isolated.uids).toBe(`${FIRST}-${FIRST + 1}`);
    const environ = readFileSync(`/proc/${worker.pid}/environ`, "utf8").split("\0");
    expect(environ).toContain(`TQ_WORKER_TOKEN_FILE=${tokenFile}`);
    expect(environ.filter((entry) => entry.includes(TOKEN))).toEqual([]);
    expect(worker.raw.filter((line) => line.includes(TOKEN))).toEqual([]);
    // The file is the worker's alone, so it does not warn that tasks could read it.
    expect(worker.logged("worker.token_file_readable")).toEqual([]);
    // The coordinator did take a token from its file: a worker without one is refused.
    const tokenless = spawnRole("worker", {
      TQ_COORDINATOR_ADDRESSES: cluster.grpcAddress,
      TQ_TASK_ISOLATION: "off",
      TQ_HEARTBEAT_INTERVAL_MS: "200",
      TQ_HEARTBEAT_TIMEOUT_MS: "1000",
    });
    try {
      const refused = await tokenless.waitForEvent("worker.disconnected");
      expect(String(refused.why)).toContain("a worker token is required");
    } finally {
      await tokenless.stop();
    }
  });

  test("a task cannot read the worker's environment", async () => {
    // The worker's pid is passed in: the task's parent may be a shell, not the worker.
    const worker = cluster.workers[0]!;
    const id = await submit({ command: `id -u; cat /proc/${worker.pid}/environ` });
    const done = await watchTask(cluster.coordinatorUrl, id);
    expect(done.state).toBe("failed");
    expect(done.stderr).toContain(`/proc/${worker.pid}/environ: Permission denied`);
    const uid = Number(String(done.stdout).trim());
    expect(uid).toBeGreaterThanOrEqual(FIRST);
    expect(uid).toBeLessThanOrEqual(FIRST + 1);
    expect(String(done.stdout)).not.toContain("TQ_");
  });

  test("a task cannot read a concurrent task's environment, secret_env included", async () => {
    // A publishes its shell's pid and waits; B, on the other slot, tries A's environ, proves A
    // was alive (its status is world-readable) and lets A go.
    const pidFile = join(shared, "a.pid");
    const done = join(shared, "b.done");
    const holder = await submit({
      command: `id -u; echo $$ > ${pidFile}.tmp && mv ${pidFile}.tmp ${pidFile}; while [ ! -e ${done} ]; do sleep 0.02; done`,
      secret_env: { SIBLING_SECRET: "s3cret-of-task-a" },
    });
    const prober = await submit({
      command: [
        "id -u",
        `while [ ! -s ${pidFile} ]; do sleep 0.02; done`,
        `a=$(cat ${pidFile})`,
        'grep "^Uid:" /proc/$a/status >&2',
        "cat /proc/$a/environ; rc=$?",
        `touch ${done}`,
        "exit $rc",
      ].join("\n"),
    });
    const [a, b] = await Promise.all([watchTask(cluster.coordinatorUrl, holder), watchTask(cluster.coordinatorUrl, prober)]);
    expect(a.state).toBe("succeeded");
    const pidOfA = readFileSync(pidFile, "utf8").trim();
    const uidOfA = String(a.stdout).trim();
    const uidOfB = String(b.stdout).split("\n")[0];
    expect(uidOfA).not.toBe(uidOfB);
    expect(b.state).toBe("failed");
    expect(b.stderr).toContain(`Uid:\t${uidOfA}\t`);
    expect(b.stderr).toContain(`/proc/${pidOfA}/environ: Permission denied`);
    expect(String(b.stdout)).not.toContain("s3cret-of-task-a");
  });

  test("a cwd the slot user cannot reach fails the task as not started, naming the folder", async () => {
    const locked = join(dir, "locked");
    mkdirSync(join(locked, "work"), { recursive: true });
    chmodSync(locked, 0o700);
    const id = await submit({ command: "pwd", cwd: join(locked, "work") });
    const done = await watchTask(cluster.coordinatorUrl, id);
    expect(done.state).toBe("failed");
    expect(String(done.error)).toContain(`cwd ${join(locked, "work")} is not accessible to the task's user`);
    expect(String(done.error)).toContain(`${locked} denies it`);
  });
});

describe.skipIf(!isRoot)("a worker's start", () => {
  test("more slots than TQ_TASK_UIDS holds: it refuses to start, saying so", async () => {
    const worker = spawnRole("worker", {
      TQ_WORKER_SLOTS: "3",
      TQ_TASK_UIDS: `${FIRST + 20}-${FIRST + 21}`,
      TQ_COORDINATOR_ADDRESSES: "127.0.0.1:1",
    });
    expect(await worker.exited).toBe(1);
    await worker.waitForText(
      `worker: TQ_WORKER_SLOTS=3 needs 3 task users but TQ_TASK_UIDS=${FIRST + 20}-${FIRST + 21} has 2: widen the range or run fewer slots`,
    );
  });

  const nonRoot = { uid: FIRST + 50, gid: FIRST + 50 };

  test("a worker that is not root warns that its tasks run as itself", async () => {
    const worker = spawnRole("worker", { HOME: "/tmp", TQ_COORDINATOR_ADDRESSES: "127.0.0.1:1" }, { user: nonRoot });
    try {
      const warning = await worker.waitForEvent("worker.no_isolation");
      expect(warning.level).toBe(40);
      expect(warning.reason).toBe(`it runs as uid ${nonRoot.uid} without CAP_SETUID and CAP_SETGID`);
      expect(String(warning.msg)).toContain("a task can read the worker's environment, its token included");
      expect(worker.logged("worker.isolated")).toEqual([]);
    } finally {
      await worker.stop();
    }
  });

  test("with TQ_TASK_ISOLATION=required, a worker that is not root refuses to start", async () => {
    const worker = spawnRole(
      "worker",
      { HOME: "/tmp", TQ_TASK_ISOLATION: "required", TQ_COORDINATOR_ADDRESSES: "127.0.0.1:1" },
      { user: nonRoot },
    );
    expect(await worker.exited).toBe(1);
    await worker.waitForText(
      `worker: TQ_TASK_ISOLATION=required, but this worker cannot run tasks as other users: it runs as uid ${nonRoot.uid} without CAP_SETUID and CAP_SETGID`,
    );
  });
});
