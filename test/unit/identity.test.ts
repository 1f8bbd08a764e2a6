// Tasks as their slot's own user (src/worker/identity.ts): who may switch users, which folders a
// slot user can reach, the homes a worker prepares, and the executor and the attempts running
// commands as those users. Running as another user needs root: those tests skip otherwise.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { loadConfig, taskIsolation } from "../../src/config";
import { AssignSchema, type TaskRef } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { Attempts } from "../../src/worker/attempts";
import { execute, type RunResult, taskEnv } from "../../src/worker/executor";
import {
  cannotSwitchUsers,
  type IsolationSettings,
  prepareIdentities,
  readableBy,
  searchDenied,
  searchDeniedRecently,
  type TaskIdentity,
} from "../../src/worker/identity";

const isRoot = process.getuid?.() === 0;
if (!isRoot) console.warn("identity.test.ts: not root, so the tests that run commands as other users are skipped");
const asRoot = test.skipIf(!isRoot);

// Far from TQ_TASK_UIDS' default, so a worker another test file runs cannot share them.
const FIRST = 29_100;
let dir: string;
const settings = (overrides: Partial<IsolationSettings> = {}): IsolationSettings => ({
  mode: "auto",
  ids: { first: FIRST, last: FIRST + 3 },
  homeDir: join(dir, "slots"),
  ...overrides,
});

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "tq-identity-"));
  chmodSync(dir, 0o711);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("who may switch users", () => {
  const status = (capEff: string) => `Name:\tbun\nCapInh:\t0000000000000000\nCapEff:\t${capEff}\nCapBnd:\t000001ffffffffff\n`;

  test("CAP_SETUID and CAP_SETGID in the effective set are needed, both", () => {
    expect(cannotSwitchUsers(status("000001fffeffffff"))).toBeNull();
    expect(cannotSwitchUsers(status("00000000000000c0"))).toBeNull(); // bits 6 and 7 alone
    expect(cannotSwitchUsers(status("0000000000000080"))).toMatch(/without CAP_SETUID and CAP_SETGID/);
    expect(cannotSwitchUsers(status("0000000000000000"))).toMatch(/without CAP_SETUID and CAP_SETGID/);
  });

  asRoot("this process, root with every capability, may", () => {
    expect(cannotSwitchUsers()).toBeNull();
  });
});

describe("what a slot user can reach", () => {
  asRoot("a folder is out of reach when any folder on its way denies search to the user", () => {
    const top = join(dir, "reach");
    const inner = join(top, "inner");
    mkdirSync(inner, { recursive: true });
    chmodSync(top, 0o700);
    chmodSync(inner, 0o777);
    const who = { uid: FIRST, gid: FIRST };
    expect(searchDenied(inner, who)).toBe(top);
    chmodSync(top, 0o711);
    expect(searchDenied(inner, who)).toBeNull();
    // Owner bits decide for the owner, group bits for the group.
    chmodSync(inner, 0o070);
    chownSync(inner, FIRST, 0);
    expect(searchDenied(inner, who)).toBe(inner);
    chownSync(inner, 0, FIRST);
    expect(searchDenied(inner, who)).toBeNull();
    expect(searchDenied(inner, { uid: FIRST + 1, gid: FIRST + 1 })).toBe(inner);
  });

  asRoot("a recent answer is reused for a second, then the folder is looked at again", () => {
    const top = join(dir, "recent");
    const inner = join(top, "inner");
    mkdirSync(inner, { recursive: true });
    chmodSync(top, 0o711);
    const who = { uid: FIRST, gid: FIRST };
    const t0 = 1_000_000;
    expect(searchDeniedRecently(inner, who, t0)).toBeNull();
    chmodSync(top, 0o700);
    expect(searchDeniedRecently(inner, who, t0 + 500)).toBeNull();
    // Another user's answer is its own.
    expect(searchDeniedRecently(inner, { uid: FIRST + 1, gid: FIRST + 1 }, t0 + 500)).toBe(top);
    expect(searchDeniedRecently(inner, who, t0 + 1001)).toBe(top);
  });

  asRoot("a file is readable only with search on its folders and its read bit", () => {
    const file = join(dir, "token");
    writeFileSync(file, "x".repeat(20), { mode: 0o600 });
    chmodSync(file, 0o600);
    const who = { uid: FIRST, gid: FIRST };
    expect(readableBy(file, who)).toBe(false);
    chmodSync(file, 0o644);
    expect(readableBy(file, who)).toBe(true);
  });
});

