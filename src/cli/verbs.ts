// The CLI's verbs: each its options (node:util parseArgs), its help, and what it does through
// the typed client (src/client). The README's "CLI" section lists them; `tq <verb> --help`
// prints the same text as here.
import type { ParseArgsConfig } from "node:util";
import { runTokenCommand, TOKEN_USAGE } from "../../scripts/token";
import type { Schemas } from "../client";
import { CliError, type Context, call, EXIT, fetchApi, usageError } from "./context";
import { eventLine, FINAL_STATES, parseAt, table, taskDetails, taskExitCode, taskTable } from "./format";
import { follow } from "./stream";

type Options = NonNullable<ParseArgsConfig["options"]>;
type Values = Record<string, string | boolean | string[] | undefined>;
type Task = Schemas["Task"];
type TaskEvent = Schemas["TaskEvent"];

export interface Verb {
  name: string;
  summary: string;
  /** The help text after the usage line(s). */
  help: string;
  usage: string;
  options: Options;
  /** Does not talk to the API (no URL or token needed). */
  offline?: boolean;
  run(ctx: Context, values: Values, positionals: string[]): Promise<number>;
}

const str = (values: Values, key: string): string | undefined => values[key] as string | undefined;

function integer(values: Values, key: string, min: number, max: number): number | undefined {
  const raw = str(values, key);
  if (raw === undefined) return undefined;
  if (!/^[+-]?\d+$/.test(raw.trim()) || Number(raw) < min || Number(raw) > max) {
    throw usageError(`--${key} must be an integer from ${min} to ${max}, not ${JSON.stringify(raw)}`);
  }
  return Number(raw);
}

function oneId(positionals: string[], what = "a task id"): string {
  if (positionals.length === 0) throw usageError(`${what} is required`);
  if (positionals.length > 1) throw usageError(`expected one id, got ${positionals.length}: ${positionals.join(" ")}`);
  return positionals[0] as string;
}

function printJson(ctx: Context, value: unknown): void {
  ctx.out(JSON.stringify(value, null, 2));
}

const TASK_FILTERS: Options = {
  state: { type: "string" },
  queue: { type: "string" },
  schedule: { type: "string" },
};

function taskFilter(values: Values) {
  return {
    ...(str(values, "state") !== undefined ? { state: str(values, "state") as Task["state"] } : {}),
    ...(str(values, "queue") !== undefined ? { queue: str(values, "queue") } : {}),
    ...(str(values, "schedule") !== undefined ? { schedule_id: str(values, "schedule") } : {}),
  };
}

const hasFilter = (values: Values) => ["state", "queue", "schedule"].some((key) => values[key] !== undefined);

/**
 * Follows a task's events until it is final. Prints each event (`lines`), and returns the
 * task as its final event read it.
 */
async function followTask(ctx: Context, id: string, lines: boolean): Promise<Task> {
  let last: Task | null = null;
  for await (const message of follow(ctx, `/tasks/${encodeURIComponent(id)}/events`, {
    isLast: (message) => {
      const update = JSON.parse(message.data) as TaskEvent;
      return FINAL_STATES.has(update.event?.state ?? update.state);
    },
  })) {
    if (message.event !== "task") continue;
    const update = JSON.parse(message.data) as TaskEvent;
    const { event, ...task } = update;
    last = task as Task;
    if (lines) {
      if (event) ctx.out(eventLine(event));
      else ctx.out(`${new Date().toISOString()}  now         ${task.state.padEnd(10)}  attempt ${task.attempt}`);
    }
  }
  // Resumed after the final event (204): the task as it is.
  if (last === null || !FINAL_STATES.has(last.state)) {
    last = await call(ctx, ctx.api.GET("/tasks/{id}", { params: { path: { id } } }));
  }
  return last;
}

/** A finished task's output tails, to stdout and stderr, as the command wrote them. */
function writeOutput(task: Task): void {
  if (task.stdout) process.stdout.write(task.stdout);
  if (task.stderr) process.stderr.write(task.stderr);
}

