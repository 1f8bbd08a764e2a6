// Recurring schedules against real PostgreSQL: the /schedules routes through app.handle, and
// the firing loop's pass (firePass) run directly, with fire times moved into the past by SQL
// where a real clock would be slow (an outage, a pause). No timing is asserted: each pass's
// outcome follows from the rows.
import { beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { loadConfig, taskDefaults } from "../../src/config";
import { insertFirings } from "../../src/db/insert";
import { nextScheduleDueIn } from "../../src/db/schedules";
import { connect, type Sql } from "../../src/db/sql";
import { cancelTask } from "../../src/db/transitions";
import { silentLogger } from "../../src/log";
import { firePass } from "../../src/schedule/firer";
import { firingSpec } from "../../src/schedule/spec";
import { useApiApp } from "../support/api";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const api = useApiApp(db);
const call = api.call;
const defaults = taskDefaults(loadConfig({}));

beforeEach(async () => {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, schedules, schedule_firings`;
});

const pass = () => firePass({ sql: db.sql, log: silentLogger, taskDefaults: defaults, aheadMs: 0 });

/** An `every 1m` schedule whose plan is moved `seconds` into the past: as if nothing fired it meanwhile. */
async function overdueSchedule(extra: Record<string, unknown>, seconds = 630) {
  const created = await call("POST", "/schedules", {
    name: `s${Bun.randomUUIDv7()}`,
    every: "1m",
    task: { command: "true" },
    ...extra,
  });
  expect(created.status).toBe(201);
  await db.sql`
    UPDATE schedules SET next_fire_at = next_fire_at - make_interval(secs => ${seconds}),
      anchor_at = anchor_at - make_interval(secs => ${seconds})
    WHERE id = ${created.json.id}`;
  return created.json.id as string;
}

async function firings(id: string) {
  return db.sql<{ fire_at: Date; outcome: string; task_id: string | null }[]>`
    SELECT fire_at, outcome, task_id FROM schedule_firings WHERE schedule_id = ${id} ORDER BY fire_at`;
}

// First in the file: no schedule exists yet.
describe("the firing loop's next due time", () => {
  test("no schedule is no due time (null), not 0: an idle firer sleeps its poll interval", async () => {
    // greatest(0, NULL) is 0 in SQL: no schedule at all once read as "due now", every 10 ms.
    expect(await nextScheduleDueIn(db.sql)).toEqual({ ms: null, buffered: false });
  });
});

describe("the API", () => {
  test("creates a schedule and shows its next 5 fire times", async () => {
    const created = await call("POST", "/schedules", {
      name: "every-5",
      cron: "*/5 * * * *",
      time_zone: "Europe/Berlin",
      task: { command: "echo hi", env: { A: "1" }, secret_env: { TOKEN: "x" }, max_attempts: 2 },
      overlap: "skip",
      catch_up: { window: "2h", mode: "all" },
    });
    expect(created.status).toBe(201);
    const s = created.json;
    expect(s).toMatchObject({
      name: "every-5",
      cron: "*/5 * * * *",
      every: null,
      time_zone: "Europe/Berlin",
      overlap: "skip",
      catch_up: { window: "2h", mode: "all" },
      paused: false,
      firings: [],
    });
    expect(s.task).toEqual({ command: "echo hi", env: { A: "1" }, max_attempts: 2, secret_env_keys: ["TOKEN"] });
    expect(s.upcoming).toHaveLength(5);
    for (const time of s.upcoming) expect(new Date(time).getUTCMinutes() % 5).toBe(0);
    expect(s.upcoming[0]).toBe(s.next_fire_at);
    const byName = await call("GET", "/schedules/every-5");
    expect(byName.json.id).toBe(s.id);
    const list = await call("GET", "/schedules?limit=1");
    expect(list.json.schedules.map((x: { id: string }) => x.id)).toEqual([s.id]);
    expect(list.json.next_cursor).toBeNull();
  });

  test("bad cron, zone, every and template are 400s naming the field; a taken name is a 409", async () => {
    const base = { name: "n", cron: "* * * * *", task: { command: "true" } };
    for (const [body, field] of [
      [{ ...base, cron: "61 * * * *" }, "cron"],
      [{ ...base, time_zone: "Mars/Base" }, "time_zone"],
      [{ name: "n", every: "often", task: { command: "true" } }, "every"],
      [{ ...base, task: { command: "true", timeout_ms: -1 } }, "task.timeout_ms"],
      [{ ...base, overlap: "sometimes" }, "overlap"],
    ] as const) {
      const answer = await call("POST", "/schedules", body);
      expect(answer.status).toBe(400);
      expect(answer.json.error.field).toBe(field);
    }
    expect((await call("POST", "/schedules", base)).status).toBe(201);
    const again = await call("POST", "/schedules", base);
    expect(again.status).toBe(409);
    expect(again.json.error.field).toBe("name");
    expect((await call("GET", "/schedules/nope")).status).toBe(404);
  });

  test("patch, pause, resume, delete", async () => {
    const { json: s } = await call("POST", "/schedules", { name: "p", every: "90s", task: { command: "true" } });
    expect(s.every).toBe("1m30s");
    const patched = await call("PATCH", `/schedules/${s.id}`, { cron: "0 * * * *", overlap: "cancel_previous" });
    expect(patched.status).toBe(200);
    expect(patched.json).toMatchObject({ cron: "0 * * * *", every: null, overlap: "cancel_previous" });
    expect(new Date(patched.json.next_fire_at).getUTCMinutes()).toBe(0);
    expect((await call("PATCH", `/schedules/${s.id}`, { time_zone: "Bad/Zone" })).json.error.field).toBe("time_zone");
    expect((await call("POST", `/schedules/${s.id}/pause`)).json.paused).toBe(true);
    expect((await call("POST", `/schedules/${s.id}/resume`)).json.paused).toBe(false);
    expect((await call("DELETE", `/schedules/${s.id}`)).status).toBe(204);
    expect((await call("GET", `/schedules/${s.id}`)).status).toBe(404);
  });
});

describe("firing", () => {
  test("a firing's task carries schedule_id and fire_at, due at the fire time, and task lists filter by them", async () => {
    const id = await overdueSchedule({ catch_up: { window: "1h", mode: "latest" } }, 61);
    expect(await pass()).toBeGreaterThan(0);
    const [firing] = (await firings(id)).filter((f) => f.outcome === "created");
    const tasks = await call("GET", `/tasks?schedule_id=${id}`);
    expect(tasks.json.tasks).toHaveLength(1);
    const task = tasks.json.tasks[0];
    expect(task.id).toBe(firing!.task_id);
    expect(task.schedule_id).toBe(id);
    expect(task.fire_at).toBe(firing!.fire_at.toISOString());
    expect(task.scheduled_at).toBe(task.fire_at);
    const byTime = await call("GET", `/tasks?schedule_id=${id}&fire_at=${task.fire_at}`);
    expect(byTime.json.tasks.map((t: { id: string }) => t.id)).toEqual([task.id]);
    expect((await call("GET", `/tasks?schedule_id=nope`)).json.error.field).toBe("schedule_id");
    // The next fire time is in the future: a second pass plans nothing.
    expect(await pass()).toBe(0);
  });

  test("a fire time makes one task, however many write it at once", async () => {
    const id = await overdueSchedule({}, 61);
    const fireAt = new Date(Date.now() - 1000);
    const writers = Array.from({ length: 8 }, () => connect(db.url, { max: 1 }));
    try {
      const results = await Promise.all(
        writers.map((sql: Sql) =>
          insertFirings(sql, [{ id: Bun.randomUUIDv7(), spec: firingSpec({ command: "true" }, defaults, id, fireAt) }]),
        ),
      );
      expect(results.flat().filter((row) => row !== null)).toHaveLength(1);
    } finally {
      await Promise.all(writers.map((sql) => sql.end()));
    }
    const [count] = await db.sql<
      { n: number }[]
    >`SELECT count(*)::int AS n FROM tasks WHERE schedule_id = ${id} AND fire_at = ${fireAt}`;
    expect(count!.n).toBe(1);
  });

  test("concurrent passes share the due schedules and fire each time once", async () => {
    const ids = await Promise.all(Array.from({ length: 20 }, () => overdueSchedule({ catch_up: { window: "1h", mode: "all" } })));
    const passers = Array.from({ length: 4 }, () => connect(db.url, { max: 2 }));
    try {
      await Promise.all(passers.map((sql) => firePass({ sql, log: silentLogger, taskDefaults: defaults, aheadMs: 0 })));
    } finally {
      await Promise.all(passers.map((sql) => sql.end()));
    }
    const rows = await db.sql<{ schedule_id: string; fire_at: Date; n: number }[]>`
      SELECT schedule_id, fire_at, count(*)::int AS n FROM tasks WHERE schedule_id IS NOT NULL GROUP BY 1, 2`;
    expect(rows.every((row) => row.n === 1)).toBe(true);
    // Ten fire times each, all within the hour's window.
    expect(rows).toHaveLength(ids.length * 10);
  });
});

describe("catch-up after downtime: ten overdue fire times", () => {
  test("mode all runs those within the window and records the older ones missed", async () => {
    const id = await overdueSchedule({ catch_up: { window: "5m", mode: "all" } });
    await pass();
    const rows = await firings(id);
    expect(rows.map((r) => r.outcome)).toEqual([...Array(5).fill("missed"), ...Array(5).fill("created")]);
    const view = await call("GET", `/schedules/${id}`);
    expect(view.json.firings.filter((f: { outcome: string }) => f.outcome === "missed")).toHaveLength(5);
  });

  test("mode latest runs the newest and records nine missed", async () => {
    const id = await overdueSchedule({ catch_up: { window: "1h", mode: "latest" } });
    await pass();
    expect((await firings(id)).map((r) => r.outcome)).toEqual([...Array(9).fill("missed"), "created"]);
  });

  test("mode none runs none and records ten missed", async () => {
    const id = await overdueSchedule({ catch_up: { window: "1h", mode: "none" } });
    await pass();
    expect((await firings(id)).map((r) => r.outcome)).toEqual(Array(10).fill("missed"));
    const [count] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks WHERE schedule_id = ${id}`;
    expect(count!.n).toBe(0);
  });

  test("a paused schedule fires nothing; resumed, it catches up by its rule", async () => {
    const id = await overdueSchedule({ catch_up: { window: "1h", mode: "latest" } });
    await call("POST", `/schedules/${id}/pause`);
    expect(await pass()).toBe(0);
    expect(await firings(id)).toHaveLength(0);
    await call("POST", `/schedules/${id}/resume`);
    await pass();
    expect((await firings(id)).map((r) => r.outcome)).toEqual([...Array(9).fill("missed"), "created"]);
  });
});