describe("the homes a worker prepares", () => {
  asRoot("each slot gets uid first+i, gid first+i and a home of its own, mode 0700", () => {
    const identities = prepareIdentities(settings(), 3, "TQ_WORKER_SLOTS=3");
    expect(identities.map(({ uid, gid }) => [uid, gid])).toEqual([
      [FIRST, FIRST],
      [FIRST + 1, FIRST + 1],
      [FIRST + 2, FIRST + 2],
    ]);
    for (const identity of identities) {
      const stat = statSync(identity.home);
      expect({ uid: stat.uid, gid: stat.gid, mode: stat.mode & 0o777 }).toEqual({
        uid: identity.uid,
        gid: identity.gid,
        mode: 0o700,
      });
    }
    // Preparing again (a restart) keeps them.
    expect(prepareIdentities(settings(), 3, "TQ_WORKER_SLOTS=3")).toEqual(identities);
  });

  test("more slots than the range is refused, naming both settings", () => {
    expect(() => prepareIdentities(settings(), 5, "TQ_WORKER_SLOTS=5")).toThrow(
      `TQ_WORKER_SLOTS=5 needs 5 task users but TQ_TASK_UIDS=${FIRST}-${FIRST + 3} has 4`,
    );
  });

  asRoot("a home folder others may write is refused", () => {
    const open = join(dir, "open-slots");
    mkdirSync(open);
    chmodSync(open, 0o777);
    expect(() => prepareIdentities(settings({ homeDir: open }), 1, "TQ_WORKER_SLOTS=1")).toThrow(/no one else may write/);
  });

  asRoot("homes out of the users' reach are refused, naming the folder in the way", () => {
    const hidden = join(dir, "hidden");
    mkdirSync(hidden, { mode: 0o700 });
    chmodSync(hidden, 0o700);
    expect(() => prepareIdentities(settings({ homeDir: join(hidden, "slots") }), 1, "TQ_WORKER_SLOTS=1")).toThrow(
      `${hidden} does not let it through`,
    );
  });
});

describe("the configuration", () => {
  test("TQ_TASK_UIDS is a range first-last of non-root ids", () => {
    expect(taskIsolation(loadConfig({})).ids).toEqual({ first: 20_000, last: 20_063 });
    expect(taskIsolation(loadConfig({ TQ_TASK_UIDS: "30000-30001", TQ_TASK_ISOLATION: "required" }))).toMatchObject({
      mode: "required",
      ids: { first: 30_000, last: 30_001 },
    });
    expect(() => loadConfig({ TQ_TASK_UIDS: "0-10" })).toThrow(/TQ_TASK_UIDS=0-10/);
    expect(() => loadConfig({ TQ_TASK_UIDS: "200-100" })).toThrow(/TQ_TASK_UIDS=200-100/);
    expect(() => loadConfig({ TQ_TASK_UIDS: "20000" })).toThrow(/TQ_TASK_UIDS/);
    expect(() => loadConfig({ TQ_TASK_ISOLATION: "maybe" })).toThrow(/TQ_TASK_ISOLATION/);
  });

  test("TQ_WORKER_TOKEN_FILE is read once into the token; both, or an unreadable or short file, are refused", () => {
    const file = join(dir, "worker-token");
    writeFileSync(file, "a-token-from-a-file-0123\n", { mode: 0o600 });
    const config = loadConfig({ TQ_WORKER_TOKEN_FILE: file });
    expect(config.TQ_WORKER_TOKEN).toBe("a-token-from-a-file-0123");
    expect(() => loadConfig({ TQ_WORKER_TOKEN_FILE: file, TQ_WORKER_TOKEN: "another-token-0123456" })).toThrow(
      "set TQ_WORKER_TOKEN or TQ_WORKER_TOKEN_FILE, not both",
    );
    expect(() => loadConfig({ TQ_WORKER_TOKEN_FILE: join(dir, "missing") })).toThrow(
      `TQ_WORKER_TOKEN_FILE ${join(dir, "missing")} cannot be read`,
    );
    writeFileSync(file, "short\n");
    expect(() => loadConfig({ TQ_WORKER_TOKEN_FILE: file })).toThrow(/at least 16 characters/);
  });

  test("tasks inherit neither the token nor the path of its file", () => {
    const env = taskEnv({ PATH: "/bin", TQ_WORKER_TOKEN: "secret", TQ_WORKER_TOKEN_FILE: "/run/secrets/token", KEEP: "1" }, {});
    expect(env).toEqual({ PATH: "/bin", KEEP: "1" });
  });
});

