// What a queued task waits for, in one small shape every rule fills: routing (no live worker
// matches, the queue is paused or full), flow control (a concurrency key full, a rate limit,
// parents not done). Task views show the first reason that holds (REST `waiting`, gRPC
// Task.waiting); src/db/waiting.ts finds them.

/** The reasons, in the order a view reports them (the first that holds wins). */
export const WAITING_KINDS = ["queue_paused", "no_worker", "queue_full", "key_full", "rate_limit", "parents"] as const;
export type WaitingKind = (typeof WAITING_KINDS)[number];

export interface Waiting {
  kind: WaitingKind;
  /** For people: "no worker with gpu=1", "queue emails is paused". */
  message: string;
}

/** The first reason by WAITING_KINDS order, or null. */
export function firstWaiting(reasons: readonly Waiting[]): Waiting | null {
  let best: Waiting | null = null;
  for (const reason of reasons) {
    if (best === null || WAITING_KINDS.indexOf(reason.kind) < WAITING_KINDS.indexOf(best.kind)) best = reason;
  }
  return best;
}
