// The workers connected to this coordinator and the slots they have free. Only this process
// writes it; the database's workers table is the cross-coordinator view.
//
// The registry is the one owner of what it knows about a connection: which attempts count
// against its slots, what it last reported, whether it drains, when it was last heard from.
// Every other part reads that through WorkerConnection and changes it only through a verb here
// (reserve, release, heard, heartbeat, drain, streamEnded, expireUnreported, holdWork).
import type { CoordinatorMessage } from "../gen/taskqueue/v1/worker_service_pb";
import type { Feature } from "../rpc/protocol";
import { attemptKey } from "../task/attempt";
import { ANY_TASK, type WorkerRouting } from "../task/routing";

/** One attempt as a worker names it on its stream. */
type HeldRef = { readonly taskId: string; readonly attempt: number };

/** A worker's stream as every part but the registry sees it. */
export interface WorkerConnection {
  readonly id: string;
  readonly name: string;
  readonly slots: number;
  /** The features agreed at Hello (src/rpc/protocol.ts): nothing else is relied on. */
  readonly features: ReadonlySet<Feature>;
  /** The queues it serves and its labels (Hello): which tasks the claim gives it. Absent: any task. */
  readonly routing?: WorkerRouting;
  /**
   * Attempts this coordinator counts against the worker's slots, by attemptKey, with
   * when they were assigned (performance.now()). An attempt leaves when its result arrives,
   * or when the worker's heartbeats stop listing it a lease after it was assigned.
   */
  readonly inFlight: ReadonlyMap<string, number>;
  /** Attempts the worker listed in its last heartbeat: their leases are renewed. */
  readonly reported: readonly HeldRef[];
  /**
   * The number of the Hello or Heartbeat that said `reported` (Heartbeat.seq, Hello.lease_seq):
   * the renewals made on its strength are confirmed to the worker under it. 0: it did not say.
   */
  readonly reportedSeq: bigint;
  readonly draining: boolean;
  /** The worker said (in its last heartbeat) that it holds too many unacknowledged results. */
  readonly full: boolean;
  /** Set when its stream has ended. */
  readonly ended: boolean;
  /** performance.now() of the last message from the worker. */
  readonly lastSeen: number;
  /** Writes on the stream while this is the worker's current connection; otherwise nothing. */
  send(message: CoordinatorMessage): void;
  /** Ends the stream from our side (heartbeat timeout, shutdown). */
  close(reason: string): void;
}

/** What a worker says about itself in Hello. */
export interface WorkerJoin {
  id: string;
  name: string;
  slots: number;
  /** The attempts it still runs or holds a result for: they count against its slots. */
  held: readonly HeldRef[];
  /** The features agreed with it (src/rpc/protocol.ts agreeWithWorker). */
  features: ReadonlySet<Feature>;
  /** Absent: every queue, no labels. */
  routing?: WorkerRouting;
  /** Hello.lease_seq: the number its held attempts were reported under. */
  seq?: bigint;
}

/** The stream under a connection, as the session that serves it gives it to the registry. */
export interface WorkerLink {
  /** Writes a message unless the stream has ended. */
  write(message: CoordinatorMessage): void;
  close(reason: string): void;
}

const copyRef = (ref: HeldRef): HeldRef => ({ taskId: ref.taskId, attempt: ref.attempt });

/** The only implementation of WorkerConnection; its fields are written by the registry alone. */
class Connection implements WorkerConnection {
  readonly inFlight = new Map<string, number>();
  reported: readonly HeldRef[];
  reportedSeq: bigint;
  draining = false;
  full = false;
  ended = false;
  lastSeen: number;
  routing: WorkerRouting = ANY_TASK;

  constructor(
    readonly id: string,
    readonly name: string,
    readonly slots: number,
    readonly features: ReadonlySet<Feature>,
    held: readonly HeldRef[],
    seq: bigint,
    now: number,
    private readonly registry: WorkerRegistry,
    private readonly link: WorkerLink,
  ) {
    for (const ref of held) this.inFlight.set(attemptKey(ref.taskId, ref.attempt), now);
    this.reported = held.map(copyRef);
    this.reportedSeq = seq;
    this.lastSeen = now;
  }

  send(message: CoordinatorMessage): void {
    if (this.registry.isCurrent(this)) this.link.write(message);
  }

  close(reason: string): void {
    this.link.close(reason);
  }
}

export class WorkerRegistry {
  private readonly workers = new Map<string, Connection>();
  /** Why no worker gets new work for now (the completer's backlog), or null. */
  private heldBack: string | null = null;

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