const submit: Verb = {
  name: "submit",
  summary: "submit a shell command (--wait: run it to the end and exit with its exit code)",
  usage: "tq submit [options] [--] COMMAND...",
  help: `The command words are joined with spaces and run with sh -c. Quote it, or put it after --,
when it has options of its own: tq submit -- ls -la /tmp

  --at TIME            run at TIME: RFC 3339 (2026-12-01T12:00:00Z) or from now (+30s, +5m, +2h, +1d)
  --queue NAME         the task's queue (default: default)
  --priority N         -1000..1000, higher first (default 0)
  --env KEY=VALUE      an environment variable (repeatable)
  --cwd DIR            working directory on the worker
  --timeout-ms N       kill it after N ms (0: no timeout)
  --max-attempts N     attempts in all, retries included
  --idempotency-key K  a repeat with the same key returns the original task
  --wait               follow it until it finishes, print its output (stdout and stderr tails),
                       and exit with its exit code (see tq --help for the codes of other endings)

Prints the new task's id (with --json, the task).`,
  options: {
    at: { type: "string" },
    queue: { type: "string" },
    priority: { type: "string" },
    env: { type: "string", multiple: true },
    cwd: { type: "string" },
    "timeout-ms": { type: "string" },
    "max-attempts": { type: "string" },
    "idempotency-key": { type: "string" },
    wait: { type: "boolean" },
  },
  async run(ctx, values, positionals) {
    const command = positionals.join(" ");
    if (command.trim() === "") throw usageError("a command is required: tq submit 'echo hello'");
    const env: Record<string, string> = {};
    for (const entry of (values.env as string[] | undefined) ?? []) {
      const eq = entry.indexOf("=");
      if (eq <= 0) throw usageError(`--env must be KEY=VALUE, not ${JSON.stringify(entry)}`);
      env[entry.slice(0, eq)] = entry.slice(eq + 1);
    }
    const at = str(values, "at");
    const body = {
      command,
      ...(at !== undefined ? { scheduled_at: parseAt(at) } : {}),
      ...(str(values, "queue") !== undefined ? { queue: str(values, "queue") } : {}),
      ...(values.priority !== undefined ? { priority: integer(values, "priority", -1000, 1000) } : {}),
      ...(Object.keys(env).length > 0 ? { env } : {}),
      ...(str(values, "cwd") !== undefined ? { cwd: str(values, "cwd") } : {}),
      ...(values["timeout-ms"] !== undefined ? { timeout_ms: integer(values, "timeout-ms", 0, 604_800_000) } : {}),
      ...(values["max-attempts"] !== undefined ? { max_attempts: integer(values, "max-attempts", 1, 100) } : {}),
    };
    const key = str(values, "idempotency-key");
    const task = await call(
      ctx,
      ctx.api.POST("/tasks", { body, ...(key !== undefined ? { headers: { "idempotency-key": key } } : {}) }),
    );
    if (!values.wait) {
      if (ctx.json) printJson(ctx, task);
      else ctx.out(task.id);
      return EXIT.ok;
    }
    if (!ctx.json) ctx.err(`tq: submitted ${task.id}, waiting for it to finish`);
    const final = await followTask(ctx, task.id, false);
    if (ctx.json) printJson(ctx, final);
    else {
      writeOutput(final);
      if (final.state !== "succeeded") ctx.err(`tq: task ${final.id} ${final.state}${final.error ? `: ${final.error}` : ""}`);
    }
    return taskExitCode(final);
  },
};

const status: Verb = {
  name: "status",
  summary: "show a task",
  usage: "tq status TASK_ID",
  help: "Prints the task's state, attempts, times and result (with --json, the API's task view).",
  options: {},
  async run(ctx, _values, positionals) {
    const id = oneId(positionals);
    const task = await call(ctx, ctx.api.GET("/tasks/{id}", { params: { path: { id } } }));
    if (ctx.json) printJson(ctx, task);
    else ctx.out(taskDetails(task));
    return EXIT.ok;
  },
};

