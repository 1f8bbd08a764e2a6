// SQL on the workers registry. The coordinator that holds a worker's stream owns its row:
// it writes the row on Hello, refreshes last_heartbeat_at for all its workers in one
// statement, and marks it gone when the stream ends. GET /workers lists the rows refreshed within
// the heartbeat timeout. (Whether a worker's tasks are lost is decided by their leases.)
import { IN_FLIGHT_STATES } from "../task/state";
import { array, states } from "./encode";
import type { Sql } from "./sql";

export type WorkerState = "connected" | "draining" | "gone";

export interface WorkerRow {
  id: string;
  name: string;
  coordinator_id: string;
  slots: number;
  labels: Record<string, string>;
  version: string;
  state: WorkerState;
  connected_at: Date;
  last_heartbeat_at: Date;
  disconnected_at: Date | null;
  /** The worker's wall clock minus its coordinator's at Hello (positive: ahead); null: not said. */
  clock_skew_ms: number | null;
  /** Tasks the worker holds (dispatched or running). */
  running: number;
}

/**
 * Registers a worker on its Hello. A worker id already known is taken over only by a stream
 * that proves to be the same worker (the hash of the resume token it was given matches);
 * returns false, changing nothing, otherwise. The row then keeps the new resume token's hash.
 */
export async function upsertWorker(
  sql: Sql,
  worker: {
    id: string;
    name: string;
    coordinatorId: string;
    slots: number;
    labels: Record<string, string>;
    /** The queues it serves; null or absent: every queue. */
    queues?: readonly string[] | null;
    version: string;
    /** Hash of the resume token the worker presented (null: none). */
    presentedHash?: string | null;
    /** Hash of the resume token handed out now. */
    resumeHash?: string | null;
    /** Its wall clock minus the coordinator's, as measured at Hello; null: it did not say. */
    clockSkewMs?: number | null;
  },
): Promise<boolean> {
  const rows = await sql`
    INSERT INTO workers (id, name, coordinator_id, slots, labels, queues, version, state, resume_hash, clock_skew_ms)
    VALUES (${worker.id}, ${worker.name}, ${worker.coordinatorId}, ${worker.slots},
            ${sql.json(worker.labels)}::jsonb, ${worker.queues ? JSON.stringify(worker.queues) : null}::jsonb,
            ${worker.version}, 'connected', ${worker.resumeHash ?? null}, ${worker.clockSkewMs ?? null}::integer)
    ON CONFLICT (id) DO UPDATE SET
      name = excluded.name, coordinator_id = excluded.coordinator_id, slots = excluded.slots,
      labels = excluded.labels, queues = excluded.queues, version = excluded.version, state = 'connected',
      connected_at = clock_timestamp(), last_heartbeat_at = clock_timestamp(), disconnected_at = NULL,
      resume_hash = excluded.resume_hash, clock_skew_ms = excluded.clock_skew_ms
    WHERE workers.resume_hash IS NULL OR workers.resume_hash = ${worker.presentedHash ?? null}
    RETURNING id`;
  return rows.length > 0;
}

/** Refreshes the heartbeat of a coordinator's live workers in one statement. */
export async function touchWorkers(sql: Sql, coordinatorId: string, ids: readonly string[]): Promise<void> {
  if (ids.length === 0) return;
  await sql`
    UPDATE workers SET last_heartbeat_at = clock_timestamp()
    WHERE coordinator_id = ${coordinatorId} AND state <> 'gone' AND id = ANY(${array(sql, ids, "text")})`;
}

export async function setWorkerDraining(sql: Sql, id: string, coordinatorId: string): Promise<void> {
  await sql`
    UPDATE workers SET state = 'draining'
    WHERE id = ${id} AND coordinator_id = ${coordinatorId} AND state = 'connected'`;
}

/**
 * Marks a worker gone, unless it has meanwhile reconnected through another coordinator
 * (which then owns the row). Returns whether this coordinator's row was marked.
 */
export async function markWorkerGone(sql: Sql, id: string, coordinatorId: string): Promise<boolean> {
  const rows = await sql`
    UPDATE workers SET state = 'gone', disconnected_at = clock_timestamp()
    WHERE id = ${id} AND coordinator_id = ${coordinatorId} AND state <> 'gone'
    RETURNING id`;
  return rows.length > 0;
}

/**
 * Live workers, with the number of tasks each holds: connected or draining, and vouched for
 * by their coordinator within the heartbeat timeout (a worker whose coordinator died with it
 * is not live, even before anyone marks it gone).
 */
export async function listLiveWorkers(sql: Sql, heartbeatTimeoutMs: number): Promise<WorkerRow[]> {
  return sql<WorkerRow[]>`
    SELECT w.*, (
      SELECT count(*)::int FROM tasks t WHERE t.worker_id = w.id AND t.state IN (${states(sql, IN_FLIGHT_STATES)})
    ) AS running
    FROM workers w
    WHERE w.state <> 'gone'
      AND w.last_heartbeat_at > clock_timestamp() - make_interval(secs => ${heartbeatTimeoutMs / 1000})
    ORDER BY w.connected_at, w.id`;
}
