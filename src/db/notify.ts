// Live task changes. Every state change statement NOTIFYs in its own transaction (the change
// tail, src/db/changes.ts), on two channels. Each change goes to the task's own channel
// (taskChannel(id)), which its live watchers LISTEN on while they watch (except its creation:
// nobody can watch a task before its id is out). TASK_CHANNEL, which every coordinator
// LISTENs on, gets what dispatch acts on: each cancel, and of the tasks a statement queued
// only the one due first (a dispatch pass claims everything due, so one wake-up or timer
// covers the rest). So a process receives only changes it acts on: a burn-down of short
// tasks does not send every coordinator and scheduler four notifications per task, nor a
// 1000-task batch a thousand.
// One listening connection per process carries every channel.
import postgres from "postgres";
import { isTaskState, type TaskState } from "../task/state";
import type { Sql } from "./sql";

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
  /** A task with a concurrency key left its live states: a waiting task of its key may now run (src/db/flow.ts). */
  frees_key?: boolean;
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
      ...(value.frees_key === true ? { frees_key: true } : {}),
    };
  } catch {
    return null;
  }
}

type Listener = (change: TaskChange) => void;

interface TaskSubscription {
  listeners: Set<Listener>;
  /** The LISTEN on the task's channel. */
  listening: Promise<void>;
}

/** Longest wait between attempts to listen again after the connection was lost, in ms. */
const RELISTEN_BACKOFF_CAP_MS = 1000;

const quoted = (channel: string) => `"${channel.replace(/"/g, '""')}"`;

/**
 * The process's one listening connection, and who gets which notification. It keeps its own
 * connection (options from the pool it is given) rather than postgres.js's listen(): channels
 * come and go with watchers, and after a reconnect postgres.js re-listens them under new
 * handles, so a watcher that left afterwards could never UNLISTEN. Here the set of channels is
 * ours: LISTEN when the first watcher of a task comes, UNLISTEN when the last one goes, and
 * after a lost connection every channel in the set is listened again before consumers resync.
 */
export class TaskChangeFeed {
  private readonly all = new Set<Listener>();
  private readonly byTask = new Map<string, TaskSubscription>();
  private readonly resyncs = new Set<() => void>();
  private connection: Sql | null = null;
  /** Channels we are (or are about to be) listening on. */
  private readonly channels = new Set<string>();
  private relistening: Promise<void> | null = null;
  private stopped = false;

  constructor(private readonly sql: Sql) {}

  /** Resolves once LISTEN on TASK_CHANNEL is in place. */
  async start(): Promise<void> {
    this.stopped = false;
    this.channels.add(TASK_CHANNEL);
    await this.listen(TASK_CHANNEL);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.channels.clear();
    const connection = this.connection;
    this.connection = null;
    if (connection) await connection.end({ timeout: 1 }).catch(() => {});
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
    const channel = taskChannel(id);
    let subscription = this.byTask.get(id);
    if (!subscription) {
      this.channels.add(channel);
      const created: TaskSubscription = { listeners: new Set(), listening: this.listen(channel) };
      subscription = created;
      this.byTask.set(id, created);
      created.listening.catch(() => {
        if (this.byTask.get(id) !== created) return;
        this.byTask.delete(id);
        this.channels.delete(channel);
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
      this.channels.delete(channel);
      void this.connection?.unsafe(`UNLISTEN ${quoted(channel)}`).catch(() => {});
    };
  }

  /** Called after the listening connection came back, when notifications may have been missed. */
  onResync(callback: () => void): () => void {
    this.resyncs.add(callback);
    return () => this.resyncs.delete(callback);
  }

  private async listen(channel: string): Promise<void> {
    await this.listeningConnection().unsafe(`LISTEN ${quoted(channel)}`);
  }

  private listeningConnection(): Sql {
    // The pool's startup parameters come along, its statement and lock timeouts included: they
    // bound each LISTEN and UNLISTEN, never the idle wait between notifications, which is no
    // statement.
    this.connection ??= postgres({
      ...this.sql.options,
      max: 1,
      idle_timeout: null,
      max_lifetime: null,
      fetch_types: false,
      onnotify: (channel: string, payload: string) => this.route(channel, payload),
      onclose: () => this.connectionLost(),
    } as unknown as postgres.Options<Record<string, never>>) as unknown as Sql;
    return this.connection;
  }

  /**
   * The listening connection closed: notifications sent meanwhile are lost, and the server
   * forgot our LISTENs. Listen on every channel again (retrying while the database is away),
   * then let every consumer re-read what it needs.
   */
  private connectionLost(): void {
    if (this.stopped || this.relistening || this.channels.size === 0) return;
    this.relistening = (async () => {
      for (let attempt = 0; !this.stopped; attempt++) {
        try {
          const sent = [...this.channels];
          if (sent.length > 0)
            await this.listeningConnection()
              .unsafe(sent.map((c) => `LISTEN ${quoted(c)}`).join("; "))
              .simple();
          // A watcher that left meanwhile may have had its UNLISTEN refused by the lost connection.
          const gone = sent.filter((channel) => !this.channels.has(channel));
          if (gone.length > 0)
            await this.listeningConnection()
              .unsafe(gone.map((c) => `UNLISTEN ${quoted(c)}`).join("; "))
              .simple();
          return;
        } catch {
          await Bun.sleep(Math.min(RELISTEN_BACKOFF_CAP_MS, 50 * 2 ** attempt));
        }
      }
    })().finally(() => {
      this.relistening = null;
      if (!this.stopped) for (const resync of this.resyncs) resync();
    });
  }

  private route(channel: string, payload: string): void {
    const change = parseTaskChange(payload);
    if (!change) return;
    if (channel === TASK_CHANNEL) {
      for (const listener of this.all) listener(change);
      return;
    }
    const subscription = this.byTask.get(change.id);
    if (channel !== taskChannel(change.id) || !subscription) return;
    for (const listener of [...subscription.listeners]) listener(change);
  }
}
