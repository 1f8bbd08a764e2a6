// gRPC round trips against a real coordinator (in this process) on a real database: the
// TaskService a client uses, and the WorkerService stream a worker speaks, driven by hand.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { connect } from "node:net";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { loadConfig } from "../../src/config";
import { Coordinator } from "../../src/coordinator/coordinator";
import { claimDue } from "../../src/db/claim";
import { TaskChangeFeed } from "../../src/db/notify";
import { finishAttempt } from "../../src/db/transitions";
import { AttemptOutcome, TaskState } from "../../src/gen/taskqueue/v1/task_pb";
import {
  type ListAttemptsResponse,
  type ListTaskEventsResponse,
  type ListTasksResponse,
  type SubmitTaskResponse,
  TaskService,
  type WatchTaskResponse,
} from "../../src/gen/taskqueue/v1/task_service_pb";
import {
  type CoordinatorMessage,
  Outcome,
  type WorkerMessage,
  WorkerMessageSchema,
  WorkerService,
} from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { clientConstructor } from "../../src/rpc/definitions";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { attemptResult } from "../support/factories";
import { expectNoTimersSince, timerMark } from "../support/leaks";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let coordinator: Coordinator;
let address: string;
let tasks: grpc.Client & Record<string, Function>;

const TaskClient = clientConstructor(TaskService);
const WorkerClient = clientConstructor(WorkerService);

function call<Res>(method: string, request: object, metadata = new grpc.Metadata()): Promise<Res> {
  return new Promise((resolve, reject) =>
    tasks[method]!(request, metadata, (error: grpc.ServiceError | null, response: Res) =>
      error ? reject(error) : resolve(response),
    ),
  );
}

/**
 * The gRPC status code a call failed with. (Not expect().rejects: Bun waits for that promise
 * in a nested loop that stalls grpc-js when client and server share this process.)
 */
async function failure(promise: Promise<unknown>): Promise<number | "resolved"> {
  try {
    await promise;
    return "resolved";
  } catch (error) {
    return (error as grpc.ServiceError).code;
  }
}

let timersBefore = 0;

beforeAll(async () => {
  timersBefore = timerMark();
  const config = loadConfig({
    TQ_COORDINATOR_PORT: String(await freePort()),
    TQ_GRPC_PORT: String(await freePort()),
    TQ_HEARTBEAT_INTERVAL_MS: "200",
    TQ_HEARTBEAT_TIMEOUT_MS: "1000",
  });
  coordinator = new Coordinator(config, db.url, silentLogger);
  address = (await coordinator.start()).grpcAddress;
  tasks = new TaskClient(address, grpc.credentials.createInsecure()) as typeof tasks;
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  tasks?.close();
  await coordinator?.stop();
  // Its loops and streams, and every client the tests opened: nothing left armed. (The tests'
  // own pool keeps idle timers; the coordinator's pool is checked as a connection at the end.)
  expectNoTimersSince(timersBefore, "Coordinator.stop()", { besides: ["node_modules/postgres/"] });
}, HOOK_TIMEOUT_MS);

/** A hand-driven worker stream that queues what the coordinator sends. */
function openWorker() {
  const client = new WorkerClient(address, grpc.credentials.createInsecure(), { "grpc.use_local_subchannel_pool": 1 });
  const stream = (client as unknown as { connect(): grpc.ClientDuplexStream<WorkerMessage, CoordinatorMessage> }).connect();
  const inbox: CoordinatorMessage[] = [];
  let waiting: ((m: CoordinatorMessage) => void) | null = null;
  const closed = new Promise<grpc.ServiceError | null>((resolve) => {
    stream.on("error", (error: grpc.ServiceError) => resolve(error));
    stream.on("end", () => resolve(null));
  });
  stream.on("data", (message: CoordinatorMessage) => {
    if (waiting) {
      const w = waiting;
      waiting = null;
      w(message);
    } else inbox.push(message);
  });
  return {
    send: (payload: MessageInitShape<typeof WorkerMessageSchema>["payload"]) =>
      stream.write(create(WorkerMessageSchema, { payload })),
    next: (): Promise<CoordinatorMessage> =>
      inbox.length > 0 ? Promise.resolve(inbox.shift()!) : new Promise((resolve) => (waiting = resolve)),
    closed,
    close() {
      stream.end();
      client.close();
    },
  };
}

