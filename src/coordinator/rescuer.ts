// Finds lost work. Locally: a worker whose stream has been silent for the heartbeat timeout
// is declared dead. Globally: this coordinator vouches for its live workers in the database
// every heartbeat interval, and requeues in-flight tasks of workers nobody vouches for (their
// coordinator died with them), so any live coordinator rescues them.
import type { Sql } from "../db/sql";
import { requeueOrphans } from "../db/tasks";
import { touchWorkers } from "../db/workers";
import type { Logger } from "../log";
import type { WorkerConnection, WorkerRegistry } from "./registry";

export interface RescuerOptions {
  sql: Sql;
  registry: WorkerRegistry;
  coordinatorId: string;
  log: Logger;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  /** Declares a silent worker dead (closes its stream, requeues its tasks). */
  onSilent: (worker: WorkerConnection) => void;
}

export class Rescuer {
  private timers: ReturnType<typeof setInterval>[] = [];
  private busy: Promise<void> | null = null;

  constructor(private readonly options: RescuerOptions) {}

  start(): void {
    const { heartbeatIntervalMs, heartbeatTimeoutMs } = this.options;
    // Checked four times per timeout, so a silent worker is found within 1.25 timeouts.
    this.timers.push(setInterval(() => this.checkSilent(), Math.max(10, Math.floor(heartbeatTimeoutMs / 4))));
    this.timers.push(setInterval(() => void this.vouchAndRescue(), heartbeatIntervalMs));
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

  vouchAndRescue(): Promise<void> {
    this.busy ??= this.pass().finally(() => (this.busy = null));
    return this.busy;
  }

  private async pass(): Promise<void> {
    try {
      const ids = this.options.registry.all().map((w) => w.id);
      await touchWorkers(this.options.sql, this.options.coordinatorId, ids);
      const rescued = await requeueOrphans(this.options.sql, this.options.heartbeatTimeoutMs);
      if (rescued.length > 0) {
        this.options.log.warn({ tasks: rescued.map((t) => t.id) }, "requeued tasks of workers no coordinator vouches for");
      }
    } catch (error) {
      this.options.log.warn({ err: error }, "vouching for workers failed");
    }
  }
}
