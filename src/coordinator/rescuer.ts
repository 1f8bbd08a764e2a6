// Finds lost work. Locally: a worker whose stream has been silent for the heartbeat timeout
// is declared dead. Through leases: every heartbeat interval this coordinator renews the
// leases of the attempts its workers report holding, tells a worker to stop any attempt that
// no longer holds its task (superseded, or cancelled while the worker was away: the polled
// fallback to the pushed Cancel), and requeues any task, of any coordinator, whose lease
// lapsed (its worker or its coordinator died, or the assignment never arrived). On the same
// tick it closes the streams of its workers whose credential was revoked.

import { sweepDependencies } from "../db/dependencies";
import { ping, type Sql } from "../db/sql";
import { nextLeaseExpiryIn, renewLeases, requeueExpiredLeases } from "../db/transitions";
import { revokedAmong } from "../db/worker-credentials";
import { touchWorkers } from "../db/workers";
import type { Logger } from "../log";
import type { TaskMetrics } from "../metrics/metrics";
import { attemptRefFromProto } from "../rpc/convert";
import { cancelMessage, leaseMessage } from "../rpc/messages";
import { type AttemptRef, attemptKey } from "../task/attempt";
import type { WorkerConnection, WorkerRegistry } from "./registry";

export interface RescuerOptions {
  sql: Sql;
  registry: WorkerRegistry;
  coordinatorId: string;
  log: Logger;
  heartbeatIntervalMs: number;
  /** Silence after which a worker is declared dead. */
  heartbeatTimeoutMs: number;
  /**
   * The lease of an attempt whose task asks for none (TQ_DEFAULT_LEASE_MS); each task's own
   * lease_ms otherwise. An attempt not renewed for its lease is lost.
   */
  leaseMs: number;
  /** Declares a silent worker dead (closes its stream, requeues its tasks). */
  onSilent: (worker: WorkerConnection) => void;
  /** Ends the stream of a worker whose credential was revoked (its end requeues its tasks). */
  onRevoked?: (worker: WorkerConnection) => void;
  /** Counts the attempts requeued for a lapsed lease. */
  metrics?: TaskMetrics;
  /**
   * Told once tasks were requeued for a lapsed lease: this coordinator's dispatcher runs a
   * pass at once rather than when the change comes back through the database's notification.
   */
  requeued?: () => void;
}

/** After the soonest lease's end, by the database's clock (its timestamps are to the ms). */
const LAPSE_CHECK_SLACK_MS = 5;

export class Rescuer {
  private timers: ReturnType<typeof setInterval>[] = [];
  private busy: Promise<void> | null = null;
  /**
   * A check at the moment the soonest lease runs out, when that comes before the next pass:
   * a lapse is then found within milliseconds, not within a heartbeat interval.
   */
  private lapseTimer: ReturnType<typeof setTimeout> | null = null;
  private stopped = false;
  /**
   * Since when (performance.now()) this coordinator has been renewing without a gap: from its
   * start, and again after renewals were held up. It believes the lapse of a lease only once
   * it has been renewing for that lease's length (mayBelieveLapse, src/task/lease.ts), so that
   * workers reconnecting to it renew first.
   */
  private renewingSince = performance.now();
  /** When renewals last succeeded (performance.now()). */
  private lastRenewal = performance.now();
  /** The report (its seq) each worker's leases were last renewed on. */
  private readonly renewedSeq = new WeakMap<WorkerConnection, bigint>();

  constructor(private readonly options: RescuerOptions) {}

  start(): void {
    const { heartbeatIntervalMs, heartbeatTimeoutMs } = this.options;
    // Checked often, so a silent worker is found within the timeout plus at most 100 ms.
    this.timers.push(setInterval(() => this.checkSilent(), Math.max(10, Math.min(100, heartbeatTimeoutMs / 4))));
    this.timers.push(setInterval(() => void this.renewAndRescue(), heartbeatIntervalMs));
  }

