// Flow control's parts of the one claim statement (src/db/claim.ts): concurrency keys and rate
// limits (issue 14). Each function is a fragment the claim embeds at a fixed place; empty here
// until flow control fills them.
import type { Fragment } from "./encode";
import type { Sql } from "./sql";

/** Extra columns of `cand`, each with a leading comma (e.g. `, tasks.concurrency_key`). */
export function flowCandidateColumns(sql: Sql): Fragment {
  return sql``;
}

/**
 * Extra conditions on a candidate task row (`tasks`), each with a leading AND: a task whose key
 * is full or whose rate limit has no token is not a candidate.
 */
export function flowCandidateFilter(sql: Sql): Fragment {
  return sql``;
}

/**
 * Extra CTEs after `room`, each `name AS (...),` with a trailing comma: rows locked FOR UPDATE
 * (keys, buckets) saying how many of the candidates (`cand`) each has room for.
 */
export function flowRooms(sql: Sql): Fragment {
  return sql``;
}

/**
 * Extra conditions in `ok`, each with a leading AND, on `w` (a candidate with window row numbers
 * the flow CTEs computed): the n-th candidate of a key passes only within its room.
 */
export function flowWithinRooms(sql: Sql): Fragment {
  return sql``;
}

/**
 * Extra CTEs after `t` (the claimed rows), each `name AS (...),` with a trailing comma: consume
 * the tokens and key slots of the claimed tasks.
 */
export function flowConsume(sql: Sql): Fragment {
  return sql``;
}
