// Flow control in SQL: the fragments the claim (src/db/claim.ts) and the insert
// (src/db/insert.ts) embed for concurrency keys and rate limits, the rate limits' own table,
// the submit-time strategies and the waiting reasons. The rules in words are in
// src/task/flow.ts; the bucket arithmetic here is refill() and take() from there, in SQL.
//
// Correctness across coordinators, in one statement and READ COMMITTED:
// - A key's live count is read from the claim's snapshot (the live tasks of the key). Only a
//   claim makes a keyed task live (the run-now fast path skips keyed tasks), and each claim that
//   admits from a key raises its concurrency_keys row's `claims` in the same statement. A claim
//   locks the key rows it admits from (FOR UPDATE SKIP LOCKED: it never waits, so no deadlock),
//   which yields the row's latest version; if that differs from the snapshot's, a claim
//   committed since the snapshot and the key is left for the next pass. So the count is never
//   missing a live task: finishes and rescues that committed since only make it larger.
// - A bucket's row is its whole state (tokens as of updated_at); a claim locks it the same way
//   and also leaves it when another claim changed it since the snapshot.
// - Candidates of a full key or an empty bucket never take the claim's window: the scan admits
//   a task only if the tasks of its key queued before it leave it room (and likewise its
//   bucket's tokens), counted on the queued partial indexes and bounded by the max.

import { type ConcurrencyStrategy, expandSchedule, type Rate } from "../task/flow";
import type { TaskSpec } from "../task/task";
import { changedRows, recordChange, type TaskChangeRow } from "./changes";
import type { Column, Fragment } from "./encode";
import type { Sql } from "./sql";
import { taskRowColumns } from "./tasks";

/** A spec's schedule id, when a schedule created it (helper `schedules` adds `firing`). */
function scheduleIdOf(spec: TaskSpec): string | null {
  return (spec as TaskSpec & { firing?: { scheduleId: string } }).firing?.scheduleId ?? null;
}

/** Whether a spec is under flow control (such a task is never born dispatched). */
export function hasFlow(spec: TaskSpec): boolean {
  return spec.concurrency !== undefined || spec.rateLimit !== undefined;
}

/** The insert's columns for flow control, `{schedule}` filled in. */
export const flowColumns: Record<string, Column<{ spec: TaskSpec }>> = {
  concurrency_key: ["text", (t) => (t.spec.concurrency ? expandSchedule(t.spec.concurrency.key, scheduleIdOf(t.spec)) : null)],
  concurrency_max: ["integer", (t) => t.spec.concurrency?.max ?? null],
  concurrency_strategy: ["text", (t) => t.spec.concurrency?.strategy ?? null],
  rate_limit: ["text", (t) => t.spec.rateLimit?.name ?? null],
  rate_limit_key: ["text", (t) => (t.spec.rateLimit ? expandSchedule(t.spec.rateLimit.key, scheduleIdOf(t.spec)) : null)],
};

/**
 * The insert's CTEs (before `t`, reading its input `r`) that create the rows a new task's key
 * and bucket need: ON CONFLICT DO NOTHING takes no lock on an existing row.
 */
export function flowRows(sql: Sql): Fragment {
  return sql`
    flow_keys AS (
      INSERT INTO concurrency_keys (key)
      SELECT DISTINCT r.concurrency_key FROM r WHERE r.concurrency_key IS NOT NULL
      ON CONFLICT (key) DO NOTHING
    ),
    flow_buckets AS (
      INSERT INTO rate_buckets (name, key, tokens, updated_at)
      SELECT DISTINCT r.rate_limit, r.rate_limit_key, l.burst::double precision, now()
      FROM r JOIN rate_limits l ON l.name = r.rate_limit
      ON CONFLICT (name, key) DO NOTHING
    ),`;
}

const LIVE = "('dispatched', 'running')";

/**
 * The rows that hold a slot of their key: the live tasks, and those cancelled while live whose
 * process is not yet known to be gone (key_held_until, migration 0024: until the worker reports
 * the attempt stopped, or at the latest that time). Columns concurrency_key, concurrency_max.
 */
