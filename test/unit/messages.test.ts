import { expect, test } from "bun:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import {
  type CoordinatorMessage,
  CoordinatorMessageSchema,
  Outcome,
  TaskFinishedSchema,
  type WorkerMessage,
  WorkerMessageSchema,
} from "../../src/gen/taskqueue/v1/worker_service_pb";
import {
  ackMessage,
  assignMessage,
  cancelMessage,
  drainMessage,
  finishedMessage,
  heartbeatMessage,
  helloMessage,
  startedMessage,
  welcomeMessage,
} from "../../src/rpc/messages";
import { FEATURES, OLDEST_SERVED_PROTOCOL, PROTOCOL_VERSION } from "../../src/rpc/protocol";
import type { Task } from "../../src/task/task";

/** What the other side decodes. */
const overWire = (message: CoordinatorMessage) =>
  fromBinary(CoordinatorMessageSchema, toBinary(CoordinatorMessageSchema, message));
const fromWorker = (message: WorkerMessage) => fromBinary(WorkerMessageSchema, toBinary(WorkerMessageSchema, message));

const task = {
  id: "019ac6f2-5d8e-7c3a-9b1e-4f0a2d6c8e10",
  attempt: 3,
  command: "echo hi",
  env: { A: "1", SHARED: "plain" },
  secret_env: { TOKEN: "s3cret", SHARED: "secret" },
  cwd: null,
  timeout_ms: 1500,
  lease_expires_at: new Date("2026-01-02T03:04:05.678Z"),
} as unknown as Task;

test("Assign carries the attempt, the command, the secret env over the plain one and the lease", () => {
  const message = overWire(assignMessage(task, 250, 9_500));
  expect(message.payload.case).toBe("assign");
  if (message.payload.case !== "assign") return;
  const assign = message.payload.value;
  expect(assign.ref).toMatchObject({ taskId: task.id, attempt: 3 });
  expect(assign.command).toBe("echo hi");
  expect(assign.env).toEqual({ A: "1", SHARED: "secret", TOKEN: "s3cret" });
  expect(assign.cwd).toBe("");
  expect(assign.timeoutMs).toBe(1500);
  expect(assign.startInMs).toBe(250);
  expect(assign.leaseExpiresAt && timestampDate(assign.leaseExpiresAt).toISOString()).toBe("2026-01-02T03:04:05.678Z");
  expect(assign.leaseMs).toBe(9_500);
  // A lease that ran out before sending still travels, as 0: the worker can tell it from an
  // older coordinator's Assign, which has none.
  expect(overWire(assignMessage({ ...task, cwd: "/tmp" }, 0, 0)).payload.value).toMatchObject({
    cwd: "/tmp",
    startInMs: 0,
    leaseMs: 0,
  });
});

test("Cancel and Ack name only the attempt, whatever else the ref holds", () => {
  const ref = { taskId: task.id, attempt: 2, workerId: "w-1" };
  const cancel = overWire(cancelMessage(ref, "cancelled"));
  expect(cancel.payload).toMatchObject({ case: "cancel", value: { ref: { taskId: task.id, attempt: 2 }, reason: "cancelled" } });
  const sent = cancelMessage(ref, "x").payload;
  if (sent.case !== "cancel") throw new Error(`built ${sent.case}`);
  expect(Object.keys(sent.value.ref ?? {})).not.toContain("workerId");
  expect(overWire(ackMessage(ref, true)).payload).toMatchObject({ case: "ack", value: { ref: { attempt: 2 }, stale: true } });
  expect(overWire(ackMessage(ref, false)).payload).toMatchObject({ case: "ack", value: { stale: false } });
});

test("Welcome and Drain carry their fields", () => {
  const welcome = overWire(
    welcomeMessage(
      {
        workerId: "w-1",
        coordinatorId: "c-1",
        heartbeatIntervalMs: 1000,
        heartbeatTimeoutMs: 5000,
        resumeToken: "tok",
        maxMessageBytes: 8 * 1024 * 1024,
      },
      { protocolVersion: 1, features: new Set(["start_in_ms"] as const) },
    ),
  );
  expect(welcome.payload).toMatchObject({
    case: "welcome",
    value: {
      workerId: "w-1",
      coordinatorId: "c-1",
      heartbeatIntervalMs: 1000,
      heartbeatTimeoutMs: 5000,
      resumeToken: "tok",
      protocolVersion: 1,
      features: ["start_in_ms"],
    },
  });
  expect(welcome.payload.value).toMatchObject({ maxMessageBytes: 8 * 1024 * 1024 });
  expect(overWire(drainMessage("shutting down")).payload).toMatchObject({ case: "drain", value: { reason: "shutting down" } });
});

test("the worker's Hello, Heartbeat, Started and Finished carry their fields", () => {
  const refs = [
    { taskId: "a", attempt: 1 },
    { taskId: "b", attempt: 4 },
  ];
  const wallClock = new Date("2026-01-02T03:04:15.678Z");
  const hello = fromWorker(
    helloMessage({ workerId: "w", name: "n", slots: 3, version: "1.2", resumeToken: "r" }, refs, wallClock),
  );
  expect(hello.payload).toMatchObject({
    case: "hello",
    value: { workerId: "w", name: "n", slots: 3, version: "1.2", resumeToken: "r", inFlight: refs },
  });
  // This build's protocol, and every feature it implements.
  expect(hello.payload).toMatchObject({
    value: { protocolVersion: PROTOCOL_VERSION, minProtocolVersion: OLDEST_SERVED_PROTOCOL, features: [...FEATURES] },
  });
  expect(FEATURES).toContain("start_in_ms");
  if (hello.payload.case !== "hello") throw new Error("expected hello");
  expect(hello.payload.value.wallClock && timestampDate(hello.payload.value.wallClock).toISOString()).toBe(
    wallClock.toISOString(),
  );
  expect(fromWorker(heartbeatMessage(7n, refs, true)).payload).toMatchObject({
    case: "heartbeat",
    value: { seq: 7n, running: refs, draining: true },
  });
  const startedAt = new Date("2026-01-02T03:04:05.678Z");
  const started = fromWorker(startedMessage({ taskId: "a", attempt: 1 }, 4242, startedAt));
  expect(started.payload).toMatchObject({ case: "started", value: { ref: refs[0], pid: 4242 } });
  if (started.payload.case === "started" && started.payload.value.startedAt) {
    expect(timestampDate(started.payload.value.startedAt).toISOString()).toBe(startedAt.toISOString());
  } else throw new Error("no startedAt");
  const finished = create(TaskFinishedSchema, { ref: refs[1], outcome: Outcome.EXITED, exitCode: 0, stdout: "out" });
  expect(fromWorker(finishedMessage(finished)).payload).toMatchObject({
    case: "finished",
    value: { ref: refs[1], outcome: Outcome.EXITED, exitCode: 0, stdout: "out" },
  });
});
