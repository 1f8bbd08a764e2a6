// `bun start` on embedded PostgreSQL, driven by the README's own curl examples.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS } from "../support/db";
import { eventually } from "../support/eventually";
import { postJson, watchTask } from "../support/http";
import { RoleProcess } from "../support/processes";
import { readmeCurls, runReadmeCommand } from "../support/readme";

setDefaultTimeout(TEST_TIMEOUT_MS);

const ROOT = join(import.meta.dir, "../..");
let dataDir: string;
let start: RoleProcess;
let ports: { scheduler: number; coordinator: number };

/** Runs a README command as printed, pointed at this test's ports. */
const sh = (command: string) => runReadmeCommand(command, ports);

beforeAll(async () => {
  dataDir = mkdtempSync(join(tmpdir(), "tq-start-"));
  ports = { scheduler: await freePort(), coordinator: await freePort() };
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    HOME: process.env.HOME ?? "/tmp",
    TQ_DATA_DIR: dataDir,
    TQ_EMBEDDED_PG_PORT: String(await freePort()),
    TQ_SCHEDULER_PORT: String(ports.scheduler),
    TQ_COORDINATOR_PORT: String(ports.coordinator),
    TQ_GRPC_PORT: String(await freePort()),
  };
  // Exactly as the README says, on embedded PostgreSQL: no DATABASE_URL.
  const proc = Bun.spawn(["bun", "run", "start"], { cwd: ROOT, env, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  start = new RoleProcess("start", proc);
  await start.waitForText("task-queue is running", 60_000);
}, 90_000);

afterAll(async () => {
  if (start) expect(await start.stop(20_000)).toBe(0);
  rmSync(dataDir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

test("bun start prints its URLs", () => {
  const printed = start.raw.join("\n");
  expect(printed).toContain(`http://127.0.0.1:${ports.scheduler}`);
  expect(printed).toContain(`http://127.0.0.1:${ports.coordinator}`);
  expect(printed).toContain("embedded PostgreSQL");
});

test("bun start serves the dashboard on both ports with no build step", async () => {
  expect(start.raw.join("\n")).toContain(`http://127.0.0.1:${ports.coordinator}/ui`);
  for (const port of [ports.coordinator, ports.scheduler]) {
    const page = await fetch(`http://127.0.0.1:${port}/ui`);
    expect(page.status).toBe(200);
    const html = await page.text();
    const script = /src="(\/ui\/assets\/app\.js\?v=[0-9a-f]+)"/.exec(html)?.[1];
    expect(script).toBeDefined();
    const asset = await fetch(`http://127.0.0.1:${port}${script}`);
    expect(asset.status).toBe(200);
    expect(asset.headers.get("content-type")).toContain("javascript");
    expect((await asset.text()).length).toBeGreaterThan(1000);
  }
});

test("the seed's curl examples in the README work as printed", async () => {
  const [schedule, status] = readmeCurls("The original API");
  expect(schedule).toBe(
    `curl -X POST http://localhost:8081/schedule -d '{"command":"your_task_command", "scheduled_at":"2023-04-01T15:04:05Z"}'`,
  );
  expect(status).toBe("curl http://localhost:8081/status?task_id=your_task_id");
  const created = JSON.parse(await sh(schedule!)) as { task_id: string; command: string; scheduled_at: string };
  expect(created).toMatchObject({ command: "your_task_command", scheduled_at: "2023-04-01T15:04:05.000Z" });
  const done = await watchTask(`http://127.0.0.1:${ports.scheduler}`, created.task_id);
  expect(done).toMatchObject({ state: "failed", exit_code: 127 });
  const shown = JSON.parse(await sh(status!.replace("your_task_id", created.task_id)));
  // Retried twice with backoff, yet still showing the time asked for, and why it failed.
  expect(shown).toMatchObject({
    task_id: created.task_id,
    state: "failed",
    attempt: 3,
    exit_code: 127,
    completed_at: null,
    scheduled_at: "2023-04-01T15:04:05.000Z",
    error: "exhausted 3 attempts: last exit code 127",
  });
  expect(Date.parse(shown.run_at)).toBeGreaterThan(Date.parse(shown.scheduled_at));
  for (const field of ["scheduled_at", "run_at", "created_at", "picked_at", "started_at", "failed_at"])
    expect(shown[field]).toEqual(expect.any(String));
});

test("the README's run-now example runs on the built-in workers", async () => {
  const submit = readmeCurls("More of the API").find((line) => line.includes("/submit"));
  expect(submit).toBeDefined();
  const task = JSON.parse(await sh(submit!)) as { id: string };
  const done = await watchTask(`http://127.0.0.1:${ports.coordinator}`, task.id);
  expect(done).toMatchObject({ state: "succeeded", stdout: "hello\n" });
  const workers = JSON.parse(await sh(`curl http://localhost:8080/workers`)) as { workers: unknown[] };
  expect(workers.workers).toHaveLength(2);
});

test("the README's recurring schedule examples work as printed", async () => {
  const curls = readmeCurls("Recurring schedules").filter((line) => line.includes("/schedules") || line.includes("schedule_id"));
  const [create, nightly, show, tasks, patch, trigger, pause, resume, remove] = curls;
  expect(curls).toHaveLength(9);
  const created = JSON.parse(await sh(create!)) as { id: string; cron: string; upcoming: string[] };
  expect(created).toMatchObject({ cron: "*/5 * * * * *" });
  expect(created.upcoming).toHaveLength(5);
  const other = JSON.parse(await sh(nightly!)) as { time_zone: string; overlap: string; catch_up: unknown };
  expect(other).toMatchObject({ time_zone: "Europe/Berlin", overlap: "skip", catch_up: { window: "6h", mode: "latest" } });
  // bun start fires schedules (its coordinator and scheduler both run the loop): the first
  // firing's task runs on the built-in workers.
  const firing = await eventually(
    async () => {
      const view = JSON.parse(await sh(show!)) as { firings: { outcome: string; task_id: string | null }[] };
      return view.firings.find((f) => f.outcome === "created") ?? null;
    },
    { what: "the first firing", timeoutMs: 20_000, intervalMs: 250 },
  );
  const listed = JSON.parse(await sh(tasks!.replace("SCHEDULE_ID", created.id))) as {
    tasks: { id: string; schedule_id: string }[];
  };
  expect(listed.tasks.map((t) => t.id)).toContain(firing.task_id!);
  const done = await watchTask(`http://127.0.0.1:${ports.scheduler}`, firing.task_id!);
  expect(done).toMatchObject({ state: "succeeded", stdout: "beat\n", schedule_id: created.id });
  expect(JSON.parse(await sh(patch!))).toMatchObject({ overlap: "buffer_one" });
  expect((JSON.parse(await sh(trigger!)) as { outcome: string }).outcome).toMatch(/^(created|buffered)$/);
  expect(JSON.parse(await sh(pause!))).toMatchObject({ paused: true });
  expect(JSON.parse(await sh(resume!))).toMatchObject({ paused: false });
  expect(await sh(remove!)).toBe("");
  await sh(pause!);
});

test.skipIf(process.getuid?.() !== 0)("started as root, its workers run tasks as their slots' own users", async () => {
  // TQ_WORKERS=2 x TQ_WORKER_SLOTS=4 by default: the two workers take consecutive slices.
  expect(start.logged("worker.isolated").map((line) => line.uids)).toEqual(["20000-20007"]);
  expect(start.logged("worker.no_isolation")).toEqual([]);
  const created = await postJson(`http://127.0.0.1:${ports.coordinator}/submit`, { command: "id -u", max_attempts: 1 });
  expect(created.status).toBe(201);
  const done = await watchTask(`http://127.0.0.1:${ports.coordinator}`, created.json.id);
  expect(done.state).toBe("succeeded");
  const uid = Number(String(done.stdout).trim());
  expect(uid).toBeGreaterThanOrEqual(20_000);
  expect(uid).toBeLessThanOrEqual(20_007);
});
