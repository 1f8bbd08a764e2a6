// The one wait helper: it resolves with the first truthy answer, tries again after a throw
// or a falsy answer, and when the time (or its tries) is up it fails naming what it awaited
// and the last thing it saw.
import { expect, test } from "bun:test";
import { eventually } from "../support/eventually";

test("resolves with the first truthy value, after falsy values and throws", async () => {
  let calls = 0;
  const value = await eventually(
    () => {
      calls++;
      if (calls === 1) throw new Error("not yet");
      return calls === 2 ? null : { calls };
    },
    { what: "the third call", intervalMs: 1 },
  );
  expect(value).toEqual({ calls: 3 });
  expect(calls).toBe(3);
});

test("fails after its time, naming what it awaited and the last error", async () => {
  const error = await eventually(
    () => {
      throw new Error("the row is missing");
    },
    { what: "the stopped event", timeoutMs: 50, intervalMs: 5 },
  ).catch((e: Error) => e);
  expect(error).toBeInstanceOf(Error);
  expect((error as Error).message).toMatch(/^the stopped event: not within 50 ms \(\d+ tries\); last error: the row is missing$/);
});

test("fails after its tries, with the last value", async () => {
  let calls = 0;
  const error = await eventually(
    () => {
      calls++;
      return 0;
    },
    { what: "a count", tries: 3, intervalMs: 1 },
  ).catch((e: Error) => e);
  expect(calls).toBe(3);
  expect((error as Error).message).toBe("a count: not in 3 tries; last value: 0");
});

test("a try that hangs fails at the deadline rather than hanging the test", async () => {
  const error = await eventually(() => new Promise<boolean>(() => {}), { what: "an answer", timeoutMs: 50 }).catch(
    (e: Error) => e,
  );
  expect((error as Error).message).toMatch(/^an answer: not within 50 ms \(1 tries\); last error: a try still running/);
});
