// The dispatch loop: claim due tasks for this coordinator's free worker slots and push them
// down the workers' streams. It wakes on a NOTIFY of a due task, on a freed slot, on a worker
// joining, and on a timer set for the earliest future task; a slow safety poll covers a
// missed notification. Between wakes it does nothing.
import { create } from "@bufbuild/protobuf";
import { claimDue, nextDueIn } from "../db/claim";
import { GroupCommit } from "../db/group-commit";
import { type InsertOutcome, insertTasks, MAX_TASKS_PER_INSERT, type NewTask } from "../db/insert";
import type { TaskChange } from "../db/notify";
import type { Sql } from "../db/sql";
import { requeueAttempt } from "../db/transitions";
import { CoordinatorMessageSchema } from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import { attemptRefToProto, toTimestamp } from "../rpc/convert";
import { attemptKey } from "../task/attempt";
import type { Task, TaskSpec } from "../task/task";
import type { WorkerRegistry } from "./registry";

export interface DispatcherOptions {
  sql: Sql;
  registry: WorkerRegistry;
  coordinatorId: string;
  log: Logger;
  /** Slow poll for a missed notification, in ms. */
  safetyPollMs: number;
  /** Lease of a dispatched attempt until its worker first reports it, in ms. */
  leaseMs: number;
  /**
   * Tasks due within this many ms are handed over early; the worker starts each at its time
   * (Assign.start_in_ms). 0 hands tasks over only once due.
   */
  aheadMs: number;
}

