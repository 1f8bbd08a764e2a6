// Version skew on the worker stream: what a coordinator agrees with workers of other builds at
// Hello (src/rpc/protocol.ts). An older worker (no version, no features) gets no early
// hand-over; a worker this coordinator cannot serve is refused with FAILED_PRECONDITION naming
// both versions, and a refused worker backs off instead of dialing again at once.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import pino from "pino";
import { loadConfig } from "../../src/config";
import { Coordinator } from "../../src/coordinator/coordinator";
import { type SubmitTaskResponse, TaskService } from "../../src/gen/taskqueue/v1/task_service_pb";
import {
  type CoordinatorMessage,
  CoordinatorMessageSchema,
  Outcome,
  type WorkerMessage,
  WorkerMessageSchema,
  WorkerService,
} from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { unbatch } from "../../src/rpc/batch";
import { clientConstructor, serverDefinition } from "../../src/rpc/definitions";
import { ackMessage, welcomeMessage } from "../../src/rpc/messages";
import { FEATURES, type Feature, OLDEST_SERVED_PROTOCOL, PROTOCOL_VERSION } from "../../src/rpc/protocol";
import { Worker } from "../../src/worker/worker";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const AHEAD_MS = 1000;
let coordinator: Coordinator;
let address: string;
let tasks: grpc.Client & Record<string, Function>;

const TaskClient = clientConstructor(TaskService);
const WorkerClient = clientConstructor(WorkerService);

beforeAll(async () => {
  const config = loadConfig({
    TQ_COORDINATOR_PORT: String(await freePort()),
    TQ_GRPC_PORT: String(await freePort()),
    TQ_HEARTBEAT_INTERVAL_MS: "200",
    TQ_HEARTBEAT_TIMEOUT_MS: "5000",
    TQ_DISPATCH_AHEAD_MS: String(AHEAD_MS),
  });
  coordinator = new Coordinator(config, db.url, silentLogger);
  address = (await coordinator.start()).grpcAddress;
  tasks = new TaskClient(address, grpc.credentials.createInsecure()) as typeof tasks;
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  tasks?.close();
  await coordinator?.stop();
}, HOOK_TIMEOUT_MS);

function submitIn(ms: number, queue = ""): Promise<SubmitTaskResponse> {
  const scheduledAt = timestampFromDate(new Date(Date.now() + ms));
  return new Promise((resolve, reject) =>
    tasks.submitTask!(
      { command: "true", scheduledAt, queue },
      new grpc.Metadata(),
      (error: grpc.ServiceError | null, r: SubmitTaskResponse) => (error ? reject(error) : resolve(r)),
    ),
  );
}

/** A hand-driven worker stream that queues what the coordinator sends. */
function openWorker() {
  const client = new WorkerClient(address, grpc.credentials.createInsecure(), { "grpc.use_local_subchannel_pool": 1 });
  const stream = (client as unknown as { connect(): grpc.ClientDuplexStream<WorkerMessage, CoordinatorMessage> }).connect();
  const inbox: CoordinatorMessage[] = [];
  /** Every message as it came off the wire, batches whole. */
  const frames: CoordinatorMessage[] = [];
  let waiting: ((m: CoordinatorMessage) => void) | null = null;
  const closed = new Promise<grpc.ServiceError | null>((resolve) => {
    stream.on("error", (error: grpc.ServiceError) => resolve(error));
    stream.on("end", () => resolve(null));
  });
  stream.on("data", (frame: CoordinatorMessage) => {
    frames.push(frame);
    for (const message of unbatch(frame)) {
      // Lease confirmations (lease_confirm) come with every renewal; these tests are about the rest.
      if (message.payload.case === "lease") continue;
      if (waiting) {
        const w = waiting;
        waiting = null;
        w(message);
      } else inbox.push(message);
    }
  });
  const send = (payload: MessageInitShape<typeof WorkerMessageSchema>["payload"]) =>
    stream.write(create(WorkerMessageSchema, { payload }));
  // A silent worker gets no work (it may be frozen): keep heartbeating as a worker does.
  let seq = 0n;
  const heartbeats = setInterval(() => send({ case: "heartbeat", value: { seq: ++seq } }), 100);
  void closed.then(() => clearInterval(heartbeats));
  return {
    send,
    frames,
    next: (): Promise<CoordinatorMessage> =>
      inbox.length > 0 ? Promise.resolve(inbox.shift()!) : new Promise((resolve) => (waiting = resolve)),
    closed,
    close() {
      clearInterval(heartbeats);
      stream.end();
      client.close();
    },
  };
}

