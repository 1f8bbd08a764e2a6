// The tail of every state change of a task: given a CTE `t` of the changed task rows, one
// task_events row each and their notifications (src/db/notify.ts says who listens where), in
// the same statement as the change itself, so that the row, its history and the live stream
// can never disagree. `t` holds the task rows' own columns (taskRowColumns), never their
// output, which the tail reads from the current attempt.
import type { Task } from "../task/task";
import type { Fragment } from "./encode";
import { freesKey } from "./flow";
import { TASK_CHANNEL, TASK_CHANNEL_PREFIX } from "./notify";
import type { Sql } from "./sql";
import { currentAttempt, outputColumns } from "./tasks";

/** A changed task as its statement returns it, with the id of the event it appended. */
export type TaskChangeRow = Task & { event_id: string };

/**
 * An event recorded ahead of each changed row's own, for a change the statement made on the
 * way (a start merged into its attempt's finish): rows of `t` that `from` keeps (a FROM clause
 * over `t`), each with `kind` (never the kind of the change's own event), the state it left
 * the task in and its `detail`. It is not notified: a watcher woken by the change's own
 * notification reads the events after the last it saw, this one among them.
 */
export interface LeadingEvent {
  kind: string;
  state: string;
  from: Fragment;
  detail: Fragment;
}

/** The change tail for rows of `t` that all get the same event. */
export function recordChange(
  sql: Sql,
  kind: string,
  detail: Record<string, string | number | boolean | null> | null = null,
  /** The API token (by name) that asked for the change, for the audit trail. */
  actor: string | null = null,
): Fragment {
  return changeTail(sql, {
    kind: sql`${kind}::text`,
    detail: detail === null ? sql`NULL::jsonb` : sql`${sql.json(detail)}::jsonb`,
    actor: sql`${actor}::text`,
  });
}

/**
 * The change tail for rows of `t` that carry their own event_kind and event_detail columns;
 * `output` as in changeTail.
 */
export function recordChanges(sql: Sql, output?: Fragment, leading?: LeadingEvent): Fragment {
  return changeTail(sql, {
    kind: sql`t.event_kind`,
    detail: sql`t.event_detail`,
    actor: sql`NULL::text`,
    output,
    ...(leading ? { leading } : {}),
  });
}

/**
 * Which changes wake the coordinators (TASK_CHANNEL): each cancel, for the one holding its
 * worker to stop the process, and of the tasks the statement queued only the one due first:
 * a dispatch pass claims whatever is due, so one wake-up (or timer) covers them all.
 */
function wakesCoordinators(sql: Sql): Fragment {
  return sql`t.state = 'cancelled'
    OR t.id = (SELECT q.id FROM t q WHERE q.state = 'queued' ORDER BY q.run_at, q.id LIMIT 1)
    OR ${freesKey(sql)}`;
}

/**
 * Appends one event per row and notifies. Each fragment may use the columns of `t`, the
 * changed rows, and of what `from` joins to it (by default nothing). The payload is small
 * and fixed (NOTIFY payloads are capped at 8000 bytes); listeners read the rest from the row.
 *
 * The rows returned carry the output of each task's current attempt, as every read does
 * (src/db/tasks.ts). The statement sees task_attempts as it was before it ran: right for a
 * change that leaves the attempt's output alone (an attempt it opens has none yet), while a
 * statement that writes the output passes `output`, a join naming the written values `o`.
 */
export function changeTail(
  sql: Sql,
  event: {
    kind: Fragment;
    detail: Fragment;
    actor: Fragment;
    from?: Fragment;
    output?: Fragment;
    /** An earlier change the same statement also made (see LeadingEvent). */
    leading?: LeadingEvent;
  },
  /** False for new tasks: nobody can be watching a task whose id is not out yet. */
  watched = true,
): Fragment {
  const own = sql`SELECT t.id, ${event.kind}, t.state, t.attempt, t.worker_id, ${event.detail}, ${event.actor}
      FROM ${event.from ?? sql`t`}`;
  const { leading } = event;
  return sql`
    e AS (
      INSERT INTO task_events (task_id, kind, state, attempt, worker_id, detail, actor)
      ${
        leading
          ? // Event ids are handed out in the order of the rows: every leading event before the change's own.
            sql`SELECT task_id, kind, state, attempt, worker_id, detail, actor FROM (
        SELECT t.id AS task_id, ${leading.kind}::text AS kind, ${leading.state}::text AS state, t.attempt, t.worker_id,
          ${leading.detail} AS detail, NULL::text AS actor, 0 AS ord
        FROM ${leading.from}
        UNION ALL
        SELECT own.*, 1 FROM (${own}) own
      ) x ORDER BY x.ord`
          : own
      }
      RETURNING id, task_id, kind
    )
    SELECT t.*, ${outputColumns(sql)}, e.id::text AS event_id,
      ${watched ? sql`pg_notify(${TASK_CHANNEL_PREFIX} || t.id::text, n.payload)::text` : sql`NULL::text`} AS notified,
      CASE WHEN ${wakesCoordinators(sql)} THEN pg_notify(${TASK_CHANNEL}, n.payload) END::text AS notified_all
    FROM t JOIN e ON e.task_id = t.id ${leading ? sql`AND e.kind <> ${leading.kind}::text` : sql``}
    ${event.output ?? currentAttempt(sql, "t")}
    CROSS JOIN LATERAL (
      SELECT json_build_object(
        'id', t.id, 'state', t.state, 'attempt', t.attempt, 'worker_id', t.worker_id,
        'coordinator_id', t.coordinator_id, 'event_id', e.id::text, 'kind', e.kind,
        'due_in_ms', CASE WHEN t.state = 'queued'
          THEN greatest(0, ceil(extract(epoch FROM t.run_at - clock_timestamp()) * 1000))::bigint END,
        'frees_key', ${freesKey(sql)}
      )::text AS payload
    ) n`;
}

/** The changed rows without the columns the change tail adds for its own use. */
export function changedRows(
  rows: readonly (Task & {
    event_id: string;
    notified?: unknown;
    notified_all?: unknown;
    event_kind?: unknown;
    event_detail?: unknown;
  })[],
): TaskChangeRow[] {
  return rows.map(({ notified: _n, notified_all: _a, event_kind: _k, event_detail: _d, ...row }) => row as TaskChangeRow);
}