const list: Verb = {
  name: "list",
  summary: "list tasks, newest first",
  usage: "tq list [--state STATE] [--queue NAME] [--schedule ID] [--limit N] [--cursor C] [--all]",
  help: `  --state STATE    waiting, queued, dispatched, running, succeeded, failed, timed_out, cancelled
  --queue NAME     only this queue's tasks
  --schedule ID    only the tasks this schedule created
  --limit N        page size, 1..500 (default 50)
  --cursor C       the page after the one that printed C
  --all            every page

With --json: {"tasks": [...], "next_cursor": ...} (with --all, every task and next_cursor null).`,
  options: { ...TASK_FILTERS, limit: { type: "string" }, cursor: { type: "string" }, all: { type: "boolean" } },
  async run(ctx, values) {
    const limit = integer(values, "limit", 1, 500);
    const tasks: Task[] = [];
    let cursor = str(values, "cursor");
    let next: string | null = null;
    do {
      const page = await call(
        ctx,
        ctx.api.GET("/tasks", {
          params: { query: { ...taskFilter(values), ...(limit ? { limit } : {}), ...(cursor ? { cursor } : {}) } },
        }),
      );
      tasks.push(...page.tasks);
      next = page.next_cursor;
      cursor = next ?? undefined;
    } while (values.all && next !== null);
    if (ctx.json) {
      printJson(ctx, { tasks, next_cursor: values.all ? null : next });
      return EXIT.ok;
    }
    if (tasks.length === 0) ctx.err("tq: no tasks");
    else ctx.out(taskTable(tasks));
    if (next !== null && !values.all) ctx.err(`tq: more: tq list --cursor ${next} (or --all)`);
    return EXIT.ok;
  },
};

const watch: Verb = {
  name: "watch",
  summary: "follow a task's events live until it finishes; exits with its exit code",
  usage: "tq watch TASK_ID",
  help: `Prints the task's state now, then one line per event (time, kind, state, attempt, worker,
actor, detail) as it happens, until the task is final. A dropped connection is resumed where it
left off (Last-Event-ID). Exits with the task's exit code, as submit --wait.
With --json: one JSON object per line, each the API's TaskEvent.`,
  options: {},
  async run(ctx, _values, positionals) {
    const id = oneId(positionals);
    if (ctx.json) {
      let last: Task | null = null;
      for await (const message of follow(ctx, `/tasks/${encodeURIComponent(id)}/events`, {
        isLast: (message) => {
          const update = JSON.parse(message.data) as TaskEvent;
          return FINAL_STATES.has(update.event?.state ?? update.state);
        },
      })) {
        if (message.event !== "task") continue;
        ctx.out(message.data);
        last = JSON.parse(message.data) as Task;
      }
      return last ? taskExitCode(last) : EXIT.ok;
    }
    const final = await followTask(ctx, id, true);
    return taskExitCode(final);
  },
};

interface LogEnd {
  attempt: number;
  state: string;
  exit_code: number | null;
  truncated: number;
}

const logs: Verb = {
  name: "logs",
  summary: "print a task's output (-f: follow it live until the attempt ends)",
  usage: "tq logs [-f] [--stream stdout|stderr|both] [--attempt K] [--offset N] TASK_ID",
  help: `Prints what the task's attempt wrote, stdout to stdout and stderr to stderr, from byte
--offset (default 0) of the chosen stream (default both, merged in the order written), of
--attempt K (default the latest).
  -f, --follow   keep printing as the task writes, until its attempt ends; a dropped
                 connection resumes from the last offset received
With --json: one JSON object per chunk ({"stream","offset","data"}), and with -f a last
{"end": {...}} line.`,
  options: {
    follow: { type: "boolean", short: "f" },
    stream: { type: "string" },
    attempt: { type: "string" },
    offset: { type: "string" },
  },
  async run(ctx, values, positionals) {
    const id = oneId(positionals);
    const stream = str(values, "stream") ?? "both";
    if (!["stdout", "stderr", "both"].includes(stream))
      throw usageError(`--stream must be stdout, stderr or both, not ${JSON.stringify(stream)}`);
    const query = new URLSearchParams({ stream });
    const attempt = integer(values, "attempt", 1, 1_000_000);
    const offset = integer(values, "offset", 0, Number.MAX_SAFE_INTEGER);
    if (attempt !== undefined) query.set("attempt", String(attempt));
    if (offset !== undefined) query.set("offset", String(offset));
    const path = `/tasks/${encodeURIComponent(id)}/logs`;
    if (!values.follow) {
      const response = await fetchApi(ctx, `${path}?${query}`);
      const text = await response.text();
      if (ctx.json) {
        printJson(ctx, {
          attempt: Number(response.headers.get("tq-log-attempt")),
          offset: Number(response.headers.get("tq-log-offset")),
          next_offset: Number(response.headers.get("tq-log-next-offset")),
          complete: response.headers.get("tq-log-complete") === "true",
          truncated: Number(response.headers.get("tq-log-truncated") ?? 0),
          data: text,
        });
      } else process.stdout.write(text);
      return EXIT.ok;
    }
    query.set("follow", "1");
    let end: LogEnd | null = null;
    for await (const message of follow(ctx, `${path}?${query}`, { isLast: (message) => message.event === "end" })) {
      if (message.event === "end") {
        end = JSON.parse(message.data) as LogEnd;
        if (ctx.json) ctx.out(JSON.stringify({ end }));
        continue;
      }
      if (message.event !== "log") continue;
      if (ctx.json) {
        ctx.out(message.data);
        continue;
      }
      const chunk = JSON.parse(message.data) as { stream: "stdout" | "stderr"; data: string };
      (chunk.stream === "stderr" ? process.stderr : process.stdout).write(chunk.data);
    }
    if (end && end.truncated > 0 && !ctx.json)
      ctx.err(`tq: ${end.truncated} bytes of this attempt's output were cut (TQ_LOG_MAX_BYTES)`);
    return EXIT.ok;
  },
};

