// The dashboard's reads (src/ui): GET /overview (tasks by state and queue, the last hour's
// throughput and latency, worker slots), GET /overview/events (the same, live over SSE), and
// GET /concurrency-keys (flow control's keys in use). Read scope, like every GET.
import { Elysia } from "elysia";
import {
  concurrencyKeysInUse,
  countTasksByQueueAndState,
  lastEventId,
  latencyPerMinute,
  throughputPerMinute,
} from "../db/overview";
import { TASK_STATES } from "../task/state";
import type { ApiDeps } from "./deps";
import { errorAnswer } from "./errors";
import { answer, documentedResponses, responses } from "./openapi";
import { ConcurrencyKeyList, OverviewJson } from "./overview-model";
import { listWorkers } from "./service";
import { KEEPALIVE_MS, sseError, sseResponse } from "./sse";

/** The charts' span, in minutes. */
export const OVERVIEW_MINUTES = 60;
/** One read serves every caller within this long (many dashboards open cost one read a second). */
const OVERVIEW_CACHE_MS = 1000;
/** How often a live overview is read again (sent only when it changed). */
export const OVERVIEW_INTERVAL_MS = 2000;

const cache = new WeakMap<object, { at: number; value: Promise<OverviewJson> }>();

const MINUTE_MS = 60_000;

export async function readOverview(deps: ApiDeps): Promise<OverviewJson> {
  const now = performance.now();
  const hit = cache.get(deps.sql);
  if (hit && now - hit.at < OVERVIEW_CACHE_MS) return hit.value;
  const value = computeOverview(deps);
  cache.set(deps.sql, { at: now, value });
  value.catch(() => cache.delete(deps.sql));
  return value;
}

async function computeOverview(deps: ApiDeps): Promise<OverviewJson> {
  // The heavy reads go to a replica when DATABASE_READ_URL names one; the event id that live
  // updates resume from stays on the primary, where the change feed is.
  const reader = deps.readSql ?? deps.sql;
  const [counts, throughput, latency, workers, eventId] = await Promise.all([
    countTasksByQueueAndState(reader),
    throughputPerMinute(reader, OVERVIEW_MINUTES),
    latencyPerMinute(reader, OVERVIEW_MINUTES),
    listWorkers(deps),
    lastEventId(deps.sql),
  ]);
  const states = Object.fromEntries(TASK_STATES.map((state) => [state, 0])) as Record<string, number>;
  const queues = new Map<string, Record<string, number>>();
  for (const row of counts) {
    states[row.state] = (states[row.state] ?? 0) + row.tasks;
    const queue = queues.get(row.queue) ?? Object.fromEntries(TASK_STATES.map((state) => [state, 0]));
    queue[row.state] = row.tasks;
    queues.set(row.queue, queue);
  }
  // One entry per minute, zeros included, ending with the current minute (the database's
  // minutes, as the rows say; the process's clock only places the empty ones).
  const byMinute = new Map(throughput.map((row) => [row.minute.getTime(), row]));
  const last = throughput.at(-1)?.minute.getTime() ?? Math.floor(Date.now() / MINUTE_MS) * MINUTE_MS;
  const end = Math.max(last, Math.floor(Date.now() / MINUTE_MS) * MINUTE_MS);
  const minutes = Array.from({ length: OVERVIEW_MINUTES }, (_, i) => end - (OVERVIEW_MINUTES - 1 - i) * MINUTE_MS);
  const total = workers.reduce((sum, worker) => sum + worker.slots, 0);
  const used = workers.reduce((sum, worker) => sum + worker.running, 0);
  return {
    at: new Date().toISOString(),
    last_event_id: eventId,
    states,
    queues: [...queues].map(([queue, counted]) => ({
      queue,
      states: counted,
      total: Object.values(counted).reduce((a, b) => a + b, 0),
    })),
    throughput: minutes.map((minute) => {
      const row = byMinute.get(minute);
      return {
        minute: new Date(minute).toISOString(),
        succeeded: row?.succeeded ?? 0,
        failed: row?.failed ?? 0,
        other: row?.other ?? 0,
      };
    }),
    latency: latency.map((row) => ({
      minute: row.minute.toISOString(),
      started: row.started,
      p50_ms: Math.round(row.p50_ms),
      p95_ms: Math.round(row.p95_ms),
      max_ms: Math.round(row.max_ms),
    })),
    slots: { workers: workers.length, total, used, free: Math.max(0, total - used) },
  };
}

