import { expect, test } from "bun:test";
import { ConfigError, coordinatorAddresses, loadConfig, requireDatabaseUrl } from "../../src/config";

test("defaults apply when nothing is set", () => {
  const config = loadConfig({});
  expect(config).toMatchObject({
    TQ_HOST: "127.0.0.1",
    TQ_SCHEDULER_PORT: 8081,
    TQ_COORDINATOR_PORT: 8080,
    TQ_GRPC_PORT: 50051,
    TQ_WORKER_SLOTS: 4,
    TQ_WORKERS: 2,
    TQ_HEARTBEAT_INTERVAL_MS: 1000,
    TQ_HEARTBEAT_TIMEOUT_MS: 3000,
    TQ_LOG_LEVEL: "info",
  });
  expect(config.DATABASE_URL).toBeUndefined();
  expect(coordinatorAddresses(config)).toEqual(["127.0.0.1:50051"]);
});

test("values are converted from strings, and empty ones mean unset", () => {
  const config = loadConfig({ TQ_WORKER_SLOTS: " 8 ", TQ_GRPC_PORT: "0", DATABASE_URL: "", TQ_LOG_LEVEL: "debug" });
  expect(config.TQ_WORKER_SLOTS).toBe(8);
  expect(config.TQ_GRPC_PORT).toBe(0);
  expect(config.DATABASE_URL).toBeUndefined();
  expect(config.TQ_LOG_LEVEL).toBe("debug");
});

test("a bad value is refused with the variable named", () => {
  expect(() => loadConfig({ TQ_WORKER_SLOTS: "many" })).toThrow(/TQ_WORKER_SLOTS="many"/);
  expect(() => loadConfig({ TQ_WORKER_SLOTS: "0" })).toThrow(/TQ_WORKER_SLOTS/);
  expect(() => loadConfig({ TQ_SCHEDULER_PORT: "70000" })).toThrow(/TQ_SCHEDULER_PORT/);
  expect(() => loadConfig({ TQ_LOG_LEVEL: "loud" })).toThrow(/TQ_LOG_LEVEL/);
  expect(() => loadConfig({ TQ_WORKER_SLOTS: "1.5" })).toThrow(ConfigError);
});

test("the heartbeat timeout must exceed the interval", () => {
  expect(() => loadConfig({ TQ_HEARTBEAT_INTERVAL_MS: "3000", TQ_HEARTBEAT_TIMEOUT_MS: "3000" })).toThrow(
    /TQ_HEARTBEAT_TIMEOUT_MS \(3000\) must exceed TQ_HEARTBEAT_INTERVAL_MS/,
  );
});

test("coordinator addresses are a host:port list", () => {
  expect(coordinatorAddresses(loadConfig({ TQ_COORDINATOR_ADDRESSES: "a:1, b.example:50051,[::1]:7" }))).toEqual([
    "a:1",
    "b.example:50051",
    "[::1]:7",
  ]);
  expect(() => loadConfig({ TQ_COORDINATOR_ADDRESSES: "a:1,nope" })).toThrow(/"nope" is not host:port/);
  expect(() => loadConfig({ TQ_COORDINATOR_ADDRESSES: "," })).toThrow(/TQ_COORDINATOR_ADDRESSES is empty/);
});

test("single roles need DATABASE_URL", () => {
  expect(() => requireDatabaseUrl(loadConfig({}), "scheduler")).toThrow(/scheduler needs DATABASE_URL/);
  expect(requireDatabaseUrl(loadConfig({ DATABASE_URL: "postgres://x@h/db" }), "scheduler")).toBe("postgres://x@h/db");
});
