// Recurring schedules on real processes: two scheduler replicas fire a per-second schedule
// (one of them SIGKILLed meanwhile), and all schedulers down for 5 s, then catch-up in each
// mode. Every assertion reads the rows (firings and tasks per fire time), none times anything.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { postJson } from "../support/http";
import { type Cluster, type RoleProcess, spawnRole, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS * 2);

const db = useTestDatabase();
let cluster: Cluster;
const schedulers: RoleProcess[] = [];

async function startScheduler(): Promise<{ process: RoleProcess; url: string }> {
  const port = await freePort();
  const process = spawnRole("scheduler", { DATABASE_URL: db.url, TQ_SCHEDULER_PORT: String(port) });
  schedulers.push(process);
  await process.waitForEvent("scheduler.started");
  return { process, url: `http://127.0.0.1:${port}` };
}

beforeAll(async () => {
  // The coordinator does not fire schedules here: the scheduler replicas under test do.
  cluster = await startCluster(db.url, { workers: 1, slots: 8, scheduler: false, env: { TQ_SCHEDULES: "false" } });
}, 90_000);

afterAll(async () => {
  await Promise.all(schedulers.map((p) => p.stop(5000)));
  await cluster?.stop();
}, HOOK_TIMEOUT_MS);

interface FiringCount {
  fire_at: Date;
  outcome: string;
  tasks: number;
  reason: string | null;
}

/** Per fire time: its firing's outcome and reason, and how many tasks carry it. */
async function perFireTime(scheduleId: string): Promise<FiringCount[]> {
  return db.sql<FiringCount[]>`
    SELECT f.fire_at, f.outcome, count(t.id)::int AS tasks, f.reason
    FROM schedule_firings f LEFT JOIN tasks t ON t.schedule_id = f.schedule_id AND t.fire_at = f.fire_at
    WHERE f.schedule_id = ${scheduleId}
    GROUP BY f.fire_at, f.outcome, f.reason ORDER BY f.fire_at`;
}

/** Every second from the first fire time to the last has exactly one firing: no gap, no double. */
function expectEverySecondOnce(rows: FiringCount[]) {
  const seconds = rows.map((row) => row.fire_at.getTime() / 1000);
  for (let i = 1; i < seconds.length; i++) expect(seconds[i]! - seconds[i - 1]!).toBe(1);
  for (const row of rows) expect(row.tasks).toBe(row.outcome === "created" ? 1 : 0);
}

describe("two scheduler replicas", () => {
  test("a */1 * * * * * schedule gives exactly one task per second, with a replica SIGKILLed meanwhile", async () => {
    const a = await startScheduler();
    const b = await startScheduler();
    const { status, json: schedule } = await postJson(`${a.url}/schedules`, {
      name: "every-second",
      cron: "*/1 * * * * *",
      task: { command: "true" },
      // A pass that comes late (the killed replica's lock released) still runs every second.
      catch_up: { window: "1m", mode: "all" },
    });
    expect(status).toBe(201);
    const created = async (n: number) =>
      eventually(
        async () => {
          const rows = await perFireTime(schedule.id);
          return rows.length >= n ? rows : null;
        },
        { what: `${n} firings`, timeoutMs: 30_000, intervalMs: 100 },
      );
    await created(4);
    // Both replicas take part before one dies (they share by SKIP LOCKED, so either may fire any second).
    a.process.kill("SIGKILL");
    await a.process.exited;
    const before = (await perFireTime(schedule.id)).length;
    await created(before + 6);
    await postJson(`${b.url}/schedules/${schedule.id}/pause`, {});
    const rows = await perFireTime(schedule.id);
    expect(rows.length).toBeGreaterThanOrEqual(10);
    expectEverySecondOnce(rows);
    expect(rows.every((row) => row.outcome === "created")).toBe(true);
    // And the tasks ran: started at or after their fire time, by the database's clock.
    const early = await db.sql<{ n: number }[]>`
      SELECT count(*)::int AS n FROM tasks WHERE schedule_id = ${schedule.id} AND started_at < fire_at`;
    expect(early[0]!.n).toBe(0);
    await b.process.stop(5000);
  });
});

