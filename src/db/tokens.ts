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

export async function countLiveTokens(sql: Sql): Promise<number> {
  const rows = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM api_tokens WHERE revoked_at IS NULL`;
  return rows[0]?.n ?? 0;
}

/** Returns whether a live token of that name was revoked. */
export async function revokeToken(sql: Sql, name: string): Promise<boolean> {
  const rows = await sql`
    UPDATE api_tokens SET revoked_at = clock_timestamp() WHERE name = ${name} AND revoked_at IS NULL RETURNING id`;
  return rows.length > 0;
}
