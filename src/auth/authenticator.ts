// Who is asking, and may they? Bearer API tokens from the database (`bun run token`) and from
// TQ_API_TOKENS, checked on every REST route but health and the OpenAPI document, and on
// every TaskService call. Authentication is enforced while the database says the API is
// closed (once a token has been created, until `bun run token open-api`: revoking the last
// token does not open it; see apiAccess), while TQ_API_TOKENS has entries, and always on a
// role that listens beyond loopback without TQ_INSECURE (which then refuses to start with no
// token at all: src/auth/exposure.ts). Verified tokens and the database's answer are cached
// for a few seconds, so a revoke or an opening takes effect within AUTH_CACHE_MS.
import type { Sql } from "../db/sql";
import { type ApiAccess, apiAccess, findLiveToken } from "../db/tokens";
import type { Logger } from "../log";
import { permissionDenied, rateLimited, unauthenticated } from "../task/errors";
import { isLoopback } from "./exposure";
import { RateLimiter } from "./rate-limit";
import {
  ANONYMOUS,
  allows,
  bearerToken,
  type ConfiguredToken,
  hashToken,
  type Principal,
  parseConfiguredTokens,
  type Scope,
  sameHash,
  tokenId,
} from "./tokens";

export const AUTH_CACHE_MS = 5000;

/** What the Authenticator takes from the configuration (authOptions in src/config.ts). */
export interface AuthOptions {
  /** Where the role listens: beyond loopback a token is always required, unless `insecure`. */
  host: string;
  /** Told to run unprotected beyond loopback. */
  insecure: boolean;
  /** Tokens from configuration, besides the table's: comma-separated name:scope+scope:sha256 entries. */
  configuredTokens: string | undefined;
  /** Requests per second each token may make to this process (0: no limit), and how many at once. */
  rateLimit: { perSecond: number; burst: number };
}

export class Authenticator {
  private readonly configured: ConfiguredToken[];
  private readonly required: boolean;
  /** Closed until the database has answered: start() fails rather than serve open. */
  private access: ApiAccess = { live: 0, closed: true, openedAt: null, openedBy: null };
  private readonly verified = new Map<string, { principal: Principal; until: number }>();
  private readonly limiter: RateLimiter | null;
  private timer: ReturnType<typeof setInterval> | null = null;

  constructor(
    private readonly sql: Sql,
    options: AuthOptions,
    private readonly log: Logger,
  ) {
    this.configured = parseConfiguredTokens(options.configuredTokens);
    this.required = !isLoopback(options.host) && !options.insecure;
    const { perSecond, burst } = options.rateLimit;
    this.limiter = perSecond > 0 ? new RateLimiter(perSecond, burst) : null;
  }

  /** Reads whether the API is closed and how many tokens exist, and keeps that fresh. */
  async start(): Promise<void> {
    this.update(await apiAccess(this.sql), true);
    this.timer = setInterval(() => {
      this.refresh().catch((error) => this.log.warn({ err: error }, "reading API token state failed"));
    }, AUTH_CACHE_MS);
    this.timer.unref?.();
  }

  /** Re-reads the database's state now (start() does so every AUTH_CACHE_MS). */
  async refresh(): Promise<void> {
    this.update(await apiAccess(this.sql), false);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Tokens that can be used: configured ones and live ones in the database. */
  get tokenCount(): number {
    return this.configured.length + this.access.live;
  }

  /** Whether requests must carry a token. */
  get enforced(): boolean {
    return this.required || this.configured.length > 0 || this.access.closed;
  }

  /** Says, when it starts and whenever it changes, that no token can get in. */
  private update(access: ApiAccess, starting: boolean): void {
    const locked = (a: ApiAccess) => a.closed && a.live === 0 && this.configured.length === 0;
    if (locked(access) && (starting || !locked(this.access))) {
      this.log.warn(
        "the API is closed and no token is live: every request needs a token and none can be used; " +
          "create one (bun run token create --name NAME --scope SCOPES) or open the API (bun run token open-api)",
      );
    }
    this.access = access;
  }

  /**
   * The principal behind an Authorization header value, allowed `scope` and within its rate
   * limit; throws unauthenticated (401), permission_denied (403) or rate_limited (429).
   */
  async check(authorization: string | null | undefined, scope: Scope): Promise<Principal> {
    const principal = this.enforced ? await this.authenticate(authorization) : ANONYMOUS;
    if (!allows(principal, scope)) throw permissionDenied(`this token does not have the ${scope} scope`);
    const wait = this.limiter?.take(principal.name) ?? 0;
    if (wait > 0) throw rateLimited(Math.ceil(wait / 1000));
    return principal;
  }

  private async authenticate(authorization: string | null | undefined): Promise<Principal> {
    if (!authorization) throw unauthenticated("an API token is required: send Authorization: Bearer <token>");
    const token = bearerToken(authorization);
    if (token === null) throw unauthenticated("the Authorization header must be: Bearer <token>");
    const hash = hashToken(token);
    const now = performance.now();
    const cached = this.verified.get(hash);
    if (cached && cached.until > now) return cached.principal;
    const principal = (await this.lookup(token, hash)) ?? null;
    if (!principal) throw unauthenticated("the API token is not valid");
    if (this.verified.size > 10_000) this.verified.clear();
    this.verified.set(hash, { principal, until: now + AUTH_CACHE_MS });
    return principal;
  }

  private async lookup(token: string, hash: string): Promise<Principal | null> {
    for (const entry of this.configured) {
      if (sameHash(hash, entry.hash)) return { name: entry.name, scopes: new Set(entry.scopes) };
    }
    const id = tokenId(token);
    if (!id) return null;
    const row = await findLiveToken(this.sql, id);
    if (!row || !sameHash(hash, row.token_hash)) return null;
    return { name: row.name, scopes: new Set(row.scopes) };
  }
}
