// Stores the output flushes workers send (TaskOutput, feature live_logs) and prunes old ones.
//
// Group commit: flushes that arrive while a write is in flight go together in the next
// statement (insertLogChunks), so many chatty tasks cost one insert per round trip. A write that
// failed because the database is away is retried whole after a pause. A result must not be
// recorded before the output that preceded it on the stream: `whenWritten(key)` is the wait the
// sessions put before such a result, and is null (no wait at all) when nothing of that attempt
// is pending, as for every task that wrote nothing.

import { insertLogChunks, type LogChunkRow, pruneLogChunks } from "../db/logs";
import type { Sql } from "../db/sql";
import type { TaskOutput } from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import { attemptKey } from "../task/attempt";
import { isTransientDatabaseError } from "../task/errors";

export interface LogWriterOptions {
  sql: Sql;
  log: Logger;
  /** TQ_LOG_MAX_BYTES: most bytes stored per attempt. */
  maxBytes: number;
  /** TQ_LOG_RETENTION_MS: chunks older than this are deleted (0: never). */
  retentionMs: number;
  /** How often the prune runs. Defaults to a minute, or a tenth of the retention when shorter. */
  pruneEveryMs?: number;
  /** Chunks deleted per statement. Defaults to 1000. */
  pruneBatch?: number;
  /** Pause before retrying a write the database refused for being away. Defaults to 500 ms. */
  retryMs?: number;
  /**
   * Most bytes of output held waiting for the database (an outage). Beyond it new output is
   * dropped, and with it the rest of each attempt it belonged to, so that no log is stored with
   * a gap and called complete. Defaults to 64 MiB.
   */
  maxPendingBytes?: number;
}

const MAX_ROWS_PER_WRITE = 500;

export class LogWriter {
  private pending: LogChunkRow[] = [];
  /** Per attempt key: chunks not yet written, and who waits for them. */
  private readonly unwritten = new Map<string, { count: number; waiters: Array<() => void> }>();
  private flushing: Promise<void> | null = null;
  private pruneTimer: Timer | undefined;
  private pruning: Promise<void> | null = null;
  private stopped = false;
  private pendingBytes = 0;
  /** Attempts whose output was dropped at the backlog's bound: the rest of theirs is dropped too. */
  private readonly gapped = new Set<string>();

  constructor(private readonly options: LogWriterOptions) {}

  start(): void {
    this.stopped = false;
    if (this.options.retentionMs > 0) this.schedulePrune();
  }

  /** Writes what is pending (giving up on retries), and stops the prune. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.pruneTimer);
    this.pruneTimer = undefined;
    await this.flushing;
    await this.pruning;
    // Whoever still waits goes on: its result will be refused or re-sent on another stream.
    for (const entry of this.unwritten.values()) for (const resolve of entry.waiters.splice(0)) resolve();
    this.unwritten.clear();
    this.pending = [];
    this.pendingBytes = 0;
    this.gapped.clear();
  }

  /** A flush from `workerId`'s stream. */
  add(workerId: string, output: TaskOutput): void {
    const ref = output.ref;
    if (!ref || this.stopped) return;
    const key = attemptKey(ref.taskId, ref.attempt);
    if (this.gapped.has(key) || this.pendingBytes + output.data.length > (this.options.maxPendingBytes ?? 64 * 1024 * 1024)) {
      if (!this.gapped.has(key))
        this.options.log.warn(
          { event: "logs.backlog_full", task_id: ref.taskId, attempt: ref.attempt, pending_bytes: this.pendingBytes },
          "too much output waits for the database: the rest of this attempt's output is dropped",
        );
      if (output.final) this.gapped.delete(key);
      else this.gapped.add(key);
      return;
    }
    this.pendingBytes += output.data.length;
    const entry = this.unwritten.get(key);
    if (entry) entry.count++;
    else this.unwritten.set(key, { count: 1, waiters: [] });
    this.pending.push({
      taskId: ref.taskId,
      attempt: ref.attempt,
      workerId,
      seq: output.seq,
      offset: Number(output.offset),
      stdoutOffset: Number(output.stdoutOffset),
      stderrOffset: Number(output.stderrOffset),
      runs: output.runs,
      data: output.data,
      final: output.final,
      cut: Number(output.cut),
    });
    this.kick();
  }

  /** Resolves once every flush of the attempt received so far is written; null when none waits. */
  whenWritten(taskId: string, attempt: number): Promise<void> | null {
    const entry = this.unwritten.get(attemptKey(taskId, attempt));
    if (!entry) return null;
    return new Promise((resolve) => entry.waiters.push(resolve));
  }

  private kick(): void {
    if (this.flushing) return;
    this.flushing = this.flush().finally(() => {
      this.flushing = null;
      if (this.pending.length > 0 && !this.stopped) this.kick();
    });
  }

  private async flush(): Promise<void> {
    const rows = this.pending.splice(0, MAX_ROWS_PER_WRITE);
    if (rows.length === 0) return;
    const bytes = rows.reduce((n, row) => n + row.data.length, 0);
    try {
      await insertLogChunks(this.options.sql, rows, this.options.maxBytes);
    } catch (error) {
      if (isTransientDatabaseError(error) && !this.stopped) {
        this.options.log.warn({ event: "logs.write_failed", err: error, chunks: rows.length }, "storing output failed; retrying");
        await Bun.sleep(this.options.retryMs ?? 500);
        this.pending.unshift(...rows);
        return;
      }
      // Values the database refuses (never expected: bytes and numbers the worker counted) are dropped.
      this.options.log.error({ event: "logs.write_refused", err: error, chunks: rows.length }, "output could not be stored");
    }
    // Written or refused: no longer held (a retry above returned before this).
    this.pendingBytes -= bytes;
    for (const row of rows) {
      const key = attemptKey(row.taskId, row.attempt);
      const entry = this.unwritten.get(key);
      if (!entry) continue;
      entry.count--;
      if (entry.count > 0) continue;
      this.unwritten.delete(key);
      for (const resolve of entry.waiters) resolve();
    }
  }

  private schedulePrune(): void {
    const every = this.options.pruneEveryMs ?? Math.max(1000, Math.min(60_000, Math.floor(this.options.retentionMs / 10)));
    this.pruneTimer = setTimeout(() => {
      this.pruning = this.prune().then(
        () => {},
        () => {},
      );
      void this.pruning.finally(() => {
        this.pruning = null;
        if (!this.stopped) this.schedulePrune();
      });
    }, every);
  }

  /** Deletes expired chunks in small batches until a batch comes back short. */
  async prune(): Promise<number> {
    const batch = this.options.pruneBatch ?? 1000;
    let deleted = 0;
    try {
      for (;;) {
        const n = await pruneLogChunks(this.options.sql, this.options.retentionMs, batch);
        deleted += n;
        if (n < batch || this.stopped) break;
      }
    } catch (error) {
      this.options.log.warn({ event: "logs.prune_failed", err: error }, "pruning old output failed; the next pass retries");
    }
    if (deleted > 0) this.options.log.info({ event: "logs.pruned", chunks: deleted }, "pruned old output");
    return deleted;
  }
}
