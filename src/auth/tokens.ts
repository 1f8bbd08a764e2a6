// API tokens: their format, hashing and scopes. A token is "tq_<id>_<secret>": the id is
// public (it finds the row), the whole token is kept only as its SHA-256 and compared in
// constant time. Tokens are shown once, at creation, and never logged.
import { timingSafeEqual } from "node:crypto";

export const SCOPES = ["submit", "read", "cancel", "admin"] as const;
export type Scope = (typeof SCOPES)[number];

export interface Principal {
  /** The token's name ("anonymous" when authentication is off). */
  name: string;
  scopes: ReadonlySet<Scope>;
}

export const ANONYMOUS: Principal = { name: "anonymous", scopes: new Set(SCOPES) };

/** admin holds every scope. */
export function allows(principal: Principal, scope: Scope): boolean {
  return principal.scopes.has(scope) || principal.scopes.has("admin");
}

const ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789";
const TOKEN_PATTERN = /^tq_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$/;
export const TOKEN_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function newToken(): { id: string; token: string } {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  const id = Array.from(bytes, (b) => ID_ALPHABET[b % ID_ALPHABET.length]).join("");
  const secret = Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("base64url");
  return { id, token: `tq_${id}_${secret}` };
}

/** The public id of a well-formed token, or null. */
export function tokenId(token: string): string | null {
  return TOKEN_PATTERN.exec(token)?.[1] ?? null;
}

/** The token of an `Authorization: Bearer <token>` value (REST header or gRPC metadata), or null. */
export function bearerToken(authorization: string | null | undefined): string | null {
  return /^Bearer ([!-~]+)$/i.exec(authorization?.trim() ?? "")?.[1] ?? null;
}

export function hashToken(token: string): string {
  return new Bun.CryptoHasher("sha256").update(token).digest("hex");
}

/** Constant-time comparison of two hex digests. */
export function sameHash(a: string, b: string): boolean {
  const x = Buffer.from(a, "hex");
  const y = Buffer.from(b, "hex");
  return x.length === y.length && x.length > 0 && timingSafeEqual(x, y);
}

export function parseScopes(value: string, separator: string | RegExp = ","): Scope[] {
  const scopes = value
    .split(separator)
    .map((s) => s.trim())
    .filter(Boolean);
  if (scopes.length === 0) throw new Error(`no scopes given; choose from ${SCOPES.join(", ")}`);
  for (const scope of scopes) {
    if (!(SCOPES as readonly string[]).includes(scope))
      throw new Error(`unknown scope "${scope}"; choose from ${SCOPES.join(", ")}`);
  }
  return [...new Set(scopes)] as Scope[];
}

export interface ConfiguredToken {
  name: string;
  scopes: Scope[];
  hash: string;
}

/** TQ_API_TOKENS: comma-separated "name:scope+scope:sha256" entries. */
export function parseConfiguredTokens(value: string | undefined): ConfiguredToken[] {
  if (!value) return [];
  return value.split(",").map((entry) => {
    const [name, scopes, hash, ...rest] = entry.trim().split(":");
    if (!name || !scopes || !hash || rest.length > 0 || !TOKEN_NAME_PATTERN.test(name) || !/^[0-9a-f]{64}$/.test(hash)) {
      throw new Error(`TQ_API_TOKENS entry "${entry.trim().slice(0, 40)}" is not name:scope+scope:sha256-hex`);
    }
    return { name, scopes: parseScopes(scopes, "+"), hash };
  });
}
