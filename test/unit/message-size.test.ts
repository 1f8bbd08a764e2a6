import { expect, test } from "bun:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { ConfigSchema } from "../../src/config";
import { CoordinatorMessageSchema, Outcome, TaskFinishedSchema } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { finishedMessageBytes, fitFinished, RESULT_HEADROOM_BYTES } from "../../src/rpc/message-size";
import { MAX_COMMAND_BYTES, MAX_CWD_BYTES, MAX_ENV_TOTAL_BYTES, MAX_ENV_VALUE_BYTES } from "../../src/task/spec";

const result = (stdout: string, stderr: string, error = "") =>
  create(TaskFinishedSchema, {
    ref: { taskId: "0190a5d0-ac96-774b-bcce-b302099a8050", attempt: 3 },
    outcome: Outcome.EXITED,
    exitCode: 0,
    stdout,
    stderr,
    error,
  });

test("a result that fits is sent as it is", () => {
  const small = result("out", "err");
  expect(fitFinished(small, 1024)).toBe(small);
});

test("a result is let through unmeasured only when even its largest encoding fits", () => {
  // Every field at its widest: 3-byte characters, negative exit code, far timestamps, usage.
  const wide = create(TaskFinishedSchema, {
    ref: { taskId: "0190a5d0-ac96-774b-bcce-b302099a8050", attempt: 0xffffffff },
    outcome: Outcome.TIMED_OUT,
    exitCode: -2147483648,
    signal: "SIGKILL",
    stdout: "€".repeat(3000),
    stderr: "€".repeat(1000),
    error: "€".repeat(500),
    stdoutTruncated: true,
    stderrTruncated: true,
    stdoutReplaced: true,
    stderrReplaced: true,
    interrupted: true,
    startedAt: { seconds: 253402300799n, nanos: 999999999 },
    finishedAt: { seconds: 253402300799n, nanos: 999999999 },
    usage: {
      limitsApplied: "cgroup-v1",
      limits: { memoryMb: 0xffffffff, pids: 0xffffffff, nofile: 0xffffffff, cpu: 1.5 },
      cpuUserUs: 0xffffffffffffffffn,
      cpuSystemUs: 0xffffffffffffffffn,
      peakMemoryBytes: 0xffffffffffffffffn,
      oomKilled: true,
    },
  });
  const size = finishedMessageBytes(wide);
  // Just above its size the result still fits and comes back as it is, measured or not.
  expect(fitFinished(wide, size)).toBe(wide);
  // A byte less and it is cut: the unmeasured bound never lets through what does not fit.
  const fitted = fitFinished(wide, size - 1);
  expect(fitted).not.toBe(wide);
  expect(finishedMessageBytes(fitted)).toBeLessThanOrEqual(size - 1);
});

test("a result over the limit loses the head of its larger stream first, and says it was cut", () => {
  const big = result(`${"a".repeat(5000)}END`, "e".repeat(100));
  const fitted = fitFinished(big, 2000);
  expect(finishedMessageBytes(fitted)).toBeLessThanOrEqual(2000);
  expect(fitted.stdout.endsWith("aEND")).toBe(true);
  expect(fitted.stdoutTruncated).toBe(true);
  // The smaller stream was not needed.
  expect(fitted.stderr).toBe("e".repeat(100));
  expect(fitted.stderrTruncated).toBe(false);
  // The original, kept for a re-send to a coordinator with a larger limit, is untouched.
  expect(big.stdout).toHaveLength(5003);
  expect(big.stdoutTruncated).toBe(false);
});

test("both streams and then the error are cut when each alone is not enough, on character boundaries", () => {
  const fitted = fitFinished(result("€".repeat(1000), "é".repeat(1000), "x".repeat(3000)), 500);
  expect(finishedMessageBytes(fitted)).toBeLessThanOrEqual(500);
  expect(fitted.stdout).toBe("");
  expect(fitted.stderr).toBe("");
  expect(fitted.stdoutTruncated && fitted.stderrTruncated).toBe(true);
  expect(fitted.error.length).toBeGreaterThan(0);
  expect(fitted.error.length).toBeLessThan(500);
  const partial = fitFinished(result("€".repeat(1000), ""), 1000);
  expect(finishedMessageBytes(partial)).toBeLessThanOrEqual(1000);
  expect(partial.stdout).toMatch(/^€+$/);
});

test("the largest result a valid configuration allows fits its limit; the largest assignment fits the floor", () => {
  // Every string at its limit, and output that replacement made three times longer in UTF-8.
  const output = 512 * 1024;
  const worst = result("\uFFFD".repeat(output / 3), "\uFFFD".repeat(output / 3), "x".repeat(MAX_CWD_BYTES + 200));
  expect(finishedMessageBytes(worst)).toBeLessThanOrEqual(2 * output + RESULT_HEADROOM_BYTES);
  const floor = ConfigSchema.properties.TQ_GRPC_MAX_MESSAGE_BYTES.minimum as number;
  const entries = Math.floor(MAX_ENV_TOTAL_BYTES / (MAX_ENV_VALUE_BYTES + 13));
  const env = Object.fromEntries(
    Array.from({ length: entries }, (_, i) => [`V${i}`.padEnd(3, "_"), "v".repeat(MAX_ENV_VALUE_BYTES)]),
  );
  const assign = create(CoordinatorMessageSchema, {
    payload: {
      case: "assign",
      value: {
        ref: { taskId: "0190a5d0-ac96-774b-bcce-b302099a8050", attempt: 100 },
        command: "c".repeat(MAX_COMMAND_BYTES),
        env,
        cwd: `/${"d".repeat(MAX_CWD_BYTES - 1)}`,
        timeoutMs: 604_800_000,
        startInMs: 1000,
      },
    },
  });
  expect(toBinary(CoordinatorMessageSchema, assign).length).toBeLessThanOrEqual(floor);
});