/** Hello, then the task it is handed; the attempt's dispatch time against the task's run_at (the database's clock). */
async function handOver(hello: MessageInitShape<typeof WorkerMessageSchema>["payload"]) {
  const worker = openWorker();
  worker.send(hello);
  const welcome = await worker.next();
  if (welcome.payload.case !== "welcome") throw new Error(`expected welcome, got ${welcome.payload.case}`);
  const { task } = await submitIn(1500);
  const assign = await worker.next();
  if (assign.payload.case !== "assign") throw new Error(`expected assign, got ${assign.payload.case}`);
  expect(assign.payload.value.ref?.taskId).toBe(task!.id);
  const [row] = await db.sql<{ early_ms: number }[]>`
    SELECT (extract(epoch FROM t.run_at - a.dispatched_at) * 1000)::float8 AS early_ms
    FROM tasks t JOIN task_attempts a ON a.task_id = t.id AND a.attempt = t.attempt WHERE t.id = ${task!.id}`;
  // Report it done, so that the next test's task finds the slot free.
  const ref = assign.payload.value.ref!;
  const now = timestampFromDate(new Date());
  worker.send({ case: "finished", value: { ref, outcome: Outcome.EXITED, exitCode: 0, startedAt: now, finishedAt: now } });
  expect((await worker.next()).payload.case).toBe("ack");
  worker.close();
  await worker.closed;
  return { welcome: welcome.payload.value, assign: assign.payload.value, earlyMs: row!.early_ms };
}

