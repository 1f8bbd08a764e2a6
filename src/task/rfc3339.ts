// The times a client sends: RFC 3339 date-times that state their time zone, in the range
// PostgreSQL, RFC 3339 and google.protobuf.Timestamp all hold (years 1 to 9999).
import { invalidArgument } from "./errors";

/** The example every time error quotes. */
export const EXAMPLE_TIME = "2023-04-01T15:04:05Z";

const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:[Zz]|([+-])(\d{2}):(\d{2}))$/;
const ZONELESS = /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?$/;
/** google.protobuf.Timestamp's range, and what PostgreSQL and RFC 3339 (in UTC) both hold. */
/** 0001-01-01T00:00:00Z. */
export const MIN_TIME_MS = -62_135_596_800_000;
/** 9999-12-31T23:59:59.999Z. */
export const MAX_TIME_MS = 253_402_300_799_999;
const RANGE = "from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z";

/**
 * Parses an RFC 3339 date-time that states its time zone. A time without one would be read in
 * the server's zone, which differs between replicas, so it is refused rather than guessed.
 * Fractions below a millisecond are dropped (the column keeps milliseconds); a leap second
 * (23:59:60 in UTC) is the second after 23:59:59, as PostgreSQL reads it.
 */
export function parseRfc3339(value: string, field: string): Date {
  const m = RFC3339.exec(value);
  if (!m) {
    if (ZONELESS.test(value)) {
      throw invalidArgument(field, `${field} must include a time zone (Z or ±hh:mm), e.g. "${EXAMPLE_TIME}"`);
    }
    throw invalidArgument(field, `${field} must be an RFC 3339 date-time with a time zone, e.g. "${EXAMPLE_TIME}"`);
  }
  const [year, month, day, hour, minute, second] = m.slice(1, 7).map(Number) as [number, number, number, number, number, number];
  const millis = Number((m[7] ?? "").padEnd(3, "0").slice(0, 3));
  if (month < 1 || month > 12 || day < 1 || day > daysInMonth(year, month)) {
    throw invalidArgument(field, `${field} is not a calendar date: ${m[1]}-${m[2]}-${m[3]}`);
  }
  if (hour > 23 || minute > 59 || second > 60) {
    throw invalidArgument(field, `${field} is not a time of day: ${m[4]}:${m[5]}:${m[6]}`);
  }
  let offsetMinutes = 0;
  if (m[8] !== undefined) {
    const offsetHours = Number(m[9]);
    const offsetMins = Number(m[10]);
    if (offsetHours > 23 || offsetMins > 59) throw invalidArgument(field, `${field} has an invalid time zone offset`);
    offsetMinutes = (m[8] === "-" ? -1 : 1) * (offsetHours * 60 + offsetMins);
  }
  // Date.UTC would read years 0-99 as 1900-1999.
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  date.setUTCHours(hour, minute, Math.min(second, 59), millis);
  let time = date.getTime() - offsetMinutes * 60_000;
  if (second === 60) {
    const utc = new Date(time);
    if (utc.getUTCHours() !== 23 || utc.getUTCMinutes() !== 59) {
      throw invalidArgument(field, `${field} is not a time of day: ${m[4]}:${m[5]}:60 (a leap second is 23:59:60 in UTC)`);
    }
    time += 1000;
  }
  if (year === 0 || time < MIN_TIME_MS || time > MAX_TIME_MS) throw invalidArgument(field, `${field} must be ${RANGE}`);
  return new Date(time);
}

function daysInMonth(year: number, month: number): number {
  const date = new Date(0);
  date.setUTCFullYear(year, month, 0);
  return date.getUTCDate();
}
