import { describe, expect, test } from "bun:test";
import { decodeCursor, encodeCursor } from "../../src/api/cursor";
import { loadConfig, taskDefaults } from "../../src/config";
import { TaskQueueError } from "../../src/task/errors";
import { MAX_TIME_MS, MIN_TIME_MS, parseRfc3339 } from "../../src/task/rfc3339";
import {
  isTaskId,
  MAX_COMMAND_BYTES,
  MAX_ENV_TOTAL_BYTES,
  MAX_ENV_VALUE_BYTES,
  parseIdempotencyKey,
  toBatchSpecs,
  toScheduleSpec,
  toTaskSpec,
} from "../../src/task/spec";

const defaults = taskDefaults(loadConfig({}));

/** The invalid_argument error `run` throws, so tests can check its field and message. */
function rejection(run: () => unknown): TaskQueueError {
  try {
    run();
  } catch (error) {
    if (error instanceof TaskQueueError && error.code === "invalid_argument") return error;
    throw error;
  }
  throw new Error("expected an invalid_argument error, but nothing was thrown");
}

const rejects = (
  input: unknown,
  field: string,
  message?: RegExp,
  parse: (input: unknown) => unknown = (body) => toTaskSpec(body, defaults),
) => {
  const error = rejection(() => parse(input));
  expect(error.field).toBe(field);
  if (message) expect(error.message).toMatch(message);
  return error;
};

