// How the CLI shows things to people (with --json it prints the API's own JSON instead), and
// what a finished task's exit status is for `submit --wait` and `watch`.
import { constants } from "node:os";
import type { Schemas } from "../client";
import { EXIT } from "./context";

type Task = Schemas["Task"];

/** Columns padded to their widest cell; the last column is not padded. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((title, i) => Math.max(title.length, ...rows.map((row) => (row[i] ?? "").length)));
  const line = (cells: string[]) =>
    cells
      .map((cell, i) => (i === cells.length - 1 ? cell : cell.padEnd(widths[i] ?? 0)))
      .join("  ")
      .trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}

/** A command on one line, cut to `max` characters. */
export function oneLine(text: string, max = 60): string {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > max ? `${flat.slice(0, max - 1)}…` : flat;
}

const orDash = (value: string | number | null | undefined) =>
  value === null || value === undefined || value === "" ? "-" : String(value);

/** A task as `key: value` lines, for `tq status`. */
export function taskDetails(task: Task): string {
  const rows: [string, string][] = [
    ["id", task.id],
    ["state", task.state],
    ["command", task.command],
    ["queue", task.queue],
    ["priority", String(task.priority)],
    [
      "attempt",
      `${task.attempt} of at most ${task.max_attempts}${task.interruptions ? ` (${task.interruptions} interrupted)` : ""}`,
    ],
    ["scheduled_at", task.scheduled_at],
    ["run_at", task.run_at],
    ["created_at", task.created_at],
    ["started_at", orDash(task.started_at)],
    ["completed_at", orDash(task.completed_at)],
    ["failed_at", orDash(task.failed_at)],
    ["cancelled_at", orDash(task.cancelled_at)],
    ["worker", orDash(task.worker_id)],
    ["exit_code", orDash(task.exit_code)],
    ["signal", orDash(task.signal)],
    ["error", orDash(task.error)],
  ];
  const waiting = (task as { waiting?: { kind: string; message: string } | null }).waiting;
  if (waiting) rows.push(["waiting", `${waiting.kind}: ${waiting.message}`]);
  if (task.schedule_id) rows.push(["schedule", `${task.schedule_id} at ${orDash(task.fire_at)}`]);
  const width = Math.max(...rows.map(([key]) => key.length));
  return rows.map(([key, value]) => `${`${key}:`.padEnd(width + 1)} ${value}`).join("\n");
}

/** The task rows of `tq list`. */
export function taskTable(tasks: readonly Task[]): string {
  return table(
    ["ID", "STATE", "QUEUE", "ATTEMPT", "CREATED", "COMMAND"],
    tasks.map((task) => [task.id, task.state, task.queue, String(task.attempt), task.created_at, oneLine(task.command)]),
  );
}

export const FINAL_STATES = new Set(["succeeded", "failed", "timed_out", "cancelled"]);

/** The exit status for a finished task (README, "CLI"). */
export const TASK_EXIT = {
  /** Killed after its timeout, as timeout(1) exits. */
  timedOut: 124,
  cancelled: 125,
  /** Failed with neither an exit code nor a signal: could not start, its worker was lost, no worker in time. */
  noExitCode: 126,
} as const;

/**
 * A finished task as a shell sees a process: its exit code; 128 + the signal's number when a
 * signal ended it; TASK_EXIT's codes for a timeout, a cancel and a failure without either.
 */
export function taskExitCode(task: Pick<Task, "state" | "exit_code" | "signal">): number {
  switch (task.state) {
    case "succeeded":
      return EXIT.ok;
    case "timed_out":
      return TASK_EXIT.timedOut;
    case "cancelled":
      return TASK_EXIT.cancelled;
    default: {
      if (task.exit_code !== null && task.exit_code !== undefined) return task.exit_code & 0xff;
      const number = task.signal ? (constants.signals as Record<string, number>)[task.signal] : undefined;
      if (number !== undefined) return 128 + number;
      return TASK_EXIT.noExitCode;
    }
  }
}

/** One line of `tq watch` for a history event. */
export function eventLine(event: {
  at: string;
  kind: string;
  state: string;
  attempt: number;
  actor?: string | null;
  worker_id?: string | null;
  detail?: unknown;
}): string {
  const parts = [event.at, event.kind.padEnd(10), event.state.padEnd(10), `attempt ${event.attempt}`];
  if (event.worker_id) parts.push(`worker ${event.worker_id}`);
  if (event.actor) parts.push(`by ${event.actor}`);
  const detail = event.detail as Record<string, unknown> | null | undefined;
  if (detail && typeof detail === "object") {
    const said = ["exit_code", "signal", "error", "reason", "from"]
      .filter((key) => detail[key] !== null && detail[key] !== undefined)
      .map((key) => `${key}=${typeof detail[key] === "string" ? JSON.stringify(detail[key]) : String(detail[key])}`);
    if (said.length > 0) parts.push(said.join(" "));
  }
  return parts.join("  ");
}

/** "+30s", "+5m", "+2h", "+1d", or an RFC 3339 time, as the API's scheduled_at. */
export function parseAt(value: string, now = Date.now()): string {
  const relative = /^\+(\d+)(ms|s|m|h|d)$/.exec(value.trim());
  if (relative) {
    const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[relative[2] as "ms" | "s" | "m" | "h" | "d"];
    return new Date(now + Number(relative[1]) * unit).toISOString();
  }
  // The API checks the time itself (RFC 3339, a zone required) and names the problem.
  return value.trim();
}
