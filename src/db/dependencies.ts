// Task dependencies: the edges (task_dependencies), and the one statement that resolves them.
//
// A task with parents is born `waiting` with parents_pending = its number of parents. An edge is
// resolved (counted off its child's parents_pending) exactly once, by whichever statement first
// finds its parent ended: the edge's own `resolved` flag, flipped under its row lock, is the
// guard, and the child's counter is decremented under the child's row lock, so two parents that
// end at once on two coordinators release the child exactly once (the second decrement sees the
// first). What a resolved edge does to its child is decided in the same statement: released to
// `queued` when the last parent ends (all succeeded, or any end under `run`), or ended
// `cancelled` at once when a parent failed under `cancel` or `skip`.
//
// Why resolving is its own statement, right after the one that ended the parent, rather than
// part of it: under READ COMMITTED a statement sees the tasks committed before it began, and a
// child inserted while the parent's finish waited for the parent row's lock is not among them.
// So the insert of an edge also writes its parent row (has_children), taking that lock and
// reading the parent's latest state; a parent that ended first is resolved by the insert's
// own transaction, and a parent that ends later returns has_children = true from its finish (the
// row's latest version), whose caller then resolves with a fresh snapshot, which sees the edge.
// Should a process die between the two, `sweepDependencies` (the rescuer's pass) resolves what
// is left.
import { FINAL_STATES, GUARDS } from "../task/state";
import type { ParentFailurePolicy, Task } from "../task/task";
import { changedRows, recordChanges, type TaskChangeRow } from "./changes";
import { array, type Fragment, states, unnest } from "./encode";
import type { Sql } from "./sql";
import { taskRowColumns } from "./tasks";

const ENDED = [...FINAL_STATES];

export interface NewEdge {
  childId: string;
  parentId: string;
  /** The name the child knows the parent by (TQ_PARENT_<ref>_EXIT). */
  ref: string;
}

/**
 * Adds the edges of children just inserted `waiting` (in the caller's transaction), and
 * resolves those whose parent has ended already. Returns the parent ids that name no task (the
 * caller's 400: roll back), or else the children that resolving changed (released or ended).
 */
export async function addDependencies(
  sql: Sql,
  edges: readonly NewEdge[],
): Promise<{ missing: string[]; changed: TaskChangeRow[] }> {
  if (edges.length === 0) return { missing: [], changed: [] };
  const rows = await sql<{ missing: string[] | null }[]>`
    WITH r AS (
      SELECT * FROM ${unnest(sql, edges, {
        child_id: ["uuid", (e) => e.childId],
        parent_id: ["uuid", (e) => e.parentId],
        ref: ["text", (e) => e.ref],
      })}
    ),
    -- Writing the parent row takes its lock and reads its latest version: a finish that waits
    -- for it returns has_children = true and resolves after (see the top of this file).
    p AS (
      UPDATE tasks SET has_children = true
      FROM (SELECT DISTINCT parent_id FROM r) x WHERE tasks.id = x.parent_id
      RETURNING tasks.id
    ),
    e AS (
      INSERT INTO task_dependencies (child_id, parent_id, ref)
      SELECT r.child_id, r.parent_id, r.ref FROM r JOIN p ON p.id = r.parent_id
      ON CONFLICT DO NOTHING
      RETURNING 1
    )
    SELECT array_agg(DISTINCT r.parent_id::text) FILTER (WHERE p.id IS NULL) AS missing, (SELECT count(*) FROM e) AS added
    FROM r LEFT JOIN p ON p.id = r.parent_id`;
  const missing = rows[0]?.missing ?? [];
  if (missing.length > 0) return { missing, changed: [] };
  const children = [...new Set(edges.map((e) => e.childId))];
  const changed = await resolveDependencies(sql, sql`d.child_id = ANY(${array(sql, children, "uuid")})`);
  return { missing: [], changed };
}