const HOLDING = `(SELECT h.concurrency_key, h.concurrency_max FROM tasks h
      WHERE h.concurrency_key IS NOT NULL AND h.state IN ${LIVE}
    UNION ALL
    SELECT h.concurrency_key, h.concurrency_max FROM tasks h
      WHERE h.key_held_until IS NOT NULL AND h.key_held_until > now() AND h.concurrency_key IS NOT NULL)`;

/** Most a cancelled keyed task holds its slot past its lease when its worker never reports the stop (see 0022). */
export const KEY_HOLD_GRACE_MS = 10_000;

/**
 * For the change tail (src/db/changes.ts): a changed row `t` of a keyed task that is no longer
 * live (ended, or back in the queue) frees a slot of its key, which wakes every coordinator:
 * the task waiting for that slot may be any coordinator's to claim.
 */
export function freesKey(sql: Sql): Fragment {
  return sql.unsafe(`(t.concurrency_key IS NOT NULL AND t.state NOT IN ${LIVE})`) as unknown as Fragment;
}

/** A bucket's tokens refilled to now() (b: rate_buckets, l: rate_limits). */
function refilled(b: string, l: string): string {
  return `least(${l}.burst::double precision, ${b}.tokens + greatest(0, extract(epoch FROM now() - ${b}.updated_at) * 1000) * ${l}.rate_count / ${l}.period_ms)`;
}

/** `(ahead.rank, ahead.id) < (tasks.rank, tasks.id)`: queued before `tasks` in the claim's order. */
const AHEAD = "(ahead.rank, ahead.id) < (tasks.rank, tasks.id)";

/** How many queued tasks of the same key come before `tasks`, counted up to its max. */
const KEY_AHEAD = `(SELECT count(*) FROM (SELECT 1 FROM tasks ahead
    WHERE ahead.concurrency_key = tasks.concurrency_key AND ahead.state = 'queued' AND ${AHEAD}
    LIMIT tasks.concurrency_max) a)`;

/** Queued tasks at the head of the claim's order whose keys get the once-per-statement path. */
const HEAD_ROWS = 32;

/**
 * The keys a claim admits from once per statement, each with its live count and its room's
 * max: the keys with live tasks (few: at most the cluster's slots, and the cancelled ones still
 * stopping; the room is the largest max among the live ones), and the keys found more than once
 * among the first HEAD_ROWS queued tasks in the claim's order (the room, for one with none
 * live, is the largest max among those head tasks; a key found once costs one probe of
 * KEY_AHEAD, no more than its lateral here would). The second kind is a hot key whose live tasks all just ended: its
 * backlog, at the front of the queue, would otherwise be counted task by task (KEY_AHEAD, up to
 * max index entries each), which made such a claim cost its backlog times its max.
 * Columns key, live, max.
 */
const KEY_ROOMS = `SELECT x.key, sum(x.live) AS live,
      coalesce(max(x.max) FILTER (WHERE x.live = 1), max(x.max)) AS max FROM (
      SELECT l.concurrency_key AS key, 1 AS live, l.concurrency_max AS max FROM ${HOLDING} l
      UNION ALL
      SELECT head.concurrency_key, 0, max(head.concurrency_max) FROM (
        SELECT h.concurrency_key, h.concurrency_max FROM tasks h WHERE h.state = 'queued'
        ORDER BY h.rank, h.id LIMIT ${HEAD_ROWS}) head
      WHERE head.concurrency_key IS NOT NULL
      GROUP BY head.concurrency_key HAVING count(*) > 1) x
    GROUP BY x.key`;

/**
 * The queued tasks that the KEY_ROOMS keys have room for, as of the snapshot: of each such key,
 * the first (max - live) of its queue, each also within its own max.
 */
const KEY_ADMITTED = `SELECT q.id FROM (${KEY_ROOMS}) lk
    CROSS JOIN LATERAL (
      SELECT q.id, q.concurrency_max, row_number() OVER (ORDER BY q.rank, q.id) - 1 AS ahead FROM tasks q
      WHERE q.concurrency_key = lk.key AND q.state = 'queued'
      ORDER BY q.rank, q.id LIMIT greatest(0, lk.max - lk.live)) q
    WHERE lk.live + q.ahead < q.concurrency_max`;

