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
  // One fragment with a parameter per column, not three fragments per column nested one inside
  // the next: postgres.js walks every fragment of every statement to build its text, and for a
  // 30-column batch that walk was a visible part of the coordinator's CPU per task (issue 16).
  // The text is the same as before: unnest($1::text::<type>[], ...) AS r("<name>", ...).
  const names = Object.keys(columns);
  const defs = Object.values(columns);
  const strings: string[] = ["unnest("];
  const values: string[] = [];
  defs.forEach(([type, pick], c) => {
    values.push(arrayLiteral(rows.map((row, i) => asText(pick(row, i)))));
    strings.push(
      c < defs.length - 1 ? `${CAST_TEXT[type]}, ` : `${CAST_TEXT[type]}) AS r(${names.map(quoteIdentifier).join(",")})`,
    );
  });
  const template = Object.assign(strings, { raw: strings }) as unknown as TemplateStringsArray;
  return sql(template, ...values) as unknown as Fragment;
}

const CAST_TEXT: Record<ColumnType, string> = {
  uuid: "::text::uuid[]",
  text: "::text::text[]",
  integer: "::text::integer[]",
  bigint: "::text::bigint[]",
  boolean: "::text::boolean[]",
  jsonb: "::text::jsonb[]",
  timestamptz: "::text::timestamptz[]",
  "double precision": "::text::double precision[]",
};

/** An identifier as postgres.js's sql(name) writes it. */
function quoteIdentifier(name: string): string {
  return `"${name.replace(/"/g, '""').replace(/\./g, '"."')}"`;
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