describe("overlap while the previous firing's task is live", () => {
  test("allow runs every firing", async () => {
    const id = await overdueSchedule({ overlap: "allow", catch_up: { window: "1h", mode: "all" } });
    await pass();
    expect((await firings(id)).map((r) => r.outcome)).toEqual(Array(10).fill("created"));
  });

  test("skip records the firings skipped while one is live", async () => {
    const id = await overdueSchedule({ overlap: "skip", catch_up: { window: "1h", mode: "all" } });
    await pass();
    expect((await firings(id)).map((r) => r.outcome)).toEqual(["created", ...Array(9).fill("skipped")]);
    const trigger = await call("POST", `/schedules/${id}/trigger`);
    expect(trigger.json.outcome).toBe("skipped");
  });

  test("buffer_one holds one firing back until the live task ends, then runs it", async () => {
    const id = await overdueSchedule({ overlap: "buffer_one", catch_up: { window: "1h", mode: "all" } });
    await pass();
    const rows = await firings(id);
    expect(rows.map((r) => r.outcome)).toEqual(["created", "buffered", ...Array(8).fill("skipped")]);
    // Still live: the buffered firing waits.
    await pass();
    expect((await firings(id))[1]!.outcome).toBe("buffered");
    await cancelTask(db.sql, rows[0]!.task_id!);
    await pass();
    const after = await firings(id);
    expect(after[1]!.outcome).toBe("created");
    const [task] = await db.sql<
      { fire_at: Date; state: string }[]
    >`SELECT fire_at, state FROM tasks WHERE id = ${after[1]!.task_id}`;
    expect(task).toEqual({ fire_at: rows[1]!.fire_at, state: "queued" });
    expect((await call("GET", `/schedules/${id}`)).json.buffered_fire_at).toBeNull();
  });

  test("cancel_previous cancels the live task, then runs", async () => {
    const id = await overdueSchedule({ overlap: "cancel_previous", catch_up: { window: "1h", mode: "latest" } });
    await pass();
    const [first] = (await firings(id)).filter((r) => r.outcome === "created");
    const trigger = await call("POST", `/schedules/${id}/trigger`);
    expect(trigger.json.outcome).toBe("created");
    const [old] = await db.sql<{ state: string }[]>`SELECT state FROM tasks WHERE id = ${first!.task_id}`;
    expect(old!.state).toBe("cancelled");
    const [fresh] = await db.sql<{ state: string }[]>`SELECT state FROM tasks WHERE id = ${trigger.json.task_id}`;
    expect(fresh!.state).toBe("queued");
  });
});
