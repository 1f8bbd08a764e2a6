// SQL on worker_credentials: the secret each worker was handed in Welcome, bound to its id.
// Only its SHA-256 is kept; rows are never deleted, so a revoked id stays revoked.
import { sameHash } from "../auth/tokens";
import { array } from "./encode";
import type { Sql } from "./sql";

export interface WorkerCredentialRow {
  worker_id: string;
  joined_with: string | null;
  created_at: Date;
  last_used_at: Date;
  revoked_at: Date | null;
  revoked_by: string | null;
  /** From the workers registry: the worker's name and state, when it has a row there. */
  name: string | null;
  state: string | null;
}

/** What a presented credential is worth for a worker id. */
export type CredentialCheck = "valid" | "revoked" | "wrong" | "unknown";

/**
 * Checks a presented credential against the worker id's row and, when it is valid, records
 * its use. A revoked credential says "revoked" only to the holder of the right secret.
 */
export async function useCredential(sql: Sql, workerId: string, presentedHash: string): Promise<CredentialCheck> {
  const check = await checkCredential(sql, workerId, presentedHash);
  if (check === "valid") await touchCredential(sql, workerId);
  return check;
}

/** useCredential's check alone (one round trip); record the use with touchCredential. */
export async function checkCredential(sql: Sql, workerId: string, presentedHash: string): Promise<CredentialCheck> {
  const [row] = await sql<{ secret_hash: string; revoked: boolean }[]>`
    SELECT secret_hash, revoked_at IS NOT NULL AS revoked FROM worker_credentials WHERE worker_id = ${workerId}`;
  if (!row) return "unknown";
  if (!sameHash(row.secret_hash, presentedHash)) return "wrong";
  if (row.revoked) return "revoked";
  return "valid";
}

/** Records a valid credential's use (last_used_at). */
export async function touchCredential(sql: Sql, workerId: string): Promise<void> {
  await sql`UPDATE worker_credentials SET last_used_at = clock_timestamp() WHERE worker_id = ${workerId}`;
}

/** Stores a new worker's credential; false (nothing changed) when the id has one already. */
export async function insertCredential(
  sql: Sql,
  credential: { workerId: string; secretHash: string; joinedWith: string | null },
): Promise<boolean> {
  const rows = await sql`
    INSERT INTO worker_credentials (worker_id, secret_hash, joined_with)
    VALUES (${credential.workerId}, ${credential.secretHash}, ${credential.joinedWith})
    ON CONFLICT (worker_id) DO NOTHING
    RETURNING worker_id`;
  return rows.length > 0;
}

/** Of these worker ids, those whose credential is revoked. */
export async function revokedAmong(sql: Sql, workerIds: readonly string[]): Promise<string[]> {
  if (workerIds.length === 0) return [];
  const rows = await sql<{ worker_id: string }[]>`
    SELECT worker_id FROM worker_credentials
    WHERE worker_id = ANY(${array(sql, workerIds, "text")}) AND revoked_at IS NOT NULL`;
  return rows.map((row) => row.worker_id);
}

/** Revokes a worker's credential; false when it has none or it was revoked already. */
export async function revokeCredential(sql: Sql, workerId: string, by: string): Promise<boolean> {
  const rows = await sql`
    UPDATE worker_credentials SET revoked_at = clock_timestamp(), revoked_by = ${by}
    WHERE worker_id = ${workerId} AND revoked_at IS NULL
    RETURNING worker_id`;
  return rows.length > 0;
}

/** Every credential, newest first, with its worker's name and state; revoked ones only when asked. */
export async function listCredentials(sql: Sql, options: { includeRevoked?: boolean; limit?: number } = {}) {
  const includeRevoked = options.includeRevoked ?? true;
  return sql<WorkerCredentialRow[]>`
    SELECT c.worker_id, c.joined_with, c.created_at, c.last_used_at, c.revoked_at, c.revoked_by,
           w.name, w.state
    FROM worker_credentials c LEFT JOIN workers w ON w.id = c.worker_id
    WHERE ${includeRevoked} OR c.revoked_at IS NULL
    ORDER BY c.created_at DESC, c.worker_id
    LIMIT ${options.limit ?? 1000}`;
}
