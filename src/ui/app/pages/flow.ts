// Flow control in use: the named rate limits and the concurrency keys with live or queued tasks.
import { api, need } from "../api";
import type { Page } from "../context";
import { fill, h, link } from "../dom";

export const flowPage: Page = async (ctx) => {
  const limits = h("section.panel");
  const keys = h("section.panel");
  fill(ctx.root, h("h1", {}, "Rate limits & concurrency keys"), limits, keys);
  const load = async () => {
    const [{ rate_limits }, { keys: inUse }] = await Promise.all([
      need(api.GET("/rate-limits")),
      need(api.GET("/concurrency-keys")),
    ]);
    fill(
      limits,
      h("h2", {}, "Rate limits"),
      rate_limits.length === 0
        ? h("p.muted", {}, "No rate limits.")
        : h(
            "table",
            {},
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                ["name", "rate", "burst", "tokens / s"].map((c) => h("th", {}, c)),
              ),
            ),
            h(
              "tbody",
              {},
              rate_limits.map((r) =>
                h(
                  "tr",
                  {},
                  h("td", {}, r.name),
                  h("td", {}, r.rate),
                  h("td.num", {}, String(r.burst)),
                  h("td.num", {}, r.tokens_per_second.toFixed(2)),
                ),
              ),
            ),
          ),
    );
    fill(
      keys,
      h("h2", {}, "Concurrency keys in use"),
      inUse.length === 0
        ? h("p.muted", {}, "No key has live or queued tasks.")
        : h(
            "table",
            {},
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                ["key", "live / max", "queued"].map((c) => h("th", {}, c)),
              ),
            ),
            h(
              "tbody",
              {},
              inUse.map((k) =>
                h(
                  "tr",
                  {},
                  h("td", {}, link(`/ui/tasks?key=${encodeURIComponent(k.key)}`, k.key)),
                  h("td.num", {}, `${k.live} / ${k.max ?? "—"}`),
                  h("td.num", {}, String(k.queued)),
                ),
              ),
            ),
          ),
    );
  };
  await load();
  ctx.onChange(() => void load());
};
