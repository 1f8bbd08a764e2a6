// task_batches: the Idempotency-Key of a POST /tasks/batch and the batch it first created.
import type { Task, TaskSpec } from "../task/task";
import type { Sql } from "./sql";
import { selectTasks } from "./tasks";

/** Identifies a batch request: its specs in order, with each item's own idempotency key. */
export function batchHash(specs: readonly TaskSpec[]): string {
  return new Bun.CryptoHasher("sha256").update(JSON.stringify(specs)).digest("hex");
}

export interface NewBatch {
  key: string;
  hash: string;
  /** The ids its items are about to be inserted under, in order. */
  taskIds: readonly string[];
  actor: string | null;
}

/**
 * Takes a batch key for this request; false when it is already taken. Call it in the
 * transaction that inserts the batch's tasks: a concurrent claim of the same key waits for that
 * transaction, and then finds the key taken (or free again, if it rolled back).
 */
export async function claimBatchKey(sql: Sql, batch: NewBatch): Promise<boolean> {
  const rows = await sql`
    INSERT INTO task_batches (idempotency_key, request_hash, task_ids, actor)
    VALUES (${batch.key}, ${batch.hash},
            ARRAY(SELECT json_array_elements_text(${JSON.stringify(batch.taskIds)}::text::json))::uuid[], ${batch.actor})
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING 1`;
  return rows.length === 1;
}

export interface StoredBatch {
  requestHash: string;
  /** The batch's tasks in order; null where a task no longer exists. */
  tasks: (Task | null)[];
}

/**
 * The batch stored under `key`, with its tasks in order. An item that was itself a replay of
 * an earlier task (through its own idempotency key) never got its own row; it is found by
 * `itemKeys[i]`, the keys of the request being answered (the same as the stored one's when
 * the hashes match).
 */
export async function getBatch(sql: Sql, key: string, itemKeys: readonly (string | null)[]): Promise<StoredBatch | null> {
  const rows = await sql<({ request_hash: string; n: number; found: boolean } & Task)[]>`
    SELECT b.request_hash, u.n::int AS n, t.id IS NOT NULL AS found, t.*
    FROM task_batches b
    CROSS JOIN LATERAL unnest(b.task_ids) WITH ORDINALITY AS u(task_id, n)
    LEFT JOIN LATERAL (
      ${selectTasks(sql)}
      WHERE tasks.id = u.task_id
         OR tasks.idempotency_key = (${JSON.stringify(itemKeys)}::text::json ->> (u.n::int - 1))
      ORDER BY tasks.id = u.task_id DESC
      LIMIT 1
    ) t ON true
    WHERE b.idempotency_key = ${key}
    ORDER BY u.n`;
  const first = rows[0];
  if (!first) return null;
  return {
    requestHash: first.request_hash,
    tasks: rows.map(({ request_hash: _h, n: _n, found, ...task }) => (found ? (task as Task) : null)),
  };
}
