// What a task waits for, in words: the one waiting-reason field every transport shows
// (GET /tasks/:id `waiting_reason`, gRPC Task.waiting_reason). Each rule that can hold a task
// back adds its clause here; dependencies are the first.

/** A parent of a task as the reason needs it. */
export interface WaitingParent {
  id: string;
  /** The parent has ended and was counted off. */
  resolved: boolean;
}

/**
 * "waiting: parents <id>, <id>" for a task blocked on its parents (the ones not yet ended, in
 * id order); null when the task waits for nothing this module knows.
 */
export function waitingReason(task: { state: string }, dependencies: { parents: readonly WaitingParent[] }): string | null {
  if (task.state !== "waiting") return null;
  const pending = dependencies.parents.filter((parent) => !parent.resolved).map((parent) => parent.id);
  return pending.length === 0 ? "waiting: parents" : `waiting: parents ${pending.join(", ")}`;
}
