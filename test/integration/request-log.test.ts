// The HTTP request log: one `http.request` line per request, with its id (also the answer's
// X-Request-Id), method, route template, status, duration and the name of the token that made
// it, never the token itself; health checks at debug.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import pino from "pino";
import { createApp } from "../../src/api";
import { Authenticator } from "../../src/auth/authenticator";
import { hashToken, newToken } from "../../src/auth/tokens";
import { apiSettings, authOptions, loadConfig } from "../../src/config";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { insertToken } from "../../src/db/tokens";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const raw: string[] = [];
const log = pino({ level: "debug" }, { write: (line: string) => raw.push(line) });
let feed: TaskChangeFeed;
let auth: Authenticator;
let app: ReturnType<typeof createApp>;
let token: string;

beforeAll(async () => {
  const made = newToken();
  token = made.token;
  await insertToken(db.sql, { id: made.id, name: "deploy-bot", hash: hashToken(token), scopes: ["submit", "read"] });
  const config = loadConfig({});
  feed = new TaskChangeFeed(db.sql);
  await feed.start();
  auth = new Authenticator(db.sql, authOptions(config), log);
  await auth.start();
  app = createApp({
    role: "scheduler",
    settings: apiSettings(config),
    sql: db.sql,
    feed,
    log,
    auth,
    submit: (id, spec, actor) => insertTask(db.sql, id, spec, { actor }),
  });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  auth.stop();
  await feed.stop();
});

type Line = Record<string, unknown>;
const requestLines = (): Line[] => raw.map((line) => JSON.parse(line) as Line).filter((line) => line.event === "http.request");

async function send(method: string, path: string, headers: Record<string, string> = {}, body?: unknown) {
  const response = await app.handle(
    new Request(`http://localhost${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) }),
  );
  const text = await response.text();
  const id = response.headers.get("x-request-id");
  const line = await eventually(() => requestLines().find((l) => l.request_id === id), { what: `the request line of ${path}` });
  return { response, text, id, line };
}

test("each request logs one line with its id, route template, status, duration and token name; the answer carries the id", async () => {
  const submitted = await send("POST", "/tasks", { authorization: `Bearer ${token}` }, { command: "true" });
  expect(submitted.response.status).toBe(201);
  expect(submitted.id).toMatch(/^[0-9a-f-]{36}$/);
  expect(submitted.line).toMatchObject({ method: "POST", route: "/tasks", status: 201, token: "deploy-bot", level: 30 });
  expect(submitted.line.duration_ms).toEqual(expect.any(Number));

  const created = JSON.parse(submitted.text) as { id: string };
  const read = await send("GET", `/tasks/${created.id}`, { authorization: `Bearer ${token}`, "x-request-id": "trace-42" });
  expect(read.id).toBe("trace-42");
  expect(read.line).toMatchObject({ method: "GET", route: "/tasks/:id", status: 200, token: "deploy-bot" });
  expect(read.line).not.toHaveProperty("path");

  // Refused before routing: logged under the template it asked for, with its real status.
  const refused = await send("GET", "/tasks/abc", { authorization: "Bearer not-a-token" });
  expect(refused.response.status).toBe(401);
  expect(refused.line).toMatchObject({ route: "/tasks/:id", status: 401, token: null });
  const unknown = await send("GET", "/no/such/route", { authorization: `Bearer ${token}` });
  expect(unknown.line).toMatchObject({ route: null, path: "/no/such/route", status: 404 });

  // A forged id (a newline could forge a log line) is replaced.
  const forged = await send("GET", "/healthz", { "x-request-id": "a\u00e9b" });
  expect(forged.id).not.toBe("a\u00e9b");
  expect(forged.line).toMatchObject({ route: "/healthz", status: 200, level: 20 });

  expect(raw.some((line) => line.includes(token))).toBe(false);
  expect(requestLines().filter((l) => l.request_id === submitted.id)).toHaveLength(1);
});
