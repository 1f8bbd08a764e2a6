import { expect, test } from "bun:test";
import { create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { TaskSchema, TaskState } from "../../src/gen/taskqueue/v1/task_pb";
import { Outcome, TaskFinishedSchema, TaskRefSchema } from "../../src/gen/taskqueue/v1/worker_service_pb";
import {
  attemptRefFromProto,
  attemptRefToProto,
  finishAction,
  fromTimestamp,
  stateFromProto,
  stateToProto,
  taskToProto,
} from "../../src/rpc/convert";
import { attemptKey } from "../../src/task/attempt";
import { TASK_STATES } from "../../src/task/state";
import type { Task } from "../../src/task/task";
import { taskRow } from "../support/factories";

const task: Task = taskRow({
  id: "019ac6f2-5d8e-7c3a-9b1e-4f0a2d6c8e10",
  command: "echo hi",
  state: "failed",
  scheduled_at: new Date("2026-01-02T03:04:05.678Z"),
  run_at: new Date("2026-01-02T03:04:09.012Z"),
  created_at: new Date("2026-01-02T03:04:00.000Z"),
  picked_at: new Date("2026-01-02T03:04:05.700Z"),
  started_at: new Date("2026-01-02T03:04:05.710Z"),
  failed_at: new Date("2026-01-02T03:04:06.000Z"),
  attempt: 2,
  env: { A: "1" },
  worker_id: "w1",
  coordinator_id: "c1",
  exit_code: -3,
  stdout: "out",
  stdout_truncated: true,
  stdout_replaced: true,
  retry_backoff_base_ms: 1000,
  retry_backoff_cap_ms: 60_000,
  secret_env: { TOKEN: "s3cret" },
});

test("every state maps to the proto enum and back", () => {
  for (const state of TASK_STATES) expect(stateFromProto(stateToProto(state))).toBe(state);
  expect(stateFromProto(TaskState.UNSPECIFIED)).toBeUndefined();
  expect(stateFromProto(99 as TaskState)).toBeUndefined();
});

test("a task survives the trip through the wire format", () => {
  const decoded = fromBinary(TaskSchema, toBinary(TaskSchema, taskToProto(task)));
  expect(decoded.id).toBe(task.id);
  expect(decoded.state).toBe(TaskState.FAILED);
  expect(fromTimestamp(decoded.scheduledAt)).toEqual(task.scheduled_at);
  expect(fromTimestamp(decoded.runAt)).toEqual(task.run_at);
  expect(fromTimestamp(decoded.failedAt)).toEqual(task.failed_at);
  expect(decoded.completedAt).toBeUndefined();
  expect(decoded.exitCode).toBe(-3);
  expect(decoded.env).toEqual({ A: "1" });
  expect(decoded.stdoutTruncated).toBe(true);
  expect(decoded.stdoutReplaced).toBe(true);
  expect(decoded.stderrReplaced).toBe(false);
  expect(decoded.stderr).toBe("");
  expect(decoded.attempt).toBe(2);
});

test("an unset exit code stays unset on the wire (not 0)", () => {
  const decoded = fromBinary(TaskSchema, toBinary(TaskSchema, taskToProto({ ...task, exit_code: null })));
  expect(decoded.exitCode).toBeUndefined();
});

const finished = (init: MessageInitShape<typeof TaskFinishedSchema>) => {
  const message = create(TaskFinishedSchema, init);
  message.ref = create(TaskRefSchema, { taskId: task.id, attempt: 1 });
  message.finishedAt = timestampFromDate(new Date());
  return message;
};

test("a worker's report becomes the right action", () => {
  expect(finishAction(finished({ outcome: Outcome.EXITED, exitCode: 0 }))).toMatchObject({
    kind: "record",
    result: { state: "succeeded", exitCode: 0 },
  });
  expect(finishAction(finished({ outcome: Outcome.EXITED, exitCode: 2 }))).toMatchObject({
    kind: "record",
    result: { state: "failed", exitCode: 2 },
  });
  expect(finishAction(finished({ outcome: Outcome.EXITED, signal: "SIGKILL" }))).toMatchObject({
    kind: "record",
    result: { state: "failed", exitCode: null, signal: "SIGKILL" },
  });
  expect(finishAction(finished({ outcome: Outcome.TIMED_OUT, signal: "SIGTERM" }))).toMatchObject({
    kind: "record",
    result: { state: "timed_out" },
  });
  expect(finishAction(finished({ outcome: Outcome.SPAWN_FAILED, error: "cwd /x does not exist" }))).toMatchObject({
    kind: "record",
    result: { state: "failed", error: "cwd /x does not exist" },
  });
  expect(finishAction(finished({ outcome: Outcome.UNSPECIFIED }))).toMatchObject({
    kind: "record",
    result: { state: "failed", error: "the worker reported no outcome" },
  });
  expect(finishAction(finished({ outcome: Outcome.ABANDONED }))).toEqual({
    kind: "requeue",
    reason: "handed back by the worker",
    cause: "lost",
  });
  expect(finishAction(finished({ outcome: Outcome.ABANDONED, error: "the worker is draining", interrupted: true }))).toEqual({
    kind: "requeue",
    reason: "the worker is draining",
    cause: "interrupted",
  });
  expect(finishAction(finished({ outcome: Outcome.CANCELLED, error: "cancelled" }))).toEqual({
    kind: "stopped",
    reason: "cancelled",
    usage: null,
  });
});

test("a TaskRef is an attempt of the stream's worker, and back", () => {
  const message = create(TaskRefSchema, { taskId: task.id, attempt: 2 });
  const ref = attemptRefFromProto(message, "w7");
  expect(ref).toEqual({ taskId: task.id, attempt: 2, workerId: "w7" });
  const back = attemptRefToProto(ref);
  expect(back.$typeName).toBe("taskqueue.v1.TaskRef");
  expect(fromBinary(TaskRefSchema, toBinary(TaskRefSchema, back))).toEqual(message);
  // Every role keys an attempt the same way, from the message or the domain ref.
  expect(attemptKey(message.taskId, message.attempt)).toBe(`${task.id}:2`);
  expect(attemptKey(ref.taskId, ref.attempt)).toBe(attemptKey(message.taskId, message.attempt));
});

test("an attempt the OOM killer reached fails whatever its exit code; its usage crosses the wire unchanged", () => {
  const usage = {
    limitsApplied: "cgroup-v2",
    limits: { memoryMb: 32, cpu: 0.5 },
    cpuUserUs: 10n,
    cpuSystemUs: 20n,
    peakMemoryBytes: 30n,
    oomKilled: true,
  } as const;
  const action = finishAction(finished({ outcome: Outcome.EXITED, exitCode: 0, error: "killed: out of memory", usage }));
  expect(action).toMatchObject({ kind: "record", result: { state: "failed", error: "killed: out of memory" } });
  if (action.kind !== "record") throw new Error("expected record");
  expect(action.result.usage).toEqual({
    limitsApplied: "cgroup-v2",
    limits: { memory_mb: 32, pids: null, nofile: null, cpu: 0.5 },
    cpuUserUs: 10,
    cpuSystemUs: 20,
    peakMemoryBytes: 30,
    oomKilled: true,
  });
  // Without usage (an older worker) an exit 0 still succeeds.
  expect(finishAction(finished({ outcome: Outcome.EXITED, exitCode: 0 }))).toMatchObject({
    result: { state: "succeeded", usage: null },
  });
});