/** The longest delay setTimeout honours. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

export class Dispatcher {
  private running = false;
  private again = false;
  private stopped = true;
  private timer: ReturnType<typeof setTimeout> | null = null;
  /** performance.now() at which `timer` fires. */
  private timerAt = Number.POSITIVE_INFINITY;
  private poll: ReturnType<typeof setInterval> | null = null;
  private lookAheadPending = false;
  private idle: Promise<void> = Promise.resolve();
  private markIdle: () => void = () => {};
  /** Concurrent submits share one INSERT and one commit (see src/db/group-commit.ts). */
  private readonly inserts: GroupCommit<NewTask, InsertOutcome>;

  constructor(private readonly options: DispatcherOptions) {
    this.inserts = new GroupCommit((items) => insertTasks(options.sql, items), { maxItemsPerWrite: MAX_TASKS_PER_INSERT });
  }

  start(): void {
    this.stopped = false;
    this.poll = setInterval(() => this.wake(true), this.options.safetyPollMs);
    this.wake(true);
  }

  /** Stops waking; resolves when a claim in progress has finished. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.poll) clearInterval(this.poll);
    this.poll = null;
    this.clearTimer();
    await this.idle;
  }

  /** Resolves when no submit is being written; call once nothing submits any more. */
  async submitsDrained(): Promise<void> {
    await this.inserts.drained();
  }

  /**
   * Asks for a dispatch pass. Passes never overlap: a wake during a pass runs one more pass
   * after it. `lookAhead` also re-reads when the next future task is due.
   */
  wake(lookAhead = false): void {
    if (this.stopped) return;
    if (lookAhead) this.lookAheadPending = true;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    this.idle = new Promise((resolve) => (this.markIdle = resolve));
    queueMicrotask(() => void this.pass());
  }

  /**
   * Feed listener: a queued task due now (or within the hand-over window) wakes us; a later
   * one arms the timer for the start of its window.
   */
  onTaskChange(change: TaskChange): void {
    if (change.state !== "queued" || change.due_in_ms === null) return;
    if (change.due_in_ms <= this.options.aheadMs) this.wake();
    else this.armTimer(change.due_in_ms - this.options.aheadMs);
  }

  /**
   * The run-now fast path: when one of our workers has a free slot, the task is persisted
   * already dispatched to it and pushed at once, saving the claim round trip. Otherwise it is
   * queued like any other.
   */
  async submit(id: string, spec: TaskSpec, actor?: string): Promise<InsertOutcome> {
    const plan = spec.scheduledAt === null && !this.stopped ? this.options.registry.slotPlan(1) : [];
    const workerId = plan[0];
    const worker = workerId ? this.options.registry.get(workerId) : undefined;
    if (!worker) return this.inserts.add({ id, spec, actor });
    const key = attemptKey(id, 1);
    worker.inFlight.set(key, performance.now());
    let outcome: InsertOutcome;
    try {
      outcome = await this.inserts.add({
        id,
        spec,
        actor,
        assignTo: { workerId: worker.id, coordinatorId: this.options.coordinatorId, leaseMs: this.options.leaseMs },
      });
    } catch (error) {
      worker.inFlight.delete(key);
      throw error;
    }
    if (outcome.kind === "existing") {
      // A repeated idempotency key: nothing was written, the slot stays free.
      worker.inFlight.delete(key);
      return outcome;
    }
    const task = outcome.task;
    // The worker may have left while we were inserting (its lost-worker requeue ran before
    // our commit and did not see this task): then assign() gives the attempt back.
    this.assign(worker.id, task);
    return outcome;
  }

  private async pass(): Promise<void> {
    try {
      for (;;) {
        if (this.stopped) break;
        const plan = this.options.registry.slotPlan();
        if (plan.length === 0) break;
        const { sql, coordinatorId, leaseMs, aheadMs } = this.options;
        const claimed = await claimDue(sql, coordinatorId, plan, leaseMs, aheadMs);
        for (const task of claimed) {
          const worker = task.worker_id ? this.options.registry.get(task.worker_id) : undefined;
          if (worker) worker.inFlight.set(attemptKey(task.id, task.attempt), performance.now());
          this.assign(task.worker_id ?? "", task, task.start_in_ms);
        }
        if (claimed.length < plan.length) break;
      }
      if (this.lookAheadPending && !this.stopped) {
        this.lookAheadPending = false;
        const dueIn = await nextDueIn(this.options.sql);
        const ahead = this.options.aheadMs;
        if (dueIn !== null && dueIn > ahead) this.armTimer(dueIn - ahead);
        // Within reach but not claimed: another coordinator holds it mid-claim, or it came
        // within the window during the pass. Look again shortly rather than spinning.
        else if (dueIn !== null && this.options.registry.totalFree() > 0) this.armTimer(5);
      }
    } catch (error) {
      this.options.log.warn({ err: error }, "dispatch pass failed; retrying on the next wake");
      // The safety poll brings us back; a lost database also re-syncs the feed.
    } finally {
      this.running = false;
      this.markIdle();
      if (this.again && !this.stopped) {
        this.again = false;
        this.wake();
      }
    }
  }

  /**
   * Pushes an Assign to the worker. One that left since the task was given to it gets
   * nothing, and this one attempt goes back to the queue (if that fails, its lease lapses).
   * Only the attempt: the worker may hold other tasks through another coordinator by now.
   */
  private assign(workerId: string, task: Task, startInMs = 0): void {
    const worker = this.options.registry.get(workerId);
    if (!worker) {
      const ref = { taskId: task.id, attempt: task.attempt, workerId };
      void requeueAttempt(this.options.sql, ref, "worker left before the assignment was sent").catch((error) =>
        this.options.log.warn({ err: error, task: task.id }, "giving back an unsent assignment failed; its lease will lapse"),
      );
      return;
    }
    worker.send(
      create(CoordinatorMessageSchema, {
        payload: {
          case: "assign",
          value: {
            ref: attemptRefToProto({ taskId: task.id, attempt: task.attempt }),
            command: task.command,
            // The secret values travel only to the worker that runs the task.
            env: { ...task.env, ...task.secret_env },
            cwd: task.cwd ?? "",
            timeoutMs: task.timeout_ms,
            leaseExpiresAt: toTimestamp(task.lease_expires_at),
            startInMs,
          },
        },
      }),
    );
  }

  private armTimer(dueInMs: number): void {
    if (this.stopped) return;
    // setTimeout takes at most 2^31 - 1 ms (24.8 days) and fires at once past that: a task
    // scheduled further ahead would make every pass re-arm a timer that fires at once. Wake
    // at the limit instead and look again then.
    const delayMs = Math.min(dueInMs, MAX_TIMER_MS);
    const at = performance.now() + delayMs;
    if (at >= this.timerAt) return;
    this.clearTimer();
    this.timerAt = at;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.timerAt = Number.POSITIVE_INFINITY;
      this.wake(true);
    }, delayMs);
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.timerAt = Number.POSITIVE_INFINITY;
  }
}