/** cancel and retry: one task by its route, several (or a filter) by POST /tasks/bulk. */
function stateAction(action: "cancel" | "retry"): Verb {
  const what = action === "cancel" ? "cancel tasks that have not finished" : "queue finished tasks again for one more attempt";
  return {
    name: action,
    summary: what,
    usage: `tq ${action} TASK_ID... | tq ${action} [--state STATE] [--queue NAME] [--schedule ID]`,
    help: `${action === "cancel" ? "Cancels a waiting, queued or running task (a running one's process is stopped)." : "Queues a task in a final state (succeeded, failed, timed_out, cancelled) again, due now, for one more attempt."}
One id: the task's own route (exit ${EXIT.conflict} when ${action === "cancel" ? "it already finished" : "it has not finished"}).
Several ids, or the filters of tq list instead: every matching task, in bulk; prints how many
were ${action === "cancel" ? "cancelled" : "retried"} and why the others were skipped (exit ${EXIT.conflict} when none changed and some were skipped).
Recorded in each task's history with your token's name.`,
    options: { ...TASK_FILTERS },
    async run(ctx, values, positionals) {
      if (positionals.length > 0 && hasFilter(values)) throw usageError("give task ids or filters, not both");
      if (positionals.length === 1) {
        const id = positionals[0] as string;
        const params = { params: { path: { id } } };
        const task = await call(
          ctx,
          action === "cancel" ? ctx.api.POST("/tasks/{id}/cancel", params) : ctx.api.POST("/tasks/{id}/retry", params),
        );
        if (ctx.json) printJson(ctx, task);
        else ctx.out(`${task.id} ${task.state}`);
        return EXIT.ok;
      }
      if (positionals.length === 0 && !hasFilter(values)) {
        throw usageError(`name the tasks to ${action}: ids, or --state/--queue/--schedule`);
      }
      const body = positionals.length > 0 ? { action, ids: positionals } : { action, filter: taskFilter(values) };
      const outcome = await call(ctx, ctx.api.POST("/tasks/bulk", { body }));
      if (ctx.json) printJson(ctx, outcome);
      else {
        ctx.out(`${action === "cancel" ? "cancelled" : "retried"} ${outcome.changed} of ${outcome.matched}`);
        for (const skipped of outcome.skipped) ctx.err(`tq: skipped ${skipped.id}: ${skipped.reason}`);
        if (outcome.skipped.length < outcome.matched - outcome.changed) {
          ctx.err(`tq: and ${outcome.matched - outcome.changed - outcome.skipped.length} more skipped`);
        }
      }
      return outcome.changed === 0 && outcome.matched > 0 ? EXIT.conflict : EXIT.ok;
    },
  };
}

const workers: Verb = {
  name: "workers",
  summary: "list live workers",
  usage: "tq workers",
  help: "Every live worker, on every coordinator: its slots, tasks held, labels and last heartbeat.",
  options: {},
  async run(ctx) {
    const { workers } = await call(ctx, ctx.api.GET("/workers"));
    if (ctx.json) printJson(ctx, { workers });
    else if (workers.length === 0) ctx.err("tq: no live workers");
    else {
      ctx.out(
        table(
          ["ID", "NAME", "STATE", "SLOTS", "RUNNING", "LABELS", "LAST HEARTBEAT"],
          workers.map((w) => [
            w.id,
            w.name,
            w.state,
            String(w.slots),
            String(w.running),
            Object.entries(w.labels)
              .map(([k, v]) => `${k}=${v}`)
              .join(",") || "-",
            w.last_heartbeat_at,
          ]),
        ),
      );
    }
    return EXIT.ok;
  },
};

