// The claim: due tasks handed to this coordinator's free worker slots, in one statement.
//
// The one claim statement. Queues, priorities, labels (issue 13) and flow control's concurrency
// keys and rate limits (issue 14, src/db/flow.ts) are all parts of this one statement, never
// extra passes. Its shape, CTE by CTE:
//
//   g      the free slots, grouped by what their worker takes (queues served, labels): workers
//          with the same routing are one group, so the plain case is one group.
//   cand   the candidates: queued, due, on tasks_rank_idx in rank order (run_at - priority *
//          aging), in a queue that is not paused, that some group can take (queue served,
//          required labels held), and that flow admits (flowCandidateFilter: key not full,
//          rate limit with a token). At most a few per slot, FOR UPDATE SKIP LOCKED.
//   room   what each limited queue has room for: its row locked FOR UPDATE, which in READ
//          COMMITTED returns the row as the last committer left it, so two coordinators'
//          claims of a limited queue serialise here and neither overfills it. flowRooms adds
//          the same for keys and rate limits.
//   ok     the candidates within every room: the n-th candidate of a queue passes only when
//          n <= room (flowWithinRooms: the same windows per key and per limit).
//   pick   the assignment, group by group (recursive: most constrained group first), each
//          taking its best candidates not taken before it, up to its free slots; a
//          candidate a group prefers (prefer weights) ranks as if its priority were higher by
//          its score on that group only.
//   t      the UPDATE to dispatched; flowConsume then takes the tokens / key slots of the rows
//          in t (the last CTE before the change tail).
//
// Never more tasks than slots: a group takes at most its own slot count, and each slot index
// of a group goes to one task.
import { ANY_TASK, MAX_PRIORITY, type WorkerRouting } from "../task/routing";
import { GUARDS } from "../task/state";
import { openAttempts } from "./attempts";
import { changedRows, changeTail, type TaskChangeRow } from "./changes";
import { type Fragment, states, unnest } from "./encode";
import {
  flowAdmissible,
  flowCandidateColumns,
  flowCandidateFilter,
  flowConsume,
  flowNextHoldEnd,
  flowNextToken,
  flowPickOrder,
  flowRooms,
  flowWithinRooms,
} from "./flow";
import type { Sql } from "./sql";
import { taskRowColumns } from "./tasks";

/** A claimed attempt, and how long until its task is due by the database's clock. */
export type ClaimedTask = TaskChangeRow & {
  /** 0 when due; otherwise the milliseconds (rounded up) until run_at. */
  start_in_ms: number;
  /** run_at in epoch ms, unrounded (run_at's Date keeps whole ms): the due time to count to as the Assign is sent. */
  run_at_ms: number;
  /**
   * The same on every row of a claim: whether it left admissible candidates behind (it read as
   * many as it may, or more than it took). False: as of its snapshot, nothing else was due and
   * admitted for these slots, so a slot freed before the database changes finds nothing either.
   */
  more_queued: boolean;
};

export interface ClaimOptions {
  /** Tasks due within this many ms are claimed too (earliest rank first). */
  aheadMs?: number;
  /** Each worker's routing; a worker not named takes any task. */
  routing?: ReadonlyMap<string, WorkerRouting>;
  /**
   * The largest TQ_PRIORITY_AGING_MS any submitter uses: it bounds how far ahead of run_at a
   * rank can be, which makes the scan's upper bound an index condition.
   */
  agingMs?: number;
}

/** Candidates read per slot: room for some to be filtered by queue limits and taken twice. */
const CANDIDATES_PER_SLOT = 2;

interface Group {
  g: number;
  queues: readonly string[] | null;
  labels: Readonly<Record<string, string>>;
  slots: string[];
}

/** The slots grouped by routing, in slot order within each group. */
function groupSlots(slots: readonly string[], routing: ReadonlyMap<string, WorkerRouting>): Group[] {
  const groups = new Map<string, Group>();
  for (const workerId of slots) {
    const r = routing.get(workerId) ?? ANY_TASK;
    const key = JSON.stringify([r.queues === null ? null : [...r.queues].sort(), Object.entries(r.labels).sort()]);
    let group = groups.get(key);
    if (!group) {
      group = { g: groups.size + 1, queues: r.queues, labels: r.labels, slots: [] };
      groups.set(key, group);
    }
    group.slots.push(workerId);
  }
  return [...groups.values()];
}

/**
 * `pick(id, worker_id)` for one group (the plain case: every free worker takes any task): the
 * best candidates in rank order, the k-th to the group's k-th slot.
 */
function pickOneGroup(sql: Sql): Fragment {
  return sql`pick AS (
      SELECT s.id, g.slots->>(s.k - 1)::int AS worker_id
      FROM (SELECT ok.id, row_number() OVER (ORDER BY ${flowPickOrder(sql)} ok.rank, ok.id) AS k FROM ok) s
      CROSS JOIN g WHERE s.k <= g.n
    ),`;
}