/**
 * The claim's condition on a candidate `tasks` row (a plain read: the claim's snapshot), with
 * a leading AND: the task's key has room for it after the live tasks and those queued before
 * it, and its bucket has a token for it after those queued before it. Exact once flowRooms
 * finds the key's and bucket's rows unchanged since the snapshot, so the candidates never
 * include a full key's or an empty bucket's tasks, and never use up the claim's window. A
 * task whose limit was deleted runs unlimited.
 */
export function flowCandidateFilter(sql: Sql): Fragment {
  return sql.unsafe(`AND (tasks.concurrency_key IS NULL OR CASE
      -- A key with live tasks, or at the head of the queue (KEY_ROOMS: few): once per
      -- statement (two hashed subplans, built only when a keyed row comes), the queued tasks
      -- its room admits, the first (max - live) of its queue on tasks_concurrency_queued_idx.
      -- Every other task of such a key, a hot key's whole backlog, is then passed over at the
      -- cost of two hash probes a row, never an index probe. (The room is the largest max
      -- among the live ones: a task asking a larger one waits until the key is below theirs.)
      WHEN tasks.concurrency_key IN (SELECT rooms.key FROM (${KEY_ROOMS}) rooms)
      THEN tasks.id IN (${KEY_ADMITTED})
      -- Any other key (none live, first queued task further back): room for its first max
      -- (counted up to the max).
      ELSE ${KEY_AHEAD} < tasks.concurrency_max END)
    AND (tasks.rate_limit IS NULL
      OR NOT EXISTS (SELECT 1 FROM rate_limits l WHERE l.name = tasks.rate_limit)
      OR EXISTS (SELECT 1 FROM rate_buckets b JOIN rate_limits l ON l.name = b.name
        WHERE b.name = tasks.rate_limit AND b.key = tasks.rate_limit_key
          AND (SELECT count(*) FROM (SELECT 1 FROM tasks ahead
                 WHERE ahead.rate_limit = tasks.rate_limit AND ahead.rate_limit_key = tasks.rate_limit_key
                   AND ahead.state = 'queued' AND ${AHEAD}
                 LIMIT floor(${refilled("b", "l")})::bigint) a) + 1 <= floor(${refilled("b", "l")})))`) as unknown as Fragment;
}

/**
 * Extra columns of `cand`: the flow columns, and the task's rank in its key's queue (1 for
 * the next one), for round robin: the pick orders by it first (flowPickOrder), so each key
 * gets one slot before any key gets a second.
 */
export function flowCandidateColumns(sql: Sql): Fragment {
  return sql.unsafe(`, tasks.concurrency_key, tasks.rate_limit, tasks.rate_limit_key,
    CASE WHEN tasks.concurrency_key IS NULL THEN 1 ELSE 1 + ${KEY_AHEAD} END AS key_rank`) as unknown as Fragment;
}

/**
 * CTEs after `room`: the key and bucket rows of the candidates, locked FOR UPDATE SKIP LOCKED
 * (a claim never waits on them, so no deadlock), kept only when unchanged since the claim's
 * snapshot (see the top of this file): then the candidate filter's counts were exact.
 */
export function flowRooms(sql: Sql): Fragment {
  return sql`
    flow_k AS (
      SELECT k.key, k.claims FROM concurrency_keys k
      WHERE k.key IN (SELECT cand.concurrency_key FROM cand WHERE cand.concurrency_key IS NOT NULL)
      ORDER BY k.key FOR UPDATE SKIP LOCKED
    ),
    flow_k_ok AS (
      SELECT flow_k.key FROM flow_k JOIN concurrency_keys snap ON snap.key = flow_k.key AND snap.claims = flow_k.claims
    ),
    flow_b AS (
      SELECT b.name, b.key, b.tokens, b.updated_at FROM rate_buckets b
      WHERE (b.name, b.key) IN (SELECT cand.rate_limit, cand.rate_limit_key FROM cand WHERE cand.rate_limit IS NOT NULL)
      ORDER BY b.name, b.key FOR UPDATE SKIP LOCKED
    ),
    flow_b_ok AS (
      SELECT flow_b.name, flow_b.key, ${sql.unsafe(refilled("flow_b", "l"))} AS tokens
      FROM flow_b JOIN rate_limits l ON l.name = flow_b.name
      JOIN rate_buckets snap ON snap.name = flow_b.name AND snap.key = flow_b.key
        AND snap.tokens = flow_b.tokens AND snap.updated_at = flow_b.updated_at
    ),`;
}

