// A real browser for the pages' tests and `bun run screenshots`: Debian's chromium driven by
// playwright-core, every request beyond loopback refused (and recorded, so a test can say
// that nothing was fetched from elsewhere).
import { existsSync } from "node:fs";
import { type Browser, type BrowserContext, chromium, type Page } from "playwright-core";

/** Debian's chromium package; .ci/run installs it when missing. */
export const CHROMIUM = "/usr/bin/chromium";

export const chromiumMissing = () => !existsSync(CHROMIUM);

const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);

export function launchBrowser(): Promise<Browser> {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
}

export interface LoopbackPage {
  context: BrowserContext;
  page: Page;
  /** Requests refused: beyond loopback. */
  outside: string[];
  /** Paths requested on loopback, in order. */
  loaded: string[];
  /** Page errors and console errors. */
  problems: string[];
}

/** A new context and page that can reach loopback only. */
export async function loopbackPage(
  browser: Browser,
  options: { viewport?: { width: number; height: number } } = {},
): Promise<LoopbackPage> {
  const context = await browser.newContext({ viewport: options.viewport ?? { width: 1280, height: 860 } });
  const outside: string[] = [];
  const loaded: string[] = [];
  const problems: string[] = [];
  await context.route("**/*", async (route) => {
    const url = new URL(route.request().url());
    if (url.protocol === "data:" || LOOPBACK.has(url.hostname)) {
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
    // A refused request (a wrong token, a read token acting) is the test's business, not a page fault.
    if (message.type() === "error" && !message.text().startsWith("Failed to load resource")) {
      problems.push(`console: ${message.text()}`);
    }
  });
  return { context, page, outside, loaded, problems };
}
