// The workers connected to this coordinator and the slots they have free. Only this process
// writes it; the database's workers table is the cross-coordinator view.
import type { CoordinatorMessage } from "../gen/taskqueue/v1/worker_service_pb";

export interface WorkerConnection {
  readonly id: string;
  readonly name: string;
  readonly slots: number;
  /**
   * Attempts this coordinator counts against the worker's slots, by attemptKey, with
   * when they were assigned (performance.now()). An attempt leaves when its result arrives,
   * or when the worker's heartbeats stop listing it a lease after it was assigned.
   */
  readonly inFlight: Map<string, number>;
  /** Attempts the worker listed in its last heartbeat: their leases are renewed. */
  reported: { taskId: string; attempt: number }[];
  draining: boolean;
  /** Set when its stream has ended. */
  ended: boolean;
  /** performance.now() of the last message from the worker. */
  lastSeen: number;
  send(message: CoordinatorMessage): void;
  /** Ends the stream from our side (heartbeat timeout, shutdown). */
  close(reason: string): void;
}

export class WorkerRegistry {
  private readonly workers = new Map<string, WorkerConnection>();

  /**
   * @param suspectAfterMs A worker silent this long gets no new work while the heartbeat
   *   timeout decides whether it is dead (it may be frozen). Defaults to never.
   */
  constructor(private readonly suspectAfterMs = Number.POSITIVE_INFINITY) {}

  get size(): number {
    return this.workers.size;
  }

  get(id: string): WorkerConnection | undefined {
    return this.workers.get(id);
  }

  all(): WorkerConnection[] {
    return [...this.workers.values()];
  }

  /** Adds a connection, in place of any earlier one of the same worker. */
  add(connection: WorkerConnection): void {
    this.workers.set(connection.id, connection);
  }

  /** Removes the connection if it is still the current one for its worker id. */
  remove(connection: WorkerConnection): boolean {
    if (this.workers.get(connection.id) !== connection) return false;
    this.workers.delete(connection.id);
    return true;
  }

  isCurrent(connection: WorkerConnection): boolean {
    return this.workers.get(connection.id) === connection;
  }

  /** Silent long enough that it gets no new work for now. */
  isSuspect(connection: WorkerConnection, now = performance.now()): boolean {
    return now - connection.lastSeen > this.suspectAfterMs;
  }

  freeSlots(connection: WorkerConnection, now = performance.now()): number {
    if (connection.draining || this.isSuspect(connection, now)) return 0;
    return Math.max(0, connection.slots - connection.inFlight.size);
  }

  totalFree(): number {
    let total = 0;
    for (const worker of this.workers.values()) total += this.freeSlots(worker);
    return total;
  }

  /**
   * One worker id per free slot, spreading by free capacity: each entry goes to the worker
   * with the most slots still free after the entries before it (ties in connection order).
   * Claiming N tasks for the first N entries therefore balances the load.
   */
  slotPlan(limit = Number.POSITIVE_INFINITY): string[] {
    const free = new Map<string, number>();
    const now = performance.now();
    for (const worker of this.workers.values()) {
      const n = this.freeSlots(worker, now);
      if (n > 0) free.set(worker.id, n);
    }
    const plan: string[] = [];
    while (plan.length < limit && free.size > 0) {
      let best: string | null = null;
      let bestFree = 0;
      for (const [id, n] of free) {
        if (n > bestFree) {
          best = id;
          bestFree = n;
        }
      }
      if (best === null) break;
      plan.push(best);
      if (bestFree === 1) free.delete(best);
      else free.set(best, bestFree - 1);
    }
    return plan;
  }
}
