// Authentication, once on, stays on: revoking the last token leaves the API closed; only an
// explicit, recorded opening (`bun run token open-api`) lets requests in without a token, and
// a token created after it closes the API again. The CLI says each of these.
import { afterAll, beforeAll, beforeEach, expect, setDefaultTimeout, test } from "bun:test";
import { join } from "node:path";
import pino from "pino";
import { createApp } from "../../src/api";
import { Authenticator } from "../../src/auth/authenticator";
import { hashToken, newToken } from "../../src/auth/tokens";
import { apiSettings, authOptions, loadConfig } from "../../src/config";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { apiAccess, insertToken, openApi, revokeToken } from "../../src/db/tokens";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const ROOT = join(import.meta.dir, "../..");

let feed: TaskChangeFeed;
let auth: Authenticator;
let app: ReturnType<typeof createApp>;
const logged: string[] = [];

beforeAll(async () => {
  const config = loadConfig({});
  const log = pino({ level: "info" }, { write: (line: string) => logged.push(line) });
  feed = new TaskChangeFeed(db.sql);
  await feed.start();
  auth = new Authenticator(db.sql, authOptions(config), log);
  app = createApp({
    role: "coordinator",
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

beforeEach(async () => {
  await db.sql`TRUNCATE api_tokens, api_openings`;
  logged.length = 0;
  await auth.refresh();
});

async function makeToken(name: string): Promise<string> {
  const { id, token } = newToken();
  await insertToken(db.sql, { id, name, hash: hashToken(token), scopes: ["admin"] });
  return token;
}

/** GET /tasks as the role answers it now (its view of the database re-read first). */
async function listStatus(token?: string): Promise<number> {
  await auth.refresh();
  const headers: Record<string, string> = token ? { authorization: `Bearer ${token}` } : {};
  const response = await app.handle(new Request("http://localhost/tasks", { headers }));
  await response.arrayBuffer();
  return response.status;
}

async function tokenCli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const proc = Bun.spawn(["bun", "run", "token", ...args], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/tmp", DATABASE_URL: db.url },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { code, stdout, stderr };
}

test("with no token ever created the API is open, as before", async () => {
  expect(await listStatus()).toBe(200);
  expect(auth.enforced).toBe(false);
});

test("revoking the last token leaves the API closed: 401 without a token", async () => {
  const token = await makeToken("ci");
  expect(await listStatus()).toBe(401);
  expect(await listStatus(token)).toBe(200);
  expect(await revokeToken(db.sql, "ci")).toBe(true);
  expect(await listStatus()).toBe(401);
  expect(auth.enforced).toBe(true);
  expect(await apiAccess(db.sql)).toMatchObject({ live: 0, closed: true, openedAt: null });
  // A role started afterwards is closed too, and the revoked token does not get in.
  const fresh = new Authenticator(db.sql, authOptions(loadConfig({})), pino({ level: "silent" }));
  await fresh.start();
  expect(fresh.enforced).toBe(true);
  await expect(fresh.check(undefined, "read")).rejects.toMatchObject({ code: "unauthenticated" });
  await expect(fresh.check(`Bearer ${token}`, "read")).rejects.toMatchObject({ code: "unauthenticated" });
  fresh.stop();
  // The role says that no token can get in, and how to change that.
  expect(logged.join("")).toContain("bun run token open-api");
});

test("an explicit opening lets requests in; a token created after it closes the API again, for good", async () => {
  await makeToken("old");
  await revokeToken(db.sql, "old");
  const openedAt = await openApi(db.sql, "tester@here");
  expect(openedAt).toBeInstanceOf(Date);
  expect(await listStatus()).toBe(200);
  expect(await apiAccess(db.sql)).toMatchObject({ live: 0, closed: false, openedBy: "tester@here" });
  const token = await makeToken("new");
  expect(await listStatus()).toBe(401);
  expect(await listStatus(token)).toBe(200);
  await revokeToken(db.sql, "new");
  expect(await listStatus()).toBe(401);
});

test("an opening is refused while a live token exists, and nothing is recorded", async () => {
  await makeToken("live-one");
  expect(await openApi(db.sql, "tester@here")).toBeNull();
  const rows = await db.sql`SELECT * FROM api_openings`;
  expect(rows).toHaveLength(0);
  expect(await listStatus()).toBe(401);
});

test("bun run token: revoking the last token says the API stays closed; open-api opens it and says so", async () => {
  await makeToken("first");
  await makeToken("second");

  const notLast = await tokenCli("revoke", "--name", "first");
  expect(notLast.code).toBe(0);
  expect(notLast.stdout).toContain('revoked token "first"');
  expect(notLast.stderr).not.toContain("last live token");

  const refused = await tokenCli("open-api");
  expect(refused.code).toBe(2);
  expect(refused.stderr).toContain("live tokens (second)");
  expect((await db.sql`SELECT * FROM api_openings`).length).toBe(0);

  const last = await tokenCli("revoke", "--name", "second");
  expect(last.code).toBe(0);
  expect(last.stderr).toContain("that was the last live token; the API stays closed");
  expect(last.stderr).toContain("bun run token open-api");
  expect(await listStatus()).toBe(401);

  const list = await tokenCli("list");
  expect(list.stdout).toContain("second\tadmin");
  expect(list.stderr).toContain("the API is closed and no token is live");

  const opened = await tokenCli("open-api");
  expect(opened.code).toBe(0);
  expect(opened.stdout).toContain("opened the API at");
  expect(opened.stderr).toContain("WARNING: requests no longer need a token");
  const [opening] = await db.sql<{ opened_by: string }[]>`SELECT opened_by FROM api_openings`;
  expect(opening?.opened_by).toContain("@");
  expect(await listStatus()).toBe(200);

  const again = await tokenCli("open-api");
  expect(again.code).toBe(0);
  expect(again.stderr).toContain("the API is open: opened");
  expect(again.stderr).toContain("nothing to do");
  expect((await db.sql`SELECT * FROM api_openings`).length).toBe(1);
});
