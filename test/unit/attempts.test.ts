// The attempts a worker holds, without a coordinator: an early hand-over waits for its start
// time, one stopped while it waits never starts, and a running one reports once it has exited.
import { expect, test } from "bun:test";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { type Assign, AssignSchema, type TaskRef, TaskRefSchema } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { type AttemptEvents, Attempts, type AttemptsOptions, REFUSED_UNTRUSTED } from "../../src/worker/attempts";
import type { RunResult } from "../../src/worker/executor";
import { HOST_GATE_WINDOW_MS, HostGates } from "../../src/worker/start-gate";
import { eventually } from "../support/eventually";

type Event =
  | { kind: "started"; ref: TaskRef; pid: number }
  | { kind: "finished"; ref: TaskRef; result: RunResult; stopReason: string | undefined; interrupted: boolean }
  | { kind: "notStarted"; ref: TaskRef; outcome: "cancelled" | "abandoned"; why: string; interrupted: boolean };

/** Attempts whose events are recorded; next() resolves with the next event. */
function attempts(gate?: (key: string, receivedAt: number) => "start" | "hold" | "refuse", more: Partial<AttemptsOptions> = {}) {
  const events: Event[] = [];
  const waiting: Array<(event: Event) => void> = [];
  const record = (event: Event) => {
    events.push(event);
    waiting.shift()?.(event);
  };
  const sink: AttemptEvents = {
    started: (ref, pid) => record({ kind: "started", ref, pid }),
    finished: (ref, result, stopReason, interrupted) => record({ kind: "finished", ref, result, stopReason, interrupted }),
    notStarted: (ref, outcome, why, interrupted) => record({ kind: "notStarted", ref, outcome, why, interrupted }),
  };
  const held = new Attempts({
    log: silentLogger,
    killGraceMs: 2000,
    maxOutputBytes: 1000,
    baseEnv: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
    events: sink,
    gate,
    ...more,
  });
  let seen = 0;
  const next = (): Promise<Event> => {
    const at = seen++;
    const event = events[at];
    return event ? Promise.resolve(event) : new Promise((resolve) => waiting.push(resolve));
  };
  return { held, events, next };
}

const ref = (taskId: string): TaskRef => create(TaskRefSchema, { taskId, attempt: 1 });

function assign(taskId: string, command: string, startInMs = 0): Assign {
  return create(AssignSchema, { ref: { taskId, attempt: 1 }, command, startInMs });
}

test("an attempt cancelled while it waits for its start time never starts and is reported at once", async () => {
  const { held, events } = attempts();
  held.take(assign("t-wait", "true", 60_000));
  expect(held.size).toBe(1);
  expect(held.refs().map((r) => r.taskId)).toEqual(["t-wait"]);
  expect(held.holds(ref("t-wait"))).toBe(true);
  expect(held.holds(ref("t-other"))).toBe(false);
  held.cancel(ref("t-wait"), "");
  expect(events).toEqual([
    {
      kind: "notStarted",
      ref: expect.objectContaining({ taskId: "t-wait" }),
      outcome: "cancelled",
      why: "cancelled",
      interrupted: false,
    },
  ]);
  expect(held.size).toBe(0);
  await held.empty();
});

test("releaseWaiting hands back only what waits; a running attempt reports its own result", async () => {
  const { held, next } = attempts();
  held.take(assign("t-run", "echo ran"));
  held.take(assign("t-early", "true", 60_000));
  const started = await next();
  expect(started).toMatchObject({ kind: "started", ref: { taskId: "t-run" } });
  held.releaseWaiting("the worker is draining", "interrupted");
  expect(await next()).toMatchObject({
    kind: "notStarted",
    ref: { taskId: "t-early" },
    outcome: "abandoned",
    why: "the worker is draining",
    interrupted: true,
  });
  const emptied = held.empty();
  const finished = await next();
  expect(finished).toMatchObject({ kind: "finished", ref: { taskId: "t-run" }, stopReason: undefined });
  if (finished.kind !== "finished") throw new Error("expected a result");
  expect(finished.result.outcome).toBe("exited");
  expect(finished.result.stdout).toBe("ran\n");
  await emptied;
  expect(held.size).toBe(0);
});