  /**
   * A connection for a worker that said Hello, not yet in the registry (see add): it sends
   * nothing until it is, but its reports are counted from now on.
   */
  open(join: WorkerJoin, link: WorkerLink, now = performance.now()): WorkerConnection {
    const connection = new Connection(
      join.id,
      join.name,
      join.slots,
      new Set(join.features),
      join.held,
      join.seq ?? 0n,
      now,
      this,
      link,
    );
    if (join.routing) connection.routing = join.routing;
    return connection;
  }

  /** Adds a connection, in place of any earlier one of the same worker. */
  add(connection: WorkerConnection): void {
    this.workers.set(connection.id, own(connection));
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

  /** A message arrived from the worker. Returns whether it had been silent long enough to be suspect. */
  heard(connection: WorkerConnection, now = performance.now()): boolean {
    const wasSuspect = this.isSuspect(connection, now);
    own(connection).lastSeen = now;
    return wasSuspect;
  }

  /**
   * The attempts the worker's latest heartbeat lists, and whether it says it is full (too many
   * results wait for our acknowledgement: it takes no new work until they are acknowledged).
   */
  heartbeat(connection: WorkerConnection, running: readonly HeldRef[], full = false, seq = 0n): void {
    const worker = own(connection);
    worker.reported = running.map(copyRef);
    worker.reportedSeq = seq;
    worker.full = full;
  }

  /**
   * While held (`why` says why), no worker has a free slot: backpressure from this
   * coordinator's own backlog. Returns whether that changed anything.
   */
  holdWork(why: string | null): boolean {
    if ((this.heldBack === null) === (why === null)) return false;
    this.heldBack = why;
    return true;
  }

  /** Why no worker gets new work for now, or null. */
  get workHeldBack(): string | null {
    return this.heldBack;
  }

  /** The worker takes no new work from now on. Returns true the first time. */
  drain(connection: WorkerConnection): boolean {
    const worker = own(connection);
    if (worker.draining) return false;
    worker.draining = true;
    return true;
  }

  /** Its stream is over; it is removed separately (remove), once what it held is dealt with. */
  streamEnded(connection: WorkerConnection): void {
    own(connection).ended = true;
  }

  /** Counts an attempt given to the worker against its slots, from `now`. */
  reserve(connection: WorkerConnection, taskId: string, attempt: number, now = performance.now()): void {
    own(connection).inFlight.set(attemptKey(taskId, attempt), now);
  }

  /**
   * Reserves a slot for an attempt on the worker that `slotPlan` would give it first. Returns
   * that worker, or null when no worker has a free slot.
   */
  reserveFreeSlot(taskId: string, attempt: number): WorkerConnection | null {
    const id = this.slotPlan(1)[0];
    const worker = id === undefined ? undefined : this.workers.get(id);
    if (!worker) return null;
    this.reserve(worker, taskId, attempt);
    return worker;
  }

  /** The attempt no longer counts against the worker's slots. Returns whether it did. */
  release(connection: WorkerConnection, taskId: string, attempt: number): boolean {
    return own(connection).inFlight.delete(attemptKey(taskId, attempt));
  }

  /**
   * Releases the attempts reserved over `olderThanMs` ago that the worker's heartbeat (keys in
   * `reported`) does not list: their assignment was lost on the way. Returns how many.
   */
  expireUnreported(connection: WorkerConnection, reported: ReadonlySet<string>, olderThanMs: number, now = performance.now()) {
    const inFlight = own(connection).inFlight;
    let expired = 0;
    for (const [key, reservedAt] of inFlight) {
      if (!reported.has(key) && now - reservedAt > olderThanMs) {
        inFlight.delete(key);
        expired++;
      }
    }
    return expired;
  }

  /** The registered workers not heard from for over `timeoutMs`. */
  silentFor(timeoutMs: number, now = performance.now()): WorkerConnection[] {
    return this.all().filter((worker) => now - worker.lastSeen > timeoutMs);
  }

  /** Silent long enough that it gets no new work for now. */
  isSuspect(connection: WorkerConnection, now = performance.now()): boolean {
    return now - connection.lastSeen > this.suspectAfterMs;
  }

  freeSlots(connection: WorkerConnection, now = performance.now()): number {
    if (this.heldBack !== null || connection.draining || connection.full || this.isSuspect(connection, now)) return 0;
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

/** Every WorkerConnection comes from open(); anything else is a bug in the caller. */
function own(connection: WorkerConnection): Connection {
  if (!(connection instanceof Connection)) throw new Error(`worker ${connection.id}: not a connection the registry opened`);
  return connection;
}
