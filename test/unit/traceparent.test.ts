// W3C traceparent values: what is kept with a task, and what is ignored.
import { expect, test } from "bun:test";
import { normalTraceparent, parseTraceparent } from "../../src/trace/traceparent";

const VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

test("a valid traceparent parses and keeps its canonical (lowercase) form", () => {
  expect(parseTraceparent(VALID)).toEqual({ traceId: "4bf92f3577b34da6a3ce929d0e0e4736", spanId: "00f067aa0ba902b7", flags: 1 });
  expect(normalTraceparent(` ${VALID.toUpperCase()} `)).toBe(VALID);
  // A later version may carry more fields; its first four are read.
  expect(normalTraceparent(`01-${VALID.slice(3)}-extra`)).toBe(VALID);
});

test("absent, malformed, all-zero ids, version ff and extra fields on version 00 are ignored", () => {
  for (const value of [
    null,
    undefined,
    "",
    "garbage",
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    `ff-${VALID.slice(3)}`,
    `${VALID}-extra`,
  ]) {
    expect(normalTraceparent(value)).toBeNull();
  }
});
