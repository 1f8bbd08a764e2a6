// Output capture: what a running command writes to stdout and stderr, read from its pipes as it
// runs. Today it keeps the bounded tail of each stream; live logs will replace it with one that
// streams chunks, behind the same OutputCapture shape, so the executor does not change.

/** A command's output as its result reports it. */
export interface CapturedOutput {
  stdout: string;
  stderr: string;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
}

/** The output of one running command. */
export interface OutputCapture {
  /** Settles once both pipes have ended (or failed to read); never rejects. */
  readonly done: Promise<void>;
  /** Stops reading: a descendant that left the process group may hold the pipes open forever. */
  cancel(): Promise<void>;
  /** What was captured until now. */
  collect(): CapturedOutput;
}

/** The output of a command that never started. */
export const NO_OUTPUT: CapturedOutput = { stdout: "", stderr: "", stdoutTruncated: false, stderrTruncated: false };

// Structural types: Bun's pipes are typed as node:stream/web streams, which the DOM
// ReadableStream and ReadableStreamDefaultReader types do not accept.
interface PipeReader {
  read(): Promise<{ done: boolean; value?: Uint8Array | undefined }>;
  cancel(): Promise<void>;
}
interface Pipe {
  getReader(): PipeReader;
}

/** Reads both pipes from now on, keeping the last `maxBytes` of each. */
export function captureTail(stdout: Pipe, stderr: Pipe, maxBytes: number): OutputCapture {
  const limit = Math.max(0, Math.floor(maxBytes));
  const out = new TailBuffer(limit);
  const err = new TailBuffer(limit);
  const stdoutReader = stdout.getReader();
  const stderrReader = stderr.getReader();
  const done = Promise.all([pump(stdoutReader, out), pump(stderrReader, err)]).then(() => {});
  return {
    done,
    cancel: async () => {
      await Promise.all([stdoutReader.cancel().catch(() => {}), stderrReader.cancel().catch(() => {})]);
    },
    collect: () => ({ stdout: out.text(), stderr: err.text(), stdoutTruncated: out.truncated, stderrTruncated: err.truncated }),
  };
}

async function pump(reader: PipeReader, into: TailBuffer): Promise<void> {
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      if (value !== undefined) into.push(value);
    }
  } catch {
    // A read error ends this stream's output; the exit status is still the result.
  }
}

const DECODER = new TextDecoder("utf-8", { ignoreBOM: true });

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

  /** UTF-8 text; when the head was cut, a partial leading character is dropped. */
  text(): string {
    let bytes = this.bytes();
    if (this.truncated) {
      let skip = 0;
      // At most 3 continuation bytes (10xxxxxx) can precede the next character start.
      while (skip < 3 && skip < bytes.length && ((bytes[skip] ?? 0) & 0xc0) === 0x80) skip++;
      bytes = bytes.subarray(skip);
    }
    return DECODER.decode(bytes);
  }
}
