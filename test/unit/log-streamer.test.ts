// The worker's live-log buffer (src/worker/log-streamer.ts) on fake time: nothing for a silent
// command, the first bytes after a quiet spell soon, a steady writer's at a growing delay, a full
// buffer at once, runs that say each byte's stream, the bound and its cut; and the reporter
// keeps an attempt's flushes until its result is acknowledged and sends them again first.
import { afterEach, beforeEach, expect, jest, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import { partialTail } from "../../src/api/logs";
import { TaskRefSchema, type WorkerMessage } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { type LogFlush, LogStreamer, MIN_DELAY_MS } from "../../src/worker/log-streamer";
import { Reporter } from "../../src/worker/reporter";

const bytes = (s: string) => new TextEncoder().encode(s);
const textOf = (f: LogFlush) => new TextDecoder().decode(f.data);

beforeEach(() => jest.useFakeTimers());
afterEach(() => jest.useRealTimers());

function streamer(options: Partial<{ maxBytes: number; flushBytes: number; maxDelayMs: number }> = {}) {
  const sent: LogFlush[] = [];
  const s = new LogStreamer((f) => sent.push(f), { maxBytes: 1 << 20, flushBytes: 1024, maxDelayMs: 1000, ...options });
  return { s, sent };
}

test("a command that writes nothing sends nothing, not even a final flush", () => {
  const { s, sent } = streamer();
  s.finish();
  jest.advanceTimersByTime(5000);
  expect(sent).toEqual([]);
});

test("the first bytes go after the short delay; both streams keep their order and offsets", () => {
  const { s, sent } = streamer();
  s.push("stdout", bytes("a1\n"));
  s.push("stdout", bytes("a2\n"));
  s.push("stderr", bytes("e1\n"));
  jest.advanceTimersByTime(MIN_DELAY_MS - 1);
  expect(sent).toEqual([]);
  jest.advanceTimersByTime(1);
  expect(sent).toHaveLength(1);
  expect(sent[0]).toMatchObject({ seq: 0, offset: 0n, stdoutOffset: 0n, stderrOffset: 0n, runs: [6, -3], final: false });
  expect(textOf(sent[0]!)).toBe("a1\na2\ne1\n");
  s.push("stderr", bytes("e2\n"));
  s.finish();
  expect(sent[1]).toMatchObject({ seq: 1, offset: 9n, stdoutOffset: 6n, stderrOffset: 3n, runs: [-3], final: true, cut: 0n });
});

test("a steady writer is flushed at a delay that doubles up to the longest, not per line", () => {
  const { s, sent } = streamer({ maxDelayMs: 400 });
  // A line every 10 ms for 2 s: 200 lines.
  for (let i = 0; i < 200; i++) {
    s.push("stdout", bytes(`line ${i}\n`));
    jest.advanceTimersByTime(10);
  }
  s.finish();
  // 50, 100, 200, then every 400 ms: a handful of flushes for 200 lines.
  expect(sent.length).toBeLessThan(10);
  expect(sent.map(textOf).join("")).toBe(Array.from({ length: 200 }, (_, i) => `line ${i}\n`).join(""));
  expect(sent.map((f) => f.seq)).toEqual(sent.map((_, i) => i));
});

test("a full buffer goes at once", () => {
  const { s, sent } = streamer({ flushBytes: 1024 });
  s.push("stdout", new Uint8Array(1500));
  expect(sent).toHaveLength(1);
  expect(sent[0]!.data.length).toBe(1500);
});

test("beyond the bound nothing is sent, and the final flush says how much was cut", () => {
  const { s, sent } = streamer({ maxBytes: 10 });
  s.push("stdout", bytes("0123456"));
  s.push("stderr", bytes("789abcdef"));
  s.push("stdout", bytes("more"));
  s.finish();
  expect(sent.map(textOf).join("")).toBe("0123456789");
  expect(sent.at(-1)).toMatchObject({ final: true, cut: 10n });
});

test("the reporter re-sends an attempt's flushes before its result, until the result is acknowledged", () => {
  const sent: WorkerMessage[] = [];
  const reporter = new Reporter((m) => sent.push(m));
  reporter.liveLogs = true;
  const ref = create(TaskRefSchema, { taskId: "t1", attempt: 1 });
  const { s } = { s: new LogStreamer((f) => reporter.output(ref, f), { maxBytes: 100, flushBytes: 1024, maxDelayMs: 1000 }) };
  s.push("stdout", bytes("hi\n"));
  s.finish();
  reporter.notStarted(ref, "cancelled", "test", false);
  expect(sent.map((m) => m.payload.case)).toEqual(["output", "finished"]);
  sent.length = 0;
  reporter.resend();
  expect(sent.map((m) => m.payload.case)).toEqual(["output", "finished"]);
  reporter.acknowledged(ref);
  sent.length = 0;
  reporter.resend();
  expect(sent).toEqual([]);
  // A coordinator without live_logs gets no output at all.
  reporter.liveLogs = false;
  reporter.output(ref, {
    seq: 0,
    offset: 0n,
    stdoutOffset: 0n,
    stderrOffset: 0n,
    runs: [1],
    data: bytes("x"),
    final: true,
    cut: 0n,
  });
  expect(sent).toEqual([]);
});

test("a character cut at the end of what was read is held back for its rest (SSE text)", () => {
  const euro = new TextEncoder().encode("a€"); // 61 e2 82 ac
  expect(partialTail(euro)).toBe(0);
  expect(partialTail(euro.subarray(0, 3))).toBe(2);
  expect(partialTail(euro.subarray(0, 2))).toBe(1);
  expect(partialTail(new TextEncoder().encode("plain"))).toBe(0);
  const emoji = new TextEncoder().encode("😀"); // 4 bytes
  expect(partialTail(emoji.subarray(0, 3))).toBe(3);
});