/** `pick(id, worker_id)` for several groups: group by group, each from what is left. */
function pickGroups(sql: Sql, agingMs: number): Fragment {
  return sql`
    -- Groups in order of how few candidates they can take: a worker that can take only some
    -- tasks picks before one that can take any, so the general worker does not use up the
    -- tasks only the special one could run. Between groups as constrained, the one the
    -- candidates prefer more (prefer weights) picks first.
    go AS (
      SELECT g.*, row_number() OVER (ORDER BY e.eligible, e.score DESC, g.g) AS step FROM g
      CROSS JOIN LATERAL (
        SELECT count(*) AS eligible, coalesce(sum(tq_labels_score(ok.prefers, g.labels)), 0) AS score FROM ok
        WHERE (g.queues IS NULL OR g.queues ? ok.queue) AND tq_labels_match(ok.requires, g.labels)) e
    ),
    pick AS (
      WITH RECURSIVE p(step, taken, assigned) AS (
        SELECT 0::bigint, ARRAY[]::uuid[], '[]'::jsonb
        UNION ALL
        SELECT p.step + 1, p.taken || coalesce(x.ids, ARRAY[]::uuid[]), p.assigned || coalesce(x.rows, '[]'::jsonb)
        FROM p JOIN go ON go.step = p.step + 1
        CROSS JOIN LATERAL (
          SELECT array_agg(s.id) AS ids,
                 jsonb_agg(jsonb_build_object('id', s.id, 'worker', go.slots->>(s.k - 1)::int)) AS rows
          FROM (
            SELECT ok.id, row_number() OVER (ORDER BY ${flowPickOrder(sql)} ok.rank - make_interval(secs => s0.score * ${agingMs / 1000}), ok.id) AS k
            FROM ok CROSS JOIN LATERAL (SELECT tq_labels_score(ok.prefers, go.labels) AS score) s0
            WHERE ok.id <> ALL (p.taken)
              AND (go.queues IS NULL OR go.queues ? ok.queue) AND tq_labels_match(ok.requires, go.labels)
          ) s WHERE s.k <= go.n
        ) x
      )
      SELECT (a->>'id')::uuid AS id, a->>'worker' AS worker_id
      FROM (SELECT assigned FROM p ORDER BY step DESC LIMIT 1) last, jsonb_array_elements(last.assigned) a
    ),
`;
}

/**
 * Claims due tasks for the given worker slots, one slot per task, in one statement: never
 * more tasks than slots, and SKIP LOCKED lets concurrent coordinators claim disjoint sets.
 * `slots[i]` is a worker with one free slot (a worker appears once per free slot); each claimed
 * task names the worker it goes to. With `aheadMs`, tasks due within that many milliseconds
 * are claimed too; each row says how long until it is due, for the worker to wait before
 * starting it.
 */
