// A bounded fuzz test with a fixed seed: hostile input at every REST route and garbage bytes at
// every gRPC method. Every answer must be a 4xx (or a 200 for a read that is allowed) on REST,
// and INVALID_ARGUMENT / UNAUTHENTICATED / PERMISSION_DENIED / NOT_FOUND on gRPC: never a 5xx,
// INTERNAL or UNKNOWN; no process dies; and no rejected request writes anything.
import { beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import * as grpc from "@grpc/grpc-js";
import { createApp } from "../../src/api";
import { Authenticator } from "../../src/auth/authenticator";
import { hashToken, newToken, type Scope } from "../../src/auth/tokens";
import { apiSettings, authOptions, loadConfig } from "../../src/config";
import { Coordinator } from "../../src/coordinator/coordinator";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { insertToken } from "../../src/db/tokens";
import { TaskService } from "../../src/gen/taskqueue/v1/task_service_pb";
import { WorkerService } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const SEED = 0x7a5c_0e01;
const REST_CASES = 3000;
const GRPC_CASES = 1500;

const db = useTestDatabase();

/** mulberry32: a small, fast PRNG, so every run throws the same cases. */
function prng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(items: readonly T[]): T => items[int(items.length)]!;
  return { next, int, pick };
}

type Rng = ReturnType<typeof prng>;

const NASTY_STRINGS = [
  "",
  " ",
  "\u0000",
  "echo a\u0000b",
  "\uFFFF\uFFFE",
  "\uD800",
  "😀".repeat(1000),
  "' OR 1=1 --",
  "../../etc/passwd",
  "%00%ff",
  "\r\n\r\nHTTP/1.1 200 OK",
  "2023-02-30T00:00:00Z",
  "2023-04-01T15:04:05",
  "10000-01-01T00:00:00Z",
  "1969-12-31T23:59:59Z",
  "not a date",
  "NaN",
  "-1",
  "1e309",
  "x".repeat(70_000),
  `tq_aaaaaaaaaaaa_${"b".repeat(43)}`,
  "{}",
  "[]",
];

function randomString(rng: Rng): string {
  if (rng.next() < 0.5) return rng.pick(NASTY_STRINGS);
  const length = rng.int(40);
  return Array.from({ length }, () => String.fromCharCode(rng.int(0x3000))).join("");
}

function randomValue(rng: Rng, depth = 0): unknown {
  switch (rng.int(depth > 3 ? 6 : 9)) {
    case 0:
      return null;
    case 1:
      return rng.next() < 0.5;
    case 2:
      return rng.pick([0, -1, 1.5, 2 ** 53, -(2 ** 63), Number.MAX_VALUE, 1e-300]);
    case 3:
    case 4:
    case 5:
      return randomString(rng);
    case 6:
      return Array.from({ length: rng.int(4) }, () => randomValue(rng, depth + 1));
    default: {
      const object: Record<string, unknown> = {};
      for (let i = rng.int(4); i > 0; i--)
        object[
          rng.pick([
            "command",
            "scheduled_at",
            "env",
            "cwd",
            "timeout_ms",
            "retry",
            "secret_env",
            "x",
            "__proto__",
            "constructor",
          ])
        ] = randomValue(rng, depth + 1);
      return object;
    }
  }
}