/**
 * After a statement that may have ended tasks (a finish, a loss, a cancel): resolves the
 * edges of those that ended and have children. Nothing to do, and no round trip, otherwise.
 */
export async function afterTasksEnded(sql: Sql, rows: readonly Pick<Task, "id" | "state" | "has_children">[]): Promise<void> {
  const ended = rows.filter((row) => row.has_children && FINAL_STATES.has(row.state)).map((row) => row.id);
  if (ended.length === 0) return;
  try {
    await resolveDependencies(sql, sql`d.parent_id = ANY(${array(sql, ended, "uuid")})`);
  } catch {
    // The change that ended the parents is committed, and its caller must act on it (a
    // result acknowledged, a cancel answered) rather than retry it: the rescuer's sweep
    // resolves these edges on its next pass, and logs that it did.
  }
}

/** Resolves every edge whose parent has ended but that nobody resolved (a process died in between). */
export async function sweepDependencies(sql: Sql): Promise<TaskChangeRow[]> {
  return resolveDependencies(sql, sql`true`);
}

/**
 * Resolves the unresolved edges `scope` chooses (a condition on `d`, the edge) whose parent has
 * ended, and applies each child's policy; children that end here (cancelled or skipped) are in
 * turn ended parents, resolved by the next round until none is left. Returns the changed children.
 */
async function resolveDependencies(sql: Sql, scope: Fragment): Promise<TaskChangeRow[]> {
  const changed: TaskChangeRow[] = [];
  let next: Fragment | null = scope;
  // Each round ends a generation of descendants; a DAG is finite and acyclic, so this stops.
  while (next !== null) {
    const rows = changedRows(await resolveOnce(sql, next));
    changed.push(...rows);
    const ended = rows.filter((row) => row.state === "cancelled" && row.has_children).map((row) => row.id);
    next = ended.length === 0 ? null : sql`d.parent_id = ANY(${array(sql, ended, "uuid")})`;
  }
  return changed;
}