/** Conditions in `ok` on `w`: a candidate's key and bucket rows are held and unchanged. */
export function flowWithinRooms(sql: Sql): Fragment {
  return sql`AND (w.concurrency_key IS NULL OR w.concurrency_key IN (SELECT key FROM flow_k_ok))
    AND (w.rate_limit IS NULL
      OR NOT EXISTS (SELECT 1 FROM rate_limits l WHERE l.name = w.rate_limit)
      OR (w.rate_limit, w.rate_limit_key) IN (SELECT name, key FROM flow_b_ok))`;
}

/** The pick's first order term, with a trailing comma: round robin over keys (key_rank). */
export function flowPickOrder(sql: Sql): Fragment {
  return sql`ok.key_rank,`;
}

/**
 * CTEs after `t` (the claimed rows): each key a claimed task holds gets its `claims` raised
 * (what tells a later claim with an older snapshot to leave the key), and each bucket loses
 * the tokens its claimed tasks took, refilled to now first.
 */
export function flowConsume(sql: Sql): Fragment {
  return sql`
    flow_spend_k AS (
      UPDATE concurrency_keys k SET claims = k.claims + 1
      WHERE k.key IN (SELECT t.concurrency_key FROM t WHERE t.concurrency_key IS NOT NULL)
    ),
    flow_spend_b AS (
      UPDATE rate_buckets b SET tokens = ok.tokens - used.n, updated_at = greatest(b.updated_at, now())
      FROM flow_b_ok ok,
        (SELECT t.rate_limit, t.rate_limit_key, count(*) AS n FROM t WHERE t.rate_limit IS NOT NULL
         GROUP BY t.rate_limit, t.rate_limit_key) used
      WHERE b.name = ok.name AND b.key = ok.key AND used.rate_limit = ok.name AND used.rate_limit_key = ok.key
    ),`;
}

/** The admissible condition alone (no leading AND), for nextDueIn. */
export function flowAdmissible(sql: Sql): Fragment {
  return sql`TRUE ${flowCandidateFilter(sql)}`;
}

/**
 * A subquery: milliseconds until the next token of a bucket that a due queued task waits for
 * (null when none waits), for nextDueIn: the dispatcher sets its timer to it, not the next poll.
 */
export function flowNextToken(sql: Sql): Fragment {
  return sql.unsafe(`(SELECT min(ceil(greatest(0, (1 - ${refilled("b", "l")}) * l.period_ms / l.rate_count)))::bigint
    FROM rate_buckets b JOIN rate_limits l ON l.name = b.name
    WHERE EXISTS (SELECT 1 FROM tasks q WHERE q.rate_limit = b.name AND q.rate_limit_key = b.key
      AND q.state = 'queued' AND q.run_at <= now()))`) as unknown as Fragment;
}

/**
 * A subquery: milliseconds until the first hold of a cancelled task (key_held_until) that a
 * queued task of its key waits behind runs out (null when none), for nextDueIn: a worker that
 * never reports the stop lets its key go at that time, not at the next safety poll.
 */
export function flowNextHoldEnd(sql: Sql): Fragment {
  return sql.unsafe(`(SELECT min(greatest(0, ceil(extract(epoch FROM h.key_held_until - clock_timestamp()) * 1000)))::bigint
    FROM tasks h WHERE h.key_held_until IS NOT NULL AND h.key_held_until > now()
      AND EXISTS (SELECT 1 FROM tasks q WHERE q.concurrency_key = h.concurrency_key AND q.state = 'queued'))`) as unknown as Fragment;
}

/** flowNextToken on its own. */
export async function nextTokenIn(sql: Sql): Promise<number | null> {
  const rows = await sql<{ in_ms: string | null }[]>`SELECT ${flowNextToken(sql)}::text AS in_ms`;
  const value = rows[0]?.in_ms;
  return value == null ? null : Number(value);
}

/** A named rate limit as stored. */
export interface RateLimitRow {
  name: string;
  rate_count: number;
  period_ms: number;
  burst: number;
  created_at: Date;
  updated_at: Date;
}