/**
 * The overview as server-sent events: `event: overview` at once, then whenever it changed
 * (read every OVERVIEW_INTERVAL_MS), a `: keepalive` comment otherwise every 15 s. The stream
 * lasts until the client goes; the dashboard closes it while its tab is hidden.
 */
export function overviewEventsResponse(
  deps: ApiDeps,
  request: Request,
  server: { timeout(request: Request, seconds: number): void } | null | undefined,
  intervalMs = OVERVIEW_INTERVAL_MS,
): Response {
  server?.timeout(request, 0);
  const encoder = new TextEncoder();
  let timer: Timer | undefined;
  let closed = false;
  let sent = "";
  let quietSince = performance.now();
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      const close = () => {
        if (closed) return;
        closed = true;
        clearTimeout(timer);
        try {
          controller.close();
        } catch {
          // Already closed by the client.
        }
      };
      request.signal.addEventListener("abort", close, { once: true });
      const tick = async () => {
        if (closed) return;
        try {
          const overview = await readOverview(deps);
          const { at: _at, ...content } = overview;
          const key = JSON.stringify(content);
          if (closed) return;
          if (key !== sent) {
            sent = key;
            quietSince = performance.now();
            controller.enqueue(encoder.encode(`event: overview\ndata: ${JSON.stringify(overview)}\n\n`));
          } else if (performance.now() - quietSince >= KEEPALIVE_MS) {
            quietSince = performance.now();
            controller.enqueue(encoder.encode(": keepalive\n\n"));
          }
        } catch (error) {
          if (closed) return;
          const { body } = errorAnswer(error, deps, "GET /overview/events");
          controller.enqueue(encoder.encode(sseError(body)));
        }
        if (!closed) timer = setTimeout(tick, intervalMs);
      };
      void tick();
    },
    cancel() {
      closed = true;
      clearTimeout(timer);
    },
  });
  return sseResponse(stream);
}

/** Most keys GET /concurrency-keys lists. */
const MAX_KEYS = 500;

export function overviewController(deps: ApiDeps) {
  return new Elysia({ normalize: false })
    .get("/overview", () => readOverview(deps), {
      response: responses({ 200: answer(OverviewJson, "The overview.") }, []),
      detail: {
        operationId: "getOverview",
        tags: ["dashboard"],
        summary: "Overview: tasks by state and queue, throughput, latency, slots",
        description:
          "What the dashboard's overview shows: every task counted by state and by queue, attempts ended per minute and " +
          "submit-to-start latency per minute over the last hour, and worker slots used and free. Read at most once a " +
          "second per role process (callers within that second share the read).",
      },
    })
    .get("/overview/events", ({ request, server }) => overviewEventsResponse(deps, request, server), {
      detail: {
        operationId: "watchOverview",
        tags: ["dashboard"],
        summary: "Watch the overview",
        description:
          "Server-sent events: `event: overview` with an Overview at once, then each time it changed (checked every 2 s), " +
          "a `: keepalive` comment after 15 s without change. Lasts until the client closes it.",
        responses: documentedResponses(
          {
            200: {
              description: "An event stream of Overview messages.",
              content: { "text/event-stream": { schema: OverviewJson } },
            },
          },
          [],
        ),
      },
    })
    .get(
      "/concurrency-keys",
      async () => ({
        keys: (await concurrencyKeysInUse(deps.readSql ?? deps.sql, MAX_KEYS)).map((row) => ({
          key: row.key,
          max: row.max,
          live: row.live,
          queued: row.queued,
        })),
      }),
      {
        response: responses({ 200: answer(ConcurrencyKeyList, "The concurrency keys in use.") }, []),
        detail: {
          operationId: "listConcurrencyKeys",
          tags: ["flow"],
          summary: "Concurrency keys in use",
          description: "Every concurrency key with live (dispatched or running) or queued tasks, the busiest first, at most 500.",
        },
      },
    );
}
