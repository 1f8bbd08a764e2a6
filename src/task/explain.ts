// Schema checks that explain themselves: the first problem TypeBox finds becomes an
// invalid_argument naming the field and the rule it broke, in words a client can act on. The
// HTTP error mapping explains Elysia's own validation failures with the same words.
import type { Static, TSchema } from "@sinclair/typebox";
import { type TypeCheck, TypeCompiler } from "@sinclair/typebox/compiler";
import { Value, type ValueError, ValueErrorType } from "@sinclair/typebox/value";
import { invalidArgument } from "./errors";

const compiled = new WeakMap<TSchema, TypeCheck<TSchema>>();

/** Checks a value against a schema; the first problem becomes invalidArgument naming its field. */
export function checkSchema<T extends TSchema>(schema: T, value: unknown): Static<T> {
  // A compiled check for the usual valid body; the interpreted walk only to explain a failure.
  let check = compiled.get(schema);
  if (!check) {
    check = TypeCompiler.Compile(schema);
    compiled.set(schema, check);
  }
  if (check.Check(value)) return value as Static<T>;
  const error = Value.Errors(schema, value).First();
  if (error) {
    const { field, message } = describeValueError(error, "body");
    throw invalidArgument(field, message);
  }
  return value as Static<T>;
}

/**
 * Turns a TypeBox error into the field it is about and the rule it broke, in words a client
 * can act on. `root` names the value itself when the error is about the whole of it.
 */
export function describeValueError(error: ValueError, root: string): { field: string; message: string } {
  const segments = error.path
    .split("/")
    .slice(1)
    .map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~"));
  const field = fieldPath(segments) || root;
  const schema = error.schema as Record<string, unknown>;
  switch (error.type) {
    case ValueErrorType.ObjectRequiredProperty:
      return { field, message: `${field} is required` };
    case ValueErrorType.ObjectAdditionalProperties: {
      const parent = fieldPath(segments.slice(0, -1));
      const key = segments.at(-1) ?? "";
      const keyPattern = Object.keys((schema.patternProperties as object | undefined) ?? {})[0];
      if (keyPattern !== undefined && parent !== "") {
        return { field: parent, message: `${parent} key ${JSON.stringify(key)} must match ${keyPattern}` };
      }
      return { field, message: `${field} is not a known field` };
    }
    case ValueErrorType.StringFormat:
      return { field, message: `${field} must be ${schema.format === "uuid" ? "a UUID" : `in ${String(schema.format)} format`}` };
    default:
      return { field, message: `${field} ${describeRule(schema) ?? `is invalid: ${error.message}`}` };
  }
}

/** `tasks[3].env.A`: an array index in brackets, the form the batch's own checks name. */
function fieldPath(segments: readonly string[]): string {
  return segments.reduce((path, segment) => {
    if (/^\d+$/.test(segment) && path !== "" && !/\.(env|secret_env)$|^(env|secret_env)$/.test(path))
      return `${path}[${segment}]`;
    return path === "" ? segment : `${path}.${segment}`;
  }, "");
}

/** The rule a schema states, as "must be ...", or null when it has no simple wording. */
function describeRule(schema: Record<string, unknown>): string | null {
  const anyOf = schema.anyOf as Record<string, unknown>[] | undefined;
  if (anyOf) {
    if (anyOf.every((s) => "const" in s)) return `must be one of: ${anyOf.map((s) => String(s.const)).join(", ")}`;
    const numeric = anyOf.find((s) => s.type === "integer" || s.type === "number");
    return numeric ? describeRule(numeric) : null;
  }
  const min = schema.minimum as number | undefined;
  const max = schema.maximum as number | undefined;
  const range =
    min !== undefined && max !== undefined
      ? ` from ${min} to ${max}`
      : min !== undefined
        ? ` of at least ${min}`
        : max !== undefined
          ? ` of at most ${max}`
          : "";
  switch (schema.type) {
    case "string": {
      const shortest = (schema.minLength as number | undefined) ?? 0;
      const longest = schema.maxLength as number | undefined;
      let rule = shortest === 1 ? "must be a non-empty string" : "must be a string";
      if (shortest > 1) rule += ` of at least ${shortest} characters`;
      // Every maxLength here stands for a limit in bytes (see Command).
      if (longest !== undefined) rule += `${shortest > 1 ? " and" : ""} of at most ${longest} bytes (UTF-8)`;
      if (schema.pattern !== undefined) rule += ` matching ${String(schema.pattern)}`;
      return rule;
    }
    case "integer":
      return `must be an integer${range}`;
    case "number":
      return `must be a number${range}`;
    case "boolean":
      return "must be true or false";
    case "array": {
      const fewest = schema.minItems as number | undefined;
      const most = schema.maxItems as number | undefined;
      if (fewest !== undefined && most !== undefined) return `must be an array of ${fewest} to ${most} items`;
      if (fewest !== undefined) return `must be an array of at least ${fewest} item${fewest === 1 ? "" : "s"}`;
      return most === undefined ? "must be an array" : `must be an array of at most ${most} items`;
    }
    case "object": {
      const most = schema.maxProperties as number | undefined;
      return `must be a JSON object${most === undefined ? "" : ` with at most ${most} entries`}`;
    }
    default:
      return null;
  }
}
