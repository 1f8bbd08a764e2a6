// Schedules: next fire times, recent and missed firings, pause, resume and trigger.
import { api, need, type Schemas } from "../api";
import type { Page } from "../context";
import { ago, badge, fill, h, link, shortId, time } from "../dom";

type Schedule = Schemas["Schedule"];

export const schedulesPage: Page = async (ctx) => {
  const body = h("div");
  fill(ctx.root, h("h1", {}, "Schedules"), body);
  const act = async (schedule: Schedule, verb: "pause" | "resume" | "trigger") => {
    if (!confirm(`${verb} schedule ${schedule.name}?`)) return;
    const path = { params: { path: { id: schedule.id } } };
    try {
      if (verb === "pause") await need(api.POST("/schedules/{id}/pause", path));
      else if (verb === "resume") await need(api.POST("/schedules/{id}/resume", path));
      else await need(api.POST("/schedules/{id}/trigger", path));
      ctx.notify(`Schedule ${schedule.name}: ${verb} done.`);
    } catch (error) {
      ctx.notify(`${verb} failed: ${error instanceof Error ? error.message : String(error)}`, "error");
    }
    await load();
  };
  const card = (s: Schedule) => {
    const missed = s.firings.filter((f) => f.outcome === "missed").length + s.missed_unrecorded;
    return h(
      "article.panel.schedule",
      { "data-schedule": s.id },
      h("h2", {}, s.name, " ", s.paused ? h("span.badge.s-paused", {}, "paused") : h("span.badge.s-active", {}, "active")),
      h(
        "p",
        {},
        s.cron ? `cron ${s.cron}` : `every ${s.every}`,
        ` · ${s.time_zone} · overlap ${s.overlap} · `,
        link(`/ui/tasks?schedule_id=${s.id}`, "its tasks"),
      ),
      h("pre.command", {}, String(s.task.command ?? "")),
      h(
        "div.actions",
        {},
        ctx.can("submit")
          ? [
              s.paused
                ? h("button", { type: "button", onclick: () => act(s, "resume") }, "Resume")
                : h("button", { type: "button", onclick: () => act(s, "pause") }, "Pause"),
              h("button", { type: "button", onclick: () => act(s, "trigger") }, "Trigger now"),
            ]
          : null,
      ),
      h(
        "div.columns",
        {},
        h(
          "div",
          {},
          h("h3", {}, "Next fires"),
          h(
            "ul",
            {},
            s.upcoming.map((at) => h("li", {}, time(at), ` (${ago(at)})`)),
          ),
        ),
        h(
          "div",
          {},
          h("h3", {}, `Recent firings${missed ? ` · ${missed} missed` : ""}`),
          s.firings.length === 0
            ? h("p.muted", {}, "None yet.")
            : h(
                "ul",
                {},
                s.firings.map((f) =>
                  h(
                    "li",
                    {},
                    time(f.fire_at),
                    " ",
                    badge(f.outcome),
                    f.task_id ? [" ", link(`/ui/tasks/${f.task_id}`, shortId(f.task_id))] : "",
                    f.reason ? ` ${f.reason}` : "",
                  ),
                ),
              ),
        ),
      ),
    );
  };
  const load = async () => {
    const { schedules } = await need(api.GET("/schedules", { params: { query: { limit: 100 } } }));
    fill(body, schedules.length === 0 ? h("p.muted", {}, "No schedules.") : schedules.map(card));
  };
  await load();
  ctx.onChange(() => void load());
};