const RATE_LIMIT_COLUMNS = "name, rate_count, period_ms::float8 AS period_ms, burst, created_at, updated_at";

/** Creates a limit; null when the name is taken. Queued tasks already naming it get their buckets, full. */
export async function createRateLimit(sql: Sql, name: string, rate: Rate, burst: number): Promise<RateLimitRow | null> {
  const rows = await sql<RateLimitRow[]>`
    WITH l AS (
      INSERT INTO rate_limits (name, rate_count, period_ms, burst) VALUES (${name}, ${rate.count}, ${rate.periodMs}, ${burst})
      ON CONFLICT (name) DO NOTHING
      RETURNING *
    ),
    b AS (
      INSERT INTO rate_buckets (name, key, tokens, updated_at)
      SELECT DISTINCT l.name, q.rate_limit_key, l.burst, now() FROM l JOIN tasks q ON q.rate_limit = l.name AND q.state = 'queued'
      ON CONFLICT (name, key) DO NOTHING
    )
    SELECT ${sql.unsafe(RATE_LIMIT_COLUMNS)} FROM l`;
  return rows[0] ?? null;
}

export async function listRateLimits(sql: Sql): Promise<RateLimitRow[]> {
  return sql<RateLimitRow[]>`SELECT ${sql.unsafe(RATE_LIMIT_COLUMNS)} FROM rate_limits ORDER BY name`;
}

export async function getRateLimit(sql: Sql, name: string): Promise<RateLimitRow | null> {
  const rows = await sql<RateLimitRow[]>`SELECT ${sql.unsafe(RATE_LIMIT_COLUMNS)} FROM rate_limits WHERE name = ${name}`;
  return rows[0] ?? null;
}

/** Whether each name is a limit (for a submit's check). */
export async function existingRateLimits(sql: Sql, names: readonly string[]): Promise<Set<string>> {
  if (names.length === 0) return new Set();
  const rows = await sql<{ name: string }[]>`SELECT name FROM rate_limits WHERE name = ANY(${sql.array([...names], 25)})`;
  return new Set(rows.map((row) => row.name));
}

/**
 * Changes a limit's rate or burst; null when there is none. Its buckets keep their tokens
 * (refilled at the old rate up to now first, and cut to a lower burst), so a change neither
 * grants nor takes back what time already earned.
 */
export async function updateRateLimit(
  sql: Sql,
  name: string,
  change: { rate?: Rate; burst?: number },
): Promise<RateLimitRow | null> {
  return sql.begin(async (tx) => {
    const t = tx as unknown as Sql;
    const locked = await t`SELECT 1 FROM rate_limits WHERE name = ${name} FOR UPDATE`;
    if (locked.length === 0) return null;
    await t`
      UPDATE rate_buckets b SET tokens = ${t.unsafe(refilled("b", "l"))}, updated_at = greatest(b.updated_at, now())
      FROM rate_limits l WHERE l.name = b.name AND b.name = ${name}`;
    const rows = await t<RateLimitRow[]>`
      UPDATE rate_limits SET
        rate_count = coalesce(${change.rate?.count ?? null}::integer, rate_count),
        period_ms = coalesce(${change.rate?.periodMs ?? null}::bigint, period_ms),
        burst = coalesce(${change.burst ?? null}::integer, burst),
        updated_at = clock_timestamp()
      WHERE name = ${name}
      RETURNING ${t.unsafe(RATE_LIMIT_COLUMNS)}`;
    await t`UPDATE rate_buckets SET tokens = least(tokens, ${rows[0]!.burst}) WHERE name = ${name}`;
    return rows[0] ?? null;
  });
}

/** Deletes a limit and its buckets; tasks naming it then run unlimited. Null when there was none. */
export async function deleteRateLimit(sql: Sql, name: string): Promise<RateLimitRow | null> {
  const rows = await sql<
    RateLimitRow[]
  >`DELETE FROM rate_limits WHERE name = ${name} RETURNING ${sql.unsafe(RATE_LIMIT_COLUMNS)}`;
  return rows[0] ?? null;
}

