// The README's two commands, run by root in a clone under a private (0700) folder, as on a
// fresh machine where the clone is /root/task-queue: embedded PostgreSQL runs as user postgres,
// which can reach neither node_modules nor .data there.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { spawnSync } from "node:child_process";
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS } from "../support/db";
import { watchTask } from "../support/http";
import { RoleProcess } from "../support/processes";
import { readmeCurls, runReadmeCommand } from "../support/readme";

setDefaultTimeout(TEST_TIMEOUT_MS);

const ROOT = join(import.meta.dir, "../..");
const AS_ROOT = process.getuid?.() === 0;
if (!AS_ROOT) {
  console.warn(
    "test/e2e/private-folder.test.ts skipped: it checks `bun start` and `bun test` run by root in a 0700 folder, and this run is not root",
  );
}

/** The environment of a newcomer's shell: no database configured, no settings of this run. */
function newcomerEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (value === undefined || key.startsWith("TQ_") || key === "DATABASE_URL" || key === "TEST_DATABASE_URL") continue;
    env[key] = value;
  }
  return { ...env, ...extra };
}

/** Copies the working tree as git sees it (tracked and new files, nothing ignored): a clone of this code. */
function copyWorkTree(to: string): void {
  const listed = spawnSync("git", ["ls-files", "-z", "--cached", "--others", "--exclude-standard"], {
    cwd: ROOT,
    encoding: "utf8",
  });
  expect(listed.status).toBe(0);
  for (const file of listed.stdout.split("\0")) {
    if (!file || !existsSync(join(ROOT, file))) continue;
    mkdirSync(dirname(join(to, file)), { recursive: true });
    cpSync(join(ROOT, file), join(to, file));
  }
}

async function run(command: string[], cwd: string, env: Record<string, string>, ceilingMs: number) {
  const proc = Bun.spawn(command, { cwd, env, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  // A ceiling only: a spinning run is killed and reported, instead of stalling the suite.
  const timer = setTimeout(() => proc.kill("SIGKILL"), ceilingMs);
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(timer);
  return { code, signal: proc.signalCode, output: `${out}${err}` };
}

function postgresIds(): { uid: number; gid: number } {
  const id = (flag: string) => Number.parseInt(spawnSync("id", [flag, "postgres"], { encoding: "utf8" }).stdout, 10);
  return { uid: id("-u"), gid: id("-g") };
}

describe.skipIf(!AS_ROOT)("as root, in a clone under a 0700 folder", () => {
  let privateDir: string;
  let clone: string;
  // A fresh TQ_EMBEDDED_PG_HOME: the binaries are copied from scratch, and nothing is left in /var/lib.
  let home: string;

  beforeAll(async () => {
    privateDir = mkdtempSync(join(tmpdir(), "tq-private-"));
    chmodSync(privateDir, 0o700);
    clone = join(privateDir, "task-queue");
    copyWorkTree(clone);
    home = mkdtempSync(join(tmpdir(), "tq-pg-home-"));
    chmodSync(home, 0o755);
    // The README's first half of both commands.
    const install = await run(["bun", "install"], clone, newcomerEnv(), 90_000);
    if (install.code !== 0) throw new Error(`bun install failed:\n${install.output}`);
  }, 120_000);

  afterAll(() => {
    rmSync(privateDir, { recursive: true, force: true });
    rmSync(home, { recursive: true, force: true });
  }, HOOK_TIMEOUT_MS);

  test("bun start runs, says where its data is, and finds it again on the next start", async () => {
    const ports = { scheduler: await freePort(), coordinator: await freePort() };
    const env = newcomerEnv({
      TQ_EMBEDDED_PG_HOME: home,
      TQ_EMBEDDED_PG_PORT: String(await freePort()),
      TQ_SCHEDULER_PORT: String(ports.scheduler),
      TQ_COORDINATOR_PORT: String(ports.coordinator),
      TQ_GRPC_PORT: String(await freePort()),
    });
    const bunStart = async () => {
      const proc = Bun.spawn(["bun", "start"], { cwd: clone, env, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
      const role = new RoleProcess("start", proc);
      await Promise.race([
        role.waitForText("task-queue is running", 60_000),
        role.exited.then((code) => {
          throw new Error(`bun start exited with ${code}:\n${role.raw.join("\n")}`);
        }),
      ]);
      const banner = role.raw.find((line) => line.includes("embedded PostgreSQL in "));
      const dataDir = banner?.match(/embedded PostgreSQL in (\S+) /)?.[1];
      return { role, banner: banner ?? "", dataDir: dataDir ?? "" };
    };

    const first = await bunStart();
    // The honest case: user postgres cannot even traverse the private folder.
    const postgres = postgresIds();
    expect(spawnSync("test", ["-x", privateDir], { ...postgres, stdio: "ignore" }).status).not.toBe(0);
    expect(first.banner).toContain(`cannot reach ${join(clone, ".data/postgres")}`);
    expect(first.dataDir.startsWith(join(home, "clusters"))).toBe(true);
    expect(existsSync(join(first.dataDir, "PG_VERSION"))).toBe(true);
    // The server runs as user postgres, from the binaries copied to the home.
    const pid = Number.parseInt(readFileSync(join(first.dataDir, "postmaster.pid"), "utf8").split("\n")[0]!, 10);
    expect(spawnSync("ps", ["-o", "user=", "-p", String(pid)], { encoding: "utf8" }).stdout.trim()).toBe("postgres");
    expect(readlinkSync(`/proc/${pid}/exe`).startsWith(join(home, "postgresql"))).toBe(true);

    const [schedule, status] = readmeCurls("The original API");
    const created = JSON.parse(await runReadmeCommand(schedule!, ports)) as { task_id: string };
    const done = await watchTask(`http://127.0.0.1:${ports.scheduler}`, created.task_id);
    expect(done).toMatchObject({ state: "failed", exit_code: 127 });
    expect(await first.role.stop(20_000)).toBe(0);

    const second = await bunStart();
    try {
      expect(second.dataDir).toBe(first.dataDir);
      const shown = JSON.parse(await runReadmeCommand(status!.replace("your_task_id", created.task_id), ports));
      expect(shown).toMatchObject({ task_id: created.task_id, state: "failed", exit_code: 127 });
    } finally {
      expect(await second.role.stop(20_000)).toBe(0);
    }
  }, 120_000);

  test("bun test runs there on embedded PostgreSQL, with no DATABASE_URL", async () => {
    writeFileSync(
      join(clone, "test/private-folder-probe.test.ts"),
      [
        'import { expect, test } from "bun:test";',
        'import { useTestDatabase } from "./support/db";',
        "const db = useTestDatabase();",
        'test("a migrated database answers", async () => {',
        "  expect([...(await db.sql`SELECT count(*)::int AS n FROM tasks`)]).toEqual([{ n: 0 }]);",
        "});",
        "",
      ].join("\n"),
    );
    const result = await run(
      ["bun", "test", "test/private-folder-probe.test.ts"],
      clone,
      newcomerEnv({ TQ_EMBEDDED_PG_HOME: home }),
      45_000,
    );
    if (result.signal) throw new Error(`bun test was killed at its ceiling (it hung or spun):\n${result.output}`);
    expect(result.output).toContain(" 1 pass");
    expect(result.code).toBe(0);
  });
});
