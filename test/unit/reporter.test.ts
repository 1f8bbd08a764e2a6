// What the worker sends: a result is kept until acknowledged, re-sent on the next stream, and
// named with the running attempts in Hello and heartbeats until then.
import { expect, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Outcome, type TaskRef, TaskRefSchema, type WorkerMessage } from "../../src/gen/taskqueue/v1/worker_service_pb";
import type { RunResult } from "../../src/worker/executor";
import { Reporter } from "../../src/worker/reporter";

const ref = (taskId: string): TaskRef => create(TaskRefSchema, { taskId, attempt: 1 });
const refs = (list: TaskRef[]) => list.map((r) => `${r.taskId}:${r.attempt}`);

function reporter() {
  const sent: WorkerMessage[] = [];
  return { reporter: new Reporter((message) => sent.push(message)), sent };
}

const introduction = { workerId: "w-1", name: "one", slots: 2, version: "t", resumeToken: "r" };

function result(overrides: Partial<RunResult>): RunResult {
  const at = new Date("2030-01-01T00:00:00Z");
  return {
    outcome: "exited",
    exitCode: 0,
    signal: null,
    stdout: "out",
    stderr: "",
    stdoutTruncated: false,
    stderrTruncated: true,
    stdoutReplaced: false,
    stderrReplaced: false,
    error: null,
    pid: 42,
    startedAt: at,
    finishedAt: new Date(at.getTime() + 5),
    usage: null,
    ...overrides,
  };
}

test("a result is kept until acknowledged: re-sent, and named in Hello and heartbeats", async () => {
  const { reporter: r, sent } = reporter();
  r.finished(ref("done"), result({}), undefined, false);
  expect(sent.map((m) => m.payload.case)).toEqual(["finished"]);
  expect(r.pending).toBe(1);
  expect(r.holds(ref("done"))).toBe(true);

  r.hello(introduction, [ref("running")], new Date("2030-01-01T00:00:10.250Z"));
  const hello = sent.at(-1)!.payload;
  if (hello.case !== "hello") throw new Error(`expected hello, got ${hello.case}`);
  expect(hello.value).toMatchObject({ workerId: "w-1", name: "one", slots: 2, version: "t", resumeToken: "r" });
  expect(timestampMs(hello.value.wallClock!)).toBe(Date.parse("2030-01-01T00:00:10.250Z"));
  expect(refs(hello.value.inFlight)).toEqual(["running:1", "done:1"]);

  r.heartbeat([ref("running")], true);
  r.heartbeat([], false);
  const beats = sent.flatMap((m) => (m.payload.case === "heartbeat" ? [m.payload.value] : []));
  // Hello and heartbeats share one sequence (LeaseConfirmation names either).
  expect(hello.value.leaseSeq).toBe(1n);
  expect(beats.map((b) => b.seq)).toEqual([2n, 3n]);
  expect(refs(beats[0]!.running)).toEqual(["running:1", "done:1"]);
  expect(beats[0]!.draining).toBe(true);
  expect(refs(beats[1]!.running)).toEqual(["done:1"]);

  sent.length = 0;
  r.resend();
  expect(sent.map((m) => m.payload.case)).toEqual(["finished"]);

  const acknowledged = r.allAcknowledged();
  r.acknowledged(ref("done"));
  await acknowledged;
  expect(r.pending).toBe(0);
  sent.length = 0;
  r.resend();
  expect(sent).toEqual([]);
});

test("a ran result carries the command's result, and a cancelled one the coordinator's reason", () => {
  const { reporter: r, sent } = reporter();
  r.finished(ref("ran"), result({ exitCode: 3 }), undefined, false);
  r.finished(ref("stopped"), result({ outcome: "cancelled", exitCode: null, signal: "SIGTERM" }), "cancelled by the user", false);
  r.finished(ref("drained"), result({ outcome: "abandoned", exitCode: null, signal: "SIGTERM" }), "the worker is draining", true);
  r.finished(ref("lapsed"), result({ outcome: "abandoned", exitCode: null, signal: "SIGTERM" }), "the lease lapsed", false);
  const [ran, stopped, drained, lapsed] = sent.map((m) => {
    if (m.payload.case !== "finished") throw new Error(`expected finished, got ${m.payload.case}`);
    return m.payload.value;
  });
  expect(ran).toMatchObject({
    outcome: Outcome.EXITED,
    exitCode: 3,
    signal: "",
    stdout: "out",
    stderrTruncated: true,
    error: "",
  });
  expect(timestampMs(ran!.finishedAt!) - timestampMs(ran!.startedAt!)).toBe(5);
  expect(stopped).toMatchObject({ outcome: Outcome.CANCELLED, signal: "SIGTERM", error: "cancelled by the user" });
  expect(stopped!.exitCode).toBeUndefined();
  expect(stopped!.interrupted).toBe(false);
  expect(drained).toMatchObject({ outcome: Outcome.ABANDONED, error: "the worker is draining", interrupted: true });
  expect(lapsed).toMatchObject({ outcome: Outcome.ABANDONED, error: "the lease lapsed", interrupted: false });
});

test("an attempt that never started is reported with its outcome and why", () => {
  const { reporter: r, sent } = reporter();
  r.notStarted(ref("early"), "abandoned", "the worker is draining", true);
  r.notStarted(ref("waiting"), "cancelled", "cancelled", false);
  r.notStarted(ref("late"), "abandoned", "the assignment arrived after its lease lapsed", false);
  const [abandoned, cancelled, late] = sent.map((m) => (m.payload.case === "finished" ? m.payload.value : undefined));
  expect(abandoned).toMatchObject({ outcome: Outcome.ABANDONED, error: "the worker is draining", stdout: "", interrupted: true });
  expect(late).toMatchObject({ outcome: Outcome.ABANDONED, interrupted: false });
  expect(abandoned!.startedAt).toEqual(abandoned!.finishedAt);
  expect(cancelled).toMatchObject({ outcome: Outcome.CANCELLED, error: "cancelled" });
  expect(r.pending).toBe(3);
});

test("started goes out once and is not kept", () => {
  const { reporter: r, sent } = reporter();
  r.started(ref("s"), 1234, new Date("2030-01-01T00:00:00Z"));
  const started = sent[0]!.payload;
  if (started.case !== "started") throw new Error(`expected started, got ${started.case}`);
  expect(started.value.pid).toBe(1234);
  expect(timestampMs(started.value.startedAt!)).toBe(Date.parse("2030-01-01T00:00:00Z"));
  expect(r.pending).toBe(0);
  sent.length = 0;
  r.resend();
  expect(sent).toEqual([]);
});
