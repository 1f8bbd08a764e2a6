// Retention: final tasks that ended before a cutoff are deleted, with everything that belongs
// to them, one small batch per short transaction (src/coordinator/pruner.ts runs the batches).
//
// What goes with a task: its task_events and task_attempts (deleted here, so that they are
// counted, though both would cascade), its edges in task_dependencies (no foreign key: see
// 0016_dependencies.sql), and any table with a foreign key ON DELETE CASCADE (the live-log
// chunks). Beside tasks: batch idempotency keys (task_batches) once none of their tasks is
// left, and schedule firings (schedule_firings) older than the cutoff whose task is gone.
//
// What stays: a final task that a live (not final) child still depends on, however old, since
// resolving and releasing the child reads its parents' rows; it goes in a later pass once its
// children have ended.
//
// Why two statements: under READ COMMITTED the first locks the batch (SKIP LOCKED: a row some
// other transaction holds, such as a submit adding a child to it, is simply left for later),
// and the second, with a fresh snapshot, sees every edge committed before those locks were
// taken. A submit adding a child afterwards waits for the lock, then finds its parent gone and
// is answered like any unknown parent (src/db/dependencies.ts, addDependencies).
import { FINAL_STATES } from "../task/state";
import { array, states } from "./encode";
import type { Sql } from "./sql";

const ENDED = [...FINAL_STATES];

/** Arbitrary constant: "tq" + "prune". One coordinator prunes at a time. */
export const RETENTION_LOCK_KEY = 0x7471_7072_756e_65n;

/** What one batch did: the rows it deleted by table, and whether any table may have more. */
export interface PruneResult {
  rows: PrunedRows;
  /** A table gave the batch its whole limit: more may be waiting (run another batch). */
  full: boolean;
}

/** Rows one batch deleted, by table. */
export interface PrunedRows {
  tasks: number;
  task_events: number;
  task_attempts: number;
  task_dependencies: number;
  task_batches: number;
  schedule_firings: number;
}

export const PRUNED_TABLES: readonly (keyof PrunedRows)[] = [
  "tasks",
  "task_events",
  "task_attempts",
  "task_dependencies",
  "task_batches",
  "schedule_firings",
];

export function noRowsPruned(): PrunedRows {
  return { tasks: 0, task_events: 0, task_attempts: 0, task_dependencies: 0, task_batches: 0, schedule_firings: 0 };
}

/** When a task ended, as the index tasks_final_ended_idx (0025_retention.sql) has it. */
const endedAt = (sql: Sql) => sql`coalesce(tasks.completed_at, tasks.failed_at, tasks.cancelled_at, tasks.created_at)`;

/**
 * Deletes up to `limit` final tasks that ended before `cutoff` (oldest first) with their rows,
 * then up to `limit` batch keys and schedule firings past it. Returns null when another
 * process holds the retention lock (it is pruning; this one need not), else what it deleted.
 */
export async function pruneBatch(sql: Sql, cutoff: Date, limit: number): Promise<PruneResult | null> {
  return sql.begin(async (transaction) => {
    // The fragment helpers take the pool's type; a transaction's tagged template is the same.
    const tx = transaction as unknown as Sql;
    const [lock] = await tx<{ locked: boolean }[]>`
      SELECT pg_try_advisory_xact_lock(${RETENTION_LOCK_KEY.toString()}::bigint) AS locked`;
    if (!lock?.locked) return null;
    const pruned = noRowsPruned();
    // A parent that a live child needs is filtered out here too (by this snapshot), so that
    // kept parents never fill the batch and stall the pruning behind them.
    const picked = await tx<{ id: string }[]>`
      SELECT tasks.id FROM tasks
      WHERE tasks.state IN (${states(tx, ENDED)}) AND ${endedAt(tx)} < ${cutoff}
        AND NOT (tasks.has_children AND ${liveChildOf(tx)})
      ORDER BY ${endedAt(tx)}, tasks.id
      LIMIT ${limit}
      FOR UPDATE OF tasks SKIP LOCKED`;
    if (picked.length > 0) {
      const ids = array(
        tx,
        picked.map((row) => row.id),
        "uuid",
      );
      const [counts] = await tx<Omit<PrunedRows, "task_batches" | "schedule_firings">[]>`
        WITH v AS (
          SELECT tasks.id FROM tasks
          WHERE tasks.id = ANY(${ids}) AND NOT (tasks.has_children AND ${liveChildOf(tx)})
        ),
        ev AS (DELETE FROM task_events WHERE task_id IN (SELECT id FROM v) RETURNING 1),
        at AS (DELETE FROM task_attempts WHERE task_id IN (SELECT id FROM v) RETURNING 1),
        dep AS (
          DELETE FROM task_dependencies
          WHERE child_id IN (SELECT id FROM v) OR parent_id IN (SELECT id FROM v)
          RETURNING 1
        ),
        t AS (DELETE FROM tasks WHERE id IN (SELECT id FROM v) RETURNING 1)
        SELECT (SELECT count(*) FROM t)::int AS tasks, (SELECT count(*) FROM ev)::int AS task_events,
               (SELECT count(*) FROM at)::int AS task_attempts, (SELECT count(*) FROM dep)::int AS task_dependencies`;
      Object.assign(pruned, counts);
    }
    // A batch key is kept while any task it created is: a repeat of the batch then still
    // returns the same tasks. Once all are gone, so is the key (a repeat creates a new batch).
    const [batches] = await tx<{ n: number }[]>`
      WITH d AS (
        DELETE FROM task_batches WHERE idempotency_key IN (
          SELECT b.idempotency_key FROM task_batches b
          WHERE b.created_at < ${cutoff} AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.id = ANY(b.task_ids))
          ORDER BY b.created_at LIMIT ${limit}
          FOR UPDATE SKIP LOCKED
        ) RETURNING 1
      )
      SELECT count(*)::int AS n FROM d`;
    pruned.task_batches = batches?.n ?? 0;
    // A firing is the record that its fire time was planned; the firing loop plans only fire
    // times after the schedule's next_fire_at, so an old one is history, never consulted
    // again. A held-back (buffered) firing is the schedule's state and stays.
    const [firings] = await tx<{ n: number }[]>`
      WITH d AS (
        DELETE FROM schedule_firings WHERE (schedule_id, fire_at) IN (
          SELECT f.schedule_id, f.fire_at FROM schedule_firings f
          WHERE f.fire_at < ${cutoff} AND f.outcome <> 'buffered'
            AND (f.task_id IS NULL OR NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.id = f.task_id))
          ORDER BY f.fire_at LIMIT ${limit}
          FOR UPDATE SKIP LOCKED
        ) RETURNING 1
      )
      SELECT count(*)::int AS n FROM d`;
    pruned.schedule_firings = firings?.n ?? 0;
    return { rows: pruned, full: picked.length >= limit || pruned.task_batches >= limit || pruned.schedule_firings >= limit };
  });
}

/**
 * A child of `tasks` that has not ended: it still needs its parent's row. A scalar subquery,
 * not EXISTS: under the OR of NOT (has_children AND ...) the planner may turn an EXISTS into a
 * hashed subplan that reads every live task once; this one is a lookup per parent (its edges
 * by task_dependencies_parent_idx, each child by its key).
 */
function liveChildOf(sql: Sql) {
  return sql`(
    SELECT true FROM task_dependencies d JOIN tasks c ON c.id = d.child_id
    WHERE d.parent_id = tasks.id AND c.state NOT IN (${states(sql, ENDED)})
    LIMIT 1
  ) IS NOT NULL`;
}
