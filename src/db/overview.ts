// What the dashboard's overview reads (src/api/overview.ts): tasks by queue and state, the
// last hour's throughput and submit-to-start latency per minute, and the concurrency keys in
// use. Each statement stays on an index on 100,000 tasks (EXPLAIN in test/integration/overview.test.ts):
// the counts are an index-only scan of tasks_queue_state_idx, the hour's attempts a range of
// task_attempts_finished_idx / task_attempts_started_idx (migration 0023), the keys the
// partial concurrency indexes. The reads return the pending statement (awaited like a
// promise), so that the test can EXPLAIN the very statement served.
import { GUARDS } from "../task/state";
import { states } from "./encode";
import type { Sql } from "./sql";

export interface StateCountRow {
  queue: string;
  state: string;
  tasks: number;
}

/** Every task, counted by queue and state. */
export function countTasksByQueueAndState(sql: Sql) {
  return sql<StateCountRow[]>`
    SELECT queue::text AS queue, state, count(*)::int AS tasks FROM tasks GROUP BY queue, state ORDER BY queue, state`;
}

export interface MinuteRow {
  /** The minute's start. */
  minute: Date;
  succeeded: number;
  failed: number;
  /** Attempts that ended otherwise: timed out, lost, stopped. */
  other: number;
}

/** Attempts that ended in each minute of the last `minutes` minutes, by outcome (database clock). */
export function throughputPerMinute(sql: Sql, minutes: number) {
  return sql<MinuteRow[]>`
    SELECT date_trunc('minute', finished_at) AS minute,
           count(*) FILTER (WHERE outcome = 'succeeded')::int AS succeeded,
           count(*) FILTER (WHERE outcome = 'failed')::int AS failed,
           count(*) FILTER (WHERE outcome NOT IN ('succeeded', 'failed'))::int AS other
    FROM task_attempts
    WHERE finished_at >= date_trunc('minute', now()) - make_interval(mins => ${minutes - 1})
    GROUP BY 1 ORDER BY 1`;
}

export interface LatencyRow {
  minute: Date;
  started: number;
  p50_ms: number;
  p95_ms: number;
  max_ms: number;
}

/**
 * Submit-to-start latency of the first attempts started in each minute: from when the task
 * could first run (created, or its scheduled time if later) to its start.
 */
export function latencyPerMinute(sql: Sql, minutes: number) {
  return sql<LatencyRow[]>`
    SELECT date_trunc('minute', a.started_at) AS minute, count(*)::int AS started,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY l.ms)::float8 AS p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY l.ms)::float8 AS p95_ms,
           max(l.ms)::float8 AS max_ms
    FROM task_attempts a
    JOIN tasks t ON t.id = a.task_id
    CROSS JOIN LATERAL (
      SELECT greatest(0, extract(epoch FROM a.started_at - greatest(t.created_at, t.scheduled_at)) * 1000) AS ms
    ) l
    WHERE a.started_at >= date_trunc('minute', now()) - make_interval(mins => ${minutes - 1})
      AND a.attempt = 1
    GROUP BY 1 ORDER BY 1`;
}

/** The newest task_events id (a change marker: the dashboard reloads a view when it moves). */
export async function lastEventId(sql: Sql): Promise<string> {
  const [row] = await sql<{ id: string | null }[]>`SELECT max(id)::text AS id FROM task_events`;
  return row?.id ?? "0";
}

export interface ConcurrencyKeyRow {
  key: string;
  /** The key's most live tasks, as its newest unfinished task asked. */
  max: number | null;
  live: number;
  queued: number;
}

const LIVE = GUARDS.inFlight;

/** Concurrency keys with live or queued tasks, the busiest first. */
export function concurrencyKeysInUse(sql: Sql, limit: number) {
  return sql<ConcurrencyKeyRow[]>`
    SELECT key, max(concurrency_max)::int AS max, sum(live)::int AS live, sum(queued)::int AS queued FROM (
      SELECT concurrency_key AS key, max(concurrency_max) AS concurrency_max, count(*) AS live, 0 AS queued
      FROM tasks WHERE concurrency_key IS NOT NULL AND state IN (${states(sql, LIVE)}) GROUP BY 1
      UNION ALL
      SELECT concurrency_key, max(concurrency_max), 0, count(*)
      FROM tasks WHERE concurrency_key IS NOT NULL AND state = 'queued' GROUP BY 1
    ) k
    GROUP BY key ORDER BY sum(live) DESC, sum(queued) DESC, key
    LIMIT ${limit}`;
}