describe("toTaskSpec", () => {
  test("a bare command gets the defaults: now, no timeout, configured attempts", () => {
    expect(toTaskSpec({ command: "echo hi" }, defaults)).toEqual({
      command: "echo hi",
      scheduledAt: null,
      timeoutMs: 0,
      maxAttempts: defaults.maxAttempts,
      env: {},
      secretEnv: {},
      cwd: null,
      retry: { onFailure: true, onTimeout: true, onLost: true, backoffBaseMs: 1000, backoffCapMs: 60_000 },
      idempotencyKey: null,
    });
    expect(toTaskSpec({ command: "x" }, { ...defaults, maxAttempts: 7 }).maxAttempts).toBe(7);
  });

  test("the full form is carried over", () => {
    const spec = toTaskSpec(
      {
        command: "make test",
        scheduled_at: "2030-01-02T03:04:05.678+02:00",
        timeout_ms: 1000,
        max_attempts: 5,
        env: { A: "1", _b2: "two words" },
        cwd: "/srv/app",
      },
      defaults,
    );
    expect(spec).toEqual({
      command: "make test",
      scheduledAt: new Date("2030-01-02T01:04:05.678Z"),
      timeoutMs: 1000,
      maxAttempts: 5,
      env: { A: "1", _b2: "two words" },
      secretEnv: {},
      cwd: "/srv/app",
      retry: { onFailure: true, onTimeout: true, onLost: true, backoffBaseMs: 1000, backoffCapMs: 60_000 },
      idempotencyKey: null,
    });
  });

  test("a retry policy overrides the defaults field by field", () => {
    const spec = toTaskSpec({ command: "x", retry: { on_failure: false, backoff_base_ms: 50 } }, defaults);
    expect(spec.retry).toEqual({ onFailure: false, onTimeout: true, onLost: true, backoffBaseMs: 50, backoffCapMs: 60_000 });
    rejects({ command: "x", retry: { on_failure: "no" } }, "retry.on_failure");
    rejects({ command: "x", retry: { backoff_base_ms: -1 } }, "retry.backoff_base_ms");
    rejects({ command: "x", retry: { sometimes: true } }, "retry.sometimes");
  });

  test("backoff_cap_ms below backoff_base_ms is refused; a default yields to what was sent", () => {
    rejects({ command: "x", retry: { backoff_base_ms: 5000, backoff_cap_ms: 4999 } }, "retry.backoff_cap_ms", /at least/);
    const equal = toTaskSpec({ command: "x", retry: { backoff_base_ms: 5000, backoff_cap_ms: 5000 } }, defaults).retry;
    expect([equal.backoffBaseMs, equal.backoffCapMs]).toEqual([5000, 5000]);
    const highBase = toTaskSpec({ command: "x", retry: { backoff_base_ms: 120_000 } }, defaults).retry;
    expect([highBase.backoffBaseMs, highBase.backoffCapMs]).toEqual([120_000, 120_000]);
    const lowCap = toTaskSpec({ command: "x", retry: { backoff_cap_ms: 200 } }, defaults).retry;
    expect([lowCap.backoffBaseMs, lowCap.backoffCapMs]).toEqual([200, 200]);
  });

  test("a batch: empty says so, items may carry their own idempotency_key, errors name the item", () => {
    rejects({ tasks: [] }, "tasks", /tasks is empty; a batch holds 1 to 10 tasks/, (input) => toBatchSpecs(input, defaults, 10));
    const specs = toBatchSpecs({ tasks: [{ command: "a", idempotency_key: "k-1" }, { command: "b" }] }, defaults, 10);
    expect(specs.map((spec) => spec.idempotencyKey)).toEqual(["k-1", null]);
    rejects({ tasks: [{ command: "a" }, { command: 5 }] }, "tasks[1].command", /string/, (input) =>
      toBatchSpecs(input, defaults, 10),
    );
    rejects({ tasks: [{ command: "a", idempotency_key: "a b" }] }, "tasks[0].idempotency_key", /visible ASCII/, (input) =>
      toBatchSpecs(input, defaults, 10),
    );
  });

  test("an idempotency key is visible ASCII of bounded length", () => {
    expect(parseIdempotencyKey(undefined)).toBeNull();
    expect(parseIdempotencyKey("")).toBeNull();
    expect(parseIdempotencyKey("order-42/retry:1")).toBe("order-42/retry:1");
    expect(() => parseIdempotencyKey("has space")).toThrow(/visible ASCII/);
    expect(() => parseIdempotencyKey("é")).toThrow(/visible ASCII/);
    expect(() => parseIdempotencyKey("k".repeat(256))).toThrow(/at most 255 bytes/);
  });

  test("command: required, a string, not blank, no NUL, bounded", () => {
    rejects({}, "command", /required/);
    rejects({ command: 5 }, "command", /string/);
    rejects({ command: "" }, "command", /non-empty/);
    rejects({ command: "  \t\n" }, "command", /blank/);
    rejects({ command: "echo a\0b" }, "command", /NUL/);
    rejects({ command: "x".repeat(MAX_COMMAND_BYTES + 1) }, "command", /at most 65536 bytes/);
    expect(toTaskSpec({ command: "x".repeat(MAX_COMMAND_BYTES) }, defaults).command).toHaveLength(MAX_COMMAND_BYTES);
    // UTF-8 bytes, not characters: 32768 two-byte characters fill the limit, one more is over.
    expect(toTaskSpec({ command: "é".repeat(MAX_COMMAND_BYTES / 2) }, defaults).command).toHaveLength(MAX_COMMAND_BYTES / 2);
    rejects({ command: "é".repeat(MAX_COMMAND_BYTES / 2 + 1) }, "command", /at most 65536 bytes \(UTF-8\); it has 65538/);
    rejects({ command: "😀".repeat(MAX_COMMAND_BYTES / 4 + 1) }, "command", /at most 65536 bytes/);
  });

  test("the body must be an object with known fields only", () => {
    rejects(null, "body", /JSON object/);
    rejects([], "body", /JSON object/);
    rejects("echo", "body", /JSON object/);
    rejects({ command: "x", timeout: 5 }, "timeout", /not a known field/);
  });

  test("timeout_ms: an integer from 0 to 7 days", () => {
    expect(toTaskSpec({ command: "x", timeout_ms: 0 }, defaults).timeoutMs).toBe(0);
    expect(toTaskSpec({ command: "x", timeout_ms: 604_800_000 }, defaults).timeoutMs).toBe(604_800_000);
    rejects({ command: "x", timeout_ms: -1 }, "timeout_ms", /from 0 to 604800000/);
    rejects({ command: "x", timeout_ms: 604_800_001 }, "timeout_ms", /integer/);
    rejects({ command: "x", timeout_ms: 1.5 }, "timeout_ms", /integer/);
    rejects({ command: "x", timeout_ms: "10" }, "timeout_ms", /integer/);
  });

  test("max_attempts: an integer from 1 to 100", () => {
    expect(toTaskSpec({ command: "x", max_attempts: 1 }, defaults).maxAttempts).toBe(1);
    expect(toTaskSpec({ command: "x", max_attempts: 100 }, defaults).maxAttempts).toBe(100);
    rejects({ command: "x", max_attempts: 0 }, "max_attempts", /from 1 to 100/);
    rejects({ command: "x", max_attempts: 101 }, "max_attempts");
    rejects({ command: "x", max_attempts: null }, "max_attempts");
  });

  test("env: names like shell variables, string values without NUL, bounded", () => {
    rejects({ command: "x", env: { "A-B": "1" } }, "env", /"A-B" must match/);
    rejects({ command: "x", env: { "1A": "1" } }, "env", /must match/);
    rejects({ command: "x", env: { "": "1" } }, "env", /must match/);
    rejects({ command: "x", env: { A: 1 } }, "env.A", /string/);
    rejects({ command: "x", env: { A: "a\0b" } }, "env.A", /NUL/);
    rejects({ command: "x", env: ["A=1"] }, "env", /JSON object/);
    const many = Object.fromEntries(Array.from({ length: 257 }, (_, i) => [`V${i}`, "x"]));
    rejects({ command: "x", env: many }, "env", /at most 256 entries/);
    const enough = Object.fromEntries(Array.from({ length: 256 }, (_, i) => [`V${i}`, "x"]));
    expect(Object.keys(toTaskSpec({ command: "x", env: enough }, defaults).env)).toHaveLength(256);
    expect(toTaskSpec({ command: "x", env: { BIG: "x".repeat(MAX_ENV_VALUE_BYTES) } }, defaults).env.BIG).toHaveLength(
      MAX_ENV_VALUE_BYTES,
    );
    rejects({ command: "x", env: { BIG: "x".repeat(MAX_ENV_VALUE_BYTES + 1) } }, "env.BIG");
    // Within the character limit, over the byte limit: "é" is two bytes.
    rejects({ command: "x", env: { BIG: "é".repeat(MAX_ENV_VALUE_BYTES / 2 + 1) } }, "env.BIG", /32768 bytes/);
  });

  test("env and secret_env together stay under what execve takes", () => {
    // 256 x 32 KiB (8 MiB) passed every per-entry rule and failed at spawn with E2BIG.
    const huge = Object.fromEntries(Array.from({ length: 256 }, (_, i) => [`V${i}`, "x".repeat(MAX_ENV_VALUE_BYTES)]));
    rejects({ command: "x", env: huge }, "env", /at most 1048576 bytes/);
    // Exactly at the limit: NAME=value, a NUL and 8 bytes per entry.
    const entry = (i: number) => `V${String(i).padStart(2, "0")}`;
    const value = (room: number) => "x".repeat(room - entry(0).length - 2 - 8);
    const per = MAX_ENV_TOTAL_BYTES / 32;
    const full = Object.fromEntries(Array.from({ length: 32 }, (_, i) => [entry(i), value(per)]));
    expect(Object.keys(toTaskSpec({ command: "x", env: full }, defaults).env)).toHaveLength(32);
    // One byte more, in secret_env: the total is what counts, and the field named is secret_env.
    rejects({ command: "x", env: full, secret_env: { S: "" } }, "secret_env", /they have 1048587/);
  });

  test("cwd: an absolute path without NUL, at most 4096 characters", () => {
    expect(toTaskSpec({ command: "x", cwd: "/" }, defaults).cwd).toBe("/");
    rejects({ command: "x", cwd: "relative/dir" }, "cwd", /absolute/);
    rejects({ command: "x", cwd: "" }, "cwd");
    rejects({ command: "x", cwd: "/tmp/\0" }, "cwd", /NUL/);
    rejects({ command: "x", cwd: `/${"d".repeat(4096)}` }, "cwd", /at most 4096/);
  });

  test("scheduled_at is checked and the legacy alias is refused outside /schedule", () => {
    rejects({ command: "x", scheduled_at: "tomorrow" }, "scheduled_at", /RFC 3339/);
    rejects({ command: "x", schedule_at: "2023-04-01T15:04:05Z" }, "schedule_at", /not a known field/);
  });
});

