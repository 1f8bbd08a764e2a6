// The worker stream's batches (src/rpc/batch.ts): what one turn writes goes out as one message
// that decodes to the same messages in the same order; one message alone goes as itself; a
// batch is cut at its byte bound; flush() writes at once.
import { expect, test } from "bun:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  CoordinatorMessageSchema,
  Outcome,
  TaskFinishedSchema,
  WorkerMessageSchema,
} from "../../src/gen/taskqueue/v1/worker_service_pb";
import { StreamBatcher, unbatch } from "../../src/rpc/batch";
import { ackMessage, cancelMessage, finishedMessage, heartbeatMessage, startedMessage } from "../../src/rpc/messages";

const ref = (n: number) => ({ taskId: `019ac6f2-5d8e-7c3a-9b1e-4f0a2d6c8e${String(n).padStart(2, "0")}`, attempt: 1 });
const nextTurn = () => new Promise((resolve) => setImmediate(resolve));

function coordinatorBatcher(maxBytes?: number) {
  const written: Uint8Array[] = [];
  const batcher = new StreamBatcher(CoordinatorMessageSchema, (bytes) => written.push(bytes), maxBytes);
  const decoded = () => written.map((bytes) => fromBinary(CoordinatorMessageSchema, bytes));
  return { batcher, written, decoded };
}

test("the messages of one turn go out as one batch, in order, and nothing before the turn ends", async () => {
  const { batcher, written, decoded } = coordinatorBatcher();
  const sent = [ackMessage(ref(1), false), cancelMessage(ref(2), "cancelled"), ackMessage(ref(3), true)];
  for (const message of sent) batcher.push(message);
  expect(written).toHaveLength(0);
  await nextTurn();
  expect(written).toHaveLength(1);
  const [batch] = decoded();
  expect(batch!.payload.case).toBe("batch");
  expect(unbatch(batch!)).toEqual(sent);
});

test("one message alone goes as itself, byte for byte what an unbatched peer sends", async () => {
  const { batcher, written } = coordinatorBatcher();
  const message = ackMessage(ref(1), false);
  batcher.push(message);
  await nextTurn();
  expect(written).toEqual([toBinary(CoordinatorMessageSchema, message)]);
  expect(unbatch(fromBinary(CoordinatorMessageSchema, written[0]!))).toEqual([message]);
});

test("a batch is cut at its byte bound, and a message bigger than the bound goes alone", async () => {
  const { batcher, written, decoded } = coordinatorBatcher(1000);
  const sent = Array.from({ length: 40 }, (_, i) => ackMessage(ref(i), false));
  for (const message of sent) batcher.push(message);
  const big = cancelMessage(ref(99), "x".repeat(5000));
  batcher.push(big);
  batcher.push(ackMessage(ref(98), false));
  await nextTurn();
  for (const bytes of written.slice(0, -2)) expect(bytes.length).toBeLessThanOrEqual(1000);
  expect(written.length).toBeGreaterThan(2);
  // Everything arrives once, in the order pushed.
  expect(decoded().flatMap((m) => unbatch(m))).toEqual([...sent, big, ackMessage(ref(98), false)]);
});

test("flush writes what is queued at once, and the turn's end then writes nothing more", async () => {
  const { batcher, written, decoded } = coordinatorBatcher();
  batcher.push(ackMessage(ref(1), false));
  batcher.push(ackMessage(ref(2), false));
  batcher.flush();
  expect(written).toHaveLength(1);
  expect(unbatch(decoded()[0]!)).toHaveLength(2);
  await nextTurn();
  expect(written).toHaveLength(1);
});

test("a worker's batch carries its reports with their payloads intact", async () => {
  const written: Uint8Array[] = [];
  const batcher = new StreamBatcher(WorkerMessageSchema, (bytes) => written.push(bytes));
  const startedAt = new Date("2026-12-02T06:00:00.000Z");
  const finished = create(TaskFinishedSchema, { ref: ref(1), outcome: Outcome.EXITED, exitCode: 0, stdout: "hi\n" });
  const sent = [startedMessage(ref(1), 4242, startedAt), finishedMessage(finished), heartbeatMessage(7n, [ref(2)], false)];
  for (const message of sent) batcher.push(message);
  await nextTurn();
  expect(written).toHaveLength(1);
  expect(unbatch(fromBinary(WorkerMessageSchema, written[0]!))).toEqual(sent);
});

test("with until microtask, a batch goes once the current microtasks are done, before the turn ends", async () => {
  const written: Uint8Array[] = [];
  const batcher = new StreamBatcher(CoordinatorMessageSchema, (bytes) => written.push(bytes), undefined, "microtask");
  batcher.push(ackMessage(ref(1), false));
  batcher.push(ackMessage(ref(2), false));
  expect(written).toHaveLength(0);
  await Promise.resolve();
  expect(written).toHaveLength(1);
  expect(unbatch(fromBinary(CoordinatorMessageSchema, written[0]!))).toHaveLength(2);
});
