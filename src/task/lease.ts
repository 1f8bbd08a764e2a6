// How long an attempt's lease lasts, from the heartbeat timings: the one place that says it,
// for the coordinator that grants leases and the worker that keeps its own view of them.

/** How often a worker heartbeats, and the silence after which it is declared dead. */
export interface HeartbeatTimings {
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
}

/** The heartbeat timings and the lease they imply. */
export interface LeaseTimings extends HeartbeatTimings {
  leaseMs: number;
}

/**
 * An attempt's lease outlasts the heartbeat timeout by an interval, so that a silent worker is
 * declared dead (and left out of dispatch) before its leases lapse.
 */
export function leaseMsFor(timings: HeartbeatTimings): number {
  return timings.heartbeatTimeoutMs + timings.heartbeatIntervalMs;
}
