// The dashboard in a real browser (Debian's chromium, nothing beyond loopback reachable)
// against real roles on real PostgreSQL: sign in with a token, submit, watch a task go live
// to succeeded with its log appearing as it is written, cancel a running task, pause a queue,
// filter the list, bulk actions, a read token that sees but cannot act, and the live streams
// pausing while the tab is hidden.
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Browser, Page } from "playwright-core";
import { hashToken, newToken } from "../../src/auth/tokens";
import { chromiumMissing, type LoopbackPage, launchBrowser, loopbackPage } from "../support/browser";
import { HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { type Cluster, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

// Without Chromium the test cannot run; on CI that is a failure, elsewhere it is skipped with a word.
const skip = chromiumMissing() && !process.env.CI;
if (skip) console.warn("dashboard test skipped: /usr/bin/chromium is missing (apt-get install chromium)");

const db = useTestDatabase();
const admin = newToken().token;
const viewer = newToken().token;

let cluster: Cluster;
let browser: Browser;
let dir: string;
let base: string;

const api = async (path: string, init: RequestInit = {}, token = admin) => {
  const response = await fetch(`${base}${path}`, {
    ...init,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json", ...(init.headers ?? {}) },
  });
  return { status: response.status, json: (await response.json()) as any };
};

/** Signs a fresh page in with the token through the sign-in form. */
async function signedIn(token: string, path = "/ui"): Promise<LoopbackPage> {
  const view = await loopbackPage(browser);
  await view.page.goto(`${base}${path}`);
  await view.page.locator("input[name=token]").fill(token);
  await view.page.locator("form.signin button[type=submit]").click();
  await view.page.locator("header nav").waitFor();
  return view;
}

const stateOf = (page: Page) => page.locator("[data-testid=task-state] .badge").getAttribute("data-state");

async function closeClean(view: LoopbackPage): Promise<void> {
  await view.context.close();
  expect(view.outside).toEqual([]);
  expect(view.problems).toEqual([]);
}

describe.skipIf(skip)("the dashboard", () => {
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tq-dashboard-"));
    // The tasks run as the worker's slot users: they must see the gates.
    chmodSync(dir, 0o755);
    const tokens = `ops:admin:${hashToken(admin)},viewer:read:${hashToken(viewer)}`;
    [cluster, browser] = await Promise.all([
      startCluster(db.url, { workers: 1, slots: 4, env: { TQ_API_TOKENS: tokens } }),
      launchBrowser(),
    ]);
    base = cluster.coordinatorUrl;
  }, HOOK_TIMEOUT_MS);

  // A test that failed half-way leaves no task holding a slot for the next.
  afterEach(async () => {
    for (const state of ["queued", "dispatched", "running"]) {
      const { json } = await api(`/tasks?state=${state}&limit=500`);
      for (const task of json.tasks ?? []) await api(`/tasks/${task.id}/cancel`, { method: "POST" });
    }
  });

  afterAll(async () => {
    await browser?.close();
    await cluster?.stop();
    rmSync(dir, { recursive: true, force: true });
  }, HOOK_TIMEOUT_MS);

  test("asks for a token, refuses a wrong one, and keeps the right one in an HttpOnly SameSite=Strict cookie", async () => {
    const view = await loopbackPage(browser);
    const { page } = view;
    const response = await page.goto(`${base}/ui`);
    expect(response?.status()).toBe(200);
    expect(response?.headers()["content-security-policy"]).toContain("default-src 'none'");
    await page.locator("input[name=token]").fill("tq_wrong");
    await page.locator("form.signin button[type=submit]").click();
    await page.locator("form.signin [role=alert]", { hasText: "not valid" }).waitFor();
    expect(await view.context.cookies()).toEqual([]);

    await page.locator("input[name=token]").fill(admin);
    await page.locator("form.signin button[type=submit]").click();
    await page.locator("h1", { hasText: "Overview" }).waitFor();
    await page.locator(".who", { hasText: "ops" }).waitFor();
    const [cookie] = await view.context.cookies();
    expect(cookie).toMatchObject({ name: "tq_session", httpOnly: true, sameSite: "Strict", path: "/" });
    // The page's script cannot read it.
    expect(await page.evaluate(() => (globalThis as any).document.cookie)).toBe("");
    // Everything came from the role: the page, its two assets, the API.
    const paths = new Set(view.loaded);
    expect([...paths]).toEqual(
      expect.arrayContaining(["/ui", "/ui/assets/app.js", "/ui/assets/app.css", "/ui/session", "/overview"]),
    );

    // Signing out ends the cookie: the sign-in form again.
    await page.locator(".who button", { hasText: "Sign out" }).click();
    await page.locator("form.signin").waitFor();
    expect(await view.context.cookies()).toEqual([]);
    await closeClean(view);
  });

  test("the browser reaches nothing beyond loopback", async () => {
    const view = await loopbackPage(browser);
    // Not from the dashboard (its Content-Security-Policy would refuse first): the browser itself.
    for (const url of ["http://93.184.216.34/", "https://example.com/"]) {
      expect(
        await view.page.goto(url).then(
          () => "reached",
          () => "refused",
        ),
      ).toBe("refused");
    }
    expect(view.outside).toEqual(["http://93.184.216.34/", "https://example.com/"]);
    await view.context.close();
  });

  test("an action on the strength of the cookie must come from the dashboard's own origin", async () => {
    const cookie = `tq_session=${encodeURIComponent(admin)}`;
    const submit = (headers: Record<string, string>) =>
      fetch(`${base}/tasks`, {
        method: "POST",
        headers: { cookie, "content-type": "application/json", ...headers },
        body: JSON.stringify({ command: "true" }),
      });
    const foreign = await submit({ origin: "http://evil.example" });
    expect(foreign.status).toBe(403);
    expect(((await foreign.json()) as any).error.code).toBe("permission_denied");
    expect((await submit({})).status).toBe(403);
    expect((await submit({ origin: base })).status).toBe(201);
    // Reads need no Origin; the cookie signs them in.
    expect((await fetch(`${base}/overview`, { headers: { cookie } })).status).toBe(200);
    expect((await fetch(`${base}/overview`)).status).toBe(401);
  });

  test("submit from the tasks page, then watch the task go live to succeeded, its log appearing as it is written", async () => {
    const view = await signedIn(admin, "/ui/tasks");
    const { page } = view;
    const gate = join(dir, "gate-live");
    await page
      .locator("[data-testid=submit-command]")
      .fill(`echo first-line; while [ ! -e '${gate}' ]; do sleep 0.05; done; echo second-line`);
    await page.locator("[data-testid=submit]").click();
    await page.waitForURL(/\/ui\/tasks\/[0-9a-f-]{36}$/);
    const id = page.url().split("/").at(-1)!;
    // Live: running without a reload, the first line shown while the command still runs.
    try {
      await page.locator("[data-testid=task-state] .badge[data-state=running]").waitFor();
      await page.locator("[data-testid=log]", { hasText: "first-line" }).waitFor();
      expect(await page.locator("[data-testid=log]").textContent()).not.toContain("second-line");
    } finally {
      writeFileSync(gate, "");
    }
    await page.locator("[data-testid=task-state] .badge[data-state=succeeded]").waitFor();
    await page.locator("[data-testid=log]", { hasText: "second-line" }).waitFor();
    await page.locator("ol.timeline li[data-attempt='1'] .badge[data-state=succeeded]").waitFor();
    // The history says who submitted it.
    expect((await api(`/tasks/${id}/history`)).json.events[0]).toMatchObject({
      kind: expect.stringContaining("submitted"),
      actor: "ops",
    });
    await closeClean(view);
  });

  test("the task page goes live to succeeded (state, attempts, history) without a reload", async () => {
    const view = await signedIn(admin);
    const { page } = view;
    const gate = join(dir, "gate-state");
    const { json: task } = await api("/tasks", {
      method: "POST",
      body: JSON.stringify({ command: `while [ ! -e '${gate}' ]; do sleep 0.05; done; echo done` }),
    });
    await page.goto(`${base}/ui/tasks/${task.id}`);
    try {
      await page.locator("[data-testid=task-state] .badge[data-state=running]").waitFor();
    } finally {
      writeFileSync(gate, "");
    }
    await page.locator("[data-testid=task-state] .badge[data-state=succeeded]").waitFor();
    await page.locator("ol.timeline li[data-attempt='1']").waitFor();
    await page.locator("table.history td", { hasText: "succeeded" }).first().waitFor();
    expect(await stateOf(page)).toBe("succeeded");
    await closeClean(view);
  });

  test("cancel a running task: it stops, and the history names who cancelled it", async () => {
    const view = await signedIn(admin);
    const { page } = view;
    const { json: task } = await api("/tasks", { method: "POST", body: JSON.stringify({ command: "sleep 600" }) });
    await page.goto(`${base}/ui/tasks/${task.id}`);
    await page.locator("[data-testid=task-state] .badge[data-state=running]").waitFor();
    page.once("dialog", (dialog) => {
      expect(dialog.message()).toContain("cancel task");
      void dialog.accept();
    });
    await page.locator("[data-testid=cancel]").click();
    await page.locator("[data-testid=task-state] .badge[data-state=cancelled]").waitFor();
    const { json: history } = await api(`/tasks/${task.id}/history`);
    expect(history.events.find((e: any) => e.kind === "cancelled")).toMatchObject({ actor: "ops" });
    await closeClean(view);
  });

  test("pause a queue: its tasks wait, and resume lets them run", async () => {
    const view = await signedIn(admin);
    const { page } = view;
    const { json: first } = await api("/tasks", { method: "POST", body: JSON.stringify({ command: "true", queue: "reports" }) });
    await eventually(async () => (await api(`/tasks/${first.id}`)).json.state === "succeeded", { what: "the reports task" });
    await page.goto(`${base}/ui/queues`);
    const toggle = page.locator("[data-testid=queue-toggle-reports]");
    page.once("dialog", (dialog) => void dialog.accept());
    await toggle.click();
    await page.locator("[data-testid=queue-status-reports]", { hasText: "paused" }).waitFor();
    const queue = async () => (await api("/queues")).json.queues.find((q: any) => q.name === "reports");
    expect(await queue()).toMatchObject({ name: "reports", paused: true });
    const { json: held } = await api("/tasks", { method: "POST", body: JSON.stringify({ command: "true", queue: "reports" }) });
    const waiting = await eventually(async () => (await api(`/tasks/${held.id}`)).json.waiting, { what: "the waiting reason" });
    expect(waiting.kind).toBe("queue_paused");
    page.once("dialog", (dialog) => void dialog.accept());
    await toggle.click();
    await page.locator("[data-testid=queue-status-reports]", { hasText: "active" }).waitFor();
    await eventually(async () => (await api(`/tasks/${held.id}`)).json.state === "succeeded", { what: "the resumed task" });
    await closeClean(view);
  });

  test("filter the list by text, state and queue; the filters are the URL", async () => {
    const marker = `marker-${Date.now()}`;
    const { json: a } = await api("/tasks", {
      method: "POST",
      body: JSON.stringify({ command: `echo ${marker} a`, queue: "filters" }),
    });
    const { json: b } = await api("/tasks", {
      method: "POST",
      body: JSON.stringify({ command: `echo ${marker} b; exit 2`, max_attempts: 1 }),
    });
    await api("/tasks", { method: "POST", body: JSON.stringify({ command: "echo unrelated" }) });
    for (const id of [a.id, b.id]) {
      await eventually(async () => ["succeeded", "failed"].includes((await api(`/tasks/${id}`)).json.state), {
        what: `task ${id}`,
      });
    }
    const view = await signedIn(admin, "/ui/tasks");
    const { page } = view;
    await page.locator("[data-testid=filter-q]").fill(marker);
    await page.locator("[data-testid=apply-filters]").click();
    await page.waitForURL((url) => url.searchParams.get("q") === marker);
    await eventually(async () => (await page.locator("table.tasks tbody tr").count()) === 2, { what: "two matching rows" });
    await page.locator("[data-testid=filter-state]").selectOption("failed");
    await page.locator("[data-testid=apply-filters]").click();
    await page.waitForURL((url) => url.searchParams.get("state") === "failed");
    await eventually(async () => (await page.locator("table.tasks tbody tr").count()) === 1, { what: "one failed row" });
    expect(await page.locator("table.tasks tbody tr").getAttribute("data-task")).toBe(b.id);
    // A shared URL opens the same view.
    await page.goto(`${base}/ui/tasks?queue=filters&q=${marker}`);
    await page.locator(`tr[data-task='${a.id}']`).waitFor();
    expect(await page.locator("table.tasks tbody tr").count()).toBe(1);
    await page.goto(`${base}/ui/tasks?q=nothing-matches-${marker}`);
    await page.locator("[data-testid=no-tasks]").waitFor();
    await closeClean(view);
  });

  test("bulk: cancel a selection, retry all matching (POST /tasks/bulk)", async () => {
    const marker = `bulk-${Date.now()}`;
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      ids.push((await api("/tasks", { method: "POST", body: JSON.stringify({ command: `sleep 600 # ${marker}` }) })).json.id);
    }
    const view = await signedIn(admin, `/ui/tasks?q=${marker}`);
    const { page } = view;
    for (const id of ids.slice(0, 2)) await page.locator(`tr[data-task='${id}'] input[type=checkbox]`).check();
    page.once("dialog", (dialog) => {
      expect(dialog.message()).toBe("cancel 2 selected tasks?");
      void dialog.accept();
    });
    await page.locator("[data-testid=cancel-selected]").click();
    await page.locator(".notice", { hasText: "2 of 2 changed" }).waitFor();
    for (const id of ids.slice(0, 2)) expect((await api(`/tasks/${id}`)).json.state).toBe("cancelled");
    expect((await api(`/tasks/${ids[2]}`)).json.state).not.toBe("cancelled");
    // Every matching task: the third is cancelled too, then all three retried.
    page.once("dialog", (dialog) => void dialog.accept());
    await page.locator("[data-testid=cancel-matching]").click();
    await eventually(async () => (await api(`/tasks/${ids[2]}`)).json.state === "cancelled", { what: "the third cancelled" });
    page.once("dialog", (dialog) => {
      expect(dialog.message()).toContain(`q=${marker}`);
      void dialog.accept();
    });
    await page.locator("[data-testid=retry-matching]").click();
    await page.locator(".notice", { hasText: "3 of 3 changed" }).waitFor();
    for (const id of ids) expect((await api(`/tasks/${id}`)).json.state).not.toBe("cancelled");
    await closeClean(view);
  });

  test("a read token sees everything but is offered no action, and the API refuses one", async () => {
    const { json: task } = await api("/tasks", { method: "POST", body: JSON.stringify({ command: "sleep 600" }) });
    const view = await signedIn(viewer, `/ui/tasks/${task.id}`);
    const { page } = view;
    await page.locator(".who", { hasText: "viewer (read)" }).waitFor();
    await page.locator("[data-testid=task-state] .badge").waitFor();
    expect(await page.locator("[data-testid=cancel]").count()).toBe(0);
    // Even sent by hand from the page, with the cookie and this origin, the API says no.
    const status = await page.evaluate(
      async (id) => (await fetch(`/tasks/${id}/cancel`, { method: "POST" })).status,
      task.id as string,
    );
    expect(status).toBe(403);
    await page.goto(`${base}/ui/queues`);
    await page.locator("table tbody tr").first().waitFor();
    expect(await page.locator("button", { hasText: /^(Pause|Resume)$/ }).count()).toBe(0);
    await page.goto(`${base}/ui/tasks`);
    await page.locator("table.tasks").waitFor();
    expect(await page.locator("[data-testid=submit]").count()).toBe(0);
    expect(await page.locator("[data-testid=cancel-selected]").count()).toBe(0);
    await closeClean(view);
  });

  test("live over SSE, closed while the tab is hidden and opened again when shown", async () => {
    const view = await signedIn(admin);
    const { page } = view;
    const opened: string[] = [];
    const ended: string[] = [];
    page.on("request", (request) => {
      if (new URL(request.url()).pathname === "/overview/events") opened.push(request.url());
    });
    page.on("requestfailed", (request) => {
      if (new URL(request.url()).pathname === "/overview/events") ended.push(request.url());
    });
    page.on("requestfinished", (request) => {
      if (new URL(request.url()).pathname === "/overview/events") ended.push(request.url());
    });
    await page.locator("[data-testid=live-toggle]", { hasText: "Live" }).waitFor();
    // The overview counts a new task without a reload.
    const before = Number(await page.locator("[data-testid=count-succeeded] strong").textContent());
    const { json: task } = await api("/tasks", { method: "POST", body: JSON.stringify({ command: "true" }) });
    await eventually(async () => (await api(`/tasks/${task.id}`)).json.state === "succeeded", { what: "the task" });
    await eventually(async () => Number(await page.locator("[data-testid=count-succeeded] strong").textContent()) > before, {
      what: "the live count",
    });
    const hide = (state: "hidden" | "visible") =>
      page.evaluate((visibility) => {
        const doc = (globalThis as any).document;
        Object.defineProperty(doc, "visibilityState", { value: visibility, configurable: true });
        doc.dispatchEvent(new Event("visibilitychange"));
      }, state);
    await hide("hidden");
    await page.locator("[data-testid=live-toggle]", { hasText: "Paused (hidden)" }).waitFor();
    await eventually(() => ended.length >= 1, { what: "the overview stream to close" });
    const openedBefore = opened.length;
    await hide("visible");
    await page.locator("[data-testid=live-toggle]", { hasText: "Live" }).waitFor();
    await eventually(() => opened.length > openedBefore, { what: "the overview stream to open again" });
    // The visible pause button does the same.
    await page.locator("[data-testid=live-toggle]").click();
    await page.locator("[data-testid=live-toggle]", { hasText: "Paused" }).waitFor();
    await closeClean(view);
  });
});
