// Workers: each live worker's labels, slots, the tasks it runs, and its last heartbeat.
import { api, need } from "../api";
import type { Page } from "../context";
import { ago, fill, h } from "../dom";

export const workersPage: Page = async (ctx) => {
  const body = h("div");
  fill(ctx.root, h("h1", {}, "Workers"), body);
  const load = async () => {
    const { workers } = await need(api.GET("/workers"));
    fill(
      body,
      workers.length === 0
        ? h("p.muted", {}, "No live workers.")
        : h(
            "table",
            {},
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                ["name", "state", "labels", "slots used", "running tasks", "last heartbeat", "coordinator", "version"].map((c) =>
                  h("th", {}, c),
                ),
              ),
            ),
            h(
              "tbody",
              {},
              workers.map((w) =>
                h(
                  "tr",
                  { "data-worker": w.id },
                  h("td", { title: w.id }, w.name),
                  h("td", {}, w.state),
                  h(
                    "td",
                    {},
                    Object.entries(w.labels).map(([k, v]) => h("span.label", {}, `${k}=${v}`)),
                  ),
                  h(
                    "td",
                    {},
                    h(
                      "div.meter.small",
                      { title: `${w.running}/${w.slots}` },
                      h("div.used", { style: `width:${w.slots ? (w.running / w.slots) * 100 : 0}%` }),
                    ),
                    ` ${w.running}/${w.slots}`,
                  ),
                  h("td.num", {}, String(w.running)),
                  h("td", { title: w.last_heartbeat_at }, ago(w.last_heartbeat_at)),
                  h("td.mono", {}, w.coordinator_id),
                  h("td", {}, w.version),
                ),
              ),
            ),
          ),
    );
  };
  await load();
  // Heartbeats change nothing a task event announces: the overview's ticks redraw too.
  ctx.onOverview(() => void load());
};
