// SQL on api_tokens. Only hashes are stored; see src/auth/tokens.ts. Scopes are read as JSON:
// a text[] parses into a JS array only once postgres.js knows the array types.

import type { Scope } from "../auth/tokens";
import type { Sql } from "./sql";

export interface TokenRow {
  id: string;
  name: string;
  token_hash: string;
  scopes: Scope[];
  created_at: Date;
  revoked_at: Date | null;
}

export async function insertToken(
  sql: Sql,
  token: { id: string; name: string; hash: string; scopes: Scope[] },
): Promise<TokenRow> {
  const rows = await sql<TokenRow[]>`
    INSERT INTO api_tokens (id, name, token_hash, scopes)
    VALUES (${token.id}, ${token.name}, ${token.hash}, ARRAY(SELECT jsonb_array_elements_text(${sql.json(token.scopes)}::jsonb)))
    RETURNING id, name, token_hash, to_jsonb(scopes) AS scopes, created_at, revoked_at`;
  return rows[0]!;
}

/** A live (not revoked) token by its public id. */
export async function findLiveToken(sql: Sql, id: string): Promise<TokenRow | null> {
  const rows = await sql<TokenRow[]>`
    SELECT id, name, token_hash, to_jsonb(scopes) AS scopes, created_at, revoked_at
    FROM api_tokens WHERE id = ${id} AND revoked_at IS NULL`;
  return rows[0] ?? null;
}

export async function listTokens(sql: Sql): Promise<TokenRow[]> {
  return sql<TokenRow[]>`
    SELECT id, name, token_hash, to_jsonb(scopes) AS scopes, created_at, revoked_at
    FROM api_tokens ORDER BY created_at, name`;
}

export interface ApiAccess {
  /** Tokens not revoked. */
  live: number;
  /**
   * Whether requests need a token: a live token exists, or a token (revoked ones count: a
   * revoke marks, never deletes) was created since the last opening. Revoking the last token
   * does not open the API; only openApi does.
   */
  closed: boolean;
  /** The last explicit opening, if any. */
  openedAt: Date | null;
  openedBy: string | null;
}

export async function apiAccess(sql: Sql): Promise<ApiAccess> {
  const rows = await sql<{ live: number; closed: boolean; opened_at: Date | null; opened_by: string | null }[]>`
    WITH opening AS (SELECT opened_at, opened_by FROM api_openings ORDER BY id DESC LIMIT 1)
    SELECT
      (SELECT count(*)::int FROM api_tokens WHERE revoked_at IS NULL) AS live,
      EXISTS (
        SELECT 1 FROM api_tokens
        WHERE revoked_at IS NULL OR created_at >= coalesce((SELECT opened_at FROM opening), '-infinity')
      ) AS closed,
      (SELECT opened_at FROM opening) AS opened_at,
      (SELECT opened_by FROM opening) AS opened_by`;
  const row = rows[0]!;
  return { live: row.live, closed: row.closed, openedAt: row.opened_at, openedBy: row.opened_by };
}

/**
 * Records an explicit opening of the API, by `by`, unless a live token exists: returns when it
 * was opened, or null (nothing recorded). Token changes wait for it, so a token created at the
 * same time counts as created after the opening and closes the API again.
 */
export async function openApi(sql: Sql, by: string): Promise<Date | null> {
  return sql.begin(async (tx) => {
    await tx`LOCK TABLE api_tokens IN SHARE MODE`;
    const rows = await tx<{ opened_at: Date }[]>`
      INSERT INTO api_openings (opened_by)
      SELECT ${by} WHERE NOT EXISTS (SELECT 1 FROM api_tokens WHERE revoked_at IS NULL)
      RETURNING opened_at`;
    return rows[0]?.opened_at ?? null;
  });
}

/** Returns whether a live token of that name was revoked. */
export async function revokeToken(sql: Sql, name: string): Promise<boolean> {
  const rows = await sql`
    UPDATE api_tokens SET revoked_at = clock_timestamp() WHERE name = ${name} AND revoked_at IS NULL RETURNING id`;
  return rows.length > 0;
}
