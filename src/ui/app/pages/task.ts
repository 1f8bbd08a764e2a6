// One task: what it is and waits for, its parents and children, the attempts timeline, the
// live log tail, its history (every change with who made it), cancel and retry. Live: the
// task's own event stream (GET /tasks/:id/events) and its log (GET /tasks/:id/logs?follow=1).
import { api, need, postJson, type Schemas } from "../api";
import type { PageContext } from "../context";
import { ago, badge, duration, fill, h, link, shortId, time } from "../dom";
import { eventSource, live } from "../live";

type Task = Schemas["Task"];
type Attempt = Schemas["Attempt"];

const FINAL = new Set(["succeeded", "failed", "timed_out", "cancelled"]);

export const taskPage = async (ctx: PageContext, id: string): Promise<void> => {
  const top = h("section");
  const logSection = h("section.panel");
  const logStatus = h("span.muted", { "data-testid": "log-status" });
  const logView = h("pre.log", { "data-testid": "log" });
  const attemptsSection = h("section.panel");
  const historySection = h("section.panel");
  fill(logSection, h("h2", {}, "Log ", logStatus), logView);
  fill(ctx.root, top, logSection, attemptsSection, historySection);

  let task = await need(api.GET("/tasks/{id}", { params: { path: { id } } }));
  let attempts: Attempt[] = [];

  // The log: the attempt it shows, how far it has read (the next offset), and whether the
  // server's log API answered at all (until it does, the attempts' stored tails are shown).
  const log = { attempt: 0, offset: 0, ended: false, streaming: false, unavailable: false, stop: null as (() => void) | null };

  const act = async (action: "cancel" | "retry") => {
    if (!confirm(`${action} task ${shortId(task.id)}?`)) return;
    try {
      task = await postJson<Task>(`/tasks/${encodeURIComponent(task.id)}/${action}`);
      ctx.notify(`${action === "cancel" ? "Cancelled" : "Queued again"}: ${shortId(task.id)}`);
      await refresh();
    } catch (error) {
      ctx.notify(`${action} failed: ${error instanceof Error ? error.message : String(error)}`, "error");
    }
  };

  const edges = (title: string, list: Task["parents"]) =>
    list?.length
      ? h(
          "div",
          {},
          h("h3", {}, title),
          h(
            "ul.edges",
            {},
            list.map((e) =>
              h("li", {}, link(`/ui/tasks/${e.id}`, shortId(e.id)), " ", e.ref ? `(${e.ref}) ` : "", badge(e.state)),
            ),
          ),
        )
      : null;

  const drawTop = () => {
    const final = FINAL.has(task.state);
    const facts: [string, unknown][] = [
      ["queue", link(`/ui/tasks?queue=${encodeURIComponent(task.queue)}`, task.queue)],
      ["priority", task.priority],
      ["attempt", `${task.attempt} of ${task.max_attempts}`],
      ["created", time(task.created_at)],
      ["scheduled at", time(task.scheduled_at)],
      ["runs at", time(task.run_at)],
      ["started", time(task.started_at)],
      ["finished", time(task.completed_at ?? task.failed_at ?? task.cancelled_at)],
      ["exit code", task.exit_code ?? "—"],
      ["worker", task.worker_id ?? "—"],
      ["timeout", task.timeout_ms ? duration(task.timeout_ms) : "none"],
      [
        "concurrency key",
        task.concurrency
          ? link(
              `/ui/tasks?key=${encodeURIComponent(task.concurrency.key)}`,
              `${task.concurrency.key} (max ${task.concurrency.max})`,
            )
          : "—",
      ],
      ["rate limit", task.rate_limit ?? "—"],
      ["schedule", task.schedule_id ? link(`/ui/tasks?schedule_id=${task.schedule_id}`, task.schedule_id) : "—"],
      ["requires", task.require.length ? task.require.map((r) => `${r.key}${r.op ?? ""}${r.value ?? ""}`).join(", ") : "—"],
      ["error", task.error ?? "—"],
    ];
    fill(
      top,
      h("h1", {}, "Task ", h("span.mono", {}, task.id), " ", h("span", { "data-testid": "task-state" }, badge(task.state))),
      h("pre.command", {}, task.command),
      h(
        "div.actions",
        {},
        !final && ctx.can("cancel")
          ? h("button.danger", { type: "button", onclick: () => act("cancel"), "data-testid": "cancel" }, "Cancel")
          : null,
        final && ctx.can("submit")
          ? h("button", { type: "button", onclick: () => act("retry"), "data-testid": "retry" }, "Retry")
          : null,
      ),
      task.waiting ? h("p.waiting", { "data-testid": "waiting" }, `Waiting: ${task.waiting.message}`) : null,
      h(
        "dl.facts",
        {},
        facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v as Node | string)]),
      ),
      h("div.edges-wrap", {}, edges("Parents", task.parents), edges("Children", task.children)),
    );
  };

  const drawAttempts = () => {
    if (attempts.length === 0) return fill(attemptsSection, h("h2", {}, "Attempts"), h("p.muted", {}, "Not dispatched yet."));
    const t = (iso: string | null | undefined) => (iso ? new Date(iso).getTime() : null);
    const start = Math.min(...attempts.map((a) => t(a.dispatched_at)!));
    const end = Math.max(Date.now() - 0, ...attempts.map((a) => t(a.finished_at) ?? Date.now()));
    const span = Math.max(1, end - start);
    const pct = (ms: number) => `${(((ms - start) / span) * 100).toFixed(2)}%`;
    fill(
      attemptsSection,
      h("h2", {}, "Attempts"),
      h(
        "ol.timeline",
        {},
        attempts.map((a) => {
          const dispatched = t(a.dispatched_at)!;
          const started = t(a.started_at);
          const finished = t(a.finished_at) ?? Date.now();
          return h(
            "li",
            { "data-attempt": a.attempt },
            h(
              "div.what",
              {},
              `#${a.attempt} `,
              a.outcome ? badge(a.outcome) : badge("running"),
              ` on ${a.worker_id}`,
              a.exit_code !== null ? ` · exit ${a.exit_code}` : "",
              a.signal ? ` · ${a.signal}` : "",
              a.error ? ` · ${a.error}` : "",
            ),
            h(
              "div.track",
              {},
              h("div.wait", {
                style: `left:${pct(dispatched)};width:calc(${pct(started ?? finished)} - ${pct(dispatched)})`,
                title: "dispatched, not started",
              }),
              started
                ? h("div.run", { style: `left:${pct(started)};width:calc(${pct(finished)} - ${pct(started)})`, title: "running" })
                : null,
            ),
            h("div.when", {}, "dispatched ", ago(a.dispatched_at), started ? ` · ran ${duration(finished - started)}` : ""),
          );
        }),
      ),
    );
  };

  const drawHistory = async () => {
    const page = await need(api.GET("/tasks/{id}/history", { params: { path: { id }, query: { limit: 200 } } }));
    fill(
      historySection,
      h("h2", {}, "History"),
      h(
        "table.history",
        {},
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["at", "event", "state", "attempt", "by", "detail"].map((c) => h("th", {}, c)),
          ),
        ),
        h(
          "tbody",
          {},
          page.events.map((e) =>
            h(
              "tr",
              {},
              h("td", {}, time(e.at)),
              h("td", {}, e.kind),
              h("td", {}, badge(e.state)),
              h("td.num", {}, e.attempt),
              h("td", {}, e.actor ?? "—"),
              h("td.detail", {}, e.detail ? JSON.stringify(e.detail) : ""),
            ),
          ),
        ),
      ),
    );
  };

  /** The attempts' stored output tails: what is shown when the log API is not there. */
  const drawStoredTail = () => {
    const last = attempts.at(-1);
    logView.textContent = last ? `${last.stdout ?? ""}${last.stderr ?? ""}` : "";
    logStatus.textContent = last ? "(stored tail of the last attempt)" : "(no output yet)";
  };

  const followLog = () => {
    if (log.unavailable || task.attempt < 1) return drawStoredTail();
    if (log.attempt !== task.attempt) {
      log.stop?.();
      log.stop = null;
      log.attempt = task.attempt;
      log.offset = 0;
      log.ended = false;
      logView.textContent = "";
    }
    if (log.ended || log.stop) return;
    logStatus.textContent = `(attempt ${log.attempt}, live)`;
    log.stop = live.add(
      eventSource(
        () => `/tasks/${encodeURIComponent(id)}/logs?stream=both&follow=1&attempt=${log.attempt}&offset=${log.offset}`,
        {
          log: (event) => {
            const chunk = JSON.parse(event.data) as { stream: string; offset: number; data: string };
            logView.append(chunk.stream === "stderr" ? h("span.stderr", {}, chunk.data) : chunk.data);
            log.offset = Number(event.lastEventId) || chunk.offset + new TextEncoder().encode(chunk.data).length;
            logView.scrollTop = logView.scrollHeight;
          },
          end: (event) => {
            const end = JSON.parse(event.data) as { state: string; exit_code: number | null; truncated: number };
            log.ended = true;
            log.stop?.();
            log.stop = null;
            logStatus.textContent = `(attempt ${log.attempt}, ended: ${end.state}${end.exit_code !== null ? `, exit ${end.exit_code}` : ""}${end.truncated ? `, ${end.truncated} bytes cut` : ""})`;
          },
          error: (event) => {
            // A stream that never opened (the log API answered an error, or is not there):
            // EventSource gives up; show what the attempts stored.
            const source = event.target as EventSource;
            if (source.readyState === EventSource.CLOSED && log.offset === 0 && !log.ended) {
              log.unavailable = true;
              log.stop?.();
              log.stop = null;
              drawStoredTail();
            }
          },
        },
      ),
    );
  };

  const refresh = async () => {
    task = await need(api.GET("/tasks/{id}", { params: { path: { id } } }));
    attempts = (await need(api.GET("/tasks/{id}/attempts", { params: { path: { id } } }))).attempts;
    drawTop();
    drawAttempts();
    followLog();
    await drawHistory();
  };

  attempts = (await need(api.GET("/tasks/{id}/attempts", { params: { path: { id } } }))).attempts;
  drawTop();
  drawAttempts();
  followLog();
  await drawHistory();

  // Every change of the task, live: reread it (a burst of events costs one read).
  let pending = false;
  live.add(
    eventSource(() => `/tasks/${encodeURIComponent(id)}/events`, {
      task: () => {
        if (pending) return;
        pending = true;
        setTimeout(() => {
          pending = false;
          void refresh().catch((error) => ctx.notify(String(error), "error"));
        }, 100);
      },
    }),
  );
};
