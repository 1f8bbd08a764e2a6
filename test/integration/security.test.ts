// Who may do what: API tokens and scopes on REST and gRPC, worker join and resume tokens,
// secret environment values, the audit trail, rate limits and the safe-defaults check.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import pino from "pino";
import { createApp } from "../../src/api";
import { Authenticator } from "../../src/auth/authenticator";
import { checkExposure, checkWorkerExposure } from "../../src/auth/exposure";
import { hashToken, newToken, type Scope } from "../../src/auth/tokens";
import { apiSettings, authOptions, ConfigError, loadConfig } from "../../src/config";
import { Coordinator } from "../../src/coordinator/coordinator";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { insertToken, revokeToken } from "../../src/db/tokens";
import { revokeCredential } from "../../src/db/worker-credentials";
import { TaskService } from "../../src/gen/taskqueue/v1/task_service_pb";
import {
  type CoordinatorMessage,
  type WorkerMessage,
  WorkerMessageSchema,
  WorkerService,
} from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { clientConstructor } from "../../src/rpc/definitions";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

/** A logger whose every line is kept, to prove secrets never reach it. */
function capturingLogger() {
  const lines: string[] = [];
  const log = pino({ level: "debug" }, { write: (line: string) => lines.push(line) });
  return { log, lines };
}

async function makeToken(name: string, scopes: Scope[]): Promise<string> {
  const { id, token } = newToken();
  await insertToken(db.sql, { id, name, hash: hashToken(token), scopes });
  return token;
}

