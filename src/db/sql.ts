// The PostgreSQL connection. Every query in the project goes through a `Sql` made here and
// lives in a named function in the module for its table.
import postgres from "postgres";

export type Sql = postgres.Sql;

export interface ConnectOptions {
  /** Pool size. Defaults to 10. */
  max?: number;
  /** Seconds to wait for a connection before failing (answered as 503). Defaults to 5. */
  connectTimeout?: number;
  /** Name shown in pg_stat_activity. */
  applicationName?: string;
  /**
   * statement_timeout on every connection, in ms: a statement running longer is cancelled
   * (SQLSTATE 57014, answered as 503). 0 turns it off. Defaults to the server's own setting.
   */
  statementTimeoutMs?: number;
  /**
   * lock_timeout on every connection, in ms: a statement waiting longer for a lock fails
   * (SQLSTATE 55P03, answered as 503). 0 turns it off. Defaults to the server's own setting.
   */
  lockTimeoutMs?: number;
  /**
   * The client's own deadline for every query, in ms (0 or unset: none). statement_timeout
   * cannot end a query the server never answers: with the primary cut off (packets dropped,
   * no reset) a query would wait on TCP for minutes. Past this deadline a query still waiting
   * for a connection fails, and one sent has its connection destroyed (which fails all on it);
   * the pool connects again, to the new primary after a failover. Error code QUERY_TIMEOUT
   * (answered 503). Lives in the patched postgres.js (patches/postgres@3.4.9.patch, Query.deadline).
   */
  queryTimeoutMs?: number;
}

/**
 * The settings a connection starts with. They travel in the startup packet, so they hold from
 * the first statement on every connection of the pool, the LISTEN connection made from its
 * options included (src/db/notify.ts), and survive reconnects; no SET per checkout. Numbers go
 * as strings: postgres.js drops a falsy value, and "0" (off) must still be sent.
 */
export function startupParameters(options: ConnectOptions): Record<string, string> {
  const parameters: Record<string, string> = { application_name: options.applicationName ?? "task-queue" };
  if (options.statementTimeoutMs !== undefined) parameters.statement_timeout = String(options.statementTimeoutMs);
  if (options.lockTimeoutMs !== undefined) parameters.lock_timeout = String(options.lockTimeoutMs);
  return parameters;
}

/**
 * A pool on `url`. The URL may list several hosts (`postgres://u@h1:5432,h2:5432/db`) with
 * `target_session_attrs=primary`: each connection goes to whichever host is the primary then,
 * so after a failover the pool's next connections reach the new one (README, "Production").
 * A connection that finds its server demoted (a write refused with 25006) is dropped by the
 * patched postgres.js rather than written to again.
 */
export function connect(url: string, options: ConnectOptions = {}): Sql {
  return postgres(url, {
    max: options.max ?? 10,
    connect_timeout: options.connectTimeout ?? 5,
    idle_timeout: 60,
    // Prepared statements: each named query is parsed once per connection.
    prepare: true,
    // Reconnect quickly after an outage. postgres.js shares its retry count across the pool
    // and would otherwise wait up to 20 s between attempts, stalling requests meant to get 503.
    // At most 250 ms: during a failover every connection attempt fails until the standby is
    // promoted, and the first attempt after the promotion should come within a quarter second.
    backoff: (retries: number) => Math.min(0.25, 0.05 * 2 ** retries) * (0.5 + Math.random() / 2),
    onnotice: () => {},
    connection: startupParameters(options),
    // Patched option (patches/postgres@3.4.9.patch): a deadline per query, client-side.
    ...(options.queryTimeoutMs ? { query_timeout: options.queryTimeoutMs } : {}),
    types: { date: { to: 1184, from: [1082, 1114, 1184], serialize: (date: Date) => date.toISOString(), parse: parseTimestamp } },
  });
}

/**
 * A date/time column's text as a Date. postgres.js would take `new Date(text)`, which reads
 * PostgreSQL's "0050-01-01 00:00:00+00" as 1950 (years 1-99 as two-digit years); read as ISO
 * in UTC, the year is taken as written, and the offset (±hh, ±hh:mm or ±hh:mm:ss) applied.
 */
export function parseTimestamp(text: string): Date {
  const m = /^(00\d\d-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?)(?:([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?)?$/.exec(text);
  if (!m) return new Date(text);
  const offsetSeconds = (m[3] === "-" ? -1 : 1) * (Number(m[4] ?? 0) * 3600 + Number(m[5] ?? 0) * 60 + Number(m[6] ?? 0));
  return new Date(Date.parse(`${m[1]}T${m[2]}Z`) - offsetSeconds * 1000);
}

/** Resolves when the database answers a trivial query (readiness). */
export async function ping(sql: Sql): Promise<void> {
  await sql`SELECT 1`;
}
