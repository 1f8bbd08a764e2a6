// Live task changes. Every state change statement (src/db/tasks.ts) NOTIFYs in its own
// transaction, on two channels. Each change goes to the task's own channel (taskChannel(id)),
// which its live watchers LISTEN on while they watch (except its creation: nobody can watch a
// task before its id is out). TASK_CHANNEL, which every coordinator
// LISTENs on, gets what dispatch acts on: each cancel, and of the tasks a statement queued
// only the one due first (a dispatch pass claims everything due, so one wake-up or timer
// covers the rest). So a process receives only changes it acts on: a burn-down of short
// tasks does not send every coordinator and scheduler four notifications per task, nor a
// 1000-task batch a thousand.
// One listening connection per process (postgres.js) carries every channel.
import type { Sql } from "./sql";
import { isTaskState, type TaskState } from "../task/state";

/** What coordinators act on: each cancel, and per statement the queued task due first. */
export const TASK_CHANNEL = "tq_task";
/** Prefix of a task's own channel: every change of the task. */
export const TASK_CHANNEL_PREFIX = "tq_task_";
export const taskChannel = (id: string) => `${TASK_CHANNEL_PREFIX}${id}`;

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

interface TaskSubscription {
  listeners: Set<Listener>;
  /** The LISTEN on the task's channel; resolves with its unlisten. */
  listening: Promise<{ unlisten: () => Promise<void> }>;
}

export class TaskChangeFeed {
  private readonly all = new Set<Listener>();
  private readonly byTask = new Map<string, TaskSubscription>();
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

  /**
   * TASK_CHANNEL: each cancel, and per statement the task it queued that is due first.
   * Returns the unsubscribe function.
   */
  onChange(listener: Listener): () => void {
    this.all.add(listener);
    return () => this.all.delete(listener);
  }

  /**
   * Every change of one task. Resolves once the LISTEN on its channel is in place (changes
   * committed after that are delivered), with the unsubscribe function.
   */
  async onTask(id: string, listener: Listener): Promise<() => void> {
    let subscription = this.byTask.get(id);
    if (!subscription) {
      const listening = this.sql.listen(taskChannel(id), (payload) => this.deliverTask(id, payload));
      subscription = { listeners: new Set(), listening };
      this.byTask.set(id, subscription);
      listening.catch(() => {
        if (this.byTask.get(id) === subscription) this.byTask.delete(id);
      });
    }
    const current = subscription;
    current.listeners.add(listener);
    try {
      await current.listening;
    } catch (error) {
      current.listeners.delete(listener);
      throw error;
    }
    return () => {
      current.listeners.delete(listener);
      if (current.listeners.size > 0 || this.byTask.get(id) !== current) return;
      this.byTask.delete(id);
      void current.listening.then(({ unlisten }) => unlisten()).catch(() => {});
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
  }

  private deliverTask(id: string, payload: string): void {
    const change = parseTaskChange(payload);
    const subscription = this.byTask.get(id);
    if (!change || change.id !== id || !subscription) return;
    for (const listener of [...subscription.listeners]) listener(change);
  }
}