describe("parseRfc3339", () => {
  const parse = (value: string) => parseRfc3339(value, "scheduled_at");
  const refused = (value: string, message: RegExp) => {
    const error = rejection(() => parse(value));
    expect(error.field).toBe("scheduled_at");
    expect(error.message).toMatch(message);
  };

  test("accepts RFC 3339 with Z or an offset, and keeps milliseconds", () => {
    expect(parse("2023-04-01T15:04:05Z").toISOString()).toBe("2023-04-01T15:04:05.000Z");
    expect(parse("2023-04-01t15:04:05z").toISOString()).toBe("2023-04-01T15:04:05.000Z");
    expect(parse("2023-04-01T15:04:05.1Z").toISOString()).toBe("2023-04-01T15:04:05.100Z");
    expect(parse("2023-04-01T15:04:05.123456789Z").toISOString()).toBe("2023-04-01T15:04:05.123Z");
    expect(parse("2023-04-01T15:04:05+05:30").toISOString()).toBe("2023-04-01T09:34:05.000Z");
    expect(parse("2023-04-01T15:04:05-07:00").toISOString()).toBe("2023-04-01T22:04:05.000Z");
    expect(parse("2024-02-29T00:00:00Z").toISOString()).toBe("2024-02-29T00:00:00.000Z");
    expect(parse("1970-01-01T00:00:00Z").getTime()).toBe(0);
    expect(parse("9999-12-31T23:59:59.999Z").toISOString()).toBe("9999-12-31T23:59:59.999Z");
  });

  test("refuses a date-time without a time zone", () => {
    refused("2023-04-01T15:04:05", /time zone/);
    refused("2023-04-01 15:04:05", /time zone/);
    refused("2023-04-01T15:04", /time zone/);
  });

  test("refuses what is not an RFC 3339 date-time", () => {
    for (const value of [
      "",
      "now",
      "2023-04-01",
      "04/01/2023 15:04:05Z",
      "2023-4-1T15:04:05Z",
      "1680361445",
      "2023-04-01T15:04:05+0530",
    ]) {
      refused(value, /RFC 3339/);
    }
  });

  test("refuses impossible dates and times", () => {
    refused("2023-02-30T00:00:00Z", /calendar date/);
    refused("2023-02-29T00:00:00Z", /calendar date/);
    refused("2023-13-01T00:00:00Z", /calendar date/);
    refused("2023-00-10T00:00:00Z", /calendar date/);
    refused("2023-04-31T00:00:00Z", /calendar date/);
    refused("2023-04-01T24:00:00Z", /time of day/);
    refused("2023-04-01T12:60:00Z", /time of day/);
    refused("2023-04-01T12:00:60Z", /time of day/);
    refused("2023-04-01T12:00:00+24:00", /offset/);
  });

  test("accepts every year from 0001 to 9999, leap seconds, and any fraction", () => {
    expect(parse("1969-12-31T23:59:59Z").getTime()).toBe(-1000);
    expect(parse("1900-01-01T00:00:00Z").toISOString()).toBe("1900-01-01T00:00:00.000Z");
    // Not read as 1950: years below 100 are years, not two-digit years.
    expect(parse("0050-01-01T00:00:00Z").toISOString()).toBe("0050-01-01T00:00:00.000Z");
    expect(parse("0001-01-01T00:00:00Z").getTime()).toBe(MIN_TIME_MS);
    expect(parse("0004-02-29T00:00:00Z").toISOString()).toBe("0004-02-29T00:00:00.000Z");
    expect(parse("9999-12-31T23:59:59.999999Z").getTime()).toBe(MAX_TIME_MS);
    expect(parse("1970-01-01T00:30:00+01:00").getTime()).toBe(-1_800_000);
    // A leap second is the second after 23:59:59 UTC, as PostgreSQL reads it.
    expect(parse("2016-12-31T23:59:60Z").toISOString()).toBe("2017-01-01T00:00:00.000Z");
    expect(parse("2016-12-31T23:59:60.25Z").toISOString()).toBe("2017-01-01T00:00:00.250Z");
    expect(parse("2016-12-31T18:59:60-05:00").toISOString()).toBe("2017-01-01T00:00:00.000Z");
    expect(parse("2023-04-01T15:04:05.1234567890123456789Z").toISOString()).toBe("2023-04-01T15:04:05.123Z");
  });

  test("refuses instants outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59.999Z", () => {
    const range = /from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z/;
    refused("0000-01-01T00:00:00Z", range);
    refused("0000-12-31T23:59:59Z", range);
    // The instant, not only the written year, must be in range.
    refused("0001-01-01T00:30:00+01:00", range);
    refused("9999-12-31T23:00:00-02:00", range);
    refused("0003-02-29T00:00:00Z", /calendar date/);
  });

  test("a leap second only at 23:59:60 UTC", () => {
    refused("2016-12-31T23:58:60Z", /not a time of day/);
    refused("2016-12-31T23:59:60+01:00", /not a time of day/);
    refused("2016-12-31T23:59:61Z", /not a time of day/);
  });

  test("names the field it was given", () => {
    expect(rejection(() => parseRfc3339("nope", "schedule_at")).field).toBe("schedule_at");
  });
});

