// Overview: tasks by state and queue, throughput and submit-to-start latency over the last
// hour, worker slots used and free; all from the live overview stream.

import { api, need } from "../api";
import { barChart, lineChart } from "../charts";
import type { Overview, Page } from "../context";
import { badge, fill, h, link } from "../dom";

const STATES = ["waiting", "queued", "dispatched", "running", "succeeded", "failed", "timed_out", "cancelled"];

export const overviewPage: Page = async (ctx) => {
  const states = h("section.cards");
  const slots = h("section.slots");
  const throughput = h("figure.panel");
  const latency = h("figure.panel");
  const queues = h("section.panel");
  fill(ctx.root, h("h1", {}, "Overview"), states, slots, h("div.charts", {}, throughput, latency), queues);
  const draw = (o: Overview) => {
    fill(
      states,
      STATES.map((state) =>
        link(
          `/ui/tasks?state=${state}`,
          h("div.card", { "data-testid": `count-${state}` }, badge(state), h("strong", {}, String(o.states[state] ?? 0))),
        ),
      ),
    );
    const pct = o.slots.total ? Math.round((o.slots.used / o.slots.total) * 100) : 0;
    fill(
      slots,
      h("h2", {}, "Worker slots"),
      h("div.meter", { title: `${pct}% used` }, h("div.used", { style: `width:${pct}%` })),
      h(
        "p",
        { "data-testid": "slots" },
        `${o.slots.used} used · ${o.slots.free} free · ${o.slots.total} total on ${o.slots.workers} workers`,
      ),
    );
    const minutes = o.throughput.map((m) => m.minute);
    const ended = o.throughput.reduce((sum, m) => sum + m.succeeded + m.failed + m.other, 0);
    fill(
      throughput,
      h("figcaption", {}, `Throughput: attempts ended per minute (last hour: ${ended})`),
      barChart(minutes, [
        { name: "succeeded", className: "ok", values: o.throughput.map((m) => m.succeeded) },
        { name: "failed", className: "bad", values: o.throughput.map((m) => m.failed) },
        { name: "other", className: "other", values: o.throughput.map((m) => m.other) },
      ]),
      h(
        "p.legend",
        {},
        h("span.ok", {}, "succeeded"),
        h("span.bad", {}, "failed"),
        h("span.other", {}, "timed out, lost, stopped"),
      ),
    );
    fill(
      latency,
      h("figcaption", {}, "Submit-to-start latency per minute (ms)"),
      lineChart(
        minutes,
        o.latency.map((m) => ({ minute: m.minute, values: [m.p50_ms, m.p95_ms] })),
        [
          { name: "p50", className: "p50", values: [] },
          { name: "p95", className: "p95", values: [] },
        ],
        " ms",
      ),
      h("p.legend", {}, h("span.p50", {}, "p50"), h("span.p95", {}, "p95")),
    );
    fill(
      queues,
      h("h2", {}, "By queue"),
      h(
        "table",
        {},
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, "queue"),
            STATES.map((s) => h("th", {}, s.replace("_", " "))),
            h("th", {}, "total"),
          ),
        ),
        h(
          "tbody",
          {},
          o.queues.map((q) =>
            h(
              "tr",
              {},
              h("td", {}, link(`/ui/tasks?queue=${encodeURIComponent(q.queue)}`, q.queue)),
              STATES.map((s) =>
                h(
                  "td.num",
                  {},
                  q.states[s] ? link(`/ui/tasks?queue=${encodeURIComponent(q.queue)}&state=${s}`, String(q.states[s])) : "0",
                ),
              ),
              h("td.num", {}, String(q.total)),
            ),
          ),
        ),
      ),
    );
  };
  // Drawn at once, paused or not; then live.
  draw(await need(api.GET("/overview")));
  ctx.onOverview(draw);
};
