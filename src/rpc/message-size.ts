// How big a gRPC message may be, and the one place a worker's result is cut to fit. Both ends
// set their limits explicitly (grpcMessageLimits): a message over the receiver's limit is not a
// slow request but a stream that fails, and a worker whose result fails its stream reconnects,
// re-sends it, and fails again, forever, requeueing its other tasks each time.
import { clone, create, toBinary } from "@bufbuild/protobuf";
import { type TaskFinished, TaskFinishedSchema, WorkerMessageSchema } from "../gen/taskqueue/v1/worker_service_pb";

/** gRPC's own default receive limit, what a coordinator that does not say it accepts. */
export const GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024;

/**
 * What a TaskFinished carries besides its two output tails: ids, times, the signal and the
 * worker's error text (a spawn error names the cwd, at most 4096 bytes). The configuration
 * requires 2 x TQ_MAX_OUTPUT_BYTES plus this to fit TQ_GRPC_MAX_MESSAGE_BYTES.
 */
export const RESULT_HEADROOM_BYTES = 64 * 1024;

/** The channel or server options that set both limits to `maxBytes`. */
export function grpcMessageLimits(maxBytes: number): Record<string, number> {
  return { "grpc.max_receive_message_length": maxBytes, "grpc.max_send_message_length": maxBytes };
}

/** The size of a result as it goes on the wire (inside its WorkerMessage). */
export function finishedMessageBytes(finished: TaskFinished): number {
  return toBinary(WorkerMessageSchema, create(WorkerMessageSchema, { payload: { case: "finished", value: finished } })).length;
}

/**
 * The result cut to fit a message of `maxBytes`: the larger output tail loses its head first
 * (the tail is what a tail keeps), marked truncated, then the other, then the error text. A
 * result that fits is returned as it is. Replacement of invalid UTF-8 (src/worker/output.ts)
 * can make text longer than the bytes read, and a coordinator may accept less than this
 * worker's own limit (it says so in Welcome), so the configuration check alone is not enough.
 */
export function fitFinished(finished: TaskFinished, maxBytes: number): TaskFinished {
  // Most results are far below the limit: known to fit without encoding them once more.
  if (finishedBytesAtMost(finished) <= maxBytes) return finished;
  let size = finishedMessageBytes(finished);
  if (size <= maxBytes) return finished;
  const fitted = clone(TaskFinishedSchema, finished);
  for (const field of [...largerFirst(fitted), "error" as const]) {
    if (size <= maxBytes) break;
    // The flag costs bytes of its own: set it before measuring what to cut.
    if (field === "stdout") fitted.stdoutTruncated = true;
    if (field === "stderr") fitted.stderrTruncated = true;
    size = finishedMessageBytes(fitted);
    // Cutting the excess brings the message within the limit unless this field is shorter
    // than the excess (then the next one goes too); a length prefix only shrinks.
    while (size > maxBytes && fitted[field] !== "") {
      const keep = Math.max(0, Buffer.byteLength(fitted[field], "utf8") - (size - maxBytes));
      if (field === "error") fitted.error = headOf(fitted.error, keep);
      else fitted[field] = tailOf(fitted[field], keep);
      size = finishedMessageBytes(fitted);
    }
  }
  return fitted;
}

/**
 * A bound on finishedMessageBytes that reads only string lengths: a UTF-16 code unit is at most
 * 3 bytes of UTF-8, and the rest (numbers, times, flags, every tag and length prefix) is far
 * less than FIXED_BYTES.
 */
function finishedBytesAtMost(finished: TaskFinished): number {
  const FIXED_BYTES = 1024;
  const text =
    finished.stdout.length +
    finished.stderr.length +
    finished.error.length +
    finished.signal.length +
    (finished.ref?.taskId.length ?? 0) +
    (finished.usage?.limitsApplied.length ?? 0);
  return 3 * text + FIXED_BYTES;
}

function largerFirst(finished: TaskFinished): ("stdout" | "stderr")[] {
  return Buffer.byteLength(finished.stdout, "utf8") >= Buffer.byteLength(finished.stderr, "utf8")
    ? ["stdout", "stderr"]
    : ["stderr", "stdout"];
}

/** The last `maxBytes` of `text` in UTF-8, starting on a character. */
function tailOf(text: string, maxBytes: number): string {
  const bytes = Buffer.from(text, "utf8");
  if (bytes.length <= maxBytes) return text;
  let start = bytes.length - maxBytes;
  while (start < bytes.length && ((bytes[start] ?? 0) & 0xc0) === 0x80) start++;
  return bytes.subarray(start).toString("utf8");
}

/** The first `maxBytes` of `text` in UTF-8, ending on a character. */
function headOf(text: string, maxBytes: number): string {
  const bytes = Buffer.from(text, "utf8");
  if (bytes.length <= maxBytes) return text;
  let end = maxBytes;
  while (end > 0 && ((bytes[end] ?? 0) & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end).toString("utf8");
}
