// How long an attempt's lease lasts and what each side may conclude from it: the one place
// that says it, for the coordinator that grants and renews leases and the worker that counts
// them down on its own clock (src/worker/lease-fence.ts).
//
// Liveness and the lease are separate. The heartbeat timeout only decides whether a worker is
// live (a silent one gets no new work). Each attempt holds a lease of its own (the task's
// lease_ms, TQ_DEFAULT_LEASE_MS when it asks for none), renewed through any coordinator while
// its worker reports it; only when it has run out may a coordinator requeue the attempt of a
// worker whose death nobody confirmed.

/** How often a worker heartbeats, and the silence after which it is declared dead. */
export interface HeartbeatTimings {
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
}

/** The heartbeat timings and the default lease of an attempt. */
export interface LeaseTimings extends HeartbeatTimings {
  /** The lease of an attempt whose task asks for none (TQ_DEFAULT_LEASE_MS). */
  leaseMs: number;
}

/** TQ_DEFAULT_LEASE_MS when unset. */
export const DEFAULT_LEASE_MS = 30_000;

/**
 * The shortest lease an attempt may hold: the heartbeat timeout plus two intervals, so that a
 * silent worker is declared dead (and left out of dispatch) and a reconnecting one has an
 * interval to renew before any lease of its lapses.
 */
export function minLeaseMs(timings: HeartbeatTimings): number {
  return timings.heartbeatTimeoutMs + 2 * timings.heartbeatIntervalMs;
}

/**
 * The lease a coordinator of protocol 4 and older granted (and still the worker's guess for
 * one that confirms no renewals): the heartbeat timeout plus an interval.
 */
export function legacyLeaseMsFor(timings: HeartbeatTimings): number {
  return timings.heartbeatTimeoutMs + timings.heartbeatIntervalMs;
}

/**
 * The clock-rate drift the worker allows for between its monotonic clock and the database's:
 * 1 %. No wall clocks are compared; only rates are assumed to agree this closely.
 */
export const CLOCK_DRIFT = 0.01;

/**
 * How long before its lease runs out (counted on the worker's clock from the send of the
 * heartbeat whose renewal was confirmed) a worker starts stopping an attempt: the drift over
 * the lease, the kill grace the stop may take (TERM, then KILL), and half an interval for a
 * timer that fires late. The fence's kill grace is the task's kill grace capped at one
 * heartbeat interval (fenceKillGraceMs), so a short lease still leaves time to run.
 */
export function fenceMarginMs(leaseMs: number, timings: HeartbeatTimings, killGraceMs: number): number {
  return Math.ceil(leaseMs * CLOCK_DRIFT) + fenceKillGraceMs(timings, killGraceMs) + Math.ceil(timings.heartbeatIntervalMs / 2);
}

/** Between TERM and KILL when the worker fences an attempt: the kill grace, at most one interval. */
export function fenceKillGraceMs(timings: HeartbeatTimings, killGraceMs: number): number {
  return Math.min(killGraceMs, timings.heartbeatIntervalMs);
}

/**
 * When (on the worker's monotonic clock) it must stop an attempt whose lease of `leaseMs` was
 * confirmed renewed in answer to a message it sent at `sentAt`. The coordinator renewed after
 * it received that message, so its lease runs out later than sentAt + leaseMs by its clock:
 * the worker's deadline is always the earlier one, by the margin.
 */
export function fenceAt(sentAt: number, leaseMs: number, timings: HeartbeatTimings, killGraceMs: number): number {
  return sentAt + leaseMs - fenceMarginMs(leaseMs, timings, killGraceMs);
}

/**
 * Whether a coordinator may believe lapses of leases as long as `leaseMs`: only once it has
 * been renewing (without a gap) for at least that long, so that workers that reconnected to
 * it after its start or an outage have renewed first.
 */
export function mayBelieveLapse(leaseMs: number, renewingForMs: number): boolean {
  return renewingForMs >= leaseMs;
}
