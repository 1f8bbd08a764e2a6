// Retention's loop (TQ_RETENTION): deletes final tasks past the retention window, and what
// belongs to them, in batches (src/db/retention.ts). Each batch is one short transaction of at
// most TQ_RETENTION_BATCH_SIZE tasks that takes only rows nobody holds (SKIP LOCKED), with a
// pause between batches, so a backlog of millions is worked off without ever holding dispatch
// up for long. Every coordinator runs one; a transaction-scoped advisory lock lets one batch
// run at a time across them, and a coordinator that finds the lock taken simply waits for
// its next interval.
import { pruneBatch } from "../db/retention";
import type { Sql } from "../db/sql";
import type { Logger } from "../log";
import type { TaskMetrics } from "../metrics/metrics";

export interface PrunerOptions {
  sql: Sql;
  log: Logger;
  /** How long a final task is kept after it ended. */
  retentionMs: number;
  /** Tasks per batch. */
  batchSize: number;
  /** Between two batches of one pass. */
  pauseMs: number;
  /** Between passes, once a pass found no more to delete. */
  intervalMs: number;
  metrics?: TaskMetrics;
}

export class Pruner {
  private timer: ReturnType<typeof setTimeout> | null = null;
  private running: Promise<void> | null = null;
  /** Set by stop(): no further batch or pass. */
  private stopping = false;
  /** Wakes the pause between batches at stop(). */
  private wakePause: (() => void) | null = null;

  constructor(private readonly options: PrunerOptions) {}

  start(): void {
    this.stopping = false;
    // The first pass soon after start, not at once: a coordinator starting up has other work.
    this.schedule(Math.min(this.options.intervalMs, 1000));
  }

  /** Stops after the batch in progress (if any) commits. */
  async stop(): Promise<void> {
    this.stopping = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.wakePause?.();
    await this.running;
  }

  /** Runs one pass now (batches until none is full); resolves to the tasks it deleted. */
  async runPass(): Promise<number> {
    const { sql, log, retentionMs, batchSize, pauseMs, metrics } = this.options;
    let tasks = 0;
    let batches = 0;
    const started = performance.now();
    // The cutoff is fixed for the pass: a pass ends even while tasks keep ending.
    const cutoff = new Date(Date.now() - retentionMs);
    try {
      while (!this.stopping) {
        const result = await pruneBatch(sql, cutoff, batchSize);
        if (result === null) break; // another coordinator is pruning
        batches++;
        tasks += result.rows.tasks;
        metrics?.pruned(result.rows);
        if (!result.full || this.stopping) break;
        await this.pause(pauseMs);
      }
    } catch (error) {
      log.warn({ err: error }, "retention batch failed; trying again next interval");
    }
    if (tasks > 0) {
      log.info(
        { event: "retention.pruned", tasks, batches, ms: Math.round(performance.now() - started) },
        "deleted final tasks past the retention window",
      );
    }
    return tasks;
  }

  private schedule(delayMs: number): void {
    if (this.stopping) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.running = this.runPass()
        .then(() => undefined)
        .finally(() => {
          this.running = null;
          this.schedule(this.options.intervalMs);
        });
    }, delayMs);
  }

  private pause(ms: number): Promise<void> {
    if (ms <= 0) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wakePause = done;
    }).finally(() => {
      this.wakePause = null;
    });
  }
}
