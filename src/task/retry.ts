// What an ended attempt does to its task: back to the queue for another attempt, or final,
// and the words of a final task's error. Pure decisions: src/db applies each one under the
// attempt's fence, in the statement that also writes the attempt row and the event.
//
// Times are not decided here. A retry's delay is added to the database's clock, and a final
// failure of a lost attempt is stamped by it, as every other time that dueness is judged
// against (ARCHITECTURE.md, "Task states").
import { describeResult, type LossCause } from "./attempt";
import { type AttemptResult, NO_OUTPUT, type Task } from "./task";

/**
 * What the decisions read from a task: the attempt that ended (pinned by the fence), how many
 * of its attempts were interrupted (which changes only with the attempt, so the fence pins it
 * too), and the retry policy it was submitted with (which never changes).
 */
export type RetryFacts = Pick<
  Task,
  | "attempt"
  | "interruptions"
  | "max_attempts"
  | "retry_on_failure"
  | "retry_on_timeout"
  | "retry_on_lost"
  | "retry_backoff_base_ms"
  | "retry_backoff_cap_ms"
>;

/** The task columns RetryFacts holds, for the statement that reads them. */
export const RETRY_FACT_COLUMNS = [
  "attempt",
  "interruptions",
  "max_attempts",
  "retry_on_failure",
  "retry_on_timeout",
  "retry_on_lost",
  "retry_backoff_base_ms",
  "retry_backoff_cap_ms",
] as const satisfies readonly (keyof RetryFacts)[];

/**
 * The attempts that count against max_attempts, the one that ended included: every attempt
 * but the interrupted ones. `task.attempt` stays the fencing token.
 */
export function countedAttempts(task: Pick<RetryFacts, "attempt" | "interruptions">): number {
  return task.attempt - task.interruptions;
}

/**
 * The delay before the next attempt after n counted attempts (countedAttempts):
 * min(cap, base * 2^(n-1)), times a random factor in [0.5, 1) (`random` in [0, 1)), so that
 * tasks failing together do not retry together. The exponent stops at 30: past that the cap
 * has long won.
 */
export function backoffMs(task: RetryFacts, random: () => number = Math.random): number {
  const exponential = task.retry_backoff_base_ms * 2 ** Math.min(Math.max(0, countedAttempts(task) - 1), 30);
  return Math.min(task.retry_backoff_cap_ms, exponential) * (0.5 + random() / 2);
}

/** What a task's policy calls the kind of ending it may decline to retry. */
export type RetryReason = "failures" | "timeouts" | "a lost worker";

/**
 * A final task's error: why its last attempt ended (`reason`), and why no other follows:
 * its policy does not retry this kind of ending (`retried` false), or it has run all its
 * attempts ("exhausted 3 attempts: last exit code 127").
 */
export function finalError(task: Pick<RetryFacts, "max_attempts">, reason: string, retried: boolean, what: RetryReason): string {
  if (!retried) return `${reason}; the task does not retry ${what}`;
  const attempts = task.max_attempts === 1 ? "attempt" : "attempts";
  return `exhausted ${task.max_attempts} ${attempts}: last ${reason}`;
}

/** What a worker's result does to its task. */
export interface FinishDecision {
  /** queued for a retry, else the result's own state (final). */
  state: "queued" | AttemptResult["state"];
  /** Retried: due again this many milliseconds after the change. null: run_at stays. */
  retryInMs: number | null;
  /** A success's completed_at: when the worker says it finished. */
  completedAt: Date | null;
  /** A final failure's or timeout's failed_at: when the worker says it finished. */
  failedAt: Date | null;
  /** The task's error after the change: the attempt's own, or a final one saying why. */
  error: string | null;
  /** The event: `retrying` (the outcome is in its detail), or the final state. */
  eventKind: "retrying" | AttemptResult["state"];
}