describe("toScheduleSpec", () => {
  test("requires scheduled_at and normalizes it", () => {
    const spec = toScheduleSpec({ command: "echo hi", scheduled_at: "2023-04-01T17:04:05+02:00" }, defaults);
    expect(spec.scheduledAt?.toISOString()).toBe("2023-04-01T15:04:05.000Z");
    expect(spec.command).toBe("echo hi");
    const missing = rejection(() => toScheduleSpec({ command: "echo hi" }, defaults));
    expect(missing.field).toBe("scheduled_at");
    expect(missing.message).toMatch(/required/);
  });

  test("accepts the seed's legacy schedule_at alias", () => {
    const spec = toScheduleSpec({ command: "x", schedule_at: "2023-04-01T15:04:05Z" }, defaults);
    expect(spec.scheduledAt?.toISOString()).toBe("2023-04-01T15:04:05.000Z");
    expect(rejection(() => toScheduleSpec({ command: "x", schedule_at: "soon" }, defaults)).field).toBe("schedule_at");
    const same = { command: "x", scheduled_at: "2023-04-01T15:04:05Z", schedule_at: "2023-04-01T16:04:05+01:00" };
    expect(toScheduleSpec(same, defaults).scheduledAt?.toISOString()).toBe("2023-04-01T15:04:05.000Z");
    const differ = rejection(() =>
      toScheduleSpec({ command: "x", scheduled_at: "2023-04-01T15:04:05Z", schedule_at: "2023-04-02T15:04:05Z" }, defaults),
    );
    expect(differ.field).toBe("schedule_at");
  });

  test("applies the same command rules and refuses other fields", () => {
    expect(rejection(() => toScheduleSpec({ command: "a\0", scheduled_at: "2023-04-01T15:04:05Z" }, defaults)).field).toBe(
      "command",
    );
    expect(
      rejection(() => toScheduleSpec({ command: "x", scheduled_at: "2023-04-01T15:04:05Z", timeout_ms: 5 }, defaults)).field,
    ).toBe("timeout_ms");
  });
});

