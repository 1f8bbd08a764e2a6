// The worker's own count of each attempt's lease, on its monotonic clock (performance.now()):
// from the send of the Hello or Heartbeat whose renewal a coordinator confirmed
// (LeaseConfirmation), or from the receipt of its Assign until the first confirmation. An
// attempt is fenced (its process group stopped) a margin before its lease runs out
// (fenceAt, src/task/lease.ts), so it is gone before any coordinator may requeue it on its own
// judgement. Pure: the worker gives it the time.
import { fenceAt, type HeartbeatTimings } from "../task/lease";

/** How many sent messages' times are kept for matching confirmations (older ones are ignored). */
const SENT_KEPT = 256;

export interface FenceOptions extends HeartbeatTimings {
  killGraceMs: number;
}

export class LeaseFence {
  /** performance.now() each numbered Hello or Heartbeat was sent, oldest first. */
  private readonly sentAt = new Map<bigint, number>();
  /** Each held attempt's fence time (performance.now()) and the lease it was counted with. */
  private readonly leases = new Map<string, { fenceAt: number; leaseMs: number }>();

  constructor(private options: FenceOptions) {}

  /** The coordinator's heartbeat timings (from Welcome), for the margins of what is counted next. */
  set timings(timings: HeartbeatTimings) {
    this.options = { ...this.options, ...timings };
  }

  /** A numbered Hello or Heartbeat went out at `at`. */
  sent(seq: bigint, at: number): void {
    this.sentAt.set(seq, at);
    if (this.sentAt.size > SENT_KEPT) this.sentAt.delete(this.sentAt.keys().next().value as bigint);
  }

  /** When the message numbered `seq` was sent, if it is still known. */
  sentTime(seq: bigint): number | undefined {
    return this.sentAt.get(seq);
  }

  /**
   * An Assign arrived at `at` with `leaseMs` left as the coordinator sent it: counted from
   * receipt (its time in transit is within the margin) until a confirmation replaces it.
   */
  granted(key: string, leaseMs: number, at: number): void {
    this.leases.set(key, { fenceAt: fenceAt(at, leaseMs, this.options, this.options.killGraceMs), leaseMs });
  }

  /**
   * A confirmation for the message numbered `seq`: each renewed attempt we hold now fences
   * `leaseMs` from that message's send. Returns the keys it moved, or null when `seq` is
   * unknown (too old, or not ours): then nothing is trusted from it.
   */
  confirm(seq: bigint, renewed: readonly { key: string; leaseMs: number }[]): Set<string> | null {
    const at = this.sentAt.get(seq);
    if (at === undefined) return null;
    const moved = new Set<string>();
    for (const { key, leaseMs } of renewed) {
      const current = this.leases.get(key);
      if (!current) continue;
      const next = fenceAt(at, leaseMs, this.options, this.options.killGraceMs);
      // Confirmations may arrive out of order: a later fence time only.
      if (next > current.fenceAt) this.leases.set(key, { fenceAt: next, leaseMs });
      moved.add(key);
    }
    return moved;
  }

  /** The attempt is no longer held. */
  forget(key: string): void {
    this.leases.delete(key);
  }

  /** Whether the attempt's lease still holds at `now` (before its fence time). */
  trusted(key: string, now: number): boolean {
    const lease = this.leases.get(key);
    return lease !== undefined && now < lease.fenceAt;
  }

  /** The lease the attempt was last counted with (for log lines). */
  leaseOf(key: string): { fenceAt: number; leaseMs: number } | undefined {
    return this.leases.get(key);
  }

  /** Held attempts whose fence time has come by `now`. */
  due(now: number): string[] {
    const out: string[] = [];
    for (const [key, lease] of this.leases) if (now >= lease.fenceAt) out.push(key);
    return out;
  }
}

/**
 * Detects the worker's own stalls: a gap between ticks of its monotonic clock longer than a
 * heartbeat interval (the process was frozen, or its event loop blocked). `tick` answers the
 * gap when it was one.
 */
export class StallDetector {
  private last: number;

  constructor(
    private readonly thresholdMs: number,
    now: number,
  ) {
    this.last = now;
  }

  tick(now: number): number | null {
    const gap = now - this.last;
    this.last = now;
    return gap > this.thresholdMs ? gap : null;
  }
}
