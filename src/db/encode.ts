// How values reach a statement, the same way in every module: the rows of a batch as one
// text[] parameter per column, task states as literals, durations against the database's
// clock.
import { isTaskState, type TaskState } from "../task/state";
import type { Sql } from "./sql";

export type Fragment = ReturnType<Sql>;

/** The element types a batch column may have. */
export type ColumnType = "uuid" | "text" | "integer" | "bigint" | "boolean" | "jsonb" | "timestamptz" | "double precision";

const ARRAY_CASTS: Record<ColumnType, (sql: Sql) => Fragment> = {
  uuid: (sql) => sql`::text::uuid[]`,
  text: (sql) => sql`::text::text[]`,
  integer: (sql) => sql`::text::integer[]`,
  bigint: (sql) => sql`::text::bigint[]`,
  boolean: (sql) => sql`::text::boolean[]`,
  jsonb: (sql) => sql`::text::jsonb[]`,
  timestamptz: (sql) => sql`::text::timestamptz[]`,
  "double precision": (sql) => sql`::text::double precision[]`,
};

/** A value as the text PostgreSQL reads for its column (objects as JSON, dates as ISO); null stays null. */
type Value = string | number | boolean | Date | object | null;

function asText(value: Value): string | null {
  if (value === null) return null;
  if (value instanceof Date) return value.toISOString();
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

/**
 * An array literal of text values, to send as one text parameter and cast to the column's
 * array type. (postgres.js would serialise a JS array itself only once it has fetched the
 * server's array types, which a fresh connection may not have done yet.)
 */
function arrayLiteral(values: readonly (string | null)[]): string {
  const elements = values.map((v) => (v === null ? "NULL" : `"${v.replace(/[\\"]/g, "\\$&")}"`));
  return `{${elements.join(",")}}`;
}

/** One array parameter of `type`: `= ANY(...)` lists, or indexing by position. */
export function array(sql: Sql, values: readonly Value[], type: ColumnType): Fragment {
  return sql`${arrayLiteral(values.map(asText))}${ARRAY_CASTS[type](sql)}`;
}

/** A batch column: its element type and each row's value. */
export type Column<R> = readonly [ColumnType, (row: R, index: number) => Value];

/**
 * `unnest(...) AS r(...)`: the rows of a batch, one array parameter per column, as a set of
 * rows named `r` with the given columns. The one encoding of every batch statement: for a
 * 1000-row batch the server reads it several times faster than the same rows as JSON
 * (json_to_recordset), and for a handful of rows it costs the same.
 */
export function unnest<R>(sql: Sql, rows: readonly R[], columns: Record<string, Column<R>>): Fragment {
  const names = Object.keys(columns);
  const arrays = Object.values(columns).map(([type, pick]) =>
    array(
      sql,
      rows.map((row, i) => pick(row, i)),
      type,
    ),
  );
  const list = arrays.reduce((all, one) => sql`${all}, ${one}`);
  return sql`unnest(${list}) AS r(${sql(names)})`;
}

/**
 * Task states as a list of SQL literals, for `state IN (...)` guards. Literals, not
 * parameters: the partial indexes (migrations) name their states, and a plan that is
 * prepared once cannot use an index whose predicate it cannot see is implied.
 */
export function states(sql: Sql, list: readonly TaskState[]): Fragment {
  let text = STATE_LISTS.get(list);
  if (text === undefined) {
    if (list.length === 0 || !list.every(isTaskState)) throw new Error(`not a list of task states: ${list.join(", ")}`);
    text = list.map((state) => `'${state}'`).join(", ");
    STATE_LISTS.set(list, text);
  }
  return sql.unsafe(text) as unknown as Fragment;
}

const STATE_LISTS = new WeakMap<readonly TaskState[], string>();