describe("ids and cursors", () => {
  test("isTaskId accepts UUIDs of any version and nothing else", () => {
    expect(isTaskId(Bun.randomUUIDv7())).toBe(true);
    expect(isTaskId(crypto.randomUUID())).toBe(true);
    expect(isTaskId("01890A5D-AC96-774B-BCCE-B302099A8057")).toBe(true);
    for (const bad of [
      "",
      "42",
      "not-a-uuid",
      "01890a5d-ac96-774b-bcce-b302099a805",
      "01890a5dac96774bbcceb302099a8057",
      "{01890a5d-ac96-774b-bcce-b302099a8057}",
      `${Bun.randomUUIDv7()} `,
    ]) {
      expect(isTaskId(bad)).toBe(false);
    }
  });

  test("a cursor round-trips and anything else is refused naming cursor", () => {
    const id = Bun.randomUUIDv7();
    const cursor = encodeCursor(id);
    expect(cursor).toMatch(/^[A-Za-z0-9_-]+$/);
    expect(decodeCursor(cursor)).toBe(id);
    for (const bad of ["", "zzz", "!!!!", encodeCursor("not-a-uuid"), `${cursor}=`, `${cursor}A`, id]) {
      const error = rejection(() => decodeCursor(bad));
      expect(error.field).toBe("cursor");
    }
  });
});