describe("TaskService", () => {
  test("SubmitTask takes depends_on and on_parent_failure; GetTask shows parents, children and the waiting reason", async () => {
    const parent = (
      await call<SubmitTaskResponse>("submitTask", {
        command: "echo parent",
        scheduledAt: timestampFromDate(new Date(Date.now() + 3_600_000)),
      })
    ).task!;
    const child = (
      await call<SubmitTaskResponse>("submitTask", { command: "echo child", dependsOn: [parent.id], onParentFailure: "skip" })
    ).task!;
    expect(child.state).toBe(TaskState.WAITING);
    expect(child.onParentFailure).toBe("skip");
    const shown = (await call<{ task: typeof child }>("getTask", { id: child.id })).task!;
    expect(shown.parents.map((p) => ({ id: p.id, ref: p.ref, state: p.state }))).toEqual([
      { id: parent.id, ref: parent.id.replaceAll("-", "_"), state: TaskState.QUEUED },
    ]);
    expect(shown.waiting?.kind).toBe("parents");
    expect(shown.waiting?.message).toBe(`parents ${parent.id}`);
    const above = (await call<{ task: typeof child }>("getTask", { id: parent.id })).task!;
    expect(above.children.map((c) => c.id)).toEqual([child.id]);
    expect(await failure(call("submitTask", { command: "true", dependsOn: [Bun.randomUUIDv7()] }))).toBe(
      grpc.status.INVALID_ARGUMENT,
    );
    expect(await failure(call("submitTask", { command: "true", dependsOn: [parent.id], onParentFailure: "maybe" }))).toBe(
      grpc.status.INVALID_ARGUMENT,
    );
    await call("cancelTask", { id: parent.id });
    const skipped = (await call<{ task: typeof child }>("getTask", { id: child.id })).task!;
    expect(skipped.state).toBe(TaskState.CANCELLED);
    expect(skipped.error).toBe(`skipped: parent ${parent.id} (${parent.id.replaceAll("-", "_")}) ended cancelled`);
  });

  test("flow control: a concurrency key and a rate limit round-trip; an unknown limit is INVALID_ARGUMENT", async () => {
    const submitted = await call<SubmitTaskResponse>("submitTask", {
      command: "echo keyed",
      scheduledAt: timestampFromDate(new Date(Date.now() + 3_600_000)),
      concurrency: { key: "grpc-key", max: 2 },
    });
    expect(submitted.task!.concurrency).toMatchObject({ key: "grpc-key", max: 2, strategy: "queue" });
    expect(submitted.task!.rateLimit).toBe("");
    expect(await failure(call("submitTask", { command: "x", rateLimit: "no-such-limit" }))).toBe(grpc.status.INVALID_ARGUMENT);
  });

  test("submit, get, list and cancel round-trip; bad input is INVALID_ARGUMENT", async () => {
    const at = new Date(Date.now() + 3_600_000);
    const submitted = await call<SubmitTaskResponse>("submitTask", {
      command: "echo grpc",
      scheduledAt: timestampFromDate(at),
      env: { A: "1" },
      maxAttempts: 2,
    });
    const task = submitted.task!;
    expect(task.state).toBe(TaskState.QUEUED);
    expect(task.command).toBe("echo grpc");
    expect(task.env).toEqual({ A: "1" });
    expect(task.maxAttempts).toBe(2);
    expect(Number(task.scheduledAt!.seconds)).toBe(Math.floor(at.getTime() / 1000));

    const got = await call<{ task: typeof task }>("getTask", { id: task.id });
    expect(got.task!.id).toBe(task.id);

    const listed = await call<ListTasksResponse>("listTasks", { state: TaskState.QUEUED, limit: 10 });
    expect(listed.tasks.map((t) => t.id)).toContain(task.id);

    const cancelled = await call<{ task: typeof task }>("cancelTask", { id: task.id });
    expect(cancelled.task!.state).toBe(TaskState.CANCELLED);
    expect(cancelled.task!.cancelledAt).toBeDefined();

    expect(await failure(call("cancelTask", { id: task.id }))).toBe(grpc.status.FAILED_PRECONDITION);
    expect(await failure(call("getTask", { id: "nope" }))).toBe(grpc.status.INVALID_ARGUMENT);
    expect(await failure(call("getTask", { id: Bun.randomUUIDv7() }))).toBe(grpc.status.NOT_FOUND);
    expect(await failure(call("submitTask", { command: "" }))).toBe(grpc.status.INVALID_ARGUMENT);
    expect(await failure(call("submitTask", { command: "x\u0000y" }))).toBe(grpc.status.INVALID_ARGUMENT);
    expect(await failure(call("listTasks", { state: 99 }))).toBe(grpc.status.INVALID_ARGUMENT);
    // A lease of its own: at least the heartbeat timeout plus two intervals (1400 ms here).
    expect(await failure(call("submitTask", { command: "true", leaseMs: 1399 }))).toBe(grpc.status.INVALID_ARGUMENT);
    const leased = await call<SubmitTaskResponse>("submitTask", { command: "true", leaseMs: 1400 });
    expect(leased.task!.leaseMs).toBe(1400);
    const byDefault = await call<SubmitTaskResponse>("submitTask", { command: "true" });
    expect(byDefault.task!.leaseMs).toBeUndefined();
    for (const id of [leased.task!.id, byDefault.task!.id]) await call("cancelTask", { id });
  });

  test("a Timestamp out of its range is INVALID_ARGUMENT, never moved; every year from 0001 is kept", async () => {
    const before = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
    for (const scheduledAt of [
      { seconds: 1_900_000_000n, nanos: 2_000_000_000 },
      { seconds: 1_900_000_000n, nanos: -1 },
      { seconds: 253_402_300_800n, nanos: 0 },
      { seconds: -62_135_596_801n, nanos: 0 },
    ]) {
      expect(await failure(call("submitTask", { command: "echo when", scheduledAt }))).toBe(grpc.status.INVALID_ARGUMENT);
    }
    const after = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
    expect(after[0]?.n).toBe(before[0]?.n);
    for (const iso of ["0001-01-01T00:00:00.000Z", "1969-07-20T20:17:40.999Z", "9999-12-31T23:59:59.999Z"]) {
      const at = new Date(iso);
      const submitted = await call<SubmitTaskResponse>("submitTask", { command: "echo old", scheduledAt: timestampFromDate(at) });
      // Due at once: out of the way of the hand-driven workers below.
      await call("cancelTask", { id: submitted.task!.id });
      const kept = submitted.task!.scheduledAt!;
      expect({ iso, seconds: kept.seconds, nanos: kept.nanos }).toEqual({
        iso,
        seconds: BigInt(Math.floor(at.getTime() / 1000)),
        nanos: (((at.getTime() % 1000) + 1000) % 1000) * 1_000_000,
      });
    }
  });

  test("the coordinator's HTTP port answers a body over the limit with the JSON 413", async () => {
    const { port } = new URL(coordinator.info().httpUrl);
    const answer = await new Promise<string>((resolve, reject) => {
      const socket = connect(Number(port), "127.0.0.1", () =>
        socket.write("POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n"),
      );
      let text = "";
      socket.on("data", (data) => {
        text += data.toString();
        if (text.includes("}}")) {
          socket.destroy();
          resolve(text);
        }
      });
      socket.on("error", reject);
    });
    expect(answer).toStartWith("HTTP/1.1 413");
    expect(answer).toContain('{"error":{"code":"payload_too_large","message":"request body is larger than 1048576 bytes');
  });

  test("WatchTask sends the current state first, then each change until a final state", async () => {
    const { task } = await call<SubmitTaskResponse>("submitTask", {
      command: "true",
      scheduledAt: timestampFromDate(new Date(Date.now() + 3_600_000)),
    });
    const stream = tasks.watchTask!({ id: task!.id }) as grpc.ClientReadableStream<WatchTaskResponse>;
    const seen: WatchTaskResponse[] = [];
    const ended = new Promise<void>((resolve, reject) => {
      stream.on("data", (message: WatchTaskResponse) => {
        seen.push(message);
        if (seen.length === 1) void call("cancelTask", { id: task!.id });
      });
      stream.on("end", resolve);
      stream.on("error", reject);
    });
    await ended;
    expect(seen.map((m) => m.task!.state)).toEqual([TaskState.QUEUED, TaskState.CANCELLED]);
    expect(seen[0]!.event).toBeUndefined();
    expect(seen[1]!.event!.kind).toBe("cancelled");
  });
});