  /** Stops the timers and waits for a pass in progress. */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const timer of this.timers) clearInterval(timer);
    this.timers = [];
    if (this.lapseTimer) clearTimeout(this.lapseTimer);
    this.lapseTimer = null;
    await this.busy;
  }

  checkSilent(now = performance.now()): void {
    for (const worker of this.options.registry.silentFor(this.options.heartbeatTimeoutMs, now)) {
      this.options.onSilent(worker);
    }
  }

  /** Requeues the tasks whose lease lapsed, if this coordinator may believe lapses by now. */
  private async rescueLapsed(now: number): Promise<void> {
    const { sql, leaseMs, log } = this.options;
    const rescued = await requeueExpiredLeases(sql, leaseMs, now - this.renewingSince);
    this.options.metrics?.rescued(rescued.length);
    if (rescued.length > 0) {
      this.options.requeued?.();
      log.warn({ tasks: rescued.map((t) => t.id) }, "requeued tasks whose lease lapsed");
    }
  }

  /**
   * Arms a check for when the soonest lease runs out, when that is before the next pass. A
   * lease renewed meanwhile makes it find nothing (one indexed statement), and the next pass
   * arms it again.
   */
  private armLapseCheck(dueInMs: number | null): void {
    if (this.lapseTimer) clearTimeout(this.lapseTimer);
    this.lapseTimer = null;
    if (this.stopped || dueInMs === null || dueInMs >= this.options.heartbeatIntervalMs) return;
    this.lapseTimer = setTimeout(() => {
      this.lapseTimer = null;
      // Only between passes that renewed on time: a lapse after a gap waits for the pass's rules.
      if (this.busy || performance.now() - this.lastRenewal > 2 * this.options.heartbeatIntervalMs) return;
      this.busy = this.rescueLapsed(performance.now())
        .catch((error) => this.options.log.warn({ err: error }, "requeueing lapsed leases failed"))
        .finally(() => (this.busy = null));
    }, Math.max(0, dueInMs) + LAPSE_CHECK_SLACK_MS);
  }

  renewAndRescue(): Promise<void> {
    this.busy ??= this.pass().finally(() => (this.busy = null));
    return this.busy;
  }

  private async pass(): Promise<void> {
    const { sql, registry, coordinatorId, heartbeatIntervalMs, leaseMs, log } = this.options;
    try {
      let workers = registry.all();
      const revoked = new Set(
        await revokedAmong(
          sql,
          workers.map((w) => w.id),
        ),
      );
      if (revoked.size > 0) {
        for (const worker of workers) if (revoked.has(worker.id)) this.options.onRevoked?.(worker);
        workers = workers.filter((w) => !revoked.has(w.id));
      }
      await touchWorkers(
        sql,
        coordinatorId,
        workers.map((w) => w.id),
      );
      await this.renew(workers);
      const now = performance.now();
      const gap = now - this.lastRenewal;
      this.lastRenewal = now;
      if (gap > 2 * heartbeatIntervalMs + 100) {
        // Renewals were held up (the database was away or slow, or this process stalled), so
        // nobody's leases were renewed: a lapse now says nothing about the workers. Every lease
        // gets its own length to be renewed before its lapse is believed.
        this.renewingSince = now;
        log.info(
          { event: "rescuer.renewals_held_up", gapMs: Math.round(gap), graceMs: leaseMs },
          "renewals were held up: renewing leases before rescuing any",
        );
        return;
      }
      await this.rescueLapsed(now);
      this.armLapseCheck(await nextLeaseExpiryIn(sql));
      // Dependencies a process died before resolving (src/db/dependencies.ts): usually none.
      const resolved = await sweepDependencies(sql);
      if (resolved.length > 0) log.warn({ tasks: resolved.map((t) => t.id) }, "resolved dependencies left unresolved");
    } catch (error) {
      log.warn({ err: error }, "renewing leases failed");
    }
  }

  /**
   * Renews what the workers report, and confirms it to them; stops what no longer holds its
   * task; forgets lost deliveries. Each report is renewed once: a worker silent since its last
   * heartbeat has its leases run out from the renewal that heartbeat earned, not from ours.
   */
  private async renew(workers: WorkerConnection[]): Promise<void> {
    // A snapshot: heartbeats replace `reported` while the query runs, and only what was
    // asked about can be judged by its answer.
    const asked = workers.map((worker) => ({ worker, reported: worker.reported, seq: worker.reportedSeq }));
    const fresh = asked.filter(({ worker, seq }) => seq === 0n || seq !== this.renewedSeq.get(worker));
    const refs: AttemptRef[] = fresh.flatMap(({ worker, reported }) =>
      reported.map((ref) => attemptRefFromProto(ref, worker.id)),
    );
    // With nothing to renew, a round trip all the same: the gap check in pass() must see an
    // outage even on a coordinator without workers, before it judges anyone's leases.
    let renewed = new Map<string, number>();
    if (refs.length > 0) renewed = await renewLeases(this.options.sql, refs, this.options.leaseMs);
    else await ping(this.options.sql);
    for (const { worker, reported, seq } of fresh) {
      this.renewedSeq.set(worker, seq);
      const confirmed: { ref: (typeof reported)[number]; leaseMs: number }[] = [];
      for (const ref of reported) {
        const leaseMs = renewed.get(attemptKey(ref.taskId, ref.attempt));
        if (leaseMs === undefined) worker.send(cancelMessage(ref, "the attempt no longer holds its task"));
        else confirmed.push({ ref, leaseMs });
      }
      if (seq !== 0n && worker.features.has("lease_confirm")) worker.send(leaseMessage(seq, confirmed));
    }
    const now = performance.now();
    for (const { worker, reported } of asked) {
      // Assigned a lease ago and never reported: the assignment was lost on the way. Its
      // lease lapses (and the task is requeued); the slot is free.
      const keys = new Set(reported.map((ref) => attemptKey(ref.taskId, ref.attempt)));
      this.options.registry.expireUnreported(worker, keys, this.options.leaseMs, now);
    }
  }
}
