// The dashboard's entry: the header, sign-in, and the router (every view is a URL under /ui,
// its filters in the query string, so a view can be shared). Styles come with it.
import "./style.css";
import { ApiFailure, readSession, type Session, signIn, signOut } from "./api";
import type { Overview, Page, PageContext } from "./context";
import { fill, h } from "./dom";
import { eventSource, live } from "./live";
import { flowPage } from "./pages/flow";
import { overviewPage } from "./pages/overview";
import { queuesPage } from "./pages/queues";
import { schedulesPage } from "./pages/schedules";
import { taskPage } from "./pages/task";
import { tasksPage } from "./pages/tasks";
import { workersPage } from "./pages/workers";

const BASE = "/ui";

const NAV: [string, string][] = [
  ["", "Overview"],
  ["/tasks", "Tasks"],
  ["/workers", "Workers"],
  ["/queues", "Queues"],
  ["/schedules", "Schedules"],
  ["/flow", "Rate limits & keys"],
];

function route(path: string): { page: Page; section: string } {
  const rest = path.slice(BASE.length).replace(/\/+$/, "");
  const task = /^\/tasks\/([^/]+)$/.exec(rest);
  if (task) return { page: (ctx) => taskPage(ctx, decodeURIComponent(task[1]!)), section: "/tasks" };
  const pages: Record<string, Page> = {
    "": overviewPage,
    "/tasks": tasksPage,
    "/workers": workersPage,
    "/queues": queuesPage,
    "/schedules": schedulesPage,
    "/flow": flowPage,
  };
  return { page: pages[rest] ?? notFoundPage, section: rest };
}

const notFoundPage: Page = ({ root }) => fill(root, h("h1", {}, "Not found"), h("p", {}, "No such page."));

const app = document.getElementById("app")!;
let session: Session = { auth: false, signed_in: false, name: null, scopes: [] };
let overviewListeners: ((overview: Overview) => void)[] = [];
let changeListeners: (() => void)[] = [];
let lastOverview: Overview | null = null;
let overviewStream: (() => void) | null = null;
let rendering = 0;

const main = h("main");
const notice = h("div.notice", { role: "status" });
const liveButton = h("button.live", { type: "button", "data-testid": "live-toggle" });
const counts = h("span.counts");
const who = h("span.who");

function header(section: string): HTMLElement {
  return h(
    "header",
    {},
    h("a.brand", { href: `${BASE}`, "data-nav": "" }, "task-queue"),
    h(
      "nav",
      {},
      NAV.map(([path, name]) =>
        h("a", { href: `${BASE}${path}`, "data-nav": "", class: path === section ? "active" : null }, name),
      ),
    ),
    counts,
    liveButton,
    who,
  );
}

live.watch((active) => {
  liveButton.textContent = active ? "● Live" : live.isPaused ? "❚❚ Paused" : "❚❚ Paused (hidden)";
  liveButton.classList.toggle("on", active);
  liveButton.title = active ? "Updates stream in; click to pause" : "Click to resume live updates";
});
liveButton.addEventListener("click", () => live.setPaused(!live.isPaused));

function notify(message: string, kind: "ok" | "error" = "ok"): void {
  fill(notice, message ? h("p", { class: kind }, message) : null);
}

let changeTimer: ReturnType<typeof setTimeout> | null = null;
function overviewArrived(overview: Overview): void {
  const changed = lastOverview !== null && lastOverview.last_event_id !== overview.last_event_id;
  lastOverview = overview;
  const s = overview.states;
  fill(counts, `${s.running ?? 0} running · ${s.queued ?? 0} queued · ${overview.slots.free}/${overview.slots.total} slots free`);
  for (const listener of overviewListeners) listener(overview);
  if (changed && !changeTimer) {
    changeTimer = setTimeout(() => {
      changeTimer = null;
      for (const listener of changeListeners) listener();
    }, 300);
  }
}

function startOverviewStream(): void {
  overviewStream ??= live.add(
    eventSource(() => "/overview/events", { overview: (event) => overviewArrived(JSON.parse(event.data) as Overview) }),
    false,
  );
}

export function navigate(href: string, replace = false): void {
  if (replace) history.replaceState(null, "", href);
  else history.pushState(null, "", href);
  void render();
}

async function render(): Promise<void> {
  const run = ++rendering;
  live.leavePage();
  overviewListeners = [];
  changeListeners = [];
  notify("");
  const url = new URL(location.href);
  const { page, section } = route(url.pathname);
  if (session.auth && !session.signed_in) return signInPage();
  fill(
    who,
    session.auth
      ? [
          h("span", { title: session.scopes.join(", ") }, `${session.name} (${session.scopes.join(", ")})`),
          h("button.link", { type: "button", onclick: () => void doSignOut() }, "Sign out"),
        ]
      : h("span.muted", { title: "The API asks for no token (dev mode): everyone may act." }, "auth off"),
  );
  fill(app, header(section), notice, main);
  startOverviewStream();
  const context: PageContext = {
    root: main,
    url,
    session,
    can: (scope) => !session.auth || session.scopes.includes(scope) || session.scopes.includes("admin"),
    navigate,
    onOverview(callback) {
      overviewListeners.push(callback);
      if (lastOverview) callback(lastOverview);
    },
    onChange(callback) {
      changeListeners.push(callback);
    },
    notify,
  };
  main.replaceChildren(h("p.loading", {}, "Loading…"));
  try {
    await page(context);
  } catch (error) {
    if (run !== rendering) return;
    if (error instanceof ApiFailure && error.status === 401) {
      session = await readSession();
      return render();
    }
    fill(main, h("p.error", {}, `Could not load this page: ${error instanceof Error ? error.message : String(error)}`));
  }
}

function signInPage(): void {
  overviewStream?.();
  overviewStream = null;
  const input = h("input", {
    type: "password",
    name: "token",
    autocomplete: "current-password",
    placeholder: "tq_…",
    required: true,
  });
  const message = h("p.error", { role: "alert" });
  const form = h(
    "form.signin",
    {
      onsubmit: async (event: Event) => {
        event.preventDefault();
        try {
          session = await signIn(input.value);
          await render();
        } catch (error) {
          message.textContent = error instanceof Error ? error.message : String(error);
        }
      },
    },
    h("h1", {}, "task-queue"),
    h("label", {}, "API token", input),
    h("button", { type: "submit" }, "Sign in"),
    message,
    h("p.muted", {}, "Create one with: bun run token create --name you --scope read (or admin to act)."),
  );
  fill(app, form);
  input.focus();
}

async function doSignOut(): Promise<void> {
  await signOut();
  session = await readSession();
  await render();
}

// Links within the dashboard change the view without a page load.
document.addEventListener("click", (event) => {
  const anchor = (event.target as Element | null)?.closest?.("a[data-nav]") as HTMLAnchorElement | null;
  if (!anchor || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(anchor.href);
});
window.addEventListener("popstate", () => void render());

session = await readSession();
await render();
