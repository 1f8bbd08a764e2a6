// Tasks: the list, filtered by state, queue, schedule, key, label and text in the command
// (all in the query string), paged by cursor, with cancel and retry over a selection or over
// every task matching the filters.
import { ApiFailure, api, type BulkResult, need, postJson, type Schemas } from "../api";
import type { Page } from "../context";
import { ago, badge, fill, h, link, shortId } from "../dom";

type Task = Schemas["Task"];

const STATES = ["waiting", "queued", "dispatched", "running", "succeeded", "failed", "timed_out", "cancelled"];
/** The filters GET /tasks takes, by their query names. */
const FILTERS = ["state", "queue", "schedule_id", "key", "label", "q"] as const;
type Filter = (typeof FILTERS)[number];

const FINAL = new Set(["succeeded", "failed", "timed_out", "cancelled"]);

export const tasksPage: Page = async (ctx) => {
  const params = ctx.url.searchParams;
  const filter: Partial<Record<Filter, string>> = {};
  for (const name of FILTERS) {
    const value = params.get(name);
    if (value) filter[name] = value;
  }
  const cursor = params.get("cursor") ?? undefined;
  const selected = new Set<string>();

  const field = (name: Filter, label: string, placeholder = "") =>
    h("label", {}, label, h("input", { name, value: filter[name] ?? "", placeholder, "data-testid": `filter-${name}` }));
  const stateSelect = h(
    "select",
    { name: "state", "data-testid": "filter-state" },
    h("option", { value: "" }, "any"),
    STATES.map((state) => h("option", { value: state, selected: filter.state === state }, state.replace("_", " "))),
  );
  const form = h(
    "form.filters",
    {
      onsubmit: (event: Event) => {
        event.preventDefault();
        const query = new URLSearchParams();
        for (const [name, value] of new FormData(form))
          if (typeof value === "string" && value.trim()) query.set(name, value.trim());
        ctx.navigate(`/ui/tasks${query.size ? `?${query}` : ""}`);
      },
    },
    h("label", {}, "state", stateSelect),
    field("queue", "queue"),
    field("q", "command contains", "sleep"),
    field("key", "concurrency key"),
    field("label", "label", "gpu or region=eu"),
    field("schedule_id", "schedule id"),
    h("button", { type: "submit", "data-testid": "apply-filters" }, "Filter"),
    Object.keys(filter).length ? link("/ui/tasks", "clear") : null,
  );

  // Submit: the run-now form of POST /tasks (command, queue), for a quick task from the page.
  const command = h("input", {
    name: "command",
    placeholder: "echo hello",
    required: true,
    "data-testid": "submit-command",
    size: 50,
  });
  const queue = h("input", { name: "queue", placeholder: "default", "data-testid": "submit-queue" });
  const submit = ctx.can("submit")
    ? h(
        "form.filters.submit",
        {
          onsubmit: async (event: Event) => {
            event.preventDefault();
            try {
              const task = await need(
                api.POST("/tasks", {
                  body: { command: command.value, ...(queue.value.trim() ? { queue: queue.value.trim() } : {}) },
                }),
              );
              ctx.navigate(`/ui/tasks/${task.id}`);
            } catch (error) {
              ctx.notify(`submit failed: ${error instanceof Error ? error.message : String(error)}`, "error");
            }
          },
        },
        h("label", {}, "run a command now", command),
        h("label", {}, "queue", queue),
        h("button", { type: "submit", "data-testid": "submit" }, "Submit"),
      )
    : null;

  const actions = h("div.actions");
  const list = h("div");
  const pager = h("div.pager");
  fill(ctx.root, h("h1", {}, "Tasks"), submit, form, actions, list, pager);

  const describeFilter = () =>
    Object.entries(filter)
      .map(([k, v]) => `${k}=${v}`)
      .join(", ") || "no filter: every task";

  const bulk = async (action: "cancel" | "retry", scope: "selected" | "matching") => {
    const ids = [...selected];
    const question =
      scope === "selected"
        ? `${action} ${ids.length} selected task${ids.length === 1 ? "" : "s"}?`
        : `${action} every task matching (${describeFilter()})?`;
    if (!confirm(question)) return;
    try {
      const result = await postJson<BulkResult>(
        "/tasks/bulk",
        scope === "selected" ? { action, ids } : { action, filter: { ...filter } },
      );
      ctx.notify(
        `${action}: ${result.changed} of ${result.matched} changed` +
          (result.skipped.length
            ? `; skipped ${result.skipped.length} (${[...new Set(result.skipped.map((s) => s.reason))].join(", ")})`
            : ""),
      );
      selected.clear();
      await load();
    } catch (error) {
      ctx.notify(`${action} failed: ${error instanceof Error ? error.message : String(error)}`, "error");
    }
  };

  const drawActions = () => {
    const may = (scope: "cancel" | "submit") => ctx.can(scope);
    fill(
      actions,
      h("span.muted", {}, `${selected.size} selected`),
      may("cancel")
        ? h(
            "button",
            {
              type: "button",
              disabled: selected.size === 0,
              onclick: () => bulk("cancel", "selected"),
              "data-testid": "cancel-selected",
            },
            "Cancel selected",
          )
        : null,
      may("submit")
        ? h(
            "button",
            {
              type: "button",
              disabled: selected.size === 0,
              onclick: () => bulk("retry", "selected"),
              "data-testid": "retry-selected",
            },
            "Retry selected",
          )
        : null,
      may("cancel")
        ? h(
            "button",
            { type: "button", onclick: () => bulk("cancel", "matching"), "data-testid": "cancel-matching" },
            "Cancel all matching",
          )
        : null,
      may("submit")
        ? h(
            "button",
            { type: "button", onclick: () => bulk("retry", "matching"), "data-testid": "retry-matching" },
            "Retry all matching",
          )
        : null,
    );
  };

  const row = (task: Task) => {
    const box = h("input", {
      type: "checkbox",
      checked: selected.has(task.id),
      "aria-label": `select ${task.id}`,
      onchange: () => {
        if (box.checked) selected.add(task.id);
        else selected.delete(task.id);
        drawActions();
      },
    });
    return h(
      "tr",
      { "data-task": task.id, "data-state": task.state },
      h("td", {}, box),
      h("td.mono", {}, link(`/ui/tasks/${task.id}`, shortId(task.id))),
      h("td", {}, badge(task.state)),
      h("td.command", { title: task.command }, h("code", {}, task.command)),
      h("td", {}, task.queue),
      h("td.num", {}, `${task.attempt}/${task.max_attempts}`),
      h("td", { title: task.created_at }, ago(task.created_at)),
      h(
        "td",
        {},
        task.waiting ? h("span.muted", {}, task.waiting.message) : FINAL.has(task.state) ? `exit ${task.exit_code ?? "—"}` : "",
      ),
    );
  };

  const load = async () => {
    let page: Schemas["TaskList"];
    try {
      page = await need(api.GET("/tasks", { params: { query: { ...filter, cursor, limit: 50 } as never } }));
    } catch (error) {
      if (error instanceof ApiFailure && error.status === 400) {
        fill(list, h("p.error", {}, error.message));
        return;
      }
      throw error;
    }
    const all = h("input", {
      type: "checkbox",
      "aria-label": "select all on this page",
      checked: page.tasks.length > 0 && page.tasks.every((t) => selected.has(t.id)),
      onchange: () => {
        for (const task of page.tasks) {
          if (all.checked) selected.add(task.id);
          else selected.delete(task.id);
        }
        void load();
      },
    });
    fill(
      list,
      page.tasks.length === 0
        ? h("p.muted", { "data-testid": "no-tasks" }, "No tasks match.")
        : h(
            "table.tasks",
            {},
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                h("th", {}, all),
                ["id", "state", "command", "queue", "attempt", "created", ""].map((c) => h("th", {}, c)),
              ),
            ),
            h("tbody", {}, page.tasks.map(row)),
          ),
    );
    const query = new URLSearchParams(filter as Record<string, string>);
    const next = new URLSearchParams(query);
    if (page.next_cursor) next.set("cursor", page.next_cursor);
    fill(
      pager,
      cursor ? link(`/ui/tasks${query.size ? `?${query}` : ""}`, "« first page") : null,
      page.next_cursor ? link(`/ui/tasks?${next}`, "next page »") : null,
    );
    drawActions();
  };
  await load();
  ctx.onChange(() => void load());
};
