// A database that is away or too slow is one answer on every transport: 503 `unavailable`
// with Retry-After over HTTP, UNAVAILABLE over gRPC, and never the server's own text.
import { describe, expect, test } from "bun:test";
import * as grpc from "@grpc/grpc-js";
import { errorAnswer } from "../../src/api/errors";
import { silentLogger } from "../../src/log";
import { toServiceError } from "../../src/rpc/status";
import { isDatabaseTimeout, isDatabaseUnavailable } from "../../src/task/errors";

/** What postgres.js rejects with when the server refuses a statement. */
const serverError = (code: string, message: string) => Object.assign(new Error(message), { code, severity: "ERROR" });

const statementTimeout = serverError("57014", "canceling statement due to statement timeout");
const lockTimeout = serverError("55P03", "canceling statement due to lock timeout");
const refused = Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:5432"), { code: "ECONNREFUSED" });
const uniqueViolation = serverError("23505", "duplicate key value violates unique constraint");

describe("database errors", () => {
  test("a statement or lock timeout is a timeout and unavailable; a constraint violation is neither", () => {
    expect([statementTimeout, lockTimeout].map(isDatabaseTimeout)).toEqual([true, true]);
    expect([statementTimeout, lockTimeout, refused].map(isDatabaseUnavailable)).toEqual([true, true, true]);
    expect([refused, uniqueViolation, new Error("x"), null].map(isDatabaseTimeout)).toEqual([false, false, false, false]);
    expect(isDatabaseUnavailable(uniqueViolation)).toBe(false);
  });

  test("HTTP answers a timeout 503 unavailable with Retry-After and without the server's text", () => {
    for (const error of [statementTimeout, lockTimeout, refused]) {
      const { status, body, headers } = errorAnswer(error, { log: silentLogger }, "GET /tasks");
      expect(status).toBe(503);
      expect(body.error.code).toBe("unavailable");
      expect(Number(headers?.["retry-after"])).toBeGreaterThanOrEqual(1);
      expect(body.error.message).not.toMatch(/canceling|timeout|ECONNREFUSED|5432/);
    }
    expect(errorAnswer(uniqueViolation, { log: silentLogger }, "GET /tasks").status).toBe(500);
  });

  test("gRPC answers a timeout UNAVAILABLE without the server's text", () => {
    for (const error of [statementTimeout, lockTimeout, refused]) {
      const status = toServiceError(error, silentLogger);
      expect(status.code).toBe(grpc.status.UNAVAILABLE);
      expect(status.details).not.toMatch(/canceling|ECONNREFUSED|5432/);
    }
    expect(toServiceError(uniqueViolation, silentLogger).code).toBe(grpc.status.INTERNAL);
  });
});
