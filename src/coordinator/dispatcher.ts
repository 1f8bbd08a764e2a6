// The dispatch loop: claim due tasks for this coordinator's free worker slots and push them
// down the workers' streams. It wakes on a NOTIFY of a due task, on a freed slot, on a worker
// joining, and on a timer set for the earliest future task; a slow safety poll covers a
// missed notification. Between wakes it does nothing.
import { type ClaimedTask, claimDue, nextDueIn } from "../db/claim";
import { DatabaseClock } from "../db/clock";
import { nextTokenIn } from "../db/flow";
import type { TaskChange } from "../db/notify";
import type { Sql } from "../db/sql";
import { requeueAttempt } from "../db/transitions";
import { expireScheduleTimeouts } from "../db/waiting";
import { type Logger, taskFields } from "../log";
import type { TaskMetrics } from "../metrics/metrics";
import { assignMessage } from "../rpc/messages";
import { attemptKey } from "../task/attempt";
import type { WorkerRouting } from "../task/routing";
import type { Task } from "../task/task";
import type { Tracing } from "../trace/tracing";
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
   * (Assign.start_in_ms). 0 hands tasks over only once due. Only to workers with the
   * "start_in_ms" feature: the others get only tasks already due.
   */
  aheadMs: number;
  /**
   * The database's clock read without a round trip (src/db/clock.ts), for the time left until an
   * early hand-over is due as its Assign is sent. Defaults to one sampling `sql` while the
   * dispatcher runs (when aheadMs > 0).
   */
  clock?: DatabaseClock;
  /** Counts each Assign sent, and the wait since its attempt became due. */
  metrics?: TaskMetrics;
  /** The role's tracing (src/trace); absent or null: off. */
  tracing?: Tracing | null;
  /** TQ_PRIORITY_AGING_MS: bounds the claim's rank scan. Defaults to 1000. */
  agingMs?: number;
}

/** The longest delay setTimeout honours. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * How long a slot left free on a keyed task's exit waits at most for the wake that its result's
 * commit brings (Completer.wakeForKeys): a result that turns out stale brings none.
 */
export const KEYED_EXIT_FALLBACK_MS = 100;

export class Dispatcher {
  private running = false;
  private again = false;
  private stopped = true;
  private timer: ReturnType<typeof setTimeout> | null = null;
  /** performance.now() at which `timer` fires. */
  private timerAt = Number.POSITIVE_INFINITY;
  private poll: ReturnType<typeof setInterval> | null = null;
  private lookAheadPending = false;
  private expirePending = false;
  private idle: Promise<void> = Promise.resolve();
  private markIdle: () => void = () => {};
  /** The attempts this dispatcher sent, by attemptKey, until their slot is seen free: the worker, and whether keyed. */
  private readonly sent = new Map<string, { workerId: string; keyed: boolean }>();
  /**
   * The slot class (slotClass) of the last claim when it left nothing admissible behind for
   * its slots (fewer tasks than slots, or more_queued false); null otherwise.
   */
  private exhaustedClass: string | null = null;
  /** Fires a pass when a skipped keyed exit's result brought no wake (KEYED_EXIT_FALLBACK_MS). */
  private fallback: ReturnType<typeof setTimeout> | null = null;

  private readonly clock: DatabaseClock | null;

  constructor(private readonly options: DispatcherOptions) {
    this.clock = options.aheadMs > 0 ? (options.clock ?? new DatabaseClock(options.sql)) : null;
  }

  start(): void {
    this.stopped = false;
    this.clock?.start();
    this.poll = setInterval(() => {
      this.expirePending = true;
      this.wake(true);
    }, this.options.safetyPollMs);
    this.wake(true);
  }

