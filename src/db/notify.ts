// Live task changes. Every state change statement (src/db/tasks.ts) NOTIFYs TASK_CHANNEL in
// its own transaction, so any process that LISTENs sees every change made by any replica.
// One listening connection per process fans out to the dispatcher and the live watchers.
import type { Sql } from "./sql";
import { isTaskState, type TaskState } from "../task/state";

export const TASK_CHANNEL = "tq_task";

export interface TaskChange {
  id: string;
  state: TaskState;
  attempt: number;
  worker_id: string | null;
  coordinator_id: string | null;
  /** task_events.id of the change, as text (bigint). */
  event_id: string;
  kind: string;
  /** For a queued task: milliseconds until it is due by the database's clock. */
  due_in_ms: number | null;
}

export function parseTaskChange(payload: string): TaskChange | null {
  try {
    const value = JSON.parse(payload) as Partial<TaskChange>;
    if (typeof value.id !== "string" || typeof value.state !== "string" || !isTaskState(value.state)) return null;
    return {
      id: value.id,
      state: value.state,
      attempt: Number(value.attempt ?? 0),
      worker_id: value.worker_id ?? null,
      coordinator_id: value.coordinator_id ?? null,
      event_id: String(value.event_id ?? "0"),
      kind: String(value.kind ?? ""),
      due_in_ms: value.due_in_ms == null ? null : Number(value.due_in_ms),
    };
  } catch {
    return null;
  }
}

type Listener = (change: TaskChange) => void;

export class TaskChangeFeed {
  private readonly all = new Set<Listener>();
  private readonly byTask = new Map<string, Set<Listener>>();
  private readonly resyncs = new Set<() => void>();
  private unlisten: (() => Promise<void>) | null = null;
  private listening = false;

  constructor(private readonly sql: Sql) {}

  /** Resolves once LISTEN is in place. postgres.js re-listens after a lost connection. */
  async start(): Promise<void> {
    const { unlisten } = await this.sql.listen(
      TASK_CHANNEL,
      (payload) => this.deliver(payload),
      () => {
        // After a reconnect, changes made while we were away were not delivered: let every
        // consumer re-read what it needs.
        if (this.listening) for (const resync of this.resyncs) resync();
        this.listening = true;
      },
    );
    this.unlisten = unlisten;
  }

  async stop(): Promise<void> {
    const unlisten = this.unlisten;
    this.unlisten = null;
    this.listening = false;
    if (unlisten) await unlisten().catch(() => {});
  }

  /** Every change. Returns the unsubscribe function. */
  onChange(listener: Listener): () => void {
    this.all.add(listener);
    return () => this.all.delete(listener);
  }

  /** Changes of one task. Returns the unsubscribe function. */
  onTask(id: string, listener: Listener): () => void {
    let set = this.byTask.get(id);
    if (!set) this.byTask.set(id, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
      if (set.size === 0) this.byTask.delete(id);
    };
  }

  /** Called after the listening connection came back, when notifications may have been missed. */
  onResync(callback: () => void): () => void {
    this.resyncs.add(callback);
    return () => this.resyncs.delete(callback);
  }

  private deliver(payload: string): void {
    const change = parseTaskChange(payload);
    if (!change) return;
    for (const listener of this.all) listener(change);
    const set = this.byTask.get(change.id);
    if (set) for (const listener of [...set]) listener(change);
  }
}
