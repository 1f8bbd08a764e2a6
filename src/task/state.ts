// Task states: the one place that says what each state means and who moves a task in and out
// of it. The database column `tasks.state` holds these names; the proto enum mirrors them.

/**
 * - waiting: persisted with parents (depends_on) not all ended; not claimable, and not in the
 *   claim's queued index. In: submit with parents. Out: queued once every parent has ended
 *   (succeeded, or any end under on_parent_failure `run`: event `released`), cancelled when a
 *   parent failed under `cancel` (event `parent_failed`) or `skip` (event `skipped`), or by a
 *   client. src/db/dependencies.ts makes these moves.
 * - queued: persisted, waiting for its run_at and a free worker slot. run_at starts as the
 *   scheduled_at the client asked for (which never changes) and a retry's backoff moves it.
 *   In: submit (scheduler or coordinator), a retry of a failed or timed-out attempt (event
 *   `retrying`), requeue of a lost or handed-back attempt (`requeued`), a client's retry of a
 *   final task (`retried`). Out: dispatch
 *   (coordinator claim), cancel, failed when its schedule_timeout_ms passed without a worker
 *   (event `schedule_timeout`).
 * - dispatched: claimed by a coordinator and assigned to one worker (picked_at, attempt + 1,
 *   a new task_attempts row), up to TQ_DISPATCH_AHEAD_MS before run_at: the worker holds it
 *   until then. Out: running (worker's TaskStarted), a final state (TaskFinished can overtake
 *   TaskStarted), queued (retry; worker lost, or handed back unstarted), cancelled.
 * - running: the worker's process started (started_at, on the task and its attempt). Out: a
 *   final state, queued (retry, worker lost or task handed back), cancelled.
 * - succeeded: exited 0 (completed_at). Final.
 * - failed: exited non-zero, killed by a signal, could not start, or its worker was lost, with
 *   no further attempt (failed_at, with exit_code / signal, and error saying why no attempt
 *   follows: "exhausted 3 attempts: last exit code 127", or "...; the task does not retry
 *   failures"). Final.
 * - timed_out: killed after its timeout, with no further attempt (failed_at, error as for
 *   failed). Final.
 * - cancelled: cancelled by a client (cancelled_at; an attempt in flight ends `stopped`). Final.
 *
 * Final means that nothing the system does moves the task again: only a client's retry
 * (POST /tasks/:id/retry, gRPC RetryTask; src/db/transitions.ts retryTasks) takes a final task
 * back to queued, due now, for one more attempt (event `retried`, with the actor).
 *
 * Each attempt keeps its own row (src/task/attempt.ts) and every change its task_events row;
 * the task row shows the current attempt only.
 */
export const TASK_STATES = [
  "waiting",
  "queued",
  "dispatched",
  "running",
  "succeeded",
  "failed",
  "timed_out",
  "cancelled",
] as const;

export type TaskState = (typeof TASK_STATES)[number];

export const FINAL_STATES: ReadonlySet<TaskState> = new Set(["succeeded", "failed", "timed_out", "cancelled"]);

/**
 * Which state may follow which. The SQL guards are read off this table (GUARDS below): each
 * statement expects exactly the states its change may start from.
 */
const TRANSITIONS: Record<TaskState, readonly TaskState[]> = {
  // queued -> failed: its schedule_timeout_ms passed without a worker (src/db/waiting.ts).
  queued: ["dispatched", "failed", "cancelled"],
  waiting: ["queued", "cancelled"],
  dispatched: ["running", "succeeded", "failed", "timed_out", "queued", "cancelled"],
  running: ["succeeded", "failed", "timed_out", "queued", "cancelled"],
  // Final: left only by a client's retry.
  succeeded: ["queued"],
  failed: ["queued"],
  timed_out: ["queued"],
  cancelled: ["queued"],
};

export function isTaskState(value: string): value is TaskState {
  return (TASK_STATES as readonly string[]).includes(value);
}

export function isFinal(state: TaskState): boolean {
  return FINAL_STATES.has(state);
}

export function canTransition(from: TaskState, to: TaskState): boolean {
  return TRANSITIONS[from].includes(to);
}

/** The states from which `to` may be entered. */
export function statesLeadingTo(to: TaskState): TaskState[] {
  return TASK_STATES.filter((from) => TRANSITIONS[from].includes(to));
}

/**
 * States in which a worker holds the task: those a retry or a requeue takes it back to the
 * queue from, and the ones a result, a lost attempt or a lease renewal must find (the states
 * a start report can come from, and running itself; `waiting` leads to queued too, but no
 * worker holds it).
 */
export const IN_FLIGHT_STATES: readonly TaskState[] = [...statesLeadingTo("running"), "running"];

/** The states each guarded change expects, as src/db's statements name them. */
export const GUARDS = {
  /** A claim (queued -> dispatched). */
  claim: statesLeadingTo("dispatched"),
  /** A start report (dispatched -> running). */
  start: statesLeadingTo("running"),
  /** A result, a lost or handed-back attempt, a lease renewal: the attempt is still in flight. */
  inFlight: IN_FLIGHT_STATES,
  /** A client's cancel. */
  cancel: statesLeadingTo("cancelled"),
  /** A client's retry (a final state -> queued). */
  retry: statesLeadingTo("queued").filter(isFinal),
  /** A queued task's schedule_timeout_ms passing (queued -> failed). */
  scheduleTimeout: ["queued"] as TaskState[],
  /** Parents resolved (src/db/dependencies.ts): waiting -> queued or cancelled. */
  waiting: ["waiting"],
} as const satisfies Record<string, readonly TaskState[]>;