describe("commands as a slot user", () => {
  const baseEnv = { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: "/root" };
  let identities: TaskIdentity[];
  beforeAll(() => {
    if (isRoot) identities = prepareIdentities(settings({ homeDir: join(dir, "run-slots") }), 3, "TQ_WORKER_SLOTS=3");
  });
  const run = (command: string, user: TaskIdentity | undefined, cwd?: string) =>
    execute({ command, env: {}, cwd, timeoutMs: 0, killGraceMs: 1000, maxOutputBytes: 1 << 16, baseEnv, user }).result;

  asRoot("runs with the slot's uid and gid and no other group, in its home, which is also HOME", async () => {
    const user = identities[0]!;
    const result = await run('id -u; id -g; id -G; pwd; echo "$HOME"; touch mine && echo wrote', user);
    expect(result).toMatchObject({ outcome: "exited", exitCode: 0 });
    expect(result.stdout.split("\n")).toEqual([
      String(user.uid),
      String(user.gid),
      String(user.gid),
      user.home,
      user.home,
      "wrote",
      "",
    ]);
  });

  asRoot("cannot read the worker's /proc/<pid>/environ, which the worker's own user can", async () => {
    const environ = `cat /proc/${process.pid}/environ`;
    const asWorker = await run(environ, undefined);
    expect(asWorker.exitCode).toBe(0);
    expect(asWorker.stdout).toContain("PATH=");
    const asSlot = await run(environ, identities[0]);
    expect(asSlot.exitCode).not.toBe(0);
    expect(asSlot.stdout).toBe("");
    expect(asSlot.stderr).toContain("Permission denied");
  });

  asRoot("a cwd the slot user cannot reach fails to start, naming the folder that denies it", async () => {
    const locked = join(dir, "locked");
    mkdirSync(join(locked, "work"), { recursive: true });
    chmodSync(locked, 0o700);
    const result = await run("pwd", identities[0], join(locked, "work"));
    expect(result).toMatchObject({ outcome: "spawn_failed", pid: null });
    expect(result.error).toBe(
      `cwd ${join(locked, "work")} is not accessible to the task's user (uid ${FIRST}): ${locked} denies it`,
    );
    // The worker itself (root) could have entered it: only the slot user is refused.
    expect(await run("pwd", undefined, join(locked, "work"))).toMatchObject({ outcome: "exited", exitCode: 0 });
  });

  asRoot("concurrent attempts run as different slot users, a freed one is reused, and none is shared", async () => {
    const finished: Array<{ ref: TaskRef; result: RunResult }> = [];
    let arrived: () => void = () => {};
    const held = new Attempts({
      log: silentLogger,
      killGraceMs: 1000,
      maxOutputBytes: 1000,
      baseEnv,
      identities: identities.slice(0, 2),
      events: {
        started: () => {},
        finished: (ref, result) => {
          finished.push({ ref, result });
          arrived();
        },
        notStarted: () => {},
      },
    });
    const gate = join(dir, "gate");
    const take = (taskId: string, command: string) => held.take(create(AssignSchema, { ref: { taskId, attempt: 1 }, command }));
    const next = (count: number) =>
      new Promise<void>((resolve) => {
        arrived = () => finished.length >= count && resolve();
        arrived();
      });
    const wait = `while [ ! -e '${gate}' ]; do sleep 0.01; done; id -u`;
    take("a", wait);
    take("b", wait);
    take("c", "id -u"); // a third attempt on two slots
    await next(1);
    expect(finished[0]).toMatchObject({
      ref: { taskId: "c" },
      result: { outcome: "spawn_failed", error: "no free slot user: this worker already runs 2 tasks" },
    });
    writeFileSync(gate, "");
    await next(3);
    const uid = (taskId: string) => finished.find((f) => f.ref.taskId === taskId)?.result.stdout.trim();
    expect([uid("a"), uid("b")]).toEqual([String(FIRST), String(FIRST + 1)]);
    take("d", "id -u");
    await next(4);
    expect(uid("d")).toBe(String(FIRST));
  });
});
