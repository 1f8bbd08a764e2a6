// Live logs: `GET /tasks/:id/logs` (bytes from an offset, or with follow=1 server-sent events
// until the attempt ends) and gRPC TailLogs share these functions. A tail wakes on the task's own
// channel (src/db/notify.ts), where every stored batch of output and every change of the task is
// notified, and reads from the database what came since its offset: never a tight poll.

import { type LogAttempt, type LogPiece, type LogSelection, readLogAttempt, readLogPieces } from "../db/logs";
import { invalidArgument, TaskQueueError } from "../task/errors";
import { isTaskId } from "../task/spec";
import { isFinal, isTaskState } from "../task/state";
import type { ApiDeps } from "./deps";
import { errorAnswer } from "./errors";
import { KEEPALIVE_MS, sseError, sseResponse } from "./sse";

/** Most bytes one read (a plain GET, or one step of a tail) returns. */
const READ_BYTES = 1024 * 1024;

export interface LogQuery {
  stream: LogSelection;
  offset: number;
  /** 0: the latest. */
  attempt: number;
}

/** Checks the query's values (the route's schema has checked their types). */
export function logQuery(id: string, raw: { stream?: string; offset?: string | number; attempt?: string | number }): LogQuery {
  if (!isTaskId(id)) throw invalidArgument("id", "id must be a task id (a UUID)");
  const stream = raw.stream ?? "both";
  if (stream !== "stdout" && stream !== "stderr" && stream !== "both")
    throw invalidArgument("stream", "stream must be stdout, stderr or both");
  const attempt = counted(raw.attempt, "attempt");
  if (attempt > 2_147_483_647) throw invalidArgument("attempt", "attempt must be at most 2147483647");
  return { stream, offset: counted(raw.offset, "offset"), attempt };
}

/** A non-negative integer from a query parameter or header; `field` names it in the error. */
export function counted(value: string | number | undefined | null, field: string): number {
  if (value === undefined || value === null || value === "") return 0;
  const text = String(value).trim();
  if (!/^\d{1,15}$/.test(text)) throw invalidArgument(field, `${field} must be a non-negative integer`);
  return Number(text);
}

/** Where an attempt's log stands, or the 404 naming what is missing. */
async function attemptOrThrow(deps: ApiDeps, id: string, attempt: number): Promise<LogAttempt> {
  const found = await readLogAttempt(deps.sql, id, attempt);
  if (!found) throw new TaskQueueError("task_not_found", `task ${id} not found`, "id");
  if (found.attempt < 0) throw new TaskQueueError("attempt_not_found", `task ${id} has no attempt ${attempt}`, "attempt");
  return found;
}

/**
 * The attempt has ended and everything it wrote is stored: its final chunk is, or it wrote
 * nothing and ended by its worker's report (whose output would have come first). An attempt
 * lost with its worker may have written what never arrived.
 */
function complete(state: LogAttempt): boolean {
  if (state.attempt === 0) return false;
  if (!state.ended) return false;
  if (state.finalStored) return true;
  return !state.anyStored && state.outcome !== "lost";
}

export interface LogRead {
  attempt: number;
  offset: number;
  nextOffset: number;
  complete: boolean;
  truncated: number;
  bytes: Uint8Array;
}

/** What is stored of the attempt from the offset on (a plain GET). */
export async function readLog(deps: ApiDeps, id: string, query: LogQuery): Promise<LogRead> {
  const state = await attemptOrThrow(deps, id, query.attempt);
  // Everything stored from the offset (at most TQ_LOG_MAX_BYTES), read a bounded step at a time.
  // Output pruned by retention while the attempt ran is gone: the bytes then start later than asked.
  const pieces: LogPiece[] = [];
  let size = 0;
  let end = query.offset;
  let fromSeq = 0;
  while (state.attempt > 0) {
    const step = await readLogPieces(deps.sql, id, state.attempt, query.stream, end, READ_BYTES, fromSeq);
    if (step.length === 0) break;
    for (const piece of step) {
      pieces.push(piece);
      size += piece.data.length;
      end = piece.offset + piece.data.length;
      fromSeq = piece.seq;
    }
  }
  const start = pieces[0]?.offset ?? query.offset;
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const piece of pieces) {
    bytes.set(piece.data, at);
    at += piece.data.length;
  }
  return {
    attempt: state.attempt,
    offset: start,
    nextOffset: end,
    complete: complete(state),
    truncated: state.cut,
    bytes,
  };
}