test("a cancelled running attempt is stopped through its process group and reports the coordinator's reason", async () => {
  const { held, next } = attempts();
  held.take(assign("t-long", "sleep 100"));
  expect(await next()).toMatchObject({ kind: "started", ref: { taskId: "t-long" } });
  held.cancel(ref("t-long"), "cancelled by the user");
  expect(held.size).toBe(1); // still held until its group has exited
  const finished = await next();
  expect(finished).toMatchObject({ kind: "finished", stopReason: "cancelled by the user" });
  if (finished.kind !== "finished") throw new Error("expected a result");
  expect(finished.result.outcome).toBe("cancelled");
  expect(held.size).toBe(0);
});

test("abandonAll hands back waiting and running attempts alike", async () => {
  const { held, next } = attempts();
  held.take(assign("t-long", "sleep 100"));
  expect(await next()).toMatchObject({ kind: "started" });
  held.take(assign("t-early", "true", 60_000));
  held.abandonAll("the lease lapsed while the worker was cut off", "lost");
  expect(await next()).toMatchObject({
    kind: "notStarted",
    ref: { taskId: "t-early" },
    outcome: "abandoned",
    interrupted: false,
  });
  const finished = await next();
  if (finished.kind !== "finished") throw new Error("expected a result");
  expect(finished.result.outcome).toBe("abandoned");
  expect(finished).toMatchObject({ stopReason: "the lease lapsed while the worker was cut off", interrupted: false });
  await held.empty();
});

test("a drain's hand-back of a running attempt says it was interrupted; the first hand-back's cause stands", async () => {
  const { held, next } = attempts();
  held.take(assign("t-drained", "sleep 100"));
  held.take(assign("t-lapsed", "sleep 100"));
  expect(await next()).toMatchObject({ kind: "started" });
  expect(await next()).toMatchObject({ kind: "started" });
  held.abandonAll("the worker is draining", "interrupted");
  held.abandonAll("the lease lapsed while the worker was cut off", "lost");
  const results = [await next(), await next()];
  for (const finished of results) {
    expect(finished).toMatchObject({ kind: "finished", stopReason: "the worker is draining", interrupted: true });
  }
  await held.empty();
});

test("the gate holds an attempt back until it is resumed, or refuses it: handed back, interrupted, never started", async () => {
  let decision: "start" | "hold" | "refuse" = "hold";
  const { held, events, next } = attempts(() => decision);
  held.take(assign("t-held", "true"));
  expect(events).toEqual([]);
  expect(held.parked().map((p) => p.key)).toEqual(["t-held:1"]);
  held.resumeParked("t-held:1", "start");
  expect((await next()).kind).toBe("started");
  expect((await next()).kind).toBe("finished");

  decision = "refuse";
  held.take(assign("t-refused", "true"));
  expect(events.at(-1)).toEqual({
    kind: "notStarted",
    ref: ref("t-refused"),
    outcome: "abandoned",
    why: REFUSED_UNTRUSTED,
    interrupted: true,
  });

  decision = "hold";
  held.take(assign("t-held-then-refused", "true"));
  held.resumeParked("t-held-then-refused:1", "refuse");
  expect(events.at(-1)).toMatchObject({ kind: "notStarted", outcome: "abandoned", why: REFUSED_UNTRUSTED, interrupted: true });
  expect(held.size).toBe(0);
});

test("a fenced running attempt is stopped through its process group and handed back as lost", async () => {
  const { held, next } = attempts();
  held.take(assign("t-fenced", "sleep 30"));
  expect((await next()).kind).toBe("started");
  expect(held.fence("t-fenced:1", "the lease ran out on the worker", 100)).toBe(true);
  const finished = await next();
  expect(finished).toMatchObject({ kind: "finished", stopReason: "the lease ran out on the worker", interrupted: false });
  if (finished.kind === "finished") expect(finished.result.outcome).toBe("abandoned");
  expect(held.fence("t-fenced:1", "again", 100)).toBe(false);
});

