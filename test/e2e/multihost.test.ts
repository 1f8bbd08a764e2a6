// One live copy across hosts: PostgreSQL and a coordinator on the server host, two workers on
// two other hosts (network namespaces joined by veth links, test/support/netns.ts), the
// coordinator listening beyond loopback with TLS, API tokens and a join token. A worker's
// link is cut mid-task and healed, a worker is SIGKILLed or frozen as a whole, and the
// coordinator is restarted under load. Each task's command logs its start and end with
// `date +%s%N` and its pid, and at its start counts the live processes of earlier attempts
// (test/support/attempt-log.ts): that file, not the database, says whether two attempts of a
// task were ever alive at once. Timings (rescue within the lease plus 500 ms) are the failover
// bench's to assert (bench/failover.ts); here only order and cause. Skipped, with the reason,
// only where the machine cannot make network namespaces (not root, no CAP_NET_ADMIN).
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { rmSync } from "node:fs";
import {
  type AttemptSpan,
  attemptSpans,
  createAttemptLog,
  describeOverlap,
  loggedCommand,
  overlaps,
  readAttemptLog,
} from "../support/attempt-log";
import { HOOK_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { type NetCluster, type NetWorker, startNetCluster } from "../support/net-cluster";
import { netnsUnavailable } from "../support/netns";
import { taskDir } from "../support/task-dir";

setDefaultTimeout(90_000);

const unavailable = netnsUnavailable();
if (unavailable) console.warn(`multihost tests skipped: ${unavailable}`);

/** The short lease the partition tests submit with: rescue after 4 s of silence. */
const SHORT_LEASE_MS = 4000;
const HEARTBEAT = { TQ_HEARTBEAT_INTERVAL_MS: "200", TQ_HEARTBEAT_TIMEOUT_MS: "1000" };

const db = useTestDatabase();
let cluster: NetCluster;
let dir: string;
let log: string;

describe.skipIf(unavailable !== null)("multihost", () => {
  beforeAll(async () => {
    dir = taskDir("tq-multihost-");
    log = createAttemptLog(dir);
    cluster = await startNetCluster(db.url, { hosts: 2, slots: 2, env: { ...HEARTBEAT, TQ_LOG_LEVEL: "info" } });
  }, HOOK_TIMEOUT_MS);

  afterAll(async () => {
    await cluster?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, HOOK_TIMEOUT_MS);

  interface Event {
    kind: string;
    attempt: number;
    worker_id: string | null;
    reason: string | null;
    outcome: string | null;
  }
  const history = (id: string) =>
    db.sql<Event[]>`
      SELECT kind, attempt, worker_id, detail ->> 'reason' AS reason, detail ->> 'outcome' AS outcome
      FROM task_events WHERE task_id = ${id} ORDER BY id`;
  const spansOf = (id: string): AttemptSpan[] => attemptSpans(readAttemptLog(log)).filter((s) => s.task === id);
  const state = async (id: string) =>
    (await db.sql<{ state: string; attempt: number }[]>`SELECT state, attempt FROM tasks WHERE id = ${id}`)[0];
  const attemptWorker = async (id: string, attempt: number) =>
    (await db.sql<{ worker_id: string }[]>`SELECT worker_id FROM task_attempts WHERE task_id = ${id} AND attempt = ${attempt}`)[0]
      ?.worker_id;

  /**
   * Before a scenario: every host has a live worker (one a failed scenario left dead or frozen
   * is replaced or thawed) and no task is in flight.
   */
  async function settled(): Promise<void> {
    for (const w of [...cluster.workers]) {
      w.process.signalGroup("SIGCONT");
      cluster.network.hosts[w.host]!.heal();
      const proc = w.process.proc;
      if (proc.exitCode !== null || proc.signalCode !== null) await cluster.startWorker(w.host);
    }
    await eventually(
      async () => {
        const rows = await db.sql<
          { n: number }[]
        >`SELECT count(*)::int AS n FROM tasks WHERE state IN ('queued', 'dispatched', 'running')`;
        return rows[0]?.n === 0;
      },
      { what: "no task in flight", timeoutMs: 30_000 },
    );
  }

  /** Submits `body` logged, waits until its first attempt runs; returns the task and which host runs it. */
  async function startTask(
    body: string,
    extra: Record<string, unknown> = {},
  ): Promise<{ id: string; a: NetWorker; b: NetWorker; first: AttemptSpan }> {
    const id = await cluster.submit({ command: loggedCommand(log, body), max_attempts: 3, ...extra });
    const first = await eventually(() => spansOf(id)[0], { what: `task ${id}'s first attempt to start`, timeoutMs: 15_000 });
    const workerId = await eventually(() => attemptWorker(id, 1), { what: `task ${id}'s first attempt row` });
    const a = cluster.byId(workerId);
    if (!a) throw new Error(`task ${id} runs on unknown worker ${workerId}`);
    const b = cluster.workers[1 - a.host]!;
    return { id, a, b, first };
  }

  const nextAttempt = (id: string) =>
    eventually(() => spansOf(id).find((s) => s.attempt >= 2), { what: `task ${id}'s next attempt to start`, timeoutMs: 20_000 });

  const final = (id: string) =>
    eventually(
      async () => {
        const row = await state(id);
        return row && ["succeeded", "failed", "timed_out", "cancelled"].includes(row.state) ? row : null;
      },
      { what: `task ${id} to be final`, timeoutMs: 40_000 },
    );

  /**
   * The one-live-copy checks for a task rescued from worker `a` to worker `b`: A's processes
   * were gone when B's attempt started (by the attempt log's own /proc count, and by the spans),
   * exactly one success and it is B's.
   */
  async function oneLiveCopy(id: string, a: NetWorker, b: NetWorker, first: AttemptSpan, next: AttemptSpan): Promise<Event[]> {
    const done = await final(id);
    expect(done.state).toBe("succeeded");
    const found = overlaps(readAttemptLog(log)).filter((o) => o.task === id);
    expect(found.map(describeOverlap)).toEqual([]);
    expect(next.aliveAtStart).toBe(0);
    if (first.end !== null) expect(first.end).toBeLessThan(next.start);
    expect(await attemptWorker(id, next.attempt)).toBe(b.id);
    const events = await history(id);
    const successes = events.filter((e) => e.kind === "succeeded");
    expect(successes.map((e) => [e.attempt, e.worker_id])).toEqual([[next.attempt, b.id]]);
    expect(events.some((e) => e.kind === "succeeded" && e.worker_id === a.id)).toBe(false);
    return events;
  }

  /** A stopped (fenced) the attempt, and said so, no later than B's start. */
  async function aStoppedFirst(a: NetWorker, first: AttemptSpan, next: AttemptSpan): Promise<void> {
    const stopped = await a.process.waitForEvent("worker.task_stopped", {
      where: (line) => Number(line.task_pid) === first.pid,
      what: `the stop of attempt ${first.attempt} (pid ${first.pid})`,
      timeoutMs: 20_000,
    });
    const stoppedAtMs = Date.parse(String(stopped.time));
    expect(stoppedAtMs).toBeLessThanOrEqual(Number(next.start / 1_000_000n));
  }

  /** A's late report of the superseded attempt leaves a `stale` row once A is back. */
  async function lateReportIsStale(id: string, a: NetWorker, attempt: number): Promise<void> {
    await eventually(
      async () => (await history(id)).some((e) => e.kind === "stale" && e.attempt === attempt && e.worker_id === a.id),
      { what: `a stale event for task ${id} attempt ${attempt} from worker ${a.id}`, timeoutMs: 30_000 },
    );
  }

  async function partition(holdMs: "until-rescue" | number): Promise<void> {
    await settled();
    const { id, a, b, first } = await startTask("sleep 6", { lease_ms: SHORT_LEASE_MS });
    const host = cluster.network.hosts[a.host]!;
    const cutAt = performance.now();
    host.cut();
    let next: AttemptSpan;
    try {
      next = await nextAttempt(id);
      if (holdMs !== "until-rescue") await Bun.sleep(Math.max(0, cutAt + holdMs - performance.now()));
    } finally {
      host.heal();
    }
    const events = await oneLiveCopy(id, a, b, first, next);
    // Rescued because its lease ran out, not because a stream closed or a heartbeat was missed.
    const requeue = events.find((e) => e.kind === "requeued" && e.attempt === first.attempt);
    expect(requeue?.reason ?? "").toContain("lease");
    await aStoppedFirst(a, first, next);
    await lateReportIsStale(id, a, first.attempt);
  }

  test("a link cut healed right after the rescue: one live copy, B's success, A's late report stale", async () => {
    await partition("until-rescue");
  });

  test("a link cut for 12 s: one live copy, B's success, A's late report stale", async () => {
    await partition(12_000);
  });

  test("a link cut shorter than the lease stops nothing and reruns nothing", async () => {
    await settled();
    const { id, a } = await startTask("sleep 5", { lease_ms: 8000 });
    const host = cluster.network.hosts[a.host]!;
    host.cut();
    // Longer than the heartbeat timeout (the coordinator hears nothing from A), shorter than the lease.
    await Bun.sleep(2000);
    host.heal();
    const done = await final(id);
    expect(done).toEqual({ state: "succeeded", attempt: 1 });
    expect(spansOf(id).map((s) => s.attempt)).toEqual([1]);
    const events = await history(id);
    expect(events.filter((e) => ["requeued", "stale", "failed"].includes(e.kind)).map((e) => e.kind)).toEqual([]);
    expect(events.filter((e) => e.kind === "succeeded").map((e) => e.worker_id)).toEqual([a.id]);
    expect(a.process.logged("worker.task_stopped").filter((line) => line.task_id === id)).toEqual([]);
  });

  test("a worker SIGKILLed as a whole: its task's processes are gone before the next attempt starts", async () => {
    await settled();
    const { id, a, b, first } = await startTask("sleep 6");
    a.process.signalGroup("SIGKILL");
    await a.process.exited;
    const next = await nextAttempt(id);
    await oneLiveCopy(id, a, b, first, next);
    await cluster.startWorker(a.host);
  });

  test("a worker frozen as a whole (SIGSTOP): its task's processes are gone before the next attempt starts", async () => {
    await settled();
    const { id, a, b, first } = await startTask("sleep 6");
    const connects = a.process.logged("worker.connected").length;
    a.process.signalGroup("SIGSTOP");
    let next: AttemptSpan;
    try {
      next = await nextAttempt(id);
    } finally {
      a.process.signalGroup("SIGCONT");
    }
    await oneLiveCopy(id, a, b, first, next);
    // Thawed, it reconnects, unless its watchdog killed it as frozen (the next scenario's
    // settled() then starts a new one).
    const reconnect = a.process.waitFor(
      (line) => line.event === "worker.connected" && a.process.logged("worker.connected").length > connects,
      "a reconnect after SIGCONT",
      20_000,
    );
    await Promise.race([reconnect.catch(() => {}), a.process.exited]);
  });

  test("a coordinator restarted for 10 s under load stops and reruns no task", async () => {
    await settled();
    // Long tasks on every slot, with the default lease (30 s): longer than the outage.
    const ids = await Promise.all([0, 1, 2, 3].map(() => cluster.submit({ command: loggedCommand(log, "sleep 20") })));
    await eventually(() => ids.every((id) => spansOf(id).length > 0), { what: "all four tasks running", timeoutMs: 15_000 });
    const stoppedBefore = cluster.workers.map((w) => w.process.logged("worker.task_stopped").length);
    await cluster.restartCoordinator(10_000);
    for (const id of ids) expect(await final(id)).toEqual({ state: "succeeded", attempt: 1 });
    for (const id of ids) expect(spansOf(id).map((s) => s.attempt)).toEqual([1]);
    const rerun = await db.sql<{ kind: string }[]>`
      SELECT kind FROM task_events WHERE task_id IN ${db.sql(ids)} AND kind IN ('requeued', 'stale', 'failed')`;
    expect(rerun.map((r) => r.kind)).toEqual([]);
    expect(cluster.workers.map((w) => w.process.logged("worker.task_stopped").length)).toEqual(stoppedBefore);
  });
});
