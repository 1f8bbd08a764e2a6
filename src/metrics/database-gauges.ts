// The gauges read from the database at scrape time: unfinished tasks by queue and state, and
// the age of the oldest due task still queued, by queue. One statement per scrape at most once
// a second, whichever gauge asks first; the others of the same scrape reuse its answer.
import { type DepthRow, readQueueDepth } from "../db/depth";
import type { Sql } from "../db/sql";
import type { TaskMetrics } from "./metrics";

/** How long one reading answers scrapes, in ms. */
const CACHE_MS = 1000;

export function addDatabaseGauges(metrics: TaskMetrics, sql: Sql): void {
  let reading: Promise<DepthRow[]> | null = null;
  let readAt = Number.NEGATIVE_INFINITY;
  const read = (): Promise<DepthRow[]> => {
    if (reading && performance.now() - readAt < CACHE_MS) return reading;
    readAt = performance.now();
    reading = readQueueDepth(sql);
    // A failed reading is not kept: the next scrape asks again.
    reading.catch(() => {
      readAt = Number.NEGATIVE_INFINITY;
    });
    return reading;
  };
  metrics.gauge(
    "taskqueue_queue_depth",
    "Unfinished tasks by queue and state (waiting, queued, dispatched, running).",
    ["queue", "state"],
    async (gauge) => {
      gauge.reset();
      for (const row of await read()) gauge.set({ queue: row.queue, state: row.state }, row.tasks);
    },
  );
  metrics.gauge(
    "taskqueue_queue_oldest_queued_age_seconds",
    "By queue: how long the oldest due task still queued has been due; 0 when none waits.",
    ["queue"],
    async (gauge) => {
      gauge.reset();
      const oldest = new Map<string, number>();
      for (const row of await read()) {
        if (row.state === "queued") oldest.set(row.queue, row.oldest_due_s);
        else if (!oldest.has(row.queue)) oldest.set(row.queue, 0);
      }
      for (const [queue, seconds] of oldest) gauge.set({ queue }, seconds);
    },
  );
}