const queues: Verb = {
  name: "queues",
  summary: "list queues; pause or resume one",
  usage: "tq queues [list] | tq queues pause NAME | tq queues resume NAME",
  help: `list     every queue with its depth by state, running count, limit and whether it is paused
pause    stop dispatching the queue's tasks (running ones carry on); needs an admin token
resume   dispatch them again`,
  options: {},
  async run(ctx, _values, positionals) {
    const [sub = "list", ...rest] = positionals;
    if (sub === "list") {
      if (rest.length > 0) throw usageError(`tq queues list takes no arguments, got ${rest.join(" ")}`);
      const { queues } = await call(ctx, ctx.api.GET("/queues"));
      if (ctx.json) printJson(ctx, { queues });
      else if (queues.length === 0) ctx.err("tq: no queues");
      else {
        ctx.out(
          table(
            ["NAME", "PAUSED", "LIMIT", "RUNNING", "QUEUED", "WAITING", "FAILED", "SUCCEEDED"],
            queues.map((q) => [
              q.name,
              q.paused ? "yes" : "no",
              q.concurrency_limit === null ? "-" : String(q.concurrency_limit),
              String(q.running),
              String(q.depth.queued),
              String(q.depth.waiting),
              String(q.depth.failed),
              String(q.depth.succeeded),
            ]),
          ),
        );
      }
      return EXIT.ok;
    }
    if (sub !== "pause" && sub !== "resume")
      throw usageError(`unknown queues command ${JSON.stringify(sub)}: list, pause or resume`);
    const name = oneId(rest, "a queue name");
    const params = { params: { path: { name } } };
    const queue = await call(
      ctx,
      sub === "pause" ? ctx.api.POST("/queues/{name}/pause", params) : ctx.api.POST("/queues/{name}/resume", params),
    );
    if (ctx.json) printJson(ctx, queue);
    else ctx.out(`${queue.name} ${queue.paused ? "paused" : "resumed"}`);
    return EXIT.ok;
  },
};

