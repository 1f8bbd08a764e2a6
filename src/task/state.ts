// Task states: the one place that says what each state means and who moves a task in and out
// of it. The database column `tasks.state` holds these names; the proto enum mirrors them.

/**
 * - queued: persisted, waiting for its scheduled_at and a free worker slot. In: submit
 *   (scheduler or coordinator), requeue of a lost or handed-back attempt. Out: dispatch
 *   (coordinator claim), cancel.
 * - dispatched: claimed by a coordinator and assigned to one worker (picked_at, attempt + 1),
 *   up to TQ_DISPATCH_AHEAD_MS before scheduled_at: the worker holds it until then. Out:
 *   running (worker's TaskStarted), a final state (TaskFinished can overtake TaskStarted),
 *   queued (worker lost, or handed back unstarted), cancelled.
 * - running: the worker's process started (started_at). Out: a final state, queued (worker
 *   lost or task handed back), cancelled.
 * - succeeded: exited 0 (completed_at). Final.
 * - failed: exited non-zero, killed by a signal, could not start, or ran out of attempts
 *   (failed_at, with exit_code / signal / error). Final.
 * - timed_out: killed after its timeout (failed_at). Final.
 * - cancelled: cancelled by a client (cancelled_at). Final.
 */
export const TASK_STATES = ["queued", "dispatched", "running", "succeeded", "failed", "timed_out", "cancelled"] as const;

export type TaskState = (typeof TASK_STATES)[number];

export const FINAL_STATES: ReadonlySet<TaskState> = new Set(["succeeded", "failed", "timed_out", "cancelled"]);

/** States in which a worker holds the task. */
export const IN_FLIGHT_STATES = ["dispatched", "running"] as const satisfies readonly TaskState[];

const TRANSITIONS: Record<TaskState, readonly TaskState[]> = {
  queued: ["dispatched", "cancelled"],
  dispatched: ["running", "succeeded", "failed", "timed_out", "queued", "cancelled"],
  running: ["succeeded", "failed", "timed_out", "queued", "cancelled"],
  succeeded: [],
  failed: [],
  timed_out: [],
  cancelled: [],
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

/** The states from which `to` may be entered; SQL guards use this list. */
export function statesLeadingTo(to: TaskState): TaskState[] {
  return TASK_STATES.filter((from) => TRANSITIONS[from].includes(to));
}