  /** Stops waking; resolves when a claim in progress has finished. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.clock?.stop();
    if (this.poll) clearInterval(this.poll);
    this.poll = null;
    this.clearTimer();
    this.clearFallback();
    await this.idle;
  }

  /** Between start() and stop(): the coordinator hands run-now tasks to its workers only then. */
  get active(): boolean {
    return !this.stopped;
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
   * A process exited and freed its slot, its result not yet written (Completer.onSlotFreed
   * with `exited`; every other freeing calls wake). When every slot freed since the last claim
   * was a keyed task's, and that claim left nothing admissible
   * behind, a claim now would count those tasks live still (their results are not committed)
   * and find nothing: a hot key's slot would cost a wasted claim per task, and its real claim
   * would queue behind it. Such a wake is skipped; the results' commit wakes the pass
   * (Completer.wakeForKeys, a plain wake), and KEYED_EXIT_FALLBACK_MS bounds the wait when
   * none comes (a stale result).
   */
  slotFreed(): void {
    if (this.stopped) return;
    if (this.onlyKeyedExits()) {
      this.armFallback();
      return;
    }
    this.wake();
  }

  /**
   * Feed listener: a queued task due now (or within the hand-over window) wakes us; a later
   * one arms the timer for the start of its window.
   */
  onTaskChange(change: TaskChange): void {
    // A keyed task left its live states: a task waiting for its key's slot may run now.
    if (change.frees_key) {
      this.wake();
      return;
    }
    if (change.state !== "queued" || change.due_in_ms === null) return;
    const ahead = this.aheadNow();
    if (change.due_in_ms <= ahead) this.wake();
    else this.armTimer(change.due_in_ms - ahead);
  }

  private async pass(): Promise<void> {
    let first = true;
    try {
      for (;;) {
        if (this.stopped) break;
        const plan = this.options.registry.slotPlan();
        if (plan.length === 0) break;
        // Slots freed during the last claim, all by keyed exits: as in slotFreed.
        if (!first && this.onlyKeyedExits()) {
          this.armFallback();
          break;
        }
        first = false;
        this.sawReleases();
        this.clearFallback();
        // A worker without start_in_ms would start an early hand-over at once: its slots are
        // claimed for due tasks only, first, so that they take the tasks already due.
        const early = plan.filter((id) => this.takesEarly(id));
        const dueOnly = plan.filter((id) => !this.takesEarly(id));
        let filled = false;
        let exhausted = true;
        for (const [slots, aheadMs] of [
          [dueOnly, 0],
          [early, this.options.aheadMs],
        ] as const) {
          if (slots.length === 0 || this.stopped) continue;
          const { sql, coordinatorId, leaseMs } = this.options;
          // Before the claim: the leases it grants start later than this, never earlier.
          const grantedAt = performance.now();
          const claimed = await claimDue(sql, coordinatorId, slots, leaseMs, {
            aheadMs,
            routing: this.routing(slots),
            agingMs: this.options.agingMs,
          });
          for (const task of claimed) {
            const worker = task.worker_id ? this.options.registry.get(task.worker_id) : undefined;
            if (worker) this.options.registry.reserve(worker, task.id, task.attempt);
            this.assign(task.worker_id ?? "", task, grantedAt, this.startIn(task), task.run_at_ms);
          }
          // All slots filled: there may be more. With workers of different routing, a pass can
          // also fill some and not others (the candidates it read were for the filled ones):
          // any progress is worth another pass, which reads for the slots still free.
          if (claimed.length === slots.length || (claimed.length > 0 && this.mixedRouting(slots))) filled = true;
          if (claimed.length === slots.length && claimed[0]?.more_queued !== false) exhausted = false;
        }
        this.exhaustedClass = exhausted ? this.slotClass(plan) : null;
        if (!filled) {
          // Slots left free: a task held back by a rate limit gets its token before any wake
          // comes, so wake when the next token is due (src/db/flow.ts), not at the next poll.
          // The answer is as of the statement: the round trip since is already spent.
          const asked = performance.now();
          const tokenIn = await nextTokenIn(this.options.sql);
          if (tokenIn !== null) this.options.metrics?.rateLimited();
          if (tokenIn !== null && !this.stopped) this.armTimer(Math.max(1, tokenIn - (performance.now() - asked)));
          break;
        }
      }
      if (this.expirePending && !this.stopped) {
        // Each safety poll also fails the queued tasks whose schedule_timeout_ms has passed.
        this.expirePending = false;
        await expireScheduleTimeouts(this.options.sql);
      }
      if (this.lookAheadPending && !this.stopped) {
        this.lookAheadPending = false;
        const dueIn = await nextDueIn(this.options.sql);
        const ahead = this.aheadNow();
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
   * nothing, and this one attempt goes back to the queue, interrupted: it never ran, so it
   * does not count against max_attempts (if that fails, its lease lapses). Only the attempt:
   * the worker may hold other tasks through another coordinator by now. Also the hand-over of
   * a task born dispatched by the run-now fast path (src/db/submitter.ts).
   *
   * `grantedAt` is performance.now() no later than the statement that granted the lease: the
   * Assign carries what is left of it as a duration, so that no wall clock decides.
   */
  assign(workerId: string, task: Task, grantedAt: number, startInMs = 0, dueAtMs = 0): void {
    const worker = this.options.registry.get(workerId);
    if (!worker) {
      const ref = { taskId: task.id, attempt: task.attempt, workerId };
      void requeueAttempt(this.options.sql, ref, "worker left before the assignment was sent", "interrupted").catch((error) =>
        this.options.log.warn(
          { err: error, ...taskFields({ ...ref, coordinatorId: this.options.coordinatorId }) },
          "giving back an unsent assignment failed; its lease will lapse",
        ),
      );
      return;
    }
    const leaseMs = task.lease_ms ?? this.options.leaseMs;
    const leaseLeftMs = Math.max(0, Math.floor(leaseMs - (performance.now() - grantedAt)));
    const { tracing } = this.options;
    // Only a task submitted under a trace gets a dispatch span: the others start none.
    const span =
      tracing && task.traceparent
        ? tracing.start("dispatch", task.traceparent, {
            "taskqueue.task_id": task.id,
            "taskqueue.attempt": task.attempt,
            "taskqueue.worker_id": workerId,
          })
        : null;
    this.sent.set(attemptKey(task.id, task.attempt), { workerId, keyed: task.concurrency_key != null });
    worker.send(assignMessage(task, startInMs, leaseLeftMs, span?.traceparent ?? task.traceparent, dueAtMs));
    span?.end();
    this.options.metrics?.dispatched((Date.now() - task.run_at.getTime()) / 1000);
  }

  /**
   * How long the worker waits before starting a claimed task: what is left until run_at by the
   * database's clock as the Assign goes out. The claim's own start_in_ms was read before the
   * claim's writes and commit and the decoding of its rows (a few ms to tens of ms with many
   * rows), and every one of those ms made the start later. The clock's reading is never ahead
   * of the database's, so the start is never early; without a recent sample, the claim's figure.
   */
  private startIn(task: ClaimedTask): number {
    if (task.start_in_ms <= 0) return 0;
    const now = this.clock?.now() ?? null;
    if (now === null || !Number.isFinite(task.run_at_ms)) return task.start_in_ms;
    return Math.min(task.start_in_ms, Math.max(0, Math.ceil(task.run_at_ms - now)));
  }

  /** The routing of the workers that have slots in `slots` (a worker without any takes any task). */
  private routing(slots: readonly string[]): Map<string, WorkerRouting> {
    const routing = new Map<string, WorkerRouting>();
    for (const id of slots) {
      if (routing.has(id)) continue;
      const r = this.options.registry.get(id)?.routing;
      if (r) routing.set(id, r);
    }
    return routing;
  }

  private mixedRouting(slots: readonly string[]): boolean {
    const first = this.options.registry.get(slots[0] ?? "")?.routing;
    return slots.some((id) => this.options.registry.get(id)?.routing !== first);
  }

  /**
   * One string for the slots when all are alike (routing and early hand-over), null when not:
   * a claim that found nothing for one kind of slot says nothing about another kind.
   */
  private slotClass(slots: readonly string[]): string | null {
    let only: string | null = null;
    for (const id of slots) {
      const worker = this.options.registry.get(id);
      const r = worker?.routing;
      const c = JSON.stringify([
        r?.queues == null ? null : [...r.queues].sort(),
        r ? Object.entries(r.labels).sort() : [],
        this.takesEarly(id),
      ]);
      if (only !== null && c !== only) return null;
      only = c;
    }
    return only;
  }

  /** The sent attempts whose slots are free since the last look (their worker let them go, or is gone), forgotten now. */
  private sawReleases(): { workerId: string; keyed: boolean }[] {
    const released: { workerId: string; keyed: boolean }[] = [];
    for (const [key, entry] of this.sent) {
      const worker = this.options.registry.get(entry.workerId);
      if (worker?.inFlight.has(key)) continue;
      this.sent.delete(key);
      released.push(entry);
    }
    return released;
  }

  /**
   * Whether a claim for the free slots now would find nothing the last one did not: it left
   * nothing behind for slots of this class, and every slot freed since was a keyed task's exit.
   */
  private onlyKeyedExits(): boolean {
    const released = this.sawReleases();
    if (released.length === 0 || released.some((r) => !r.keyed)) return false;
    if (this.exhaustedClass === null) return false;
    return this.slotClass(this.options.registry.slotPlan()) === this.exhaustedClass;
  }

  private armFallback(): void {
    if (this.fallback || this.stopped) return;
    this.fallback = setTimeout(() => {
      this.fallback = null;
      this.wake();
    }, KEYED_EXIT_FALLBACK_MS);
  }

  private clearFallback(): void {
    if (this.fallback) clearTimeout(this.fallback);
    this.fallback = null;
  }

  private takesEarly(workerId: string): boolean {
    return this.options.registry.get(workerId)?.features.has("start_in_ms") === true;
  }

  /** The hand-over window that a free slot can use now: 0 unless a worker with one takes early hand-overs. */
  private aheadNow(): number {
    if (this.options.aheadMs === 0) return 0;
    const registry = this.options.registry;
    const any = registry.all().some((worker) => worker.features.has("start_in_ms") && registry.freeSlots(worker) > 0);
    return any ? this.options.aheadMs : 0;
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