export async function claimDue(
  sql: Sql,
  coordinatorId: string,
  slots: readonly string[],
  leaseMs: number,
  aheadMsOrOptions: number | ClaimOptions = 0,
): Promise<ClaimedTask[]> {
  if (slots.length === 0) return [];
  const options = typeof aheadMsOrOptions === "number" ? { aheadMs: aheadMsOrOptions } : aheadMsOrOptions;
  const aheadSecs = Math.max(0, options.aheadMs ?? 0) / 1000;
  const boundSecs = aheadSecs + (MAX_PRIORITY * Math.max(0, options.agingMs ?? 1000)) / 1000;
  const groups = groupSlots(slots, options.routing ?? new Map());
  const limit = slots.length * CANDIDATES_PER_SLOT;
  const rows = await sql<(ClaimedTask & { event_id: string })[]>`
    WITH g AS (
      SELECT r.g, r.queues, r.labels, r.slots, jsonb_array_length(r.slots) AS n FROM ${unnest(sql, groups, {
        g: ["integer", (x) => x.g],
        // jsonb, not text[]: a group's queues are a list inside one column.
        queues: ["jsonb", (x) => x.queues],
        labels: ["jsonb", (x) => x.labels],
        slots: ["jsonb", (x) => x.slots],
      })}
    ),
    cand AS (
      SELECT tasks.id, tasks.queue, tasks.rank, tasks.requires, tasks.prefers ${flowCandidateColumns(sql)}
      FROM tasks
      -- now() (the statement's start), not clock_timestamp(): a volatile bound cannot be an
      -- index condition. It is never later than the real time, so a task never starts early.
      -- The rank bound is the index condition (rank <= run_at + MAX_PRIORITY * aging); run_at
      -- decides dueness.
      WHERE state IN (${states(sql, GUARDS.claim)})
        AND rank <= now() + make_interval(secs => ${boundSecs})
        AND run_at <= now() + make_interval(secs => ${aheadSecs})
        -- Paused, or full as of the statement's snapshot (room below decides under the lock).
        AND NOT EXISTS (
          SELECT 1 FROM queues q WHERE q.name = tasks.queue
            AND (q.paused OR (q.concurrency_limit IS NOT NULL AND q.live >= q.concurrency_limit)))
        AND EXISTS (
          SELECT 1 FROM g
          WHERE (g.queues IS NULL OR g.queues ? tasks.queue)
            AND (tasks.requires = '[]'::jsonb OR tq_labels_match(tasks.requires, g.labels)))
        ${flowCandidateFilter(sql)}
      ORDER BY rank, id
      LIMIT ${limit}
      FOR UPDATE OF tasks SKIP LOCKED
    ),
    room AS (
      SELECT q.name, greatest(0, q.concurrency_limit - q.live) AS room FROM queues q
      WHERE q.concurrency_limit IS NOT NULL AND q.name IN (SELECT queue FROM cand)
      FOR UPDATE OF q
    ),
    ${flowRooms(sql)}
    ok AS (
      SELECT w.* FROM (
        SELECT cand.*, row_number() OVER (PARTITION BY cand.queue ORDER BY cand.rank, cand.id) AS queue_n FROM cand
      ) w
      LEFT JOIN room ON room.name = w.queue
      WHERE (room.name IS NULL OR w.queue_n <= room.room)
        ${flowWithinRooms(sql)}
    ),
    ${groups.length === 1 ? pickOneGroup(sql) : pickGroups(sql, options.agingMs ?? 1000)}
    t AS (
      UPDATE tasks SET
        state = 'dispatched', picked_at = clock_timestamp(), attempt = tasks.attempt + 1,
        worker_id = pick.worker_id, coordinator_id = ${coordinatorId},
        -- The task's own lease, or the default (leaseMs: TQ_DEFAULT_LEASE_MS).
        lease_expires_at = clock_timestamp() + make_interval(secs => coalesce(tasks.lease_ms, ${leaseMs}::integer) / 1000.0),
        started_at = NULL, exit_code = NULL, signal = NULL, error = NULL
      FROM pick WHERE tasks.id = pick.id
      RETURNING ${taskRowColumns(sql, "tasks")},
        -- Rounded up, and read after the claim: waiting this long from any later moment never
        -- starts the task before its time.
        greatest(0, ceil(extract(epoch FROM tasks.run_at - clock_timestamp()) * 1000))::integer AS start_in_ms,
        (extract(epoch FROM tasks.run_at) * 1000)::float8 AS run_at_ms,
        (SELECT count(*) FROM cand) >= ${limit} OR (SELECT count(*) FROM cand) > (SELECT count(*) FROM pick) AS more_queued
    ),
    ${flowConsume(sql)}
    ${openAttempts(sql)},
    ${changeTail(sql, {
      kind: sql`${"dispatched"}::text`,
      detail: sql`NULL::jsonb`,
      actor: sql`NULL::text`,
      // The attempt each row now names is the one this statement opens: it has no output
      // yet, so no join of task_attempts for it.
      output: sql`CROSS JOIN (SELECT NULL::text AS stdout, NULL::text AS stderr, false AS stdout_truncated,
        false AS stderr_truncated, false AS stdout_replaced, false AS stderr_replaced) o`,
    })}`;
  // In claim order (RETURNING has none of its own).
  return (changedRows(rows) as ClaimedTask[]).sort(
    (a, b) => (a.rank?.getTime() ?? 0) - (b.rank?.getTime() ?? 0) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0),
  );
}

/**
 * Milliseconds until the earliest queued task is due by the database's clock (0 when one is
 * due now), or null when nothing is queued. The database's clock, not ours, decides dueness.
 */
export async function nextDueIn(sql: Sql): Promise<number | null> {
  // Flow control: tasks their key or bucket holds back are not due; a bucket's next token is,
  // and so is the end of a stopping task's hold on its key.
  const rows = await sql<{ due_in_ms: string | null }[]>`
    SELECT least(
      -- greatest inside min: min of no rows stays null (greatest(0, null) would be 0, and an
      -- idle dispatcher with free slots would look again every 5 ms).
      (SELECT min(greatest(0, ceil(extract(epoch FROM run_at - clock_timestamp()) * 1000)))::bigint
       FROM tasks WHERE state IN (${states(sql, GUARDS.claim)}) AND ${flowAdmissible(sql)}),
      ${flowNextToken(sql)},
      ${flowNextHoldEnd(sql)})::text AS due_in_ms`;
  const value = rows[0]?.due_in_ms;
  return value == null ? null : Math.max(0, Number(value));
}

/** For tests and EXPLAIN: the slot arrays a claim of these slots would pass. */
export const claimGroupsFor = groupSlots;