/** Whether the decision for `result` reads its task: only a result that may be retried does. */
export function mayRetry(result: Pick<AttemptResult, "state">): boolean {
  return result.state !== "succeeded";
}

/**
 * A result whose task's policy retries its kind (a failure or a timeout), with attempts
 * left, sends the task back to the queue after backoffMs; any other is final. `task` is
 * needed only when mayRetry(result).
 */
export function decideFinish(result: AttemptResult, task: RetryFacts | null, random: () => number = Math.random): FinishDecision {
  if (result.state === "succeeded") {
    return {
      state: "succeeded",
      retryInMs: null,
      completedAt: result.finishedAt,
      failedAt: null,
      error: result.error,
      eventKind: "succeeded",
    };
  }
  if (task === null) throw new Error("decideFinish: a result that may be retried needs its task");
  const timedOut = result.state === "timed_out";
  const retried = timedOut ? task.retry_on_timeout : task.retry_on_failure;
  if (retried && countedAttempts(task) < task.max_attempts) {
    return {
      state: "queued",
      retryInMs: backoffMs(task, random),
      completedAt: null,
      failedAt: null,
      error: result.error,
      eventKind: "retrying",
    };
  }
  return {
    state: result.state,
    retryInMs: null,
    completedAt: null,
    failedAt: result.finishedAt,
    error: finalError(task, describeResult(result), retried, timedOut ? "timeouts" : "failures"),
    eventKind: result.state,
  };
}

/** What an attempt that ended without a result (its worker lost, or interrupted) does to its task. */
export interface LostDecision {
  state: "queued" | "failed";
  /** A final failure's error; null: the task keeps the error it has. */
  error: string | null;
  eventKind: "requeued" | "failed";
  /** Whether the attempt was interrupted: it does not count (tasks.interruptions rises by one). */
  interrupted: boolean;
}

/**
 * An attempt that ended without a result goes back to the queue at once (no backoff: the task
 * was due already, and the ending was not its command's doing), unless the task's policy does
 * not retry a lost worker or, for a `lost` attempt, it has no attempts left: then it fails with
 * `reason`. An `interrupted` attempt (a drain's hand-back, an assignment never delivered) is
 * not counted against max_attempts, so it never exhausts them; the policy still applies, as
 * an interrupted command may have done part of its work.
 */
export function decideLost(task: RetryFacts, reason: string, cause: LossCause): LostDecision {
  const interrupted = cause === "interrupted";
  const left = interrupted || countedAttempts(task) < task.max_attempts;
  if (task.retry_on_lost && left) return { state: "queued", error: null, eventKind: "requeued", interrupted };
  return {
    state: "failed",
    error: finalError(task, reason, task.retry_on_lost, "a lost worker"),
    eventKind: "failed",
    interrupted,
  };
}

/** A task's error when the database refused its attempt's result (see decideUnstorable). */
export const UNSTORABLE_RESULT_ERROR = "result could not be stored";

/**
 * A result the database refused (a value it cannot hold, a constraint it breaks) fails its
 * task for good, whatever its policy: the same worker would likely send the same result again,
 * and the command has run. The reason stays in the coordinator's log, not in the task.
 */
export function decideUnstorable(result: Pick<AttemptResult, "finishedAt">): FinishDecision {
  return {
    state: "failed",
    retryInMs: null,
    completedAt: null,
    failedAt: result.finishedAt,
    error: UNSTORABLE_RESULT_ERROR,
    eventKind: "failed",
  };
}

/**
 * What is stored in place of a refused result: its exit code (an integer always fits), and
 * none of its text or times, which may be what the database refused; finished now, by the
 * coordinator's clock.
 */
export function unstorableResult(result: Pick<AttemptResult, "exitCode">): AttemptResult {
  return {
    state: "failed",
    exitCode: result.exitCode,
    signal: null,
    ...NO_OUTPUT,
    error: UNSTORABLE_RESULT_ERROR,
    startedAt: null,
    finishedAt: new Date(),
  };
}
