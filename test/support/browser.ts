// A real browser for the pages' tests and `bun run screenshots`: Debian's chromium driven by
// playwright-core, every request beyond loopback refused (and recorded, so a test can say
// that nothing was fetched from elsewhere). Refused by the browser itself, not by route
// interception: with any route set, Playwright intercepts every request, and an intercepted
// event stream reaches the page only in large pieces (a task's few small events not until
// its stream ends), which would make a live page look dead. So every host but loopback
// resolves to nothing, and whatever is left (an IP literal) goes to a proxy that is not
// there: loopback alone is reached directly.
import { existsSync } from "node:fs";
import { type Browser, type BrowserContext, chromium, type Page } from "playwright-core";

/** Debian's chromium package; .ci/run installs it when missing. */
export const CHROMIUM = "/usr/bin/chromium";

export const chromiumMissing = () => !existsSync(CHROMIUM);

const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);

export function launchBrowser(): Promise<Browser> {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
      // Port 9 (discard) on loopback: nothing listens, so a proxied request fails at once.
      "--proxy-server=http://127.0.0.1:9",
      "--proxy-bypass-list=<-loopback>;127.0.0.1;localhost;[::1]",
    ],
  });
}

export interface LoopbackPage {
  context: BrowserContext;
  page: Page;
  /** Requests the page tried beyond loopback (each failed). */
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
  const beyondLoopback = (url: URL) => url.protocol !== "data:" && !LOOPBACK.has(url.hostname);
  context.on("request", (request) => {
    const url = new URL(request.url());
    if (beyondLoopback(url)) outside.push(url.href);
    else loaded.push(url.pathname);
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