/**
 * The submit-time strategies of new keyed tasks, under their key rows' locks (a concurrent
 * claim skips a locked key, so the live count is current): `cancel_newest` cancels the new task
 * when its key is full; `cancel_in_progress` returns the oldest live tasks of a full key, for
 * the caller to cancel through the cancel path (which stops their processes). Returns the new
 * tasks cancelled and the live ones to cancel.
 */
export async function applyKeyStrategies(
  sql: Sql,
  tasks: readonly { id: string; key: string; max: number; strategy: ConcurrencyStrategy }[],
): Promise<{ cancelled: TaskChangeRow[]; toCancel: { id: string; key: string }[] }> {
  const acting = tasks.filter((task) => task.strategy !== "queue");
  if (acting.length === 0) return { cancelled: [], toCancel: [] };
  return sql.begin(async (tx) => {
    const t = tx as unknown as Sql;
    const keys = [...new Set(acting.map((task) => task.key))].sort();
    await t`SELECT key FROM concurrency_keys WHERE key = ANY(${t.array(keys, 25)}) ORDER BY key FOR UPDATE`;
    // A new task a claim already took found room: its key was not full for it.
    const ids = acting.map((task) => task.id);
    const stillQueued = new Set(
      (await t<{ id: string }[]>`SELECT id FROM tasks WHERE id = ANY(${t.array(ids, 2950)}) AND state = 'queued'`).map(
        (r) => r.id,
      ),
    );
    const live = await t<{ id: string; key: string }[]>`
      SELECT id, concurrency_key AS key FROM tasks
      WHERE concurrency_key = ANY(${t.array(keys, 25)}) AND state IN ('dispatched', 'running')
        AND id <> ALL(${t.array(ids, 2950)})
      ORDER BY picked_at, id`;
    const byKey = new Map<string, string[]>();
    for (const row of live) byKey.set(row.key, [...(byKey.get(row.key) ?? []), row.id]);
    const cancelNew: string[] = [];
    const toCancel: { id: string; key: string }[] = [];
    for (const task of acting) {
      if (!stillQueued.has(task.id)) continue;
      const ids = byKey.get(task.key) ?? [];
      if (ids.length < task.max) continue;
      if (task.strategy === "cancel_newest") cancelNew.push(task.id);
      else {
        // The oldest live one makes room for this one.
        const oldest = ids.shift();
        if (oldest) toCancel.push({ id: oldest, key: task.key });
      }
    }
    if (cancelNew.length === 0) return { cancelled: [], toCancel };
    const rows = await t<(TaskChangeRow & { event_id: string })[]>`
      WITH t AS (
        UPDATE tasks SET state = 'cancelled', cancelled_at = clock_timestamp(),
          error = 'cancelled at submit: concurrency key ' || tasks.concurrency_key || ' was full (' || tasks.concurrency_max || ' live), strategy cancel_newest'
        WHERE tasks.id = ANY(${t.array(cancelNew, 2950)}) AND tasks.state = 'queued'
        RETURNING ${taskRowColumns(t, "tasks")}
      ),
      ${recordChange(t, "cancelled", { reason: "concurrency key full (cancel_newest)" })}`;
    return { cancelled: changedRows(rows), toCancel };
  });
}

/** Why a queued task waits, as flow control sees it (null when it does not). */
export interface FlowWaitRow {
  key_live: number | null;
  bucket_tokens: number | null;
  rate_count: number | null;
  period_ms: number | null;
}

export async function flowWaitOf(sql: Sql, id: string): Promise<FlowWaitRow | null> {
  const rows = await sql<FlowWaitRow[]>`
    SELECT
      (SELECT count(*)::int FROM ${sql.unsafe(HOLDING)} l WHERE l.concurrency_key = t.concurrency_key) AS key_live,
      (SELECT ${sql.unsafe(refilled("b", "rl"))} FROM rate_buckets b JOIN rate_limits rl ON rl.name = b.name
         WHERE b.name = t.rate_limit AND b.key = t.rate_limit_key) AS bucket_tokens,
      l.rate_count, l.period_ms::float8 AS period_ms
    FROM tasks t LEFT JOIN rate_limits l ON l.name = t.rate_limit
    WHERE t.id = ${id} AND t.state = 'queued'`;
  return rows[0] ?? null;
}