const schedules: Verb = {
  name: "schedules",
  summary: "create, list, pause, resume or trigger recurring schedules",
  usage: `tq schedules create --name NAME (--cron "*/5 * * * *" | --every 90s) [options] [--] COMMAND...
tq schedules list [--limit N] [--cursor C]
tq schedules pause|resume|trigger ID_OR_NAME`,
  help: `create options:
  --name NAME          unique name
  --cron PATTERN       a cron pattern (5 or 6 fields), read in --time-zone
  --every DURATION     a fixed interval instead ("90s", "5m", "1h")
  --time-zone ZONE     IANA zone for --cron (default UTC)
  --overlap POLICY     what a firing does while the last one runs: allow, skip, buffer_one, cancel_previous
  --queue NAME, --priority N, --timeout-ms N, --max-attempts N, --env KEY=VALUE: the task each firing creates
  --paused             create it paused
trigger  fires the schedule now, once (prints the firing)`,
  options: {
    name: { type: "string" },
    cron: { type: "string" },
    every: { type: "string" },
    "time-zone": { type: "string" },
    overlap: { type: "string" },
    queue: { type: "string" },
    priority: { type: "string" },
    "timeout-ms": { type: "string" },
    "max-attempts": { type: "string" },
    env: { type: "string", multiple: true },
    paused: { type: "boolean" },
    limit: { type: "string" },
    cursor: { type: "string" },
  },
  async run(ctx, values, positionals) {
    const [sub, ...rest] = positionals;
    if (sub === "create") {
      const name = str(values, "name");
      if (!name) throw usageError("--name is required");
      const command = rest.join(" ");
      if (command.trim() === "") throw usageError("a command is required: tq schedules create --name N --every 1m 'echo hi'");
      const env: Record<string, string> = {};
      for (const entry of (values.env as string[] | undefined) ?? []) {
        const eq = entry.indexOf("=");
        if (eq <= 0) throw usageError(`--env must be KEY=VALUE, not ${JSON.stringify(entry)}`);
        env[entry.slice(0, eq)] = entry.slice(eq + 1);
      }
      const task = {
        command,
        ...(str(values, "queue") !== undefined ? { queue: str(values, "queue") } : {}),
        ...(values.priority !== undefined ? { priority: integer(values, "priority", -1000, 1000) } : {}),
        ...(values["timeout-ms"] !== undefined ? { timeout_ms: integer(values, "timeout-ms", 0, 604_800_000) } : {}),
        ...(values["max-attempts"] !== undefined ? { max_attempts: integer(values, "max-attempts", 1, 100) } : {}),
        ...(Object.keys(env).length > 0 ? { env } : {}),
      };
      const body = {
        name,
        task,
        ...(str(values, "cron") !== undefined ? { cron: str(values, "cron") } : {}),
        ...(str(values, "every") !== undefined ? { every: str(values, "every") } : {}),
        ...(str(values, "time-zone") !== undefined ? { time_zone: str(values, "time-zone") } : {}),
        ...(str(values, "overlap") !== undefined ? { overlap: str(values, "overlap") } : {}),
        ...(values.paused ? { paused: true } : {}),
      } as Schemas["ScheduleCreateInput"];
      const schedule = await call(ctx, ctx.api.POST("/schedules", { body }));
      if (ctx.json) printJson(ctx, schedule);
      else ctx.out(`${schedule.id} ${schedule.name} next ${schedule.next_fire_at ?? "-"}`);
      return EXIT.ok;
    }
    if (sub === "list") {
      const limit = integer(values, "limit", 1, 500);
      const cursor = str(values, "cursor");
      const page = await call(
        ctx,
        ctx.api.GET("/schedules", { params: { query: { ...(limit ? { limit } : {}), ...(cursor ? { cursor } : {}) } } }),
      );
      if (ctx.json) printJson(ctx, page);
      else if (page.schedules.length === 0) ctx.err("tq: no schedules");
      else {
        ctx.out(
          table(
            ["ID", "NAME", "WHEN", "PAUSED", "NEXT FIRE", "COMMAND"],
            page.schedules.map((s) => [
              s.id,
              s.name,
              s.cron ? `cron ${s.cron} ${s.time_zone}` : `every ${s.every}`,
              s.paused ? "yes" : "no",
              s.next_fire_at ?? "-",
              String((s.task as { command?: string }).command ?? ""),
            ]),
          ),
        );
        if (page.next_cursor) ctx.err(`tq: more: tq schedules list --cursor ${page.next_cursor}`);
      }
      return EXIT.ok;
    }
    if (sub === "pause" || sub === "resume") {
      const id = oneId(rest, "a schedule id or name");
      const params = { params: { path: { id } } };
      const schedule = await call(
        ctx,
        sub === "pause" ? ctx.api.POST("/schedules/{id}/pause", params) : ctx.api.POST("/schedules/{id}/resume", params),
      );
      if (ctx.json) printJson(ctx, schedule);
      else
        ctx.out(
          `${schedule.name} ${schedule.paused ? "paused" : "resumed"}${schedule.paused ? "" : `, next ${schedule.next_fire_at ?? "-"}`}`,
        );
      return EXIT.ok;
    }
    if (sub === "trigger") {
      const id = oneId(rest, "a schedule id or name");
      const firing = await call(ctx, ctx.api.POST("/schedules/{id}/trigger", { params: { path: { id } } }));
      if (ctx.json) printJson(ctx, firing);
      else ctx.out(`fired ${firing.fire_at}: ${firing.outcome}${firing.task_id ? ` task ${firing.task_id}` : ""}`);
      return EXIT.ok;
    }
    throw usageError(
      sub === undefined
        ? "a schedules command is required: create, list, pause, resume or trigger"
        : `unknown schedules command ${JSON.stringify(sub)}: create, list, pause, resume or trigger`,
    );
  },
};

const token: Verb = {
  name: "token",
  summary: "manage API tokens (on the database, as bun run token)",
  usage: "tq token create|list|revoke|open-api|hash|worker-hash|worker-list|worker-revoke ...",
  help: `Runs against the database (DATABASE_URL, else the embedded one of bun start), not the API:
making tokens is the operator's. The same commands as bun run token:
${TOKEN_USAGE.replace(/bun run token/g, "tq token").replace(/^usage:\n/, "")}
Exit 2 on any failure, with the reason.`,
  options: {},
  offline: true,
  async run() {
    throw new CliError("tq token is run by main", EXIT.failure);
  },
};

/** Runs `tq token` with its own arguments (its own parser: its flags are not tq's). */
export async function runToken(args: readonly string[]): Promise<number> {
  await runTokenCommand(args);
  return EXIT.ok;
}

export const VERBS: readonly Verb[] = [
  submit,
  status,
  list,
  watch,
  logs,
  stateAction("cancel"),
  stateAction("retry"),
  workers,
  queues,
  schedules,
  token,
];