/** A submit body that is invalid by construction: a valid one with one field broken. */
function invalidSubmit(rng: Rng): unknown {
  const body: Record<string, unknown> = { command: "echo fuzz", scheduled_at: "2099-01-01T00:00:00Z" };
  const breakage = rng.int(12);
  switch (breakage) {
    case 0:
      delete body.command;
      break;
    case 1:
      body.command = rng.pick(["", "   ", "a\u0000b", "x".repeat(70_000), 5, null, [], {}]);
      break;
    case 2:
      body.scheduled_at = rng.pick([
        "2023-02-30T00:00:00Z",
        "2023-04-01T15:04:05",
        "yesterday",
        0,
        null,
        "10000-01-01T00:00:00Z",
      ]);
      break;
    case 3:
      body.env = rng.pick([{ "1BAD": "x" }, { A: "\u0000" }, { A: 5 }, "A=1", { A: "x".repeat(40_000) }]);
      break;
    case 4:
      body.cwd = rng.pick(["relative/dir", "", "/a\u0000b", 7]);
      break;
    case 5:
      body.timeout_ms = rng.pick([-1, 1.5, "10", 1e12]);
      break;
    case 6:
      body.max_attempts = rng.pick([0, 101, -3, "3"]);
      break;
    case 7:
      body.retry = rng.pick([{ on_failure: "yes" }, { backoff_base_ms: -5 }, { surprise: true }, []]);
      break;
    case 8:
      body[randomString(rng) || "unexpected"] = randomValue(rng);
      break;
    case 9: {
      // Deep nesting inside a field.
      let nested: unknown = "leaf";
      for (let i = 0; i < 2000; i++) nested = [nested];
      body.env = nested;
      break;
    }
    case 10:
      return randomValue(rng);
    default:
      body.secret_env = rng.pick([{ "A B": "x" }, { K: null }, "secret"]);
  }
  return body;
}

const printable = (s: string) => s.replace(/[^\x20-\x7e]/g, "x");

function randomId(rng: Rng): string {
  return rng.pick([
    "not-a-uuid",
    "00000000-0000-0000-0000-000000000000",
    Bun.randomUUIDv7(),
    "%2e%2e",
    encodeURIComponent(randomString(rng).replace(/[\uD800-\uDFFF]/g, "?")) || "x",
    "0".repeat(5000),
  ]);
}

interface FuzzCase {
  method: string;
  path: string;
  body?: string | Uint8Array;
  headers: Record<string, string>;
  /** A submit: it must never be accepted, since every generated body is invalid. */
  submit: boolean;
}

function restCase(rng: Rng, tokens: Record<Scope, string>): FuzzCase {
  const headers: Record<string, string> = {};
  const auth = rng.int(6);
  if (auth < 3) headers.authorization = `Bearer ${tokens.admin}`;
  else if (auth === 3) headers.authorization = `Bearer ${tokens.read}`;
  // Header values a client can send at all: visible ASCII and spaces.
  else if (auth === 4)
    headers.authorization = rng.pick([
      "Bearer",
      "Basic Zm9vOmJhcg==",
      `Bearer ${printable(randomString(rng))}`,
      "x".repeat(8000),
    ]);
  if (rng.next() < 0.3)
    headers["content-type"] = rng.pick([
      "text/plain",
      "application/x-www-form-urlencoded",
      "multipart/form-data; boundary=x",
      "application/json; charset=latin1",
      "garbage",
    ]);
  if (rng.next() < 0.2) headers["idempotency-key"] = rng.pick(["ok-key", " spaced ", "k".repeat(300), "\u00fc"]);
  if (rng.next() < 0.05) headers["x-huge"] = "h".repeat(50_000);
  const route = rng.int(10);
  const bodyOf = (): string | Uint8Array => {
    const kind = rng.int(10);
    if (kind === 0) return crypto.getRandomValues(new Uint8Array(rng.int(200)));
    if (kind === 1) return '{"command": ';
    if (kind === 2) return "x".repeat(2 * 1024 * 1024);
    if (kind === 3) return "[".repeat(100_000);
    return JSON.stringify(invalidSubmit(rng));
  };
  switch (route) {
    case 0:
      return { method: "POST", path: "/schedule", body: bodyOf(), headers, submit: true };
    case 1:
      return { method: "POST", path: "/submit", body: bodyOf(), headers, submit: true };
    case 2:
      return { method: "POST", path: "/tasks", body: bodyOf(), headers, submit: true };
    case 3:
      return { method: "GET", path: `/status?task_id=${randomId(rng)}`, headers, submit: false };
    case 4:
      return { method: "GET", path: `/tasks/${randomId(rng)}`, headers, submit: false };
    case 5:
      return {
        method: "GET",
        path: `/tasks?state=${encodeURIComponent(randomString(rng).replace(/[\uD800-\uDFFF]/g, "?"))}&limit=${rng.pick(["-1", "0", "501", "abc", "1e3", "10"])}&cursor=${encodeURIComponent(randomString(rng).replace(/[\uD800-\uDFFF]/g, "?"))}`,
        headers,
        submit: false,
      };
    case 6:
      return {
        method: "POST",
        path: `/tasks/${randomId(rng)}/cancel`,
        body: rng.next() < 0.5 ? bodyOf() : undefined,
        headers,
        submit: false,
      };
    case 7:
      return { method: "GET", path: `/tasks/${randomId(rng)}/events`, headers, submit: false };
    case 8:
      return {
        method: rng.pick(["PUT", "DELETE", "PATCH", "GET"]),
        path: rng.pick(["/workers", "/schedule", "/tasks/x/y/z", "/%00", `/${"a".repeat(3000)}`]),
        headers,
        submit: false,
      };
    default:
      return { method: "GET", path: rng.pick(["/healthz", "/readyz", "/openapi/json"]), headers, submit: false };
  }
}

