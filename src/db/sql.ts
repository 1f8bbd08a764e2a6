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
}

export function connect(url: string, options: ConnectOptions = {}): Sql {
  return postgres(url, {
    max: options.max ?? 10,
    connect_timeout: options.connectTimeout ?? 5,
    idle_timeout: 60,
    // Prepared statements: each named query is parsed once per connection.
    prepare: true,
    // Reconnect quickly after an outage. postgres.js shares its retry count across the pool
    // and would otherwise wait up to 20 s between attempts, stalling requests meant to get 503.
    backoff: (retries: number) => Math.min(1, 0.05 * 2 ** retries) * (0.5 + Math.random() / 2),
    onnotice: () => {},
    connection: { application_name: options.applicationName ?? "task-queue" },
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
