// Live output of one running attempt: what its command writes to stdout and stderr, buffered
// and sent as numbered flushes (TaskOutput) while it runs, so that the coordinator can store it
// and anyone can read it from any offset (src/db/logs.ts).
//
// Flushing is adaptive, so that a chatty command does not cost a message (and a row) per line:
// the first bytes after a quiet spell go out within MIN_DELAY_MS, and while the command keeps
// writing the delay doubles up to `maxDelayMs`; a buffer of `flushBytes` goes at once. A
// command that writes nothing costs nothing: no timer, no message.

export type LogStream = "stdout" | "stderr";

/** One flush, as TaskOutput carries it (src/gen/taskqueue/v1/worker_service_pb.ts). */
export interface LogFlush {
  seq: number;
  /** Offset of data's first byte, both streams merged in the order written. */
  offset: bigint;
  stdoutOffset: bigint;
  stderrOffset: bigint;
  /** Lengths of data's runs: positive from stdout, negative from stderr. */
  runs: number[];
  data: Uint8Array;
  final: boolean;
  /** On the final flush: bytes written past maxBytes, not sent. */
  cut: bigint;
}

export interface LogStreamerOptions {
  /** Most bytes of the attempt's output sent; the rest is counted in the final flush's cut. */
  maxBytes: number;
  /** Flush at once when this many bytes wait. */
  flushBytes: number;
  /** Longest a byte waits while the command keeps writing. */
  maxDelayMs: number;
}

/** The delay before the first flush after a quiet spell. */
export const MIN_DELAY_MS = 50;

export class LogStreamer {
  private pieces: Uint8Array[] = [];
  private runs: number[] = [];
  private buffered = 0;
  private seq = 0;
  /** Bytes sent (or buffered to send) so far, merged and per stream. */
  private offset = 0;
  private stdoutOffset = 0;
  private stderrOffset = 0;
  /** Offsets at the first buffered byte. */
  private startOffset = 0;
  private startStdout = 0;
  private startStderr = 0;
  private cut = 0;
  private delayMs = MIN_DELAY_MS;
  private timer: Timer | undefined;
  private lastFlushAt = 0;
  private finished = false;

  constructor(
    private readonly send: (flush: LogFlush) => void,
    private readonly options: LogStreamerOptions,
  ) {}

  /** Bytes the command wrote to one stream. */
  push(stream: LogStream, chunk: Uint8Array): void {
    if (this.finished || chunk.length === 0) return;
    const room = Math.max(0, this.options.maxBytes - this.offset);
    const kept = chunk.length <= room ? chunk : chunk.subarray(0, room);
    this.cut += chunk.length - kept.length;
    if (kept.length === 0) return;
    if (this.buffered === 0) {
      this.startOffset = this.offset;
      this.startStdout = this.stdoutOffset;
      this.startStderr = this.stderrOffset;
    }
    // The pipe reader hands over its own buffers: keep a copy only of what is kept.
    this.pieces.push(kept.slice());
    const signed = stream === "stdout" ? kept.length : -kept.length;
    const last = this.runs.length - 1;
    if (last >= 0 && Math.sign(this.runs[last] ?? 0) === Math.sign(signed)) this.runs[last] = (this.runs[last] ?? 0) + signed;
    else this.runs.push(signed);
    this.buffered += kept.length;
    this.offset += kept.length;
    if (stream === "stdout") this.stdoutOffset += kept.length;
    else this.stderrOffset += kept.length;
    if (this.buffered >= this.options.flushBytes) {
      this.flush(false);
      return;
    }
    if (this.timer === undefined) {
      // Quiet since the last flush for longer than the longest delay: start small again.
      if (performance.now() - this.lastFlushAt > this.options.maxDelayMs) this.delayMs = MIN_DELAY_MS;
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.flush(false);
        this.delayMs = Math.min(this.options.maxDelayMs, this.delayMs * 2);
      }, this.delayMs);
    }
  }

  /**
   * The command's pipes are read out: sends what is buffered as the final flush (an empty one
   * when only the cut is left to say). Nothing at all for a command that wrote nothing.
   */
  finish(): void {
    if (this.finished) return;
    this.finished = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.seq === 0 && this.buffered === 0 && this.cut === 0) return;
    if (this.buffered === 0) {
      this.startOffset = this.offset;
      this.startStdout = this.stdoutOffset;
      this.startStderr = this.stderrOffset;
    }
    this.flush(true);
  }

  /** Stops the timer without sending anything more (the attempt is forgotten). */
  close(): void {
    this.finished = true;
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  private flush(final: boolean): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.buffered === 0 && !final) return;
    const data = this.pieces.length === 1 ? (this.pieces[0] as Uint8Array) : concat(this.pieces, this.buffered);
    const flush: LogFlush = {
      seq: this.seq++,
      offset: BigInt(this.startOffset),
      stdoutOffset: BigInt(this.startStdout),
      stderrOffset: BigInt(this.startStderr),
      runs: this.runs,
      data,
      final,
      cut: final ? BigInt(this.cut) : 0n,
    };
    this.pieces = [];
    this.runs = [];
    this.buffered = 0;
    this.lastFlushAt = performance.now();
    this.send(flush);
  }
}

function concat(pieces: Uint8Array[], size: number): Uint8Array {
  const all = new Uint8Array(size);
  let at = 0;
  for (const piece of pieces) {
    all.set(piece, at);
    at += piece.length;
  }
  return all;
}
