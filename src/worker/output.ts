// Output capture: what a running command writes to stdout and stderr, read from its pipes as it
// runs. It keeps the bounded tail of each stream (the result's stdout and stderr, the task
// view's output) and hands every chunk read to a sink, the live log (src/worker/log-streamer.ts).

import type { CapturedOutput } from "../task/task";

/** The output of one running command. */
export interface OutputCapture {
  /** Settles once both pipes have ended (or failed to read); never rejects. */
  readonly done: Promise<void>;
  /** Stops reading: a descendant that left the process group may hold the pipes open forever. */
  cancel(): Promise<void>;
  /** What was captured until now. */
  collect(): CapturedOutput;
}

// Structural types: Bun's pipes are typed as node:stream/web streams, which the DOM
// ReadableStream and ReadableStreamDefaultReader types do not accept.
interface PipeReader {
  read(): Promise<{ done: boolean; value?: Uint8Array | undefined }>;
  cancel(): Promise<void>;
}
interface Pipe {
  getReader(): PipeReader;
}

/** Hears every chunk read from either pipe, in the order read. */
export type OutputSink = (stream: "stdout" | "stderr", chunk: Uint8Array) => void;

/** Reads both pipes from now on, keeping the last `maxBytes` of each, and passing every chunk to `sink`. */
export function captureTail(stdout: Pipe, stderr: Pipe, maxBytes: number, sink?: OutputSink): OutputCapture {
  const limit = Math.max(0, Math.floor(maxBytes));
  const out = new TailBuffer(limit);
  const err = new TailBuffer(limit);
  const stdoutReader = stdout.getReader();
  const stderrReader = stderr.getReader();
  const done = Promise.all([pump(stdoutReader, out, "stdout", sink), pump(stderrReader, err, "stderr", sink)]).then(() => {});
  return {
    done,
    cancel: async () => {
      await Promise.all([stdoutReader.cancel().catch(() => {}), stderrReader.cancel().catch(() => {})]);
    },
    collect: () => {
      const o = out.text();
      const e = err.text();
      return {
        stdout: o.text,
        stderr: e.text,
        stdoutTruncated: o.truncated,
        stderrTruncated: e.truncated,
        stdoutReplaced: o.replaced,
        stderrReplaced: e.replaced,
      };
    },
  };
}

async function pump(reader: PipeReader, into: TailBuffer, stream: "stdout" | "stderr", sink?: OutputSink): Promise<void> {
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      if (value === undefined) continue;
      // The sink first: the tail may keep the chunk itself.
      sink?.(stream, value);
      into.push(value);
    }
  } catch {
    // A read error ends this stream's output; the exit status is still the result.
  }
}

const STRICT = new TextDecoder("utf-8", { ignoreBOM: true, fatal: true });
const LENIENT = new TextDecoder("utf-8", { ignoreBOM: true });
const NUL = /\0/g;

/** Text of a stream's tail: what it keeps, whether its head was cut, whether bytes were replaced. */
export interface TailText {
  text: string;
  truncated: boolean;
  replaced: boolean;
}

/** Keeps the last `limit` bytes written to it; memory stays within limit plus one chunk. */
export class TailBuffer {
  private readonly chunks: Uint8Array[] = [];
  private size = 0;
  private dropped = false;

  constructor(private readonly limit: number) {}

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    if (chunk.length >= this.limit) {
      // Copy: a view would pin the whole (possibly large) chunk in memory.
      this.dropped ||= this.size > 0 || chunk.length > this.limit;
      this.chunks.length = 0;
      this.chunks.push(chunk.slice(chunk.length - this.limit));
      this.size = this.limit;
      return;
    }
    this.chunks.push(chunk);
    this.size += chunk.length;
    // Drop whole chunks that lie entirely before the tail; the partial one is cut in bytes().
    let first = this.chunks[0];
    while (first !== undefined && this.size - first.length >= this.limit) {
      this.chunks.shift();
      this.size -= first.length;
      this.dropped = true;
      first = this.chunks[0];
    }
  }

  get truncated(): boolean {
    return this.dropped || this.size > this.limit;
  }

  bytes(): Uint8Array {
    const all = new Uint8Array(this.size);
    let at = 0;
    for (const c of this.chunks) {
      all.set(c, at);
      at += c.length;
    }
    return this.size > this.limit ? all.subarray(this.size - this.limit) : all;
  }

  /**
   * The tail as text PostgreSQL can store: NUL (which `text` cannot hold) and invalid UTF-8
   * become U+FFFD. Replacement can make the text longer than the bytes it came from (one bad
   * byte, three bytes of U+FFFD), so the text is cut again to `limit` bytes of UTF-8: the
   * result stays within what the limit promises, and what TaskFinished is sized for. A partial
   * leading character of a cut head is dropped, not replaced.
   */
  text(): TailText {
    let bytes = this.bytes();
    let truncated = this.truncated;
    if (truncated) bytes = bytes.subarray(leadingContinuationBytes(bytes));
    let text: string;
    let replaced = false;
    try {
      text = STRICT.decode(bytes);
    } catch {
      text = LENIENT.decode(bytes);
      replaced = true;
    }
    if (text.includes("\0")) {
      text = text.replace(NUL, "\uFFFD");
      replaced = true;
    }
    if (replaced) {
      const encoded = Buffer.from(text, "utf8");
      if (encoded.length > this.limit) {
        const tail = encoded.subarray(encoded.length - this.limit);
        text = tail.subarray(leadingContinuationBytes(tail)).toString("utf8");
        truncated = true;
      }
    }
    return { text, truncated, replaced };
  }
}

/** At most 3 continuation bytes (10xxxxxx) can precede the next character start. */
function leadingContinuationBytes(bytes: Uint8Array): number {
  let skip = 0;
  while (skip < 3 && skip < bytes.length && ((bytes[skip] ?? 0) & 0xc0) === 0x80) skip++;
  return skip;
}
