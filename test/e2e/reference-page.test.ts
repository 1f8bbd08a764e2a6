// The API reference page works offline: a real scheduler serves /openapi, headless Chromium
// renders it with every request beyond loopback refused, and the operations are listed.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync } from "node:fs";
import { type Browser, chromium } from "playwright-core";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { type RoleProcess, spawnRole } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

/** Debian's chromium package; .ci/run installs it when missing. */
const CHROMIUM = "/usr/bin/chromium";
// Without Chromium the test cannot run; on CI that is a failure, elsewhere it is skipped with a word.
const skip = !existsSync(CHROMIUM) && !process.env.CI;
if (skip) console.warn(`reference page test skipped: ${CHROMIUM} is missing (apt-get install chromium)`);

const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);

const db = useTestDatabase();

describe.skipIf(skip)("the API reference page", () => {
  let scheduler: RoleProcess;
  let baseUrl: string;
  let browser: Browser;

  beforeAll(async () => {
    const port = await freePort();
    scheduler = spawnRole("scheduler", { DATABASE_URL: db.url, TQ_SCHEDULER_PORT: String(port) });
    baseUrl = `http://127.0.0.1:${port}`;
    [browser] = await Promise.all([
      chromium.launch({
        executablePath: CHROMIUM,
        args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
      }),
      scheduler.waitForEvent("scheduler.started"),
    ]);
  }, HOOK_TIMEOUT_MS);
  afterAll(async () => {
    await browser?.close();
    await scheduler?.stop();
  }, HOOK_TIMEOUT_MS);

  for (const path of ["/openapi", "/openapi/"]) {
    test(`${path} lists every operation, loading nothing from beyond loopback`, async () => {
      const documented = (await (await fetch(`${baseUrl}/openapi/json`)).json()) as { paths: Record<string, object> };
      const operations = Object.values(documented.paths).flatMap((item) => Object.keys(item));
      expect(operations.length).toBeGreaterThan(10);

      const context = await browser.newContext();
      const outside: string[] = [];
      const loaded: string[] = [];
      const problems: string[] = [];
      await context.route("**/*", async (route) => {
        const url = new URL(route.request().url());
        if (LOOPBACK.has(url.hostname)) {
          loaded.push(url.pathname);
          await route.continue();
        } else {
          outside.push(url.href);
          await route.abort("blockedbyclient");
        }
      });
      const page = await context.newPage();
      page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
      page.on("console", (message) => {
        if (message.type() === "error") problems.push(`console: ${message.text()}`);
      });
      try {
        const response = await page.goto(`${baseUrl}${path}`);
        expect(response?.status()).toBe(200);
        expect(response?.headers()["content-security-policy"]).toContain("default-src 'none'");
        const blocks = page.locator(".opblock");
        await blocks.first().waitFor({ state: "visible", timeout: 20_000 });
        expect(await blocks.count()).toBe(operations.length);
        await expect(page.locator(".opblock-summary-description", { hasText: "Submit a task" }).isVisible()).resolves.toBe(true);
        await expect(page.locator(".opblock-summary-path", { hasText: "/tasks/batch" }).isVisible()).resolves.toBe(true);
        expect(await page.locator(".info .title").textContent()).toContain("task-queue");
      } finally {
        await context.close();
      }
      expect(outside).toEqual([]);
      expect(problems).toEqual([]);
      // The page, Swagger UI's files and the document, all from the role.
      expect(loaded).toEqual(expect.arrayContaining([path, "/openapi/swagger-ui-bundle.js", "/openapi/json"]));
      for (const pathname of loaded) expect(pathname).toStartWith("/openapi");
    });
  }
});