export type TailItem =
  | { kind: "log"; piece: LogPiece; nextOffset: number }
  | { kind: "end"; attempt: number; state: string; exitCode: number | null; truncated: number };

/**
 * The attempt's output from the offset on, live until the attempt has ended and everything it
 * wrote was given, then one `end`. A task with no attempt yet is waited for (its first attempt is
 * the one tailed); one that reached a final state without any attempt ends at once.
 */
export async function* tailLog(deps: ApiDeps, id: string, query: LogQuery, signal: AbortSignal): AsyncGenerator<TailItem> {
  let pending = true;
  let wake: (() => void) | null = null;
  const poke = () => {
    pending = true;
    const resolve = wake;
    wake = null;
    resolve?.();
  };
  // Listening before the first read: nothing stored after it can go unnoticed.
  const offResync = deps.feed.onResync(poke);
  signal.addEventListener("abort", poke);
  let offTask: () => void = () => {};
  try {
    offTask = await deps.feed.onTask(id, poke);
    // The attempt tailed: the one asked for, or the latest now, or (none yet) the first to come.
    let target = (await attemptOrThrow(deps, id, query.attempt)).attempt;
    let offset = query.offset;
    // Rows before the one the last byte given came from hold nothing more: each step starts there.
    let fromSeq = 0;
    while (!signal.aborted) {
      pending = false;
      const state = await attemptOrThrow(deps, id, target);
      target = state.attempt;
      if (state.attempt === 0) {
        if (isTaskState(state.taskState) && isFinal(state.taskState)) {
          yield { kind: "end", attempt: 0, state: state.taskState, exitCode: null, truncated: 0 };
          return;
        }
      } else {
        // Read until what is stored is given, then end if the attempt had ended before the read
        // (its output is stored before its end is: nothing more can come).
        const ended = state.ended;
        const pieces = await readLogPieces(deps.sql, id, state.attempt, query.stream, offset, READ_BYTES, fromSeq);
        for (const piece of pieces) {
          offset = piece.offset + piece.data.length;
          fromSeq = piece.seq;
          yield { kind: "log", piece, nextOffset: offset };
        }
        if (pieces.length > 0) continue;
        if (ended) {
          // The end was written with the task's next state (retrying, final) in one statement.
          yield { kind: "end", attempt: state.attempt, state: state.taskState, exitCode: state.exitCode, truncated: state.cut };
          return;
        }
      }
      while (!pending && !signal.aborted) await new Promise<void>((resolve) => (wake = resolve));
    }
  } finally {
    offTask();
    offResync();
    signal.removeEventListener("abort", poke);
  }
}

export interface LogEventsOptions {
  keepaliveMs?: number;
  server?: { timeout(request: Request, seconds: number): void } | null;
  lastEventId?: string | null;
}

