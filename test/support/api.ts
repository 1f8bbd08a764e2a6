// The HTTP app in process, for integration tests against real PostgreSQL: the scheduler's
// routes (createApp) over the file's test database, with a started change feed, open auth and
// the plain insert as submit, and `call()`, one request through app.handle.
import { afterAll, beforeAll, expect } from "bun:test";
import type { ApiDeps } from "../../src/api/deps";
import { createApp } from "../../src/api/index";
import { apiSettings, loadConfig } from "../../src/config";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { silentLogger } from "../../src/log";
import { HOOK_TIMEOUT_MS, type TestDatabase } from "./db";
import { openAuth } from "./factories";

/** An answer: its status, its body parsed as JSON (null when empty or not JSON), its headers. */
export interface ApiAnswer {
  status: number;
  // Tests read whatever shape the route documents.
  json: any;
  headers: Headers;
}

export interface ApiHarness {
  /** Set in beforeAll. */
  app: ReturnType<typeof createApp>;
  /**
   * One request through the app: `body` as JSON (a string is sent as it is, for malformed
   * bodies). A 500 fails the test: bad input is answered, never a crash.
   */
  call(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<ApiAnswer>;
}

/** Registers the hooks that build the app (after useTestDatabase's, so `db` is ready) and stop its feed. */
export function useApiApp(db: TestDatabase): ApiHarness {
  let feed: TaskChangeFeed | null = null;
  const harness: ApiHarness = {
    app: undefined as unknown as ReturnType<typeof createApp>,
    async call(method, path, body, headers = {}) {
      const request = new Request(`http://localhost${path}`, {
        method,
        headers: { "content-type": "application/json", ...headers },
        ...(body === undefined ? {} : { body: typeof body === "string" ? body : JSON.stringify(body) }),
      });
      const response = await harness.app.handle(request);
      const text = await response.text();
      expect(response.status).not.toBe(500);
      let json: unknown = null;
      if (text) {
        try {
          json = JSON.parse(text);
        } catch {
          json = null;
        }
      }
      return { status: response.status, json, headers: response.headers };
    },
  };
  beforeAll(async () => {
    feed = new TaskChangeFeed(db.sql);
    await feed.start();
    const deps: ApiDeps = {
      role: "scheduler",
      settings: apiSettings(loadConfig({})),
      sql: db.sql,
      feed,
      log: silentLogger,
      auth: openAuth,
      submit: (id, spec) => insertTask(db.sql, id, spec),
    };
    harness.app = createApp(deps);
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await feed?.stop();
  }, HOOK_TIMEOUT_MS);
  return harness;
}
