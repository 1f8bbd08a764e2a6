// Attempts: one per dispatch of a task, kept in task_attempts. The task row shows the current
// attempt; an attempt row keeps its own times and result after the task moved on.
import type { AttemptResult, EffectiveLimits, LimitsApplied } from "./task";

/**
 * How an attempt ended; null (in the row and the API) while it holds its task.
 * - succeeded, failed, timed_out: the worker reported this result and it was applied.
 * - lost: it ended without a result: its worker died, froze, was cut off or left, or its
 *   lease lapsed (error says which). Counts against the task's max_attempts.
 * - interrupted: it ended without a result for reasons not the task's nor a lost worker's:
 *   its worker handed it back on drain, or it was never delivered (the coordinator stopped,
 *   or the worker left before the assignment went out). Does not count against max_attempts.
 * - stopped: the task was cancelled while the attempt held it.
 * - stale: its result arrived after the attempt had already ended (lost, interrupted or stopped) and
 *   changed nothing; the result is kept on the row, for the record, and the task's own
 *   history has the matching `stale` event. A result re-sent for an attempt whose result was
 *   already applied leaves the row as it is.
 */
export const ATTEMPT_OUTCOMES = ["succeeded", "failed", "timed_out", "lost", "interrupted", "stopped", "stale"] as const;

export type AttemptOutcome = (typeof ATTEMPT_OUTCOMES)[number];

/** One attempt as task_attempts stores it and the API returns it. */
export interface Attempt {
  task_id: string;
  attempt: number;
  worker_id: string;
  coordinator_id: string | null;
  dispatched_at: Date;
  started_at: Date | null;
  finished_at: Date | null;
  pid: number | null;
  exit_code: number | null;
  signal: string | null;
  error: string | null;
  stdout: string | null;
  stderr: string | null;
  stdout_truncated: boolean;
  stderr_truncated: boolean;
  stdout_replaced: boolean;
  stderr_replaced: boolean;
  outcome: AttemptOutcome | null;
  /** How the worker enforced the limits; null until a result with usage arrived. */
  limits_applied: LimitsApplied | null;
  /** The limits that held. */
  limits: EffectiveLimits | null;
  /** bigint columns: postgres.js reads them as strings. */
  cpu_user_us: string | number | null;
  cpu_system_us: string | number | null;
  peak_memory_bytes: string | number | null;
  oom_killed: boolean | null;
}

/**
 * What ended an attempt that did not succeed, as the tail of a final task's error
 * ("exhausted 3 attempts: last exit code 127").
 */
export function describeResult(result: Pick<AttemptResult, "state" | "exitCode" | "signal" | "error" | "usage">): string {
  if (result.state === "timed_out") return result.error ?? "timed out";
  if (result.usage?.oomKilled) return result.error ?? "killed: out of memory";
  if (result.signal !== null) return `signal ${result.signal}`;
  if (result.exitCode !== null) return `exit code ${result.exitCode}`;
  if (result.error !== null) return `could not start: ${result.error}`;
  return "no result";
}

/**
 * One attempt of a task, as given to one worker: what every report and every fenced change
 * names. The attempt number is the fencing token, and the worker must be the one it was
 * given to.
 */
export interface AttemptRef {
  taskId: string;
  attempt: number;
  workerId: string;
}

/** An attempt's key in maps and sets, in every role: "taskId:attempt". */
/**
 * Why an attempt ended without a result: `lost` (its worker died, froze, was cut off, or its
 * lease lapsed), counted against max_attempts; or `interrupted` (a drain's hand-back, or an
 * assignment never delivered), which is not.
 */
export type LossCause = "lost" | "interrupted";

export const attemptKey = (taskId: string, attempt: number): string => `${taskId}:${attempt}`;

/** A process that exited succeeded only with exit code 0 and no signal. */
export function exitedState(exitCode: number | null, signal: string | null): "succeeded" | "failed" {
  return exitCode === 0 && signal === null ? "succeeded" : "failed";
}
