// The API's server-sent event streams (a task's events, its live logs), read with
// eventsource-parser, resumed with Last-Event-ID when the connection drops before the stream
// said it was done: a watch or a tail sees every message once, even across a role restart.
import { type EventSourceMessage, EventSourceParserStream } from "eventsource-parser/stream";
import { CliError, type Context, EXIT, fetchApi } from "./context";

/** How long a dropped stream is tried again before the CLI gives up. */
const RECONNECT_FOR_MS = 30_000;
const RECONNECT_DELAYS_MS = [100, 250, 500, 1000, 2000];

export interface FollowOptions {
  /** Resume after this id (an event id, a log offset). */
  lastEventId?: string;
  /** True for the message after which the stream is complete (it closes by itself then). */
  isLast: (message: EventSourceMessage) => boolean;
  signal?: AbortSignal;
}

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

/**
 * Every message of the stream at `path`, until one that `isLast` says ends it, or an answer
 * of 204 (nothing follows the id resumed from). A connection that ends or fails before that
 * is opened again from the last id seen, for up to RECONNECT_FOR_MS; an error answer (404,
 * 401, ...) ends it with that error.
 */
export async function* follow(ctx: Context, path: string, options: FollowOptions): AsyncGenerator<EventSourceMessage> {
  let lastEventId = options.lastEventId;
  let failingSince: number | null = null;
  let attempt = 0;
  while (!options.signal?.aborted) {
    let dropped: unknown = null;
    try {
      const headers: Record<string, string> = { accept: "text/event-stream" };
      if (lastEventId !== undefined) headers["last-event-id"] = lastEventId;
      const response = await fetchApi(ctx, path, { headers, signal: options.signal });
      if (response.status === 204 || !response.body) return;
      failingSince = null;
      attempt = 0;
      const messages = response.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
      for await (const message of messages) {
        if (message.id !== undefined) lastEventId = message.id;
        yield message;
        if (options.isLast(message)) return;
      }
    } catch (error) {
      if (options.signal?.aborted) return;
      // The API's own refusals (a 404, a 401) are final; a refused or broken connection is not.
      if (error instanceof CliError && error.exitCode !== EXIT.unavailable) throw error;
      dropped = error;
    }
    // The stream ended without its last message: the connection dropped (or the role stopped).
    failingSince ??= Date.now();
    if (Date.now() - failingSince > RECONNECT_FOR_MS) {
      if (dropped instanceof CliError) throw dropped;
      throw new CliError(`the stream from ${ctx.url}${path} kept dropping for ${RECONNECT_FOR_MS / 1000} s`, EXIT.unavailable);
    }
    await sleep(RECONNECT_DELAYS_MS[Math.min(attempt++, RECONNECT_DELAYS_MS.length - 1)] ?? 2000, options.signal);
  }
}
