// `GET /tasks/:id/events` as server-sent events: the current state first (or, with
// Last-Event-ID, every event after that one), then every event until a final state, then the
// stream ends. Each message's id is its task_events id, so a client that reconnects with the
// last id it saw misses nothing and sees nothing twice.

import { isFinal, isTaskState } from "../task/state";
import type { ApiDeps } from "./deps";
import { errorAnswer } from "./errors";
import { taskEventJson } from "./model";
import { canFollow, parseEventId, type TaskUpdate, watchTask } from "./service";

/** A comment this often keeps proxies and clients from timing the stream out. */
export const KEEPALIVE_MS = 15_000;

/** The headers of every event stream the API serves (no caching, no proxy buffering). */
const SSE_HEADERS = {
  "content-type": "text/event-stream; charset=utf-8",
  "cache-control": "no-cache",
  "x-accel-buffering": "no",
};

/** An event stream's response (task events, live logs, the overview). */
export function sseResponse(stream: ReadableStream<Uint8Array>): Response {
  return new Response(stream, { headers: SSE_HEADERS });
}

/** An error after the headers were sent: it becomes the stream's last message. */
export function sseError(body: unknown): string {
  return `event: error\ndata: ${JSON.stringify(body)}\n\n`;
}

export function sseMessage(update: TaskUpdate): string {
  return `id: ${update.eventId}\nevent: task\ndata: ${JSON.stringify(taskEventJson(update.task, update.event))}\n\n`;
}

/** The last update of a watch: the final state when it began, or the event that made the task final. */
function endsWatch(update: TaskUpdate): boolean {
  const state = update.event === null ? update.task.state : update.event.state;
  return isTaskState(state) && isFinal(state);
}

export interface TaskEventsOptions {
  keepaliveMs?: number;
  /** When served by Bun.serve: lifts the idle timeout, which would cut a quiet stream. */
  server?: { timeout(request: Request, seconds: number): void } | null;
  /** The Last-Event-ID header: resume after this event. */
  lastEventId?: string | null;
}

/**
 * Answers with the event stream of one task. A bad or unknown id, or an unreachable database,
 * throws before any byte is sent, so the client gets the usual JSON error and status.
 */
export async function taskEventsResponse(
  deps: ApiDeps,
  id: string,
  request: Request,
  options: TaskEventsOptions = {},
): Promise<Response> {
  const raw = options.lastEventId?.trim();
  const afterEventId = raw ? parseEventId(raw, "Last-Event-ID") : undefined;
  // A resume may have nothing to send until the task next changes: the stream opens once the
  // task is known and something can follow, not at its next event.
  if (afterEventId !== undefined && !(await canFollow(deps, id, afterEventId))) return new Response(null, { status: 204 });
  const stop = new AbortController();
  const updates = watchTask(deps, id, stop.signal, { afterEventId });
  const first = afterEventId === undefined ? await updates.next() : null;
  if (first?.done) return new Response(null, { status: 204 });
  options.server?.timeout(request, 0);

  const encoder = new TextEncoder();
  const where = `GET ${new URL(request.url).pathname}`;
  let keepalive: Timer | undefined;
  let closed = false;
  let close = () => {};

  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      // Stops the watcher, the timer and the disconnect listener once, however the stream ends.
      close = () => {
        if (closed) return;
        closed = true;
        clearInterval(keepalive);
        request.signal.removeEventListener("abort", close);
        stop.abort();
        void updates.return(undefined).catch(() => {});
        try {
          controller.close();
        } catch {
          // Already closed or cancelled by the client.
        }
      };
      if (first) {
        controller.enqueue(encoder.encode(sseMessage(first.value)));
        if (endsWatch(first.value)) return close();
      } else controller.enqueue(encoder.encode(`: resuming after event ${afterEventId}\n\n`));
      if (request.signal.aborted) return close();
      request.signal.addEventListener("abort", close);
      keepalive = setInterval(() => controller.enqueue(encoder.encode(": keepalive\n\n")), options.keepaliveMs ?? KEEPALIVE_MS);
    },
    async pull(controller) {
      if (closed) return;
      try {
        const next = await updates.next();
        if (closed) return;
        if (next.done) return close();
        controller.enqueue(encoder.encode(sseMessage(next.value)));
        if (endsWatch(next.value)) close();
      } catch (error) {
        if (closed) return;
        // Headers are sent: the error becomes the last message.
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