describe("all schedulers down for 5 s", () => {
  test("catch-up: all runs each missed second, latest the newest, none none; every second is recorded", async () => {
    const first = await startScheduler();
    const ids: Record<string, string> = {};
    for (const mode of ["all", "latest", "none"]) {
      const { json } = await postJson(`${first.url}/schedules`, {
        name: `outage-${mode}`,
        every: "1s",
        task: { command: "true" },
        catch_up: { window: "1h", mode },
      });
      ids[mode] = json.id;
    }
    await eventually(
      async () => {
        const counts = await Promise.all(Object.values(ids).map((id) => perFireTime(id)));
        return counts.every((rows) => rows.length >= 2) || null;
      },
      { what: "each schedule fired twice", timeoutMs: 20_000, intervalMs: 100 },
    );
    await first.process.stop(5000);
    const [stopped] = await db.sql<{ down: Date }[]>`SELECT clock_timestamp() AS down`;
    const down = stopped!.down;
    // The outage: the database's clock passes 5 s with no scheduler running.
    await eventually(
      async () => {
        const [row] = await db.sql<
          { ok: boolean }[]
        >`SELECT clock_timestamp() > ${down}::timestamptz + interval '5 seconds' AS ok`;
        return row!.ok || null;
      },
      { what: "5 s of outage", timeoutMs: 20_000, intervalMs: 200 },
    );
    const second = await startScheduler();
    for (const id of Object.values(ids)) {
      await eventually(
        async () => {
          const rows = await perFireTime(id);
          const last = rows.at(-1);
          return last && last.fire_at.getTime() > down.getTime() + 6000 ? rows : null;
        },
        { what: "firing after the outage", timeoutMs: 20_000, intervalMs: 100 },
      );
    }
    await Promise.all(Object.values(ids).map((id) => postJson(`${second.url}/schedules/${id}/pause`, {})));
    // Caught up: a firing more than the on-time grace (1 s) overdue that ran anyway.
    const caughtUp = (rows: FiringCount[]) =>
      rows.filter((row) => row.outcome === "created" && row.reason?.startsWith("caught up")).length;
    const all = await perFireTime(ids.all!);
    const latest = await perFireTime(ids.latest!);
    const none = await perFireTime(ids.none!);
    for (const rows of [all, latest, none]) expectEverySecondOnce(rows);
    // How many fire times the outage left overdue depends on its phase against the fire times
    // and on how soon the new replica's first pass runs (about 5 s, less the 0.5 s the stopped
    // one wrote ahead and the 1 s on-time grace: 2 to 4), so each mode is checked against its
    // own count: all runs every one, latest only the newest, none none.
    const missed = (rows: FiringCount[]) => rows.filter((row) => row.outcome === "missed").length;
    expect(missed(all)).toBe(0);
    expect(caughtUp(all)).toBeGreaterThanOrEqual(2);
    expect(caughtUp(latest)).toBe(1);
    expect(missed(latest)).toBeGreaterThanOrEqual(1);
    expect(caughtUp(none)).toBe(0);
    expect(missed(none)).toBeGreaterThanOrEqual(2);
    // The missed ones are visible in the API.
    const view = await fetch(`${second.url}/schedules/${ids.none}`).then((r) => r.json());
    expect((view as { firings: { outcome: string }[] }).firings.some((f) => f.outcome === "missed")).toBe(true);
    await second.process.stop(5000);
  });
});

describe("overlap with a long command", () => {
  test("skip records the firings that come while the task runs; cancel_previous kills it and starts the next", async () => {
    const { url } = await startScheduler();
    const skip = await postJson(`${url}/schedules`, {
      name: "long-skip",
      every: "1s",
      overlap: "skip",
      task: { command: "sleep 3" },
    });
    const cancel = await postJson(`${url}/schedules`, {
      name: "long-cancel",
      every: "1s",
      overlap: "cancel_previous",
      task: { command: "sleep 30" },
    });
    await eventually(
      async () => {
        const rows = await perFireTime(skip.json.id);
        return rows.filter((r) => r.outcome === "skipped").length >= 2 ? rows : null;
      },
      { what: "two skipped firings", timeoutMs: 30_000, intervalMs: 100 },
    );
    // A cancelled sleep 30 that was running: its process group was stopped.
    await eventually(
      async () => {
        const rows = await db.sql<{ n: number }[]>`
          SELECT count(*)::int AS n FROM tasks t JOIN task_attempts a ON a.task_id = t.id
          WHERE t.schedule_id = ${cancel.json.id} AND t.state = 'cancelled' AND a.started_at IS NOT NULL AND a.finished_at IS NOT NULL`;
        return rows[0]!.n >= 1 || null;
      },
      { what: "a running task cancelled by the next firing", timeoutMs: 30_000, intervalMs: 100 },
    );
    await postJson(`${url}/schedules/long-skip/pause`, {});
    await postJson(`${url}/schedules/long-cancel/pause`, {});
    // Skip: never two live at once; every fire time recorded once.
    const skipRows = await perFireTime(skip.json.id);
    expectEverySecondOnce(skipRows);
    const overlapping = await db.sql<{ n: number }[]>`
      SELECT count(*)::int AS n FROM tasks a JOIN tasks b ON a.schedule_id = b.schedule_id AND a.id < b.id
      WHERE a.schedule_id = ${skip.json.id} AND b.started_at < a.completed_at`;
    expect(overlapping[0]!.n).toBe(0);
    // Cancel: no more than one of its tasks is live.
    const live = await db.sql<{ n: number }[]>`
      SELECT count(*)::int AS n FROM tasks WHERE schedule_id = ${cancel.json.id} AND state IN ('queued', 'dispatched', 'running')`;
    expect(live[0]!.n).toBeLessThanOrEqual(1);
    const left = await db.sql<{ id: string }[]>`
      SELECT id FROM tasks WHERE schedule_id = ${cancel.json.id} AND state IN ('queued', 'dispatched', 'running')`;
    for (const { id } of left) await postJson(`${cluster.coordinatorUrl}/tasks/${id}/cancel`, {});
    await fetch(`${url}/schedules/long-cancel`, { method: "DELETE" });
  });
});