/** Attempts whose `changed` hook resolves armed() once an attempt's process group is known. */
function armedAttempts() {
  const events: Event[] = [];
  let onArmed: ((pgid: number) => void) | null = null;
  const held: Attempts = new Attempts({
    log: silentLogger,
    killGraceMs: 2000,
    maxOutputBytes: 1000,
    baseEnv: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
    events: {
      started: (r, pid) => events.push({ kind: "started", ref: r, pid }),
      finished: (r, result, stopReason, interrupted) =>
        events.push({ kind: "finished", ref: r, result, stopReason, interrupted }),
      notStarted: (r, outcome, why, interrupted) => events.push({ kind: "notStarted", ref: r, outcome, why, interrupted }),
    },
    changed: () => {
      const pgid = held.processes()[0]?.pgid;
      if (pgid != null && onArmed) onArmed(pgid);
    },
  });
  const armed = () => new Promise<number>((resolve) => (onArmed = resolve));
  return { held, events, armed };
}

const groupAlive = (pgid: number) => {
  try {
    process.kill(-pgid, 0);
    return true;
  } catch {
    return false;
  }
};

test("an early hand-over is spawned while it waits, held before its command, and released at its start time", async () => {
  const dir = mkdtempSync(join(tmpdir(), "attempts-armed-"));
  try {
    const marker = join(dir, "ran");
    const { held, events, armed } = armedAttempts();
    const startInMs = 300;
    const waiting = armed();
    const takenAt = performance.now();
    held.take(assign("t-armed", `touch '${marker}'`, startInMs));
    const pgid = await waiting;
    // Its process group exists before its start, and the watchdog is told of it; the command has not run.
    expect(groupAlive(pgid)).toBe(true);
    expect(existsSync(marker)).toBe(false);
    expect(events).toEqual([]);
    await held.empty();
    const started = events.find((e) => e.kind === "started");
    expect(started).toMatchObject({ kind: "started", pid: pgid });
    const finished = events.find((e) => e.kind === "finished");
    if (finished?.kind !== "finished") throw new Error(`no finish: ${JSON.stringify(events)}`);
    expect(finished.result).toMatchObject({ outcome: "exited", exitCode: 0 });
    // Never early: the command started no sooner than its start time after the Assign was taken.
    expect(finished.result.startedAt.getTime()).toBeGreaterThanOrEqual(
      Math.floor(performance.timeOrigin + takenAt + startInMs) - 1,
    );
    expect(existsSync(marker)).toBe(true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("an armed early hand-over cancelled before its start never runs, and is reported only once its process is gone", async () => {
  const dir = mkdtempSync(join(tmpdir(), "attempts-armed-"));
  try {
    const marker = join(dir, "ran");
    const { held, events, armed } = armedAttempts();
    const waiting = armed();
    held.take(assign("t-armed-cancel", `touch '${marker}'`, 60_000));
    const pgid = await waiting;
    held.cancel(ref("t-armed-cancel"), "not wanted");
    held.cancel(ref("t-armed-cancel"), "twice");
    held.releaseWaiting("draining", "interrupted");
    await held.empty();
    expect(events).toEqual([
      { kind: "notStarted", ref: ref("t-armed-cancel"), outcome: "cancelled", why: "not wanted", interrupted: false },
    ]);
    expect(groupAlive(pgid)).toBe(false);
    expect(existsSync(marker)).toBe(false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("attempts due at one time (one due_at_ms) start together on one gate, at the earliest count; one cancelled meanwhile never runs", async () => {
  const dir = mkdtempSync(join(tmpdir(), "attempts-gate-"));
  try {
    const marker = (name: string) => join(dir, name);
    const { held, events } = armedAttempts();
    const dueAtMs = Date.now() + 400;
    const due = (taskId: string, startInMs: number) =>
      create(AssignSchema, { ref: { taskId, attempt: 1 }, command: `touch '${marker(taskId)}'`, startInMs, dueAtMs });
    const firstTaken = performance.now();
    held.take(due("g-1", 400));
    held.take(due("g-cancelled", 400));
    await Bun.sleep(150);
    // Taken 150 ms later with the same count: by itself it would start 150 ms after the others.
    const lateTaken = performance.now();
    held.take(due("g-late", 400));
    held.cancel(ref("g-cancelled"), "not wanted");
    await held.empty();
    const started = (taskId: string) => {
      const finished = events.find((e) => e.kind === "finished" && e.ref.taskId === taskId);
      if (finished?.kind !== "finished") throw new Error(`no finish of ${taskId}: ${JSON.stringify(events)}`);
      expect(finished.result).toMatchObject({ outcome: "exited", exitCode: 0 });
      return finished.result.startedAt.getTime();
    };
    const earliest = Math.floor(performance.timeOrigin + firstTaken + 400) - 1;
    // Never early: not before the earliest count of their shared due time.
    expect(started("g-1")).toBeGreaterThanOrEqual(earliest);
    expect(started("g-late")).toBeGreaterThanOrEqual(earliest);
    // Together: the late one started with the first, well before its own count.
    expect(started("g-late")).toBeLessThan(performance.timeOrigin + lateTaken + 400 - 50);
    expect(existsSync(marker("g-1"))).toBe(true);
    expect(existsSync(marker("g-late"))).toBe(true);
    expect(existsSync(marker("g-cancelled"))).toBe(false);
    expect(events).toContainEqual({
      kind: "notStarted",
      ref: ref("g-cancelled"),
      outcome: "cancelled",
      why: "not wanted",
      interrupted: false,
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("an armed attempt held back at its start on a shared gate runs only once resumed, and once; the one due with it runs at its time", async () => {
  const dir = mkdtempSync(join(tmpdir(), "attempts-gate-hold-"));
  try {
    const out = (name: string) => join(dir, name);
    const { held, events } = attempts((key) => (key.startsWith("h-held") ? "hold" : "start"));
    const dueAtMs = Date.now() + 300;
    for (const taskId of ["h-held", "h-free"])
      held.take(
        create(AssignSchema, { ref: { taskId, attempt: 1 }, command: `echo x >> '${out(taskId)}'`, startInMs: 300, dueAtMs }),
      );
    await eventually(() => events.find((e) => e.kind === "finished" && e.ref.taskId === "h-free") ?? null, {
      what: "the free one's finish",
    });
    expect(held.parked().map((p) => p.key)).toEqual(["h-held:1"]);
    expect(existsSync(out("h-held"))).toBe(false);
    held.resumeParked("h-held:1", "start");
    await held.empty();
    expect(await Bun.file(out("h-held")).text()).toBe("x\n");
    expect(await Bun.file(out("h-free")).text()).toBe("x\n");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** Host gates in a folder of their own (one per "host"), or the test fails where there are none. */
function hostGatesIn(dir: string): HostGates {
  const gates = HostGates.open(join(dir, "gates"));
  if (typeof gates === "string") throw new Error(`no host gates on this host: ${gates}`);
  return gates;
}

function finishedStart(events: Event[], taskId: string): number {
  const finished = events.find((e) => e.kind === "finished" && e.ref.taskId === taskId);
  if (finished?.kind !== "finished") throw new Error(`no finish of ${taskId}: ${JSON.stringify(events)}`);
  expect(finished.result).toMatchObject({ outcome: "exited", exitCode: 0 });
  return finished.result.startedAt.getTime();
}

test("two workers' attempts due at one time share a host gate: the first one's start lets the other's go, recorded at that time", async () => {
  const dir = mkdtempSync(join(tmpdir(), "attempts-host-gate-"));
  try {
    const trusted = { leaseHolds: () => true };
    const a = attempts(undefined, { hostGates: hostGatesIn(dir), ...trusted });
    const b = attempts(undefined, { hostGates: hostGatesIn(dir), ...trusted });
    const dueAtMs = Date.now() + 300;
    const marker = join(dir, "b-ran");
    a.held.take(create(AssignSchema, { ref: { taskId: "a-1", attempt: 1 }, command: "true", startInMs: 300, dueAtMs }));
    // Worker b reads the database's clock 2 s behind: by itself it would start 2 s late.
    b.held.take(
      create(AssignSchema, { ref: { taskId: "b-1", attempt: 1 }, command: `echo x >> '${marker}'`, startInMs: 2300, dueAtMs }),
    );
    // b's command ran with a's start, long before b's own timer (nothing of b's started yet).
    await eventually(() => (existsSync(marker) ? true : null), { what: "b's command run by a's opening", timeoutMs: 1500 });
    expect(b.events.some((e) => e.kind === "started")).toBe(false);
    await a.held.empty();
    await b.held.empty();
    const aStarted = finishedStart(a.events, "a-1");
    // Never early, and b's start is a's opening, not its own late count.
    expect(aStarted).toBeGreaterThanOrEqual(dueAtMs - 1);
    expect(finishedStart(b.events, "b-1")).toBe(aStarted);
    // b's command ran once: the run a's opening let go, ended before b's own start came, is
    // b's result (no fresh spawn at b's start).
    expect(readFileSync(marker, "utf8")).toBe("x\n");
    // One opening, by a: b found it and wrote none.
    expect(readFileSync(join(dir, "gates", `${dueAtMs}.opened`), "utf8")).toBe(`${aStarted}\n`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a worker past a host gate's window gives it up: its shell there is killed and its command spawned afresh, once", async () => {
  const dir = mkdtempSync(join(tmpdir(), "attempts-host-window-"));
  try {
    const out = join(dir, "out");
    const { held, events } = attempts(undefined, { hostGates: hostGatesIn(dir), leaseHolds: () => true });
    const dueAtMs = Date.now() + 200;
    held.take(
      create(AssignSchema, { ref: { taskId: "w-1", attempt: 1 }, command: `echo x >> '${out}'`, startInMs: 200, dueAtMs }),
    );
    // Armed on the host gate (the FIFO is there), then the event loop held past the window.
    await eventually(() => (readdirSync(join(dir, "gates")).includes(String(dueAtMs)) ? true : null), {
      what: "the host gate's FIFO",
    });
    const until = performance.now() + 200 + HOST_GATE_WINDOW_MS + 100;
    while (performance.now() < until) {
      // a worker blocked past the window
    }
    await held.empty();
    expect(finishedStart(events, "w-1")).toBeGreaterThanOrEqual(dueAtMs + HOST_GATE_WINDOW_MS);
    expect(readFileSync(out, "utf8")).toBe("x\n");
    // Not opened, and given up for every worker of the host.
    expect(readFileSync(join(dir, "gates", `${dueAtMs}.opened`), "utf8")).toBe("given up\n");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("an attempt whose lease does not outlast a host gate's window is not put on one", async () => {
  const dir = mkdtempSync(join(tmpdir(), "attempts-host-lease-"));
  try {
    const leaseAsked: number[] = [];
    const { held, events } = attempts(undefined, {
      hostGates: hostGatesIn(dir),
      leaseHolds: (_key, until) => {
        leaseAsked.push(until - performance.now());
        return false;
      },
    });
    const dueAtMs = Date.now() + 200;
    held.take(create(AssignSchema, { ref: { taskId: "l-1", attempt: 1 }, command: "true", startInMs: 200, dueAtMs }));
    await held.empty();
    expect(finishedStart(events, "l-1")).toBeGreaterThanOrEqual(dueAtMs - 1);
    // Asked for the window and a second past the instant; no FIFO made.
    expect(leaseAsked.length).toBeGreaterThan(0);
    expect(leaseAsked[0]!).toBeGreaterThan(HOST_GATE_WINDOW_MS + 900);
    expect(readdirSync(join(dir, "gates"))).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