describe("attempts and history over gRPC", () => {
  test("the Task keeps scheduled_at as submitted beside run_at; ListAttempts, ListTaskEvents and a resumed WatchTask show each attempt", async () => {
    const requested = new Date("2023-04-01T15:04:05.123Z");
    const { task } = await call<SubmitTaskResponse>("submitTask", {
      command: "exit 3",
      scheduledAt: timestampFromDate(requested),
      maxAttempts: 2,
      retry: { backoffBaseMs: 0, backoffCapMs: 0 },
    });
    const id = task!.id;
    // No worker is connected here: the attempts are driven through the database, as a coordinator would.
    for (let attempt = 1; attempt <= 2; attempt++) {
      const [claimed] = await claimDue(db.sql, "c-test", [`w${attempt}`], 30_000);
      expect(claimed).toMatchObject({ id, attempt });
      await finishAttempt(
        db.sql,
        { taskId: id, attempt, workerId: `w${attempt}` },
        attemptResult({ state: "failed", exitCode: 3 }),
      );
    }
    const got = (await call<{ task: typeof task }>("getTask", { id })).task!;
    expect(got.scheduledAt).toEqual(timestampFromDate(requested));
    expect(Number(got.runAt!.seconds)).toBeGreaterThan(Number(got.scheduledAt!.seconds));
    expect(got.error).toBe("exhausted 2 attempts: last exit code 3");

    const { attempts } = await call<ListAttemptsResponse>("listAttempts", { taskId: id });
    expect(attempts.map((a) => [a.attempt, a.workerId, a.exitCode, a.outcome])).toEqual([
      [1, "w1", 3, AttemptOutcome.FAILED],
      [2, "w2", 3, AttemptOutcome.FAILED],
    ]);
    expect(attempts.every((a) => a.dispatchedAt !== undefined && a.finishedAt !== undefined)).toBe(true);

    const events: ListTaskEventsResponse["events"] = [];
    let cursor = "";
    do {
      const page: ListTaskEventsResponse = await call("listTaskEvents", { taskId: id, limit: 2, cursor });
      events.push(...page.events);
      cursor = page.nextCursor;
    } while (cursor !== "");
    expect(events.map((e) => [e.kind, e.state, e.attempt])).toEqual([
      ["submitted", TaskState.QUEUED, 0],
      ["dispatched", TaskState.DISPATCHED, 1],
      ["retrying", TaskState.QUEUED, 1],
      ["dispatched", TaskState.DISPATCHED, 2],
      ["failed", TaskState.FAILED, 2],
    ]);
    expect(events[2]!.detail).toMatchObject({ outcome: "failed", exit_code: 3 });
    expect(events.every((e) => e.at !== undefined && e.taskId === id)).toBe(true);

    // Resumed after the first dispatch: the rest, in order, then the stream ends.
    const stream = tasks.watchTask!({ id, afterEventId: events[1]!.id }) as grpc.ClientReadableStream<WatchTaskResponse>;
    const seen: WatchTaskResponse[] = [];
    await new Promise<void>((resolve, reject) => {
      stream.on("data", (message: WatchTaskResponse) => seen.push(message));
      stream.on("end", resolve);
      stream.on("error", reject);
    });
    expect(seen.map((m) => m.event!.id)).toEqual(events.slice(2).map((e) => e.id));
    expect(seen.map((m) => m.event!.kind)).toEqual(["retrying", "dispatched", "failed"]);
    expect(seen.every((m) => m.task!.state === TaskState.FAILED)).toBe(true);

    expect(await failure(call("listAttempts", { taskId: "nope" }))).toBe(grpc.status.INVALID_ARGUMENT);
    expect(await failure(call("listAttempts", { taskId: Bun.randomUUIDv7() }))).toBe(grpc.status.NOT_FOUND);
    expect(await failure(call("listTaskEvents", { taskId: id, cursor: "bogus" }))).toBe(grpc.status.INVALID_ARGUMENT);
    const bad = tasks.watchTask!({ id, afterEventId: "x" }) as grpc.ClientReadableStream<WatchTaskResponse>;
    const code = await new Promise<number>((resolve) => {
      bad.on("error", (error: grpc.ServiceError) => resolve(error.code));
      bad.on("end", () => resolve(-1));
    });
    expect(code).toBe(grpc.status.INVALID_ARGUMENT);
  });
});

