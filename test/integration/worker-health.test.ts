// The worker's backpressure and its /healthz, against a coordinator played by this test (a
// gRPC server that welcomes, assigns, and acknowledges only when told): a worker holding its
// bound of unacknowledged results says it is full at once, and takes work again once some are
// acknowledged; /healthz reports what it holds and turns 503 once the coordinator has been
// gone for longer than the heartbeat timeout.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import {
  type CoordinatorMessage,
  CoordinatorMessageSchema,
  type Heartbeat,
  type WorkerMessage,
  WorkerService,
} from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { unbatch } from "../../src/rpc/batch";
import { serverDefinition } from "../../src/rpc/definitions";
import { ackMessage, welcomeMessage } from "../../src/rpc/messages";
import { FEATURES, PROTOCOL_VERSION } from "../../src/rpc/protocol";
import { WorkerHealthServer } from "../../src/worker/health";
import { Worker } from "../../src/worker/worker";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS } from "../support/db";
import { eventually } from "../support/eventually";

setDefaultTimeout(TEST_TIMEOUT_MS);

const HEARTBEAT_TIMEOUT_MS = 1000;
let server: grpc.Server;
let address: string;
let call: grpc.ServerDuplexStream<WorkerMessage, CoordinatorMessage> | null = null;
const heartbeats: Heartbeat[] = [];
const finished: string[] = [];

beforeAll(async () => {
  server = new grpc.Server();
  server.addService(serverDefinition(WorkerService), {
    connect(stream: grpc.ServerDuplexStream<WorkerMessage, CoordinatorMessage>) {
      call = stream;
      stream.on("data", (frame: WorkerMessage) => {
        for (const message of unbatch(frame)) received(stream, message);
      });
      stream.on("error", () => {});
    },
  });
  function received(stream: grpc.ServerDuplexStream<WorkerMessage, CoordinatorMessage>, message: WorkerMessage) {
    const payload = message.payload;
    if (payload.case === "hello") {
      stream.write(
        welcomeMessage(
          {
            workerId: payload.value.workerId,
            coordinatorId: "played-by-the-test",
            heartbeatIntervalMs: 200,
            heartbeatTimeoutMs: HEARTBEAT_TIMEOUT_MS,
            resumeToken: "resume",
          },
          { protocolVersion: PROTOCOL_VERSION, features: new Set(FEATURES) },
        ),
      );
    }
    if (payload.case === "heartbeat") heartbeats.push(payload.value);
    if (payload.case === "finished") finished.push(payload.value.ref!.taskId);
  }
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, bound) =>
      error ? reject(error) : resolve(bound),
    ),
  );
  address = `127.0.0.1:${port}`;
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
}, HOOK_TIMEOUT_MS);

function assign(taskId: string): CoordinatorMessage {
  return create(CoordinatorMessageSchema, {
    payload: { case: "assign", value: { ref: { taskId, attempt: 1 }, command: "true", timeoutMs: 0, startInMs: 0 } },
  });
}

test("a worker at its bound of unacknowledged results says it is full, takes work again once acknowledged, and /healthz tells", async () => {
  const worker = new Worker({
    name: "w",
    slots: 4,
    addresses: [address],
    log: silentLogger,
    heartbeatIntervalMs: 200,
    heartbeatTimeoutMs: HEARTBEAT_TIMEOUT_MS,
    killGraceMs: 100,
    drainGraceMs: 100,
    maxOutputBytes: 1024,
    maxUnacked: 2,
    baseEnv: { PATH: process.env.PATH },
  });
  const health = new WorkerHealthServer({
    host: "127.0.0.1",
    port: 0,
    health: () => worker.health(),
    heartbeatTimeoutMs: HEARTBEAT_TIMEOUT_MS,
    log: silentLogger,
  });
  const port = health.start();
  const healthz = async () => {
    const response = await fetch(`http://127.0.0.1:${port}/healthz`);
    return { status: response.status, body: (await response.json()) as Record<string, unknown> };
  };
  try {
    expect((await healthz()).body).toMatchObject({ connected: false, coordinator: null, last_ack_age_ms: null });
    worker.start();
    await worker.connected();
    expect(await healthz()).toMatchObject({
      status: 200,
      body: { status: "ok", connected: true, coordinator: "played-by-the-test", running: 0, unacknowledged: 0, full: false },
    });

    call!.write(assign("t1"));
    await eventually(() => finished.includes("t1"), { what: "the first result" });
    expect(worker.health()).toMatchObject({ unacknowledged: 1, full: false });
    const before = heartbeats.length;
    call!.write(assign("t2"));
    // The second unacknowledged result reaches the bound: a heartbeat says so at once.
    const full = await eventually(() => heartbeats.slice(before).find((h) => h.full), { what: "a heartbeat saying full" });
    expect(full.running.map((ref) => ref.taskId).sort()).toEqual(["t1", "t2"]);
    expect(await healthz()).toMatchObject({ status: 200, body: { full: true, unacknowledged: 2, running: 0 } });

    const fullAt = heartbeats.length;
    call!.write(ackMessage({ taskId: "t1", attempt: 1 }, false));
    const cleared = await eventually(() => heartbeats.slice(fullAt).find((h) => !h.full), { what: "a heartbeat no longer full" });
    expect(cleared.running.map((ref) => ref.taskId)).toEqual(["t2"]);
    const after = await healthz();
    expect(after.body).toMatchObject({ full: false, unacknowledged: 1 });
    expect(after.body.last_ack_age_ms).toEqual(expect.any(Number));

    // The coordinator goes away: connected flips at once, the status once the heartbeat
    // timeout has passed without a coordinator.
    server.forceShutdown();
    await eventually(async () => (await healthz()).body.connected === false, { what: "/healthz saying disconnected" });
    const gone = await eventually(
      async () => {
        const answer = await healthz();
        return answer.status === 503 ? answer : null;
      },
      { what: "/healthz answering 503", timeoutMs: 10_000 },
    );
    expect(gone.body).toMatchObject({ status: "unavailable", connected: false, coordinator: "played-by-the-test" });
    expect(gone.body.disconnected_ms as number).toBeGreaterThan(HEARTBEAT_TIMEOUT_MS);
  } finally {
    await worker.stop();
    await health.stop();
  }
});