let tokens: Record<Scope, string>;

beforeAll(async () => {
  tokens = {} as Record<Scope, string>;
  for (const scope of ["admin", "read", "submit", "cancel"] as const) {
    const { id, token } = newToken();
    await insertToken(db.sql, { id, name: `fuzz-${scope}`, hash: hashToken(token), scopes: [scope] });
    tokens[scope] = token;
  }
}, HOOK_TIMEOUT_MS);

test(`REST: ${REST_CASES} hostile requests, never a 5xx, nothing rejected is written`, async () => {
  const rng = prng(SEED);
  const config = loadConfig({});
  const feed = new TaskChangeFeed(db.sql);
  await feed.start();
  const auth = new Authenticator(db.sql, authOptions(config), silentLogger);
  await auth.start();
  const app = createApp({
    role: "scheduler",
    settings: apiSettings(config),
    sql: db.sql,
    feed,
    log: silentLogger,
    auth,
    submit: (id, spec, actor) => insertTask(db.sql, id, spec, { actor }),
  });
  const statuses = new Map<number, number>();
  try {
    for (let i = 0; i < REST_CASES; i++) {
      const c = restCase(rng, tokens);
      let response: Response;
      try {
        const request = new Request(`http://localhost${c.path}`, { method: c.method, headers: c.headers, body: c.body });
        // An SSE stream on a real task would stay open; these ids are never real tasks.
        response = await app.handle(request);
      } catch (error) {
        throw new Error(`case ${i} (${c.method} ${c.path.slice(0, 80)}) threw: ${String(error)}`);
      }
      await response.arrayBuffer();
      statuses.set(response.status, (statuses.get(response.status) ?? 0) + 1);
      if (response.status >= 500) throw new Error(`case ${i} (${c.method} ${c.path.slice(0, 80)}) answered ${response.status}`);
      if (c.submit && response.status < 400)
        throw new Error(`case ${i}: an invalid submit was accepted (${c.method} ${c.path}): ${String(c.body).slice(0, 200)}`);
    }
  } finally {
    auth.stop();
    await feed.stop();
  }
  console.log(`fuzz REST statuses: ${JSON.stringify(Object.fromEntries([...statuses].sort()))}`);
  const written = await db.sql<{ n: number }[]>`SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM task_events) AS n`;
  expect(Number(written[0]?.n)).toBe(0);
  expect([...statuses.keys()].every((s) => s < 500)).toBe(true);
}, 120_000);

