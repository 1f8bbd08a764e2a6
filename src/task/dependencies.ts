// Dependency rules with no SQL: the names a child knows its parents by, and what a waiting
// task says it waits for (src/db/dependencies.ts keeps the edges and moves the tasks).
import type { Waiting } from "./waiting";

/**
 * The ref of a parent named by id: the id with its hyphens as underscores, so that the child
 * reads its exit code from TQ_PARENT_<ref>_EXIT (a batch ref is a valid name as it is; the
 * release statement in src/db/dependencies.ts writes the variables).
 */
export function refOfId(id: string): string {
  return id.replaceAll("-", "_");
}

/** A parent of a task as the reason needs it. */
export interface WaitingParent {
  id: string;
  /** The parent has ended and was counted off. */
  resolved: boolean;
}

/**
 * The `parents` reason of a task blocked on its parents, naming the ones not yet ended (in id
 * order); null for a task that is not waiting on parents.
 */
export function parentsWaiting(task: { state: string }, parents: readonly WaitingParent[]): Waiting | null {
  if (task.state !== "waiting") return null;
  const pending = parents.filter((parent) => !parent.resolved).map((parent) => parent.id);
  return { kind: "parents", message: pending.length === 0 ? "parents" : `parents ${pending.join(", ")}` };
}
