// bun run screenshots [dir]: screenshots of the dashboard's main pages (docs/screenshots/*.png
// by default, shown in the README), taken with the browser the tests use (Debian's chromium,
// nothing beyond loopback reachable) from a real `bun start` on a fresh database (DATABASE_URL's
// server when set, else embedded PostgreSQL in a temporary directory), given a little work to
// show: tasks that succeeded, failed and run, a paused queue, a limited one, schedules, a rate
// limit and a busy concurrency key.
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import postgres from "postgres";
import { type EmbeddedDatabase, startEmbedded } from "../src/db/embedded";
import { chromiumMissing, launchBrowser, loopbackPage } from "../test/support/browser";

const ROOT = resolve(import.meta.dir, "..");
const out = resolve(process.argv[2] ?? join(ROOT, "docs", "screenshots"));

if (chromiumMissing()) {
  console.error("bun run screenshots needs /usr/bin/chromium (apt-get install chromium)");
  process.exit(1);
}

function freePort(): number {
  const server = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = server.port;
  server.stop(true);
  return port;
}

async function until<T>(what: string, fn: () => Promise<T | null | undefined | false>, timeoutMs = 60_000): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      const value = await fn();
      if (value) return value;
    } catch {
      // Not yet.
    }
    if (performance.now() > deadline) throw new Error(`screenshots: gave up waiting for ${what}`);
    await Bun.sleep(100);
  }
}

const temp = mkdtempSync(join(tmpdir(), "tq-screenshots-"));
let embedded: EmbeddedDatabase | null = null;
let dropDatabase: (() => Promise<void>) | null = null;
let role: ReturnType<typeof Bun.spawn> | null = null;
let exitCode = 0;

try {
  // A database of its own.
  let url: string;
  if (process.env.DATABASE_URL) {
    const name = `tq_screenshots_${process.pid}`;
    const admin = postgres(process.env.DATABASE_URL, { max: 1, onnotice: () => {} });
    await admin`CREATE DATABASE ${admin(name)}`;
    const parsed = new URL(process.env.DATABASE_URL);
    parsed.pathname = `/${name}`;
    url = parsed.toString();
    dropDatabase = async () => {
      await admin`DROP DATABASE IF EXISTS ${admin(name)} WITH (FORCE)`;
      await admin.end();
    };
  } else {
    embedded = await startEmbedded({ dataDir: join(temp, "pg"), port: freePort() });
    url = embedded.url;
  }

  const [http, schedulerPort, grpc] = [freePort(), freePort(), freePort()];
  role = Bun.spawn(["bun", "src/start.ts"], {
    cwd: ROOT,
    env: {
      PATH: process.env.PATH ?? "/usr/bin:/bin",
      HOME: process.env.HOME ?? "/tmp",
      DATABASE_URL: url,
      TQ_COORDINATOR_PORT: String(http),
      TQ_SCHEDULER_PORT: String(schedulerPort),
      TQ_GRPC_PORT: String(grpc),
      TQ_WORKERS: "2",
      TQ_WORKER_SLOTS: "4",
      TQ_LOG_LEVEL: "warn",
    },
    stdout: "ignore",
    stderr: "inherit",
  });
  const base = `http://127.0.0.1:${http}`;
  const api = async (method: string, path: string, body?: unknown) => {
    const response = await fetch(`${base}${path}`, {
      method,
      headers: { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`);
    // biome-ignore lint/suspicious/noExplicitAny: the answers of many routes, read by field name
    return (await response.json()) as any;
  };
  await until("the coordinator", async () => (await fetch(`${base}/readyz`)).ok);
  await until("two workers", async () => (await api("GET", "/workers")).workers.length >= 2);

  // Something to show.
  await api("POST", "/rate-limits", { name: "partner-api", rate: "30/1m", burst: 10 });
  await api("PATCH", "/queues/batch", { concurrency_limit: 2 });
  for (let i = 1; i <= 14; i++) {
    await api("POST", "/tasks", { command: `echo report ${i} && sleep 0.${i % 5}`, queue: i % 3 ? "default" : "batch" });
  }
  for (let i = 1; i <= 3; i++) await api("POST", "/tasks", { command: `echo "import ${i}" >&2; exit 3`, max_attempts: 1 });
  const running = await api("POST", "/tasks", {
    command: 'for i in $(seq 1 400); do echo "step $i: processing shard $((i % 16))"; sleep 0.25; done',
    queue: "default",
  });
  await api("POST", "/tasks", { command: "sleep 300", concurrency: { key: "tenant-42", max: 1 } });
  await api("POST", "/tasks", { command: "sleep 300", concurrency: { key: "tenant-42", max: 1 } });
  await api("POST", "/tasks", { command: "echo nightly export", queue: "reports" });
  await api("POST", "/queues/reports/pause");
  await api("POST", "/tasks", { command: "echo waiting for reports", queue: "reports" });
  await api("POST", "/schedules", {
    name: "nightly-report",
    cron: "0 2 * * *",
    time_zone: "UTC",
    task: { command: "echo nightly" },
  });
  const every = await api("POST", "/schedules", { name: "heartbeat-check", every: "1m", task: { command: "echo ok" } });
  await api("POST", `/schedules/${every.id}/trigger`);
  await until("the running task's log", async () => (await api("GET", `/tasks/${running.id}`)).state === "running");
  await until("the quick tasks", async () => (await api("GET", "/tasks?state=succeeded&limit=500")).tasks.length >= 12);
  // A few lines of log.
  await Bun.sleep(3000);

  mkdirSync(out, { recursive: true });
  const browser = await launchBrowser();
  try {
    const view = await loopbackPage(browser, { viewport: { width: 1280, height: 800 } });
    const shots: [string, string, string][] = [
      ["overview", "/ui", "h1"],
      ["tasks", "/ui/tasks", "table.tasks"],
      ["task", `/ui/tasks/${running.id}`, "ol.timeline"],
      ["workers", "/ui/workers", "table"],
      ["queues", "/ui/queues", "table"],
      ["schedules", "/ui/schedules", "article.schedule"],
      ["flow", "/ui/flow", "table"],
    ];
    for (const [name, path, ready] of shots) {
      await view.page.goto(`${base}${path}`);
      await view.page.locator(ready).first().waitFor();
      // Let the live streams draw once.
      await view.page.waitForTimeout(800);
      const file = join(out, `${name}.png`);
      await view.page.screenshot({ path: file, fullPage: false });
      console.log(`wrote ${file}`);
    }
    await view.context.close();
    if (view.outside.length) throw new Error(`the pages asked for ${view.outside.join(", ")} beyond loopback`);
  } finally {
    await browser.close();
  }
} catch (error) {
  console.error(error instanceof Error ? error.message : error);
  exitCode = 1;
} finally {
  if (role) {
    role.kill("SIGTERM");
    await role.exited;
  }
  await dropDatabase?.().catch(() => {});
  await embedded?.stop();
  rmSync(temp, { recursive: true, force: true });
}
process.exit(exitCode);
