// Worker join tokens and worker credentials.
//
// A worker joins with a join token: TQ_WORKER_TOKEN (one shared token, as before) or any
// entry of TQ_WORKER_TOKENS (name:sha256, several at once so that a new token can be rolled
// out before the old one is dropped). On joining, the coordinator hands the worker its own
// credential in Welcome, bound to its id; the worker presents it in every later Hello. A
// stream with a valid credential for its id is accepted without a join token, so dropping a
// join token from the list keeps the workers that joined with it; revoking a worker's
// credential (`bun run token worker-revoke`) shuts that one worker out.
import { hashToken, sameHash, TOKEN_NAME_PATTERN } from "./tokens";

export interface JoinToken {
  /** Shown in `bun run token worker-list` as what a worker joined with. */
  name: string;
  /** SHA-256 (hex) of the token. */
  hash: string;
}

/** The name a plain TQ_WORKER_TOKEN is known by. */
export const SHARED_JOIN_TOKEN_NAME = "TQ_WORKER_TOKEN";

/** TQ_WORKER_TOKENS: comma-separated "name:sha256" entries, as `bun run token worker-hash` prints them. */
export function parseJoinTokens(value: string | undefined): JoinToken[] {
  if (!value) return [];
  return value.split(",").map((entry) => {
    const [name, hash, ...rest] = entry.trim().split(":");
    if (!name || !hash || rest.length > 0 || !TOKEN_NAME_PATTERN.test(name) || !/^[0-9a-f]{64}$/.test(hash)) {
      throw new Error(`TQ_WORKER_TOKENS entry "${entry.trim().slice(0, 40)}" is not name:sha256-hex`);
    }
    return { name, hash };
  });
}

/** The join tokens a coordinator accepts: TQ_WORKER_TOKEN (if set) and every TQ_WORKER_TOKENS entry. */
export function joinTokens(shared: string | undefined, configured: string | undefined): JoinToken[] {
  const list = parseJoinTokens(configured);
  if (shared) list.unshift({ name: SHARED_JOIN_TOKEN_NAME, hash: hashToken(shared) });
  return list;
}

/** The name of the accepted join token `presented` is, or null. Every entry is compared, in constant time. */
export function matchJoinToken(tokens: readonly JoinToken[], presented: string | null): string | null {
  if (presented === null) return null;
  const hash = hashToken(presented);
  let match: string | null = null;
  for (const token of tokens) if (sameHash(token.hash, hash) && match === null) match = token.name;
  return match;
}

/** A new join token, for a TQ_WORKER_TOKENS entry. */
export function newJoinToken(): string {
  return `tqj_${Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("base64url")}`;
}

/** A new worker credential (handed out once, in Welcome). */
export function newWorkerCredential(): string {
  return `tqw_${Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("base64url")}`;
}

/** Trailer key that tells a refused worker why, when the reason changes what it does. */
export const REFUSAL_KEY = "tq-refusal";
/** Its value for a revoked credential: the worker kills its tasks and stops instead of reconnecting. */
export const REFUSAL_REVOKED = "credential-revoked";