/** The SSE answer of `GET /tasks/:id/logs?follow=1`; a bad query or unknown task throws before any byte. */
export async function logEventsResponse(
  deps: ApiDeps,
  id: string,
  query: LogQuery,
  request: Request,
  options: LogEventsOptions = {},
): Promise<Response> {
  const resumeAt = options.lastEventId?.trim();
  const from = resumeAt ? { ...query, offset: counted(resumeAt, "Last-Event-ID") } : query;
  // Unknown task or attempt: the JSON 404, before the stream opens.
  await attemptOrThrow(deps, id, from.attempt);
  const stop = new AbortController();
  const items = tailLog(deps, id, from, stop.signal);
  options.server?.timeout(request, 0);
  const encoder = new TextEncoder();
  const where = `GET ${new URL(request.url).pathname}`;
  // Bytes of a character cut by a chunk boundary wait for the rest of it, per stream.
  const carry: Record<string, { offset: number; bytes: Uint8Array } | undefined> = {};
  let keepalive: Timer | undefined;
  let closed = false;
  let close = () => {};

  const message = (item: TailItem): string => {
    if (item.kind === "end") {
      const data = { attempt: item.attempt, state: item.state, exit_code: item.exitCode, truncated: item.truncated };
      return `event: end\ndata: ${JSON.stringify(data)}\n\n`;
    }
    const { stream } = item.piece;
    const held = carry[stream];
    const offset = held ? held.offset : item.piece.offset;
    const bytes = held ? join(held.bytes, item.piece.data) : item.piece.data;
    const whole = bytes.length - partialTail(bytes);
    carry[stream] = whole < bytes.length ? { offset: offset + whole, bytes: bytes.slice(whole) } : undefined;
    if (whole === 0) return "";
    const text = new TextDecoder("utf-8").decode(bytes.subarray(0, whole));
    return `event: log\nid: ${offset + whole}\ndata: ${JSON.stringify({ stream, offset, data: text })}\n\n`;
  };

  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      close = () => {
        if (closed) return;
        closed = true;
        clearInterval(keepalive);
        request.signal.removeEventListener("abort", close);
        stop.abort();
        void items.return(undefined).catch(() => {});
        try {
          controller.close();
        } catch {
          // Already closed or cancelled by the client.
        }
      };
      if (request.signal.aborted) return close();
      request.signal.addEventListener("abort", close);
      controller.enqueue(encoder.encode(`: logs of task ${id} from offset ${from.offset}\n\n`));
      keepalive = setInterval(() => controller.enqueue(encoder.encode(": keepalive\n\n")), options.keepaliveMs ?? KEEPALIVE_MS);
    },
    async pull(controller) {
      if (closed) return;
      try {
        const next = await items.next();
        if (closed) return;
        if (next.done) return close();
        if (next.value.kind === "end") {
          // What is left of a cut character is all there is: sent as it is (replaced).
          for (const [name, held] of Object.entries(carry)) {
            if (!held) continue;
            const text = new TextDecoder("utf-8").decode(held.bytes);
            const data = { stream: name, offset: held.offset, data: text };
            controller.enqueue(
              encoder.encode(`event: log\nid: ${held.offset + held.bytes.length}\ndata: ${JSON.stringify(data)}\n\n`),
            );
          }
          controller.enqueue(encoder.encode(message(next.value)));
          return close();
        }
        const text = message(next.value);
        if (text) controller.enqueue(encoder.encode(text));
      } catch (error) {
        if (closed) return;
        const { body } = errorAnswer(error, deps, where);
        controller.enqueue(encoder.encode(sseError(body)));
        close();
      }
    },
    cancel() {
      close();
    },
  });

  return sseResponse(stream);
}

/** How many bytes at the end begin a UTF-8 character that is not complete yet (0 to 3). */
export function partialTail(bytes: Uint8Array): number {
  for (let back = 1; back <= Math.min(3, bytes.length); back++) {
    const byte = bytes[bytes.length - back] ?? 0;
    if ((byte & 0xc0) === 0x80) continue; // continuation: look further back
    const need = byte >= 0xf0 ? 4 : byte >= 0xe0 ? 3 : byte >= 0xc0 ? 2 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

function join(a: Uint8Array, b: Uint8Array): Uint8Array {
  const all = new Uint8Array(a.length + b.length);
  all.set(a, 0);
  all.set(b, a.length);
  return all;
}