describe("WorkerService", () => {
  test("hello, assign, started, finished, ack; a stale report is acknowledged as stale", async () => {
    const worker = openWorker();
    const workerId = `hand-${Bun.randomUUIDv7()}`;
    worker.send({ case: "hello", value: { workerId, name: "hand", slots: 1 } });
    const welcome = await worker.next();
    expect(welcome.payload.case).toBe("welcome");

    const { task } = await call<SubmitTaskResponse>("submitTask", { command: "echo from-hand" });
    const assign = await worker.next();
    expect(assign.payload.case).toBe("assign");
    if (assign.payload.case !== "assign") throw new Error("expected assign");
    const ref = assign.payload.value.ref!;
    expect(ref).toMatchObject({ taskId: task!.id, attempt: 1 });
    expect(assign.payload.value.command).toBe("echo from-hand");

    const now = timestampFromDate(new Date());
    worker.send({ case: "started", value: { ref, pid: 4242, startedAt: now } });
    worker.send({
      case: "finished",
      value: { ref, outcome: Outcome.EXITED, exitCode: 0, stdout: "from-hand\n", startedAt: now, finishedAt: now },
    });
    const ack = await worker.next();
    expect(ack.payload).toMatchObject({ case: "ack", value: { ref: { taskId: task!.id, attempt: 1 }, stale: false } });
    const [row] = await db.sql`SELECT state, exit_code, worker_id FROM tasks WHERE id = ${task!.id}`;
    expect(row).toEqual({ state: "succeeded", exit_code: 0, worker_id: workerId });
    // The output is stored on the attempt; GetTask shows it.
    const [attemptRow] = await db.sql`SELECT stdout FROM task_attempts WHERE task_id = ${task!.id} AND attempt = 1`;
    expect(attemptRow).toEqual({ stdout: "from-hand\n" });
    expect((await call<{ task: typeof task }>("getTask", { id: task!.id })).task).toMatchObject({
      state: TaskState.SUCCEEDED,
      stdout: "from-hand\n",
    });

    // The same result again (a re-send after a reconnect) changes nothing.
    worker.send({ case: "finished", value: { ref, outcome: Outcome.EXITED, exitCode: 1, finishedAt: now } });
    const again = await worker.next();
    expect(again.payload).toMatchObject({ case: "ack", value: { stale: true } });
    const [after] = await db.sql`SELECT state, exit_code FROM tasks WHERE id = ${task!.id}`;
    expect(after).toEqual({ state: "succeeded", exit_code: 0 });
    worker.close();
  });

  test("limits travel from SubmitTask to Assign; the worker's usage and an OOM kill reach ListAttempts", async () => {
    const worker = openWorker();
    const workerId = `hand-${Bun.randomUUIDv7()}`;
    worker.send({ case: "hello", value: { workerId, name: "hand", slots: 1 } });
    expect((await worker.next()).payload.case).toBe("welcome");

    const { task } = await call<SubmitTaskResponse>("submitTask", {
      command: "head -c 200M /dev/zero | tail",
      maxAttempts: 1,
      limits: { memoryMb: 32, pids: 16 },
    });
    expect(task!.limits).toMatchObject({ memoryMb: 32, pids: 16 });
    expect(task!.limits!.nofile).toBeUndefined();
    const assign = await worker.next();
    if (assign.payload.case !== "assign") throw new Error("expected assign");
    expect(assign.payload.value.limits).toMatchObject({ memoryMb: 32, pids: 16 });
    const ref = assign.payload.value.ref!;

    // The shell exits 137 after the OOM killer took its pipeline's tail.
    const now = timestampFromDate(new Date());
    worker.send({
      case: "finished",
      value: {
        ref,
        outcome: Outcome.EXITED,
        exitCode: 137,
        error: "killed: out of memory (memory_mb 32)",
        startedAt: now,
        finishedAt: now,
        usage: {
          limitsApplied: "cgroup-v1",
          limits: { memoryMb: 32, pids: 16 },
          cpuUserUs: 1200n,
          cpuSystemUs: 3400n,
          peakMemoryBytes: 33_554_432n,
          oomKilled: true,
        },
      },
    });
    expect((await worker.next()).payload).toMatchObject({ case: "ack", value: { stale: false } });
    const { attempts } = await call<ListAttemptsResponse>("listAttempts", { taskId: task!.id });
    expect(attempts[0]!.outcome).toBe(AttemptOutcome.FAILED);
    expect(attempts[0]!.error).toBe("killed: out of memory (memory_mb 32)");
    expect(attempts[0]!.usage).toMatchObject({
      limitsApplied: "cgroup-v1",
      limits: { memoryMb: 32, pids: 16 },
      cpuUserUs: 1200n,
      cpuSystemUs: 3400n,
      peakMemoryBytes: 33_554_432n,
      oomKilled: true,
    });
    const got = (await call<{ task: typeof task }>("getTask", { id: task!.id })).task!;
    expect(got.state).toBe(TaskState.FAILED);
    expect(got.error).toContain("out of memory");

    expect(await failure(call("submitTask", { command: "true", limits: { memoryMb: 0 } }))).toBe(grpc.status.INVALID_ARGUMENT);
    worker.close();
  });

  test("an assignment a reconnecting worker never got is requeued interrupted, and does not use up the one attempt", async () => {
    const first = openWorker();
    const workerId = `reconnect-${Bun.randomUUIDv7()}`;
    first.send({ case: "hello", value: { workerId, name: "reconnect", slots: 1 } });
    const welcome = await first.next();
    if (welcome.payload.case !== "welcome") throw new Error(`expected welcome, got ${welcome.payload.case}`);
    const { task } = await call<SubmitTaskResponse>("submitTask", { command: "true", maxAttempts: 1 });
    const assign = await first.next();
    expect(assign.payload).toMatchObject({ case: "assign", value: { ref: { taskId: task!.id, attempt: 1 } } });
    // The Assign was lost with its stream, as when the coordinator stops with it unread: the
    // worker's next stream says it holds nothing.
    const second = openWorker();
    second.send({
      case: "hello",
      value: { workerId, name: "reconnect", slots: 1, resumeToken: welcome.payload.value.resumeToken, inFlight: [] },
    });
    expect((await second.next()).payload.case).toBe("welcome");
    // Before, max_attempts 1 failed the task here; now it is given out again.
    const again = await second.next();
    expect(again.payload).toMatchObject({ case: "assign", value: { ref: { taskId: task!.id, attempt: 2 } } });
    const attempts = await db.sql<{ attempt: number; outcome: string | null }[]>`
      SELECT attempt, outcome FROM task_attempts WHERE task_id = ${task!.id} ORDER BY attempt`;
    expect([...attempts]).toEqual([
      { attempt: 1, outcome: "interrupted" },
      { attempt: 2, outcome: null },
    ]);
    const [requeued] = await db.sql<{ detail: { cause: string } }[]>`
      SELECT detail FROM task_events WHERE task_id = ${task!.id} AND kind = 'requeued'`;
    expect(requeued?.detail.cause).toBe("interrupted");
    const [row] = await db.sql`SELECT interruptions FROM tasks WHERE id = ${task!.id}`;
    expect(row).toEqual({ interruptions: 1 });
    second.close();
    first.close();
  });

  test("a stream that does not start with Hello is refused", async () => {
    const worker = openWorker();
    worker.send({ case: "heartbeat", value: { seq: 1n } });
    const error = await worker.closed;
    expect(error?.code).toBe(grpc.status.FAILED_PRECONDITION);
    worker.close();
  });

  test("a Hello with no worker id is refused", async () => {
    const worker = openWorker();
    worker.send({ case: "hello", value: { workerId: "", slots: 1 } });
    const error = await worker.closed;
    expect(error?.code).toBe(grpc.status.INVALID_ARGUMENT);
    worker.close();
  });

  test("a worker that goes silent is declared dead and its task is requeued once its lease lapses", async () => {
    const worker = openWorker();
    const workerId = `silent-${Bun.randomUUIDv7()}`;
    worker.send({ case: "hello", value: { workerId, name: "silent", slots: 1 } });
    expect((await worker.next()).payload.case).toBe("welcome");
    const feed = new TaskChangeFeed(db.sql);
    await feed.start();
    let onRequeue: () => void = () => {};
    feed.onChange((change) => {
      if (change.kind === "requeued") onRequeue();
    });
    const nextRequeue = () => new Promise<void>((resolve) => (onRequeue = resolve));
    let requeue = nextRequeue();
    // The shortest lease (1400 ms here): silence alone requeues nothing, its lapse does.
    const { task } = await call<SubmitTaskResponse>("submitTask", { command: "true", maxAttempts: 5, leaseMs: 1400 });
    expect((await worker.next()).payload.case).toBe("assign");
    // No heartbeats: after the timeout (1 s here) the coordinator ends the stream. (The
    // lapsed lease may requeue the attempt first, and it may go to this worker once more.)
    const error = await worker.closed;
    expect(error?.code).toBe(grpc.status.UNAVAILABLE);
    for (;;) {
      const [row] = await db.sql<{ state: string }[]>`SELECT state FROM tasks WHERE id = ${task!.id}`;
      if (row?.state === "queued") break;
      await requeue;
      requeue = nextRequeue();
    }
    await feed.stop();
    const events = await db.sql<{ kind: string; worker_id: string; reason: string }[]>`
      SELECT kind, worker_id, detail ->> 'reason' AS reason FROM task_events WHERE task_id = ${task!.id} ORDER BY id`;
    expect(events.at(-1)).toEqual({ kind: "requeued", worker_id: workerId, reason: "worker lost (lease expired)" });
    worker.close();
  });
});

describe("TaskService traceparent (branch metrics)", () => {
  test("a traceparent in the metadata is stored with the task, in canonical form; a malformed one is ignored", async () => {
    const submit = async (traceparent: string) => {
      const metadata = new grpc.Metadata();
      metadata.set("traceparent", traceparent);
      const at = timestampFromDate(new Date(Date.now() + 3_600_000));
      const { task } = await call<SubmitTaskResponse>("submitTask", { command: "true", scheduledAt: at }, metadata);
      const [row] = await db.sql<{ traceparent: string | null }[]>`SELECT traceparent FROM tasks WHERE id = ${task!.id}`;
      return row!.traceparent;
    };
    // Tracing is off in this coordinator: the caller's own traceparent is what its worker gets.
    expect(await submit("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01")).toBe(
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    expect(await submit("00-00000000000000000000000000000000-00f067aa0ba902b7-01")).toBeNull();
    expect(await submit("not a traceparent")).toBeNull();
  });
});
