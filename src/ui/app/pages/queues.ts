// Queues: depth by state, running, the concurrency limit, pause and resume.
import { api, need } from "../api";
import type { Page } from "../context";
import { fill, h, link } from "../dom";

const STATES = ["waiting", "queued", "dispatched", "running", "succeeded", "failed", "timed_out", "cancelled"] as const;

export const queuesPage: Page = async (ctx) => {
  const body = h("div");
  fill(ctx.root, h("h1", {}, "Queues"), body);
  const toggle = async (name: string, paused: boolean) => {
    const verb = paused ? "resume" : "pause";
    if (!confirm(`${verb} queue ${name}?`)) return;
    const call = paused
      ? api.POST("/queues/{name}/resume", { params: { path: { name } } })
      : api.POST("/queues/{name}/pause", { params: { path: { name } } });
    try {
      await need(call);
      ctx.notify(`Queue ${name} ${paused ? "resumed" : "paused"}.`);
    } catch (error) {
      ctx.notify(`${verb} failed: ${error instanceof Error ? error.message : String(error)}`, "error");
    }
    await load();
  };
  const load = async () => {
    const { queues } = await need(api.GET("/queues"));
    fill(
      body,
      queues.length === 0
        ? h("p.muted", {}, "No queues yet.")
        : h(
            "table",
            {},
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                h("th", {}, "queue"),
                h("th", {}, "status"),
                h("th", {}, "running / limit"),
                STATES.map((s) => h("th", {}, s.replace("_", " "))),
                h("th", {}, ""),
              ),
            ),
            h(
              "tbody",
              {},
              queues.map((q) =>
                h(
                  "tr",
                  { "data-queue": q.name },
                  h("td", {}, link(`/ui/tasks?queue=${encodeURIComponent(q.name)}`, q.name)),
                  h(
                    "td",
                    { "data-testid": `queue-status-${q.name}` },
                    q.paused ? h("span.badge.s-paused", {}, "paused") : h("span.badge.s-active", {}, "active"),
                  ),
                  h("td.num", {}, `${q.running} / ${q.concurrency_limit ?? "∞"}`),
                  STATES.map((s) => h("td.num", {}, String(q.depth[s]))),
                  h(
                    "td",
                    {},
                    ctx.can("admin")
                      ? h(
                          "button",
                          { type: "button", onclick: () => toggle(q.name, q.paused), "data-testid": `queue-toggle-${q.name}` },
                          q.paused ? "Resume" : "Pause",
                        )
                      : null,
                  ),
                ),
              ),
            ),
          ),
    );
  };
  await load();
  ctx.onChange(() => void load());
};