function resolveOnce(sql: Sql, scope: Fragment) {
  // The first failed parent (by id) names the failure; a cancelled child's error and event say it.
  return sql<(Task & { event_id: string })[]>`
    -- Edges, then children, are locked in key order: two of these statements that share
    -- edges (a sweep and a finish) or children (two parents ending at once) wait for each
    -- other rather than deadlock.
    WITH c AS (
      SELECT d.child_id, d.parent_id, p.state AS parent_state
      FROM task_dependencies d JOIN tasks p ON p.id = d.parent_id
      WHERE NOT d.resolved AND p.state IN (${states(sql, ENDED)}) AND ${scope}
      ORDER BY d.child_id, d.parent_id
      FOR UPDATE OF d
    ),
    flip AS (
      UPDATE task_dependencies d SET resolved = true
      FROM c WHERE d.child_id = c.child_id AND d.parent_id = c.parent_id
      RETURNING d.child_id, d.parent_id, d.ref, c.parent_state
    ),
    x AS (
      SELECT child_id, count(*)::int AS n,
        array_agg(parent_id::text ORDER BY parent_id) AS parents,
        (array_agg(parent_id::text ORDER BY parent_id) FILTER (WHERE parent_state <> 'succeeded'))[1] AS failed_id,
        (array_agg(ref ORDER BY parent_id) FILTER (WHERE parent_state <> 'succeeded'))[1] AS failed_ref,
        (array_agg(parent_state ORDER BY parent_id) FILTER (WHERE parent_state <> 'succeeded'))[1] AS failed_state
      FROM flip GROUP BY child_id
    ),
    v AS (
      SELECT tasks.id, x.*,
        CASE WHEN x.failed_id IS NOT NULL AND tasks.on_parent_failure IS DISTINCT FROM 'run'
               THEN coalesce(tasks.on_parent_failure, 'cancel')
             WHEN tasks.parents_pending - x.n = 0 THEN 'release'
             ELSE 'wait' END AS verdict
      FROM tasks JOIN x ON x.child_id = tasks.id
      WHERE tasks.state IN (${states(sql, GUARDS.waiting)})
      ORDER BY tasks.id
      FOR UPDATE OF tasks
    ),
    t AS (
      UPDATE tasks SET
        parents_pending = tasks.parents_pending - v.n,
        state = CASE v.verdict WHEN 'release' THEN 'queued' WHEN 'wait' THEN 'waiting' ELSE 'cancelled' END,
        cancelled_at = CASE WHEN v.verdict IN ('cancel', 'skip') THEN clock_timestamp() END,
        error = CASE v.verdict
          WHEN 'cancel' THEN 'parent ' || v.failed_id || ' (' || v.failed_ref || ') ended ' || v.failed_state
          WHEN 'skip' THEN 'skipped: parent ' || v.failed_id || ' (' || v.failed_ref || ') ended ' || v.failed_state
          ELSE tasks.error END,
        -- Released: due now at the earliest (never before the time it was scheduled for).
        run_at = CASE WHEN v.verdict = 'release'
          THEN greatest(tasks.run_at, date_trunc('milliseconds', clock_timestamp())) ELSE tasks.run_at END,
        -- Every parent has ended and committed: their exit codes are final ("" for none: a
        -- parent cancelled before it ran, or killed by a signal).
        parent_env = CASE WHEN v.verdict = 'release' THEN (
          SELECT jsonb_object_agg('TQ_PARENT_' || all_d.ref || '_EXIT', coalesce(pp.exit_code::text, ''))
          FROM task_dependencies all_d JOIN tasks pp ON pp.id = all_d.parent_id
          WHERE all_d.child_id = tasks.id
        ) END
      FROM v WHERE tasks.id = v.id
      RETURNING ${taskRowColumns(sql, "tasks")},
        CASE v.verdict WHEN 'release' THEN 'released' WHEN 'wait' THEN 'parent_ended'
                       WHEN 'cancel' THEN 'parent_failed' ELSE 'skipped' END AS event_kind,
        jsonb_build_object('parents', to_jsonb(v.parents), 'parents_pending', tasks.parents_pending)
          || CASE WHEN v.failed_id IS NULL THEN '{}'::jsonb ELSE jsonb_build_object(
               'failed_parent', v.failed_id, 'failed_parent_ref', v.failed_ref, 'failed_parent_state', v.failed_state,
               'policy', coalesce(tasks.on_parent_failure, 'cancel')) END AS event_detail
    ),
    ${recordChanges(sql)}`;
}

/** One end of an edge as GET /tasks/:id shows it. */
export interface DependencyRow {
  id: string;
  ref: string | null;
  state: Task["state"];
  /** Parents only: the edge was counted off (the parent ended). */
  resolved: boolean;
}

export interface TaskDependencies {
  parents: DependencyRow[];
  children: DependencyRow[];
}

/** A task's parents (with the ref it knows them by) and children (with their own ref), in id order. */
export async function getDependencies(sql: Sql, id: string): Promise<TaskDependencies> {
  const rows = await sql<(DependencyRow & { side: "parent" | "child" })[]>`
    SELECT 'parent' AS side, d.parent_id::text AS id, d.ref, p.state, d.resolved
    FROM task_dependencies d JOIN tasks p ON p.id = d.parent_id WHERE d.child_id = ${id}
    UNION ALL
    SELECT 'child', d.child_id::text, c.ref, c.state, d.resolved
    FROM task_dependencies d JOIN tasks c ON c.id = d.child_id WHERE d.parent_id = ${id}
    ORDER BY 1, 2`;
  const strip = ({ side: _s, ...row }: DependencyRow & { side: string }) => row;
  return {
    parents: rows.filter((row) => row.side === "parent").map(strip),
    children: rows.filter((row) => row.side === "child").map(strip),
  };
}

export type { ParentFailurePolicy };