describe("REST", () => {
  let feed: TaskChangeFeed;
  let app: ReturnType<typeof createApp>;
  let auth: Authenticator;
  const captured = capturingLogger();
  const tokens: Record<string, string> = {};

  beforeAll(async () => {
    await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers, api_tokens`;
    tokens.submitter = await makeToken("submitter", ["submit"]);
    tokens.reader = await makeToken("reader", ["read"]);
    tokens.canceller = await makeToken("canceller", ["cancel", "submit"]);
    tokens.admin = await makeToken("root", ["admin"]);
    tokens.revoked = await makeToken("gone", ["admin"]);
    await revokeToken(db.sql, "gone");
    const config = loadConfig({ TQ_RATE_LIMIT_PER_SECOND: "1", TQ_RATE_LIMIT_BURST: "1000" });
    feed = new TaskChangeFeed(db.sql);
    await feed.start();
    auth = new Authenticator(db.sql, authOptions(config), captured.log);
    await auth.start();
    app = createApp({
      role: "scheduler",
      settings: apiSettings(config),
      sql: db.sql,
      feed,
      log: captured.log,
      auth,
      submit: (id, spec, actor) => insertTask(db.sql, id, spec, { actor }),
    });
  }, HOOK_TIMEOUT_MS);

  afterAll(async () => {
    auth.stop();
    await feed.stop();
  });

  const call = async (method: string, path: string, token?: string, body?: unknown, headers: Record<string, string> = {}) => {
    const response = await app.handle(
      new Request(`http://localhost${path}`, {
        method,
        headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}), ...headers },
        body: body === undefined ? undefined : JSON.stringify(body),
      }),
    );
    const text = await response.text();
    expect(response.status).toBeLessThan(500);
    const json = response.headers.get("content-type")?.startsWith("application/json") ? JSON.parse(text) : null;
    return { status: response.status, headers: response.headers, text, json };
  };

  test("no token is 401 with a challenge; a bad or revoked one too; health and OpenAPI stay open", async () => {
    const none = await call("GET", "/tasks");
    expect(none.status).toBe(401);
    expect(none.json.error.code).toBe("unauthenticated");
    expect(none.headers.get("www-authenticate")).toContain("Bearer");
    for (const header of ["Basic abc", "Bearer", "Bearer tq_nope", `Bearer ${tokens.reader}x`]) {
      const answer = await call("GET", "/tasks", undefined, undefined, { authorization: header });
      expect(answer.status).toBe(401);
    }
    expect((await call("GET", "/tasks", tokens.revoked)).status).toBe(401);
    // Nothing was parsed or written for a caller without a token.
    expect((await call("POST", "/submit", undefined, { command: "echo no" })).status).toBe(401);
    expect((await call("POST", "/submit", undefined, "{not json")).status).toBe(401);
    const count = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM tasks`;
    expect(count[0]?.n).toBe(0);
    expect((await call("GET", "/healthz")).status).toBe(200);
    expect((await call("GET", "/readyz")).status).toBe(200);
    const doc = await call("GET", "/openapi/json");
    expect(doc.status).toBe(200);
    expect(doc.json.components.securitySchemes.bearerAuth).toMatchObject({ type: "http", scheme: "bearer" });
  });

  test("each route needs its scope: 403 without it, and admin holds them all", async () => {
    const submitted = await call("POST", "/submit", tokens.submitter, { command: "echo hi" });
    expect(submitted.status).toBe(201);
    const id = submitted.json.id;
    const forbidden = await call("GET", `/tasks/${id}`, tokens.submitter);
    expect(forbidden.status).toBe(403);
    expect(forbidden.json.error).toEqual({ code: "permission_denied", message: "this token does not have the read scope" });
    expect((await call("POST", "/submit", tokens.reader, { command: "echo hi" })).status).toBe(403);
    expect((await call("POST", `/tasks/${id}/cancel`, tokens.reader)).status).toBe(403);
    expect((await call("GET", `/tasks/${id}`, tokens.reader)).status).toBe(200);
    expect((await call("GET", `/status?task_id=${id}`, tokens.reader)).status).toBe(200);
    expect((await call("GET", "/workers", tokens.reader)).status).toBe(200);
    // Metrics are read like any GET: a scraper carries a read token.
    expect((await call("GET", "/metrics")).status).toBe(401);
    expect((await call("GET", "/metrics", tokens.submitter)).status).toBe(403);
    expect((await call("GET", "/metrics", tokens.reader)).status).toBe(200);
    expect((await call("POST", `/tasks/${id}/cancel`, tokens.canceller)).status).toBe(200);
    expect((await call("GET", `/tasks/${id}`, tokens.admin)).status).toBe(200);
    expect((await call("POST", "/tasks", tokens.admin, { command: "echo root" })).status).toBe(201);
  });

  test("task_events records which token submitted and which cancelled", async () => {
    const submitted = await call("POST", "/tasks", tokens.canceller, {
      command: "echo audit",
      scheduled_at: "2099-01-01T00:00:00Z",
    });
    await call("POST", `/tasks/${submitted.json.id}/cancel`, tokens.canceller);
    const events = await db.sql<{ kind: string; actor: string | null }[]>`
      SELECT kind, actor FROM task_events WHERE task_id = ${submitted.json.id} ORDER BY id`;
    expect(events.map((e) => ({ kind: e.kind, actor: e.actor }))).toEqual([
      { kind: "submitted", actor: "canceller" },
      { kind: "cancelled", actor: "canceller" },
    ]);
  });

  test("secret env values are never returned, streamed or logged", async () => {
    const secret = "s3cret-value-that-must-not-leak";
    const submitted = await call("POST", "/tasks", tokens.admin, {
      command: "true",
      scheduled_at: "2099-01-01T00:00:00Z",
      env: { PLAIN: "visible" },
      secret_env: { API_KEY: secret },
    });
    expect(submitted.status).toBe(201);
    expect(submitted.json.secret_env_keys).toEqual(["API_KEY"]);
    expect(submitted.json.env).toEqual({ PLAIN: "visible" });
    const id = submitted.json.id;
    const reads = [
      submitted.text,
      (await call("GET", `/tasks/${id}`, tokens.admin)).text,
      (await call("GET", "/tasks", tokens.admin)).text,
      (await call("GET", `/status?task_id=${id}`, tokens.admin)).text,
      (await call("POST", `/tasks/${id}/cancel`, tokens.admin)).text,
      (await call("GET", `/tasks/${id}/events`, tokens.admin)).text,
    ];
    for (const text of reads) expect(text).not.toContain(secret);
    const history = await db.sql<{ detail: unknown }[]>`SELECT detail FROM task_events WHERE task_id = ${id}`;
    expect(JSON.stringify(history)).not.toContain(secret);
    expect(captured.lines.join("\n")).not.toContain(secret);
    const stored = await db.sql<{ secret_env: Record<string, string> }[]>`SELECT secret_env FROM tasks WHERE id = ${id}`;
    expect(stored[0]?.secret_env).toEqual({ API_KEY: secret });
  });

  test("tokens are never echoed or logged", () => {
    for (const token of Object.values(tokens)) expect(captured.lines.join("\n")).not.toContain(token);
  });
});

test("a per-token rate limit answers 429 with Retry-After", async () => {
  const token = await makeToken(`limited-${Date.now()}`, ["read"]);
  const config = loadConfig({ TQ_RATE_LIMIT_PER_SECOND: "0.5", TQ_RATE_LIMIT_BURST: "2" });
  const auth = new Authenticator(db.sql, authOptions(config), silentLogger);
  await auth.start();
  const feed = new TaskChangeFeed(db.sql);
  const app = createApp({
    role: "scheduler",
    settings: apiSettings(config),
    sql: db.sql,
    feed,
    log: silentLogger,
    auth,
    submit: () => Promise.reject(new Error("unused")),
  });
  const get = () => app.handle(new Request("http://localhost/workers", { headers: { authorization: `Bearer ${token}` } }));
  expect((await get()).status).toBe(200);
  expect((await get()).status).toBe(200);
  const limited = await get();
  expect(limited.status).toBe(429);
  expect(Number(limited.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
  expect(((await limited.json()) as { error: { code: string } }).error.code).toBe("rate_limited");
  auth.stop();
});

test("tokens from TQ_API_TOKENS work alongside the table's", async () => {
  const { token } = newToken();
  const config = loadConfig({ TQ_API_TOKENS: `from-config:read+submit:${hashToken(token)}` });
  const auth = new Authenticator(db.sql, authOptions(config), silentLogger);
  await auth.start();
  expect(auth.enforced).toBe(true);
  expect((await auth.check(`Bearer ${token}`, "submit")).name).toBe("from-config");
  await expect(auth.check(`Bearer ${token}`, "cancel")).rejects.toMatchObject({ code: "permission_denied" });
  expect(() => new Authenticator(db.sql, authOptions(loadConfig({ TQ_API_TOKENS: "bad entry" })), silentLogger)).toThrow(
    /not name:scope\+scope:sha256-hex/,
  );
  auth.stop();
});

describe("safe defaults", () => {
  test("beyond loopback a role refuses to start without protection, unless told it is insecure", () => {
    const exposed = loadConfig({ TQ_HOST: "0.0.0.0" });
    expect(() => checkExposure(exposed, "scheduler", 0, silentLogger)).toThrow(ConfigError);
    expect(() => checkExposure(exposed, "scheduler", 0, silentLogger)).toThrow(/without API tokens/);
    expect(() => checkExposure(exposed, "scheduler", 1, silentLogger)).not.toThrow();
    expect(() => checkExposure(exposed, "coordinator", 1, silentLogger)).toThrow(/worker token/);
    const tls = { TQ_TLS_CERT: "/etc/tq/cert.pem", TQ_TLS_KEY: "/etc/tq/key.pem" };
    const guarded = loadConfig({ TQ_HOST: "0.0.0.0", TQ_WORKER_TOKEN: "w".repeat(32), ...tls });
    expect(() => checkExposure(guarded, "coordinator", 1, silentLogger)).not.toThrow();
    const rotating = loadConfig({ TQ_HOST: "0.0.0.0", TQ_WORKER_TOKENS: `next:${"a".repeat(64)}`, ...tls });
    expect(() => checkExposure(rotating, "coordinator", 1, silentLogger)).not.toThrow();
    // Tokens are not enough beyond loopback: they and secret_env would travel in plaintext.
    const plaintext = loadConfig({ TQ_HOST: "0.0.0.0", TQ_WORKER_TOKEN: "w".repeat(32) });
    expect(() => checkExposure(plaintext, "coordinator", 1, silentLogger)).toThrow(/without TLS/);
    const { log, lines } = capturingLogger();
    checkExposure(loadConfig({ TQ_HOST: "0.0.0.0", TQ_INSECURE: "true" }), "coordinator", 0, log);
    expect(lines.join("")).toContain("INSECURE");
    expect(() => checkExposure(loadConfig({}), "coordinator", 0, silentLogger)).not.toThrow();
  });

  test("a worker refuses to dial a coordinator beyond loopback in plaintext, unless told it is insecure", () => {
    const remote = ["10.1.2.3:50051", "coordinator:50051", "[fd00::1]:50051", "0.0.0.0:50051"];
    for (const address of remote) {
      expect(() => checkWorkerExposure(loadConfig({}), ["127.0.0.1:50051", address], silentLogger)).toThrow(
        new RegExp(`dial ${address.replace(/[[\]]/g, "\\$&")} \\(beyond loopback\\) without TLS`),
      );
    }
    for (const local of ["127.0.0.1:50051", "localhost:1", "[::1]:50051", "127.9.9.9:7"]) {
      expect(() => checkWorkerExposure(loadConfig({}), [local], silentLogger)).not.toThrow();
    }
    expect(() => checkWorkerExposure(loadConfig({ TQ_TLS_CA: "/etc/tq/ca.pem" }), remote, silentLogger)).not.toThrow();
    const { log, lines } = capturingLogger();
    checkWorkerExposure(loadConfig({ TQ_INSECURE: "true" }), remote, log);
    expect(lines.join("")).toContain("INSECURE");
  });
});

describe("gRPC", () => {
  let coordinator: Coordinator;
  let address: string;
  const workerToken = "join-token-0123456789abcdef";
  let submitter: string;
  let reader: string;

  beforeAll(async () => {
    await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers, worker_credentials, api_tokens`;
    submitter = await makeToken("g-submitter", ["submit"]);
    reader = await makeToken("g-reader", ["read"]);
    const config = loadConfig({
      TQ_COORDINATOR_PORT: String(await freePort()),
      TQ_GRPC_PORT: String(await freePort()),
      TQ_WORKER_TOKEN: workerToken,
    });
    coordinator = new Coordinator(config, db.url, silentLogger);
    address = (await coordinator.start()).grpcAddress;
  }, HOOK_TIMEOUT_MS);

  afterAll(async () => {
    await coordinator?.stop();
  }, HOOK_TIMEOUT_MS);

  const TaskClient = clientConstructor(TaskService);
  const WorkerClient = clientConstructor(WorkerService);

  function unary(method: string, request: object, token?: string): Promise<{ error: grpc.ServiceError | null; response: any }> {
    const client = new TaskClient(address, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
    const metadata = new grpc.Metadata();
    if (token) metadata.set("authorization", `Bearer ${token}`);
    return new Promise((resolve) =>
      client[method]!(request, metadata, (error: grpc.ServiceError | null, response: unknown) => {
        client.close();
        resolve({ error, response });
      }),
    );
  }

  function workerStream(token?: string) {
    const client = new WorkerClient(address, grpc.credentials.createInsecure(), { "grpc.use_local_subchannel_pool": 1 });
    const metadata = new grpc.Metadata();
    if (token) metadata.set("authorization", `Bearer ${token}`);
    const stream = (
      client as unknown as { connect(m: grpc.Metadata): grpc.ClientDuplexStream<WorkerMessage, CoordinatorMessage> }
    ).connect(metadata);
    const received: CoordinatorMessage[] = [];
    let wake: (() => void) | null = null;
    const closed = new Promise<grpc.ServiceError | null>((resolve) => {
      stream.on("error", (e: grpc.ServiceError) => resolve(e));
      stream.on("end", () => resolve(null));
    });
    stream.on("data", (m: CoordinatorMessage) => {
      received.push(m);
      wake?.();
    });
    return {
      send: (payload: MessageInitShape<typeof WorkerMessageSchema>["payload"]) =>
        stream.write(create(WorkerMessageSchema, { payload })),
      next: async () => {
        while (received.length === 0) await new Promise<void>((resolve) => (wake = resolve));
        return received.shift()!;
      },
      closed,
      close: () => {
        stream.end();
        client.close();
      },
    };
  }

  test("TaskService: no token is UNAUTHENTICATED, a token without the scope PERMISSION_DENIED", async () => {
    const anonymous = await unary("submitTask", { command: "echo x" });
    expect(anonymous.error?.code).toBe(grpc.status.UNAUTHENTICATED);
    const wrongScope = await unary("submitTask", { command: "echo x" }, reader);
    expect(wrongScope.error?.code).toBe(grpc.status.PERMISSION_DENIED);
    const bad = await unary("getTask", { id: Bun.randomUUIDv7() }, `tq_aaaaaaaaaaaa_${"b".repeat(43)}`);
    expect(bad.error?.code).toBe(grpc.status.UNAUTHENTICATED);
    const ok = await unary("submitTask", { command: "echo x", scheduledAt: { seconds: 4_000_000_000n } }, submitter);
    expect(ok.error).toBeNull();
    const read = await unary("getTask", { id: ok.response.task.id }, reader);
    expect(read.error).toBeNull();
    const events = await db.sql<{ actor: string }[]>`SELECT actor FROM task_events WHERE task_id = ${ok.response.task.id}`;
    expect(events.map((e) => e.actor)).toEqual(["g-submitter"]);
  });

  test("TaskService never returns secret env values", async () => {
    const secret = "grpc-secret-that-must-not-leak";
    const submitted = await unary(
      "submitTask",
      { command: "true", scheduledAt: { seconds: 4_000_000_000n }, secretEnv: { TOKEN: secret }, env: { PLAIN: "yes" } },
      submitter,
    );
    expect(submitted.error).toBeNull();
    expect(submitted.response.task.secretEnvKeys).toEqual(["TOKEN"]);
    expect(submitted.response.task.env).toEqual({ PLAIN: "yes" });
    const read = await unary("getTask", { id: submitted.response.task.id }, reader);
    const listed = await unary("listTasks", { limit: 50 }, reader);
    for (const answer of [submitted, read, listed]) {
      expect(JSON.stringify(answer.response, (_, v) => (typeof v === "bigint" ? String(v) : v))).not.toContain(secret);
    }
  });

  test("WorkerService: a stream without the worker token gets nothing and changes nothing", async () => {
    for (const token of [undefined, "wrong-token-0123456789"]) {
      const intruder = workerStream(token);
      intruder.send({ case: "hello", value: { workerId: "intruder", name: "x", slots: 4 } });
      const error = await intruder.closed;
      expect(error?.code).toBe(grpc.status.UNAUTHENTICATED);
      intruder.close();
    }
    const rows = await db.sql`SELECT id FROM workers WHERE id = 'intruder'`;
    expect(rows).toHaveLength(0);
  });

  test("a worker id belongs to the stream that took it: another needs its resume token", async () => {
    const first = workerStream(workerToken);
    first.send({ case: "hello", value: { workerId: "w-owned", name: "owner", slots: 1 } });
    const welcome = await first.next();
    if (welcome.payload.case !== "welcome") throw new Error("expected welcome");
    const resumeToken = welcome.payload.value.resumeToken;
    expect(resumeToken.length).toBeGreaterThan(20);

    const impostor = workerStream(workerToken);
    impostor.send({ case: "hello", value: { workerId: "w-owned", name: "impostor", slots: 8 } });
    expect((await impostor.closed)?.code).toBe(grpc.status.PERMISSION_DENIED);
    impostor.close();
    const [row] = await db.sql<{ name: string; state: string }[]>`SELECT name, state FROM workers WHERE id = 'w-owned'`;
    expect(row).toEqual({ name: "owner", state: "connected" });

    // The owner reconnecting with its resume token takes the id back.
    const again = workerStream(workerToken);
    again.send({ case: "hello", value: { workerId: "w-owned", name: "owner", slots: 1, resumeToken } });
    expect((await again.next()).payload.case).toBe("welcome");
    again.close();
    first.close();
  });

  test("a worker's credential lets it back in without the join token, under its own id only", async () => {
    const first = workerStream(workerToken);
    first.send({ case: "hello", value: { workerId: "w-cred", name: "cred", slots: 1 } });
    const welcome = await first.next();
    if (welcome.payload.case !== "welcome") throw new Error("expected welcome");
    const credential = welcome.payload.value.resumeToken;
    first.close();
    const [row] = await db.sql<{ secret_hash: string; joined_with: string }[]>`
      SELECT secret_hash, joined_with FROM worker_credentials WHERE worker_id = 'w-cred'`;
    expect(row).toEqual({ secret_hash: hashToken(credential), joined_with: "TQ_WORKER_TOKEN" });

    // Another worker cannot use it: not for its own id, nor with a join token it does not have.
    const thief = workerStream();
    thief.send({ case: "hello", value: { workerId: "w-thief", name: "thief", slots: 1, resumeToken: credential } });
    expect((await thief.closed)?.code).toBe(grpc.status.UNAUTHENTICATED);
    thief.close();
    const guess = workerStream();
    guess.send({ case: "hello", value: { workerId: "w-cred", name: "guess", slots: 1, resumeToken: `${credential}x` } });
    expect((await guess.closed)?.code).toBe(grpc.status.UNAUTHENTICATED);
    guess.close();
    expect(await db.sql`SELECT id FROM workers WHERE id = 'w-thief'`).toHaveLength(0);
    expect(await db.sql`SELECT worker_id FROM worker_credentials WHERE worker_id = 'w-thief'`).toHaveLength(0);

    // Its owner needs no join token to come back.
    const back = workerStream();
    back.send({ case: "hello", value: { workerId: "w-cred", name: "cred", slots: 1, resumeToken: credential } });
    const again = await back.next();
    expect(again.payload.case === "welcome" && again.payload.value.resumeToken).toBe(credential);
    back.close();
  });

  test("revoking a credential closes its worker's stream and keeps it out, join token or not", async () => {
    const first = workerStream(workerToken);
    first.send({ case: "hello", value: { workerId: "w-revoked", name: "revoked", slots: 1 } });
    const welcome = await first.next();
    if (welcome.payload.case !== "welcome") throw new Error("expected welcome");
    const credential = welcome.payload.value.resumeToken;
    expect(await revokeCredential(db.sql, "w-revoked", "test")).toBe(true);
    // Closed by the coordinator's next renewal tick (every heartbeat interval), saying why.
    const closed = await first.closed;
    expect(closed?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(closed?.metadata.get("tq-refusal")).toEqual(["credential-revoked"]);
    first.close();
    for (const token of [undefined, workerToken]) {
      const again = workerStream(token);
      again.send({ case: "hello", value: { workerId: "w-revoked", name: "revoked", slots: 1, resumeToken: credential } });
      const refused = await again.closed;
      expect(refused?.code).toBe(grpc.status.UNAUTHENTICATED);
      expect(refused?.metadata.get("tq-refusal")).toEqual(["credential-revoked"]);
      again.close();
    }
    // Without the credential, the id is taken.
    const fresh = workerStream(workerToken);
    fresh.send({ case: "hello", value: { workerId: "w-revoked", name: "revoked", slots: 1 } });
    expect((await fresh.closed)?.code).toBe(grpc.status.PERMISSION_DENIED);
    fresh.close();
  });
});