describe("dependencies", () => {
  const id = "01960f3c-8a4e-7b21-9c3d-2f5e6a7b8c9d";
  const refused = (run: () => unknown) => {
    try {
      run();
    } catch (error) {
      if (error instanceof TaskQueueError) return { field: error.field, message: error.message };
      throw error;
    }
    throw new Error("accepted");
  };

  test("depends_on takes task ids outside a batch; on_parent_failure defaults to cancel", () => {
    expect(toTaskSpec({ command: "true", depends_on: [id] }, defaults)).toMatchObject({
      dependsOn: [id],
      onParentFailure: "cancel",
    });
    expect(toTaskSpec({ command: "true" }, defaults)).not.toHaveProperty("dependsOn");
    expect(refused(() => toTaskSpec({ command: "true", depends_on: ["build"] }, defaults)).field).toBe("depends_on");
    expect(refused(() => toTaskSpec({ command: "true", depends_on: [id], on_parent_failure: "maybe" }, defaults)).field).toBe(
      "on_parent_failure",
    );
  });

  test("a batch's refs are unique and valid names; depends_on names a ref of the batch or an id", () => {
    const specs = toBatchSpecs(
      {
        tasks: [
          { ref: "build", command: "make" },
          { command: "make test", depends_on: ["build", id], on_parent_failure: "run" },
        ],
      },
      defaults,
      10,
    );
    expect(specs[0]?.ref).toBe("build");
    expect(specs[1]).toMatchObject({ dependsOn: ["build", id], onParentFailure: "run" });
    const twice = refused(() =>
      toBatchSpecs(
        {
          tasks: [
            { ref: "a", command: "x" },
            { ref: "a", command: "y" },
          ],
        },
        defaults,
        10,
      ),
    );
    expect(twice).toMatchObject({ field: "tasks[1].ref" });
    expect(refused(() => toBatchSpecs({ tasks: [{ ref: "not-a-name", command: "x" }] }, defaults, 10)).field).toBe(
      "tasks[0].ref",
    );
    const unknown = refused(() => toBatchSpecs({ tasks: [{ command: "x", depends_on: ["nope"] }] }, defaults, 10));
    expect(unknown).toMatchObject({ field: "tasks[0].depends_on" });
    expect(unknown.message).toContain('"nope"');
  });

  test("a cycle is refused, named in the direction work flows", () => {
    const cycle = refused(() =>
      toBatchSpecs(
        {
          tasks: [
            { ref: "build", command: "x", depends_on: ["deploy"] },
            { ref: "test", command: "x", depends_on: ["build"] },
            { ref: "deploy", command: "x", depends_on: ["test"] },
            { ref: "other", command: "x" },
          ],
        },
        defaults,
        10,
      ),
    );
    expect(cycle.message).toBe("cycle: build -> test -> deploy -> build");
    // A diamond is not a cycle.
    const diamond = toBatchSpecs(
      {
        tasks: [
          { ref: "a", command: "x" },
          { ref: "b", command: "x", depends_on: ["a"] },
          { ref: "c", command: "x", depends_on: ["a"] },
          { ref: "d", command: "x", depends_on: ["b", "c"] },
        ],
      },
      defaults,
      10,
    );
    expect(diamond).toHaveLength(4);
  });
});