test(`gRPC: ${GRPC_CASES} garbage messages, only client-error statuses, and the coordinator lives on`, async () => {
  const rng = prng(SEED + 1);
  const config = loadConfig({
    TQ_COORDINATOR_PORT: String(await freePort()),
    TQ_GRPC_PORT: String(await freePort()),
    TQ_WORKER_TOKEN: "fuzz-worker-token-0123456789",
  });
  const coordinator = new Coordinator(config, db.url, silentLogger);
  const address = (await coordinator.start()).grpcAddress;
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  const raw = (bytes: Buffer) => bytes;
  const codes = new Map<string, number>();
  const allowed = new Set([
    grpc.status.INVALID_ARGUMENT,
    grpc.status.UNAUTHENTICATED,
    grpc.status.PERMISSION_DENIED,
    grpc.status.NOT_FOUND,
    grpc.status.FAILED_PRECONDITION,
    grpc.status.OK,
  ]);
  try {
    const methods = [
      ...TaskService.methods.map((m) => ({ path: `/${TaskService.typeName}/${m.name}`, kind: m.methodKind })),
      ...WorkerService.methods.map((m) => ({ path: `/${WorkerService.typeName}/${m.name}`, kind: m.methodKind })),
    ];
    for (let i = 0; i < GRPC_CASES; i++) {
      const method = rng.pick(methods);
      const bytes = Buffer.from(crypto.getRandomValues(new Uint8Array(rng.int(300))));
      const metadata = new grpc.Metadata();
      const who = rng.int(4);
      // Never a submit-capable token: garbage that happens to decode must still write nothing.
      if (who === 0) metadata.set("authorization", `Bearer ${tokens.read}`);
      if (who === 1) metadata.set("authorization", "Bearer fuzz-worker-token-0123456789");
      // Within gRPC's metadata size limit (8 KiB by default): beyond it the transport, not the
      // service, refuses the call.
      if (who === 2) metadata.set("authorization", `Bearer ${printable(randomString(rng)).slice(0, 200) || "x"}`);
      const deadline = Date.now() + 5000;
      let details = "";
      let cancelLater: ReturnType<typeof setTimeout> | undefined;
      const code = await new Promise<number>((resolve) => {
        if (method.kind === "unary") {
          client.makeUnaryRequest(method.path, raw, raw, bytes, metadata, { deadline }, (error) => {
            details = error?.details ?? "";
            resolve(error ? error.code : grpc.status.OK);
          });
        } else if (method.kind === "server_streaming") {
          const call = client.makeServerStreamRequest(method.path, raw, raw, bytes, metadata, { deadline });
          call.on("data", () => {});
          call.on("error", (error: grpc.ServiceError) => resolve(error.code));
          call.on("end", () => resolve(grpc.status.OK));
        } else {
          const call = client.makeBidiStreamRequest(method.path, raw, raw, metadata, { deadline });
          call.on("data", () => {});
          call.on("error", (error: grpc.ServiceError) => resolve(error.code));
          call.on("end", () => resolve(grpc.status.OK));
          call.write(bytes);
          // A garbage first message that decodes as something else than Hello is refused; one
          // that happens to be a valid Hello would be welcomed: end the stream either way.
          cancelLater = setTimeout(() => call.cancel(), 200);
        }
      });
      clearTimeout(cancelLater);
      const name = grpc.status[code] ?? String(code);
      codes.set(name, (codes.get(name) ?? 0) + 1);
      if (!allowed.has(code) && code !== grpc.status.CANCELLED) {
        throw new Error(
          `case ${i}: ${method.path} answered ${name} (${details}) to ${bytes.length} random bytes (metadata ${JSON.stringify(metadata.getMap()).slice(0, 300)})`,
        );
      }
    }
    console.log(`fuzz gRPC codes: ${JSON.stringify(Object.fromEntries([...codes].sort()))}`);
    const written = await db.sql<{ n: number }[]>`SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM task_events) AS n`;
    expect(Number(written[0]?.n)).toBe(0);
    // Still serving.
    const alive = await new Promise<number>((resolve) =>
      client.makeUnaryRequest(
        `/${TaskService.typeName}/ListTasks`,
        raw,
        raw,
        Buffer.alloc(0),
        (() => {
          const m = new grpc.Metadata();
          m.set("authorization", `Bearer ${tokens.read}`);
          return m;
        })(),
        { deadline: Date.now() + 5000 },
        (error) => resolve(error ? error.code : grpc.status.OK),
      ),
    );
    expect(alive).toBe(grpc.status.OK);
  } finally {
    client.close();
    await coordinator.stop();
  }
}, 120_000);
