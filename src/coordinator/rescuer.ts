// Finds lost work. Locally: a worker whose stream has been silent for the heartbeat timeout
// is declared dead. Through leases: every heartbeat interval this coordinator renews the
// leases of the attempts its workers report holding, tells a worker to stop any attempt that
// no longer holds its task (superseded, or cancelled while the worker was away: the polled
// fallback to the pushed Cancel), and requeues any task, of any coordinator, whose lease
// lapsed (its worker or its coordinator died, or the assignment never arrived).
import { create } from "@bufbuild/protobuf";
import { CoordinatorMessageSchema } from "../gen/taskqueue/v1/worker_service_pb";
import type { Sql } from "../db/sql";
import { renewLeases, requeueExpiredLeases, type AttemptRef } from "../db/tasks";
import { touchWorkers } from "../db/workers";
import type { Logger } from "../log";
import { attemptKey, type WorkerConnection, type WorkerRegistry } from "./registry";

export interface RescuerOptions {
  sql: Sql;
  registry: WorkerRegistry;
  coordinatorId: string;
  log: Logger;
  heartbeatIntervalMs: number;
  /** Also the lease: an attempt not reported for this long is lost. */
  heartbeatTimeoutMs: number;
  /** Declares a silent worker dead (closes its stream, requeues its tasks). */
  onSilent: (worker: WorkerConnection) => void;
}

export class Rescuer {
  private timers: ReturnType<typeof setInterval>[] = [];
  private busy: Promise<void> | null = null;
  /** After the database was unreachable, no lease is judged until this (performance.now()). */
  private graceUntil = 0;
  private failing = false;

  constructor(private readonly options: RescuerOptions) {}

  start(): void {
    const { heartbeatIntervalMs, heartbeatTimeoutMs } = this.options;
    // Checked often, so a silent worker is found within the timeout plus at most 100 ms.
    this.timers.push(setInterval(() => this.checkSilent(), Math.max(10, Math.min(100, heartbeatTimeoutMs / 4))));
    this.timers.push(setInterval(() => void this.renewAndRescue(), heartbeatIntervalMs));
  }

  /** Stops the timers and waits for a pass in progress. */
  async stop(): Promise<void> {
    for (const timer of this.timers) clearInterval(timer);
    this.timers = [];
    await this.busy;
  }

  checkSilent(now = performance.now()): void {
    for (const worker of this.options.registry.all()) {
      if (now - worker.lastSeen > this.options.heartbeatTimeoutMs) this.options.onSilent(worker);
    }
  }

  renewAndRescue(): Promise<void> {
    this.busy ??= this.pass().finally(() => (this.busy = null));
    return this.busy;
  }

  private async pass(): Promise<void> {
    const { sql, registry, coordinatorId, heartbeatTimeoutMs, log } = this.options;
    try {
      const workers = registry.all();
      await touchWorkers(sql, coordinatorId, workers.map((w) => w.id));
      await this.renew(workers);
      if (this.failing) {
        // Nobody could renew while the database was away: give every coordinator one lease
        // period to renew its workers' leases before any lapse is believed.
        this.failing = false;
        this.graceUntil = performance.now() + heartbeatTimeoutMs;
        log.info({ graceMs: heartbeatTimeoutMs }, "database back: renewing leases before rescuing any");
        return;
      }
      if (performance.now() < this.graceUntil) return;
      const rescued = await requeueExpiredLeases(sql);
      if (rescued.length > 0) {
        log.warn({ tasks: rescued.map((t) => t.id) }, "requeued tasks whose lease lapsed");
      }
    } catch (error) {
      this.failing = true;
      log.warn({ err: error }, "renewing leases failed");
    }
  }

  /** Renews what the workers report; stops what no longer holds its task; forgets lost deliveries. */
  private async renew(workers: WorkerConnection[]): Promise<void> {
    const refs: AttemptRef[] = [];
    for (const worker of workers) {
      for (const ref of worker.reported) refs.push({ id: ref.taskId, attempt: ref.attempt, workerId: worker.id });
    }
    const renewed = await renewLeases(this.options.sql, refs, this.options.heartbeatTimeoutMs);
    const now = performance.now();
    for (const worker of workers) {
      const reported = new Set<string>();
      for (const ref of worker.reported) {
        const key = attemptKey(ref.taskId, ref.attempt);
        reported.add(key);
        if (!renewed.has(key)) stopAttempt(worker, ref, "the attempt no longer holds its task");
      }
      // Assigned a lease ago and never reported: the assignment was lost on the way. Its
      // lease lapses (and the task is requeued); the slot is free.
      for (const [key, assignedAt] of worker.inFlight) {
        if (!reported.has(key) && now - assignedAt > this.options.heartbeatTimeoutMs) worker.inFlight.delete(key);
      }
    }
  }
}

/** Tells a worker to stop an attempt (a no-op on its side if it no longer runs it). */
export function stopAttempt(worker: WorkerConnection, ref: { taskId: string; attempt: number }, reason: string): void {
  worker.send(
    create(CoordinatorMessageSchema, {
      payload: { case: "cancel", value: { ref: { taskId: ref.taskId, attempt: ref.attempt }, reason } },
    }),
  );
}
