// The W3C Trace Context `traceparent` value (version 00): "00-<trace id>-<parent span id>-<flags>".
// A value that does not parse is ignored, as the recommendation says, never an error: tracing
// must not turn a submit away.

export interface TraceParent {
  traceId: string;
  spanId: string;
  /** The trace-flags byte: bit 0 is "sampled". */
  flags: number;
}

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;
const ZERO_TRACE = "0".repeat(32);
const ZERO_SPAN = "0".repeat(16);

/** The parts of a valid traceparent, or null (absent, malformed, all-zero ids, version ff). */
export function parseTraceparent(value: string | null | undefined): TraceParent | null {
  if (!value) return null;
  const match = TRACEPARENT.exec(value.trim().toLowerCase());
  if (!match) return null;
  const [, version, traceId, spanId, flags, rest] = match;
  if (version === "ff" || traceId === ZERO_TRACE || spanId === ZERO_SPAN) return null;
  // Version 00 has exactly four fields; a later version may add more after a dash.
  if (version === "00" && rest !== undefined) return null;
  return { traceId: traceId!, spanId: spanId!, flags: Number.parseInt(flags!, 16) };
}

export function formatTraceparent({ traceId, spanId, flags }: TraceParent): string {
  return `00-${traceId}-${spanId}-${(flags & 0xff).toString(16).padStart(2, "0")}`;
}

/** A valid traceparent in its canonical form, or null: what is stored with a task. */
export function normalTraceparent(value: string | null | undefined): string | null {
  const parsed = parseTraceparent(value);
  return parsed ? formatTraceparent(parsed) : null;
}