describe("protocol agreement at Hello", () => {
  test("a worker that announces no version (an older build) is protocol 0 with no features and gets only due tasks", async () => {
    const { welcome, assign, earlyMs } = await handOver({
      case: "hello",
      value: { workerId: `old-${Bun.randomUUIDv7()}`, name: "old", slots: 1 },
    });
    expect(welcome.protocolVersion).toBe(0);
    expect(welcome.features).toEqual([]);
    expect(assign.startInMs).toBe(0);
    // Claimed only once due by the database's clock: never handed over early.
    expect(earlyMs).toBeLessThanOrEqual(0);
  });

  test("a worker with start_in_ms is handed tasks early and told to wait", async () => {
    const { welcome, assign, earlyMs } = await handOver({
      case: "hello",
      value: {
        workerId: `new-${Bun.randomUUIDv7()}`,
        name: "new",
        slots: 1,
        protocolVersion: PROTOCOL_VERSION,
        minProtocolVersion: OLDEST_SERVED_PROTOCOL,
        features: [...FEATURES, "a-feature-from-the-future"],
      },
    });
    expect(welcome.protocolVersion).toBe(PROTOCOL_VERSION);
    // Only what both sides know.
    expect(welcome.features).toEqual([...FEATURES]);
    expect(assign.startInMs).toBeGreaterThan(0);
    expect(earlyMs).toBeGreaterThan(0);
  });

  test("a newer worker that still speaks our version is served at ours", async () => {
    const worker = openWorker();
    worker.send({
      case: "hello",
      value: { workerId: `newer-${Bun.randomUUIDv7()}`, slots: 1, protocolVersion: PROTOCOL_VERSION + 5, minProtocolVersion: 1 },
    });
    const welcome = await worker.next();
    expect(welcome.payload).toMatchObject({ case: "welcome", value: { protocolVersion: PROTOCOL_VERSION } });
    worker.close();
    await worker.closed;
  });

  test("a worker this coordinator cannot serve is refused with FAILED_PRECONDITION naming both versions", async () => {
    const worker = openWorker();
    const tooNew = PROTOCOL_VERSION + 98;
    worker.send({
      case: "hello",
      value: { workerId: `future-${Bun.randomUUIDv7()}`, slots: 1, protocolVersion: tooNew, minProtocolVersion: tooNew },
    });
    const error = await worker.closed;
    expect(error?.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(error?.details).toContain(`worker protocol ${tooNew}`);
    expect(error?.details).toContain(`protocols ${OLDEST_SERVED_PROTOCOL} to ${PROTOCOL_VERSION}`);
    worker.close();
  });
});

describe("batches on the worker stream (feature batch)", () => {
  const SLOTS = 4;
  /** SLOTS tasks queued on a queue of their own before any worker serves it: one dispatch pass claims them all. */
  async function queued(queue: string): Promise<string[]> {
    const ids: string[] = [];
    for (let i = 0; i < SLOTS; i++) ids.push((await submitIn(-1, queue)).task!.id);
    return ids;
  }
  const hello = (queue: string, features: string[]): MessageInitShape<typeof WorkerMessageSchema>["payload"] => ({
    case: "hello",
    value: {
      workerId: `${queue}-${Bun.randomUUIDv7()}`,
      slots: SLOTS,
      protocolVersion: PROTOCOL_VERSION,
      minProtocolVersion: OLDEST_SERVED_PROTOCOL,
      features,
      queues: [queue],
    },
  });
  async function assigned(worker: ReturnType<typeof openWorker>) {
    const welcome = await worker.next();
    expect(welcome.payload.case).toBe("welcome");
    const refs = [];
    while (refs.length < SLOTS) {
      const message = await worker.next();
      if (message.payload.case === "assign") refs.push(message.payload.value.ref!);
    }
    return { welcome, refs };
  }
  const framesWith = (worker: ReturnType<typeof openWorker>, kind: string) =>
    worker.frames.filter((frame) => unbatch(frame).some((m) => m.payload.case === kind));

  test("a worker that names it gets a pass's Assigns in one batch, and its reports sent in one batch are acknowledged in one", async () => {
    const queue = `batched-${Bun.randomUUIDv7()}`;
    const ids = await queued(queue);
    const worker = openWorker();
    worker.send(hello(queue, ["batch"]));
    const { welcome, refs } = await assigned(worker);
    expect(welcome.payload.case === "welcome" && welcome.payload.value.features).toEqual(["batch"]);
    expect(refs.map((r) => r.taskId).sort()).toEqual([...ids].sort());
    const assigns = framesWith(worker, "assign");
    expect(assigns).toHaveLength(1);
    expect(assigns[0]!.payload.case).toBe("batch");
    // Every Started and Finished in one message, in order (a start before its finish).
    const now = timestampFromDate(new Date());
    worker.send({
      case: "batch",
      value: {
        messages: [
          ...refs.map((ref) => ({ payload: { case: "started" as const, value: { ref, pid: 1, startedAt: now } } })),
          ...refs.map((ref) => ({
            payload: {
              case: "finished" as const,
              value: { ref, outcome: Outcome.EXITED, exitCode: 0, startedAt: now, finishedAt: now },
            },
          })),
        ],
      },
    });
    const acked: string[] = [];
    while (acked.length < SLOTS) {
      const message = await worker.next();
      if (message.payload.case === "ack") acked.push(message.payload.value.ref!.taskId);
    }
    expect(acked.sort()).toEqual([...ids].sort());
    // The results were recorded in one statement, so their Acks went out in one turn: one message.
    expect(framesWith(worker, "ack")).toHaveLength(1);
    const rows = await db.sql<{ state: string; started_at: Date | null }[]>`
      SELECT state, started_at FROM tasks WHERE id = ANY(${ids}::uuid[])`;
    expect(rows.map((r) => r.state)).toEqual(Array(SLOTS).fill("succeeded"));
    worker.close();
    await worker.closed;
  });

  test("a worker that does not name it gets every message alone", async () => {
    const queue = `single-${Bun.randomUUIDv7()}`;
    const ids = await queued(queue);
    const worker = openWorker();
    worker.send(hello(queue, ["start_in_ms"]));
    const { refs } = await assigned(worker);
    expect(refs.map((r) => r.taskId).sort()).toEqual([...ids].sort());
    expect(worker.frames.some((frame) => frame.payload.case === "batch")).toBe(false);
    expect(framesWith(worker, "assign")).toHaveLength(SLOTS);
    for (const ref of refs) {
      const now = timestampFromDate(new Date());
      worker.send({ case: "finished", value: { ref, outcome: Outcome.EXITED, exitCode: 0, startedAt: now, finishedAt: now } });
    }
    let acks = 0;
    while (acks < SLOTS) if ((await worker.next()).payload.case === "ack") acks++;
    expect(worker.frames.some((frame) => frame.payload.case === "batch")).toBe(false);
    worker.close();
    await worker.closed;
  });

  test("a batch inside a batch is refused with INVALID_ARGUMENT", async () => {
    const worker = openWorker();
    worker.send(hello(`nested-${Bun.randomUUIDv7()}`, ["batch"]));
    expect((await worker.next()).payload.case).toBe("welcome");
    worker.send({ case: "batch", value: { messages: [{ payload: { case: "batch", value: { messages: [] } } }] } });
    const error = await worker.closed;
    expect(error?.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(error?.details).toContain("a batch must not hold a batch");
    worker.close();
  });
});

describe("a worker of this build and the batch feature", () => {
  /**
   * A coordinator played by the test: its Welcome names `features`; it assigns `count` tasks at
   * once (in one batch when it names batch) and acknowledges every result. Resolves with every
   * message the worker wrote, batches whole, once all results are in.
   */
  async function against(features: string[], count: number): Promise<WorkerMessage[]> {
    const frames: WorkerMessage[] = [];
    let done: () => void = () => {};
    const finished = new Promise<void>((resolve) => (done = resolve));
    const server = new grpc.Server();
    server.addService(serverDefinition(WorkerService), {
      connect(call: grpc.ServerDuplexStream<WorkerMessage, CoordinatorMessage>) {
        let results = 0;
        call.on("data", (frame: WorkerMessage) => {
          frames.push(frame);
          for (const message of unbatch(frame)) {
            const payload = message.payload;
            if (payload.case === "hello") {
              call.write(
                welcomeMessage(
                  {
                    workerId: payload.value.workerId,
                    coordinatorId: "played-by-the-test",
                    heartbeatIntervalMs: 5000,
                    heartbeatTimeoutMs: 15_000,
                    resumeToken: "resume",
                  },
                  { protocolVersion: PROTOCOL_VERSION, features: new Set(features as Feature[]) },
                ),
              );
              const assigns = Array.from({ length: count }, (_, i) =>
                create(CoordinatorMessageSchema, {
                  payload: {
                    case: "assign",
                    value: {
                      ref: { taskId: `019ac6f2-5d8e-7c3a-9b1e-4f0a2d6c8e1${i}`, attempt: 1 },
                      command: "true",
                      leaseMs: 30_000,
                    },
                  },
                }),
              );
              if (features.includes("batch"))
                call.write(create(CoordinatorMessageSchema, { payload: { case: "batch", value: { messages: assigns } } }));
              else for (const assign of assigns) call.write(assign);
            }
            if (payload.case === "finished") {
              call.write(ackMessage(payload.value.ref!, false));
              if (++results === count) done();
            }
          }
        });
        call.on("error", () => {});
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
        error ? reject(error) : resolve(p),
      ),
    );
    const worker = new Worker({
      name: "batching",
      slots: count,
      addresses: [`127.0.0.1:${port}`],
      log: silentLogger,
      // Long intervals: a loaded machine's event-loop gap must not count as a stall (which
      // would hold the assignments for a lease confirmation this coordinator never sends).
      heartbeatIntervalMs: 5000,
      heartbeatTimeoutMs: 15_000,
      killGraceMs: 100,
      drainGraceMs: 1000,
      maxOutputBytes: 1024,
      baseEnv: { PATH: process.env.PATH },
    });
    try {
      worker.start();
      await finished;
      await worker.stop();
    } finally {
      server.forceShutdown();
    }
    return frames;
  }

  const reports = (frames: WorkerMessage[], kind: string) =>
    frames.flatMap((frame) => unbatch(frame)).filter((m) => m.payload.case === kind);

  test("to a coordinator whose Welcome names it, the Started reports of one turn go in one batch", async () => {
    const frames = await against(["batch"], 4);
    expect(reports(frames, "started")).toHaveLength(4);
    expect(reports(frames, "finished")).toHaveLength(4);
    // The four assignments came in one message and were started in one turn.
    const startedFrames = frames.filter((frame) => unbatch(frame).some((m) => m.payload.case === "started"));
    expect(startedFrames).toHaveLength(1);
    expect(unbatch(startedFrames[0]!).filter((m) => m.payload.case === "started")).toHaveLength(4);
    // Hello always goes alone, first.
    expect(frames[0]!.payload.case).toBe("hello");
  });

  test("to a coordinator whose Welcome does not name it (an older build), every message goes alone", async () => {
    const frames = await against([], 4);
    expect(reports(frames, "started")).toHaveLength(4);
    expect(reports(frames, "finished")).toHaveLength(4);
    expect(frames.filter((frame) => frame.payload.case === "batch")).toEqual([]);
  });
});

describe("a refused worker", () => {
  test("logs worker.refused with the coordinator's reason and waits its refusal backoff before dialing again", async () => {
    // A coordinator from a later release that no longer serves this worker's protocol.
    const reason = `worker protocol ${PROTOCOL_VERSION} is too old: this coordinator speaks protocols 7 to 9; upgrade the worker`;
    let dials = 0;
    const server = new grpc.Server();
    server.addService(serverDefinition(WorkerService), {
      connect(call: grpc.ServerDuplexStream<WorkerMessage, CoordinatorMessage>) {
        dials++;
        call.once("data", () =>
          call.emit("error", Object.assign(new Error(reason), { code: grpc.status.FAILED_PRECONDITION, details: reason })),
        );
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
        error ? reject(error) : resolve(p),
      ),
    );
    const lines: Record<string, unknown>[] = [];
    let onLine: (() => void) | null = null;
    const log = pino(
      { level: "info" },
      {
        write(text: string) {
          lines.push(JSON.parse(text));
          onLine?.();
        },
      },
    );
    const refused = new Promise<Record<string, unknown>>((resolve) => {
      onLine = () => {
        const line = lines.find((l) => l.event === "worker.refused");
        if (line) resolve(line);
      };
    });
    const worker = new Worker({
      name: "refused",
      slots: 1,
      addresses: [`127.0.0.1:${port}`],
      log,
      heartbeatIntervalMs: 200,
      heartbeatTimeoutMs: 1000,
      killGraceMs: 100,
      drainGraceMs: 100,
      maxOutputBytes: 1024,
      refusedBackoffMs: 60_000,
      baseEnv: {},
    });
    try {
      worker.start();
      const line = await refused;
      expect(line.why).toBe(reason);
      // Half the backoff at least (jitter), where a plain disconnect retries within 100 ms.
      expect(Number(line.retryInMs)).toBeGreaterThanOrEqual(30_000);
      expect(dials).toBe(1);
    } finally {
      await worker.stop();
      server.forceShutdown();
    }
  });
});
