import { expect, test } from "bun:test";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import {
  apiSettings,
  authOptions,
  ConfigError,
  coordinatorAddresses,
  leaseTimings,
  loadConfig,
  requireDatabaseUrl,
  taskDefaults,
} from "../../src/config";
import { minLeaseMs } from "../../src/task/lease";

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

test("a task's result must fit the gRPC message limit, or the role refuses to start", () => {
  expect(loadConfig({}).TQ_GRPC_MAX_MESSAGE_BYTES).toBe(4 * 1024 * 1024);
  // 8 MiB of output let a 6 MB result through, which the coordinator's 4 MiB limit refused.
  expect(() => loadConfig({ TQ_MAX_OUTPUT_BYTES: String(8 * 1024 * 1024) })).toThrow(
    /TQ_MAX_OUTPUT_BYTES = 16777216.*must fit TQ_GRPC_MAX_MESSAGE_BYTES \(4194304\); lower TQ_MAX_OUTPUT_BYTES to at most 2064384 or raise TQ_GRPC_MAX_MESSAGE_BYTES to at least 16842752/,
  );
  // Exactly at the limit, and one byte over.
  expect(loadConfig({ TQ_MAX_OUTPUT_BYTES: "2064384" }).TQ_MAX_OUTPUT_BYTES).toBe(2064384);
  expect(() => loadConfig({ TQ_MAX_OUTPUT_BYTES: "2064385" })).toThrow(ConfigError);
  expect(
    loadConfig({ TQ_MAX_OUTPUT_BYTES: String(8 * 1024 * 1024), TQ_GRPC_MAX_MESSAGE_BYTES: String(17 * 1024 * 1024) })
      .TQ_GRPC_MAX_MESSAGE_BYTES,
  ).toBe(17 * 1024 * 1024);
  // An assignment (command, env, cwd) must fit too: the limit has a floor.
  expect(() => loadConfig({ TQ_GRPC_MAX_MESSAGE_BYTES: String(1024 * 1024) })).toThrow(/TQ_GRPC_MAX_MESSAGE_BYTES/);
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

test("the parts get their settings under domain names", () => {
  const config = loadConfig({
    TQ_DEFAULT_MAX_ATTEMPTS: "7",
    TQ_RETRY_BACKOFF_BASE_MS: "250",
    TQ_RETRY_BACKOFF_CAP_MS: "9000",
    TQ_MAX_BODY_BYTES: "4096",
    TQ_MAX_BATCH: "12",
    TQ_HEARTBEAT_INTERVAL_MS: "200",
    TQ_HEARTBEAT_TIMEOUT_MS: "1000",
    TQ_HOST: "0.0.0.0",
    TQ_INSECURE: "true",
    TQ_API_TOKENS: "ci:read:abc",
    TQ_RATE_LIMIT_PER_SECOND: "2.5",
    TQ_RATE_LIMIT_BURST: "9",
  });
  const defaults = { maxAttempts: 7, retry: { backoffBaseMs: 250, backoffCapMs: 9000 }, minLeaseMs: 1400 };
  expect(taskDefaults(config)).toEqual(defaults);
  expect(apiSettings(config)).toEqual({
    maxBodyBytes: 4096,
    maxBatchTasks: 12,
    taskDefaults: defaults,
    workerTimeoutMs: 1000,
    priorityAgingMs: 1000,
  });
  expect(authOptions(config)).toEqual({
    host: "0.0.0.0",
    insecure: true,
    configuredTokens: "ci:read:abc",
    rateLimit: { perSecond: 2.5, burst: 9 },
  });
  expect(leaseTimings(config)).toEqual({ heartbeatIntervalMs: 200, heartbeatTimeoutMs: 1000, leaseMs: 30_000 });
});

test("an attempt's default lease is TQ_DEFAULT_LEASE_MS, at least the heartbeat timeout plus two intervals", () => {
  expect(minLeaseMs({ heartbeatIntervalMs: 1000, heartbeatTimeoutMs: 3000 })).toBe(5000);
  expect(leaseTimings(loadConfig({})).leaseMs).toBe(30_000);
  expect(leaseTimings(loadConfig({ TQ_DEFAULT_LEASE_MS: "5000" })).leaseMs).toBe(5000);
  expect(() => loadConfig({ TQ_DEFAULT_LEASE_MS: "4999" })).toThrow(
    "TQ_DEFAULT_LEASE_MS (4999) must be at least TQ_HEARTBEAT_TIMEOUT_MS plus two TQ_HEARTBEAT_INTERVAL_MS (5000)",
  );
});

// The roles' assembly (and the checks of the configuration itself, whose messages name the
// variables to set) may read the configuration by its variables' names; the parts they build
// take typed options instead.
const READS_CONFIGURATION = new Set([
  "src/config.ts",
  "src/role.ts",
  "src/tls.ts",
  "src/start.ts",
  "src/auth/exposure.ts",
  "src/coordinator/coordinator.ts",
  "src/scheduler/scheduler.ts",
  "src/worker/main.ts",
  "src/worker/options.ts",
  // The watchdog's own process: an entry point, as a main is.
  "src/worker/watchdog-process.ts",
  // The CLI's entry point: its own two settings, TQ_URL and TQ_TOKEN.
  "src/cli/main.ts",
]);

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return name === "gen" ? [] : sources(path);
    return path.endsWith(".ts") ? [path] : [];
  });
}

test("no part below a role reads a setting by its variable's name, and the lease is computed once", () => {
  const root = join(import.meta.dir, "../..");
  const readers: string[] = [];
  const leaseFormulas: string[] = [];
  for (const path of sources(join(root, "src"))) {
    const file = relative(root, path);
    const text = readFileSync(path, "utf8");
    if (/\.TQ_[A-Z0-9_]+\b/.test(text) && !READS_CONFIGURATION.has(file)) readers.push(file);
    if (/heartbeat_?timeout_?ms\s*\+|\+\s*[\w.]*heartbeat_?timeout_?ms/i.test(text) && file !== "src/task/lease.ts") {
      leaseFormulas.push(file);
    }
  }
  expect(readers).toEqual([]);
  expect(leaseFormulas).toEqual([]);
});
