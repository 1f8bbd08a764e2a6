// Turns a worker's reports into fenced state changes and acknowledges them. A result is
// acknowledged only once it is durable (or known stale), so a worker keeps re-sending it
// across database outages and reconnects.
import type { Sql } from "../db/sql";
import {
  type FinishReport,
  finishAttempts,
  markStartedMany,
  recordAttemptStopped,
  requeueAttempt,
  type StartReport,
} from "../db/transitions";
import type { TaskFinished, TaskStarted } from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import { attemptRefFromProto, type FinishAction, finishAction, fromTimestamp } from "../rpc/convert";
import { ackMessage } from "../rpc/messages";
import type { AttemptRef } from "../task/attempt";
import type { WorkerConnection, WorkerRegistry } from "./registry";

export interface CompleterOptions {
  sql: Sql;
  registry: WorkerRegistry;
  log: Logger;
  /** Called when a slot frees up. */
  onSlotFreed: () => void;
  /** Delay between retries of a report the database did not take. Defaults to 500 ms. */
  retryMs?: number;
}

/** Most reports of a kind (starts, results) written in one statement. */
const MAX_REPORTS_PER_WRITE = 500;

export class Completer {
  private readonly pending = new Set<Promise<void>>();
  private readonly starts: StartReport[] = [];
  private readonly finishes: { worker: WorkerConnection; report: FinishReport }[] = [];
  private flushing: Promise<void> | null = null;
  private stopped = false;

  constructor(private readonly options: CompleterOptions) {}

  started(worker: WorkerConnection, message: TaskStarted): void {
    const ref = message.ref;
    if (!ref) return;
    this.starts.push({
      ...attemptRefFromProto(ref, worker.id),
      startedAt: fromTimestamp(message.startedAt) ?? new Date(),
      pid: message.pid,
    });
    this.kick();
  }

  finished(worker: WorkerConnection, message: TaskFinished): void {
    const ref = message.ref;
    if (!ref) return;
    // The process has exited: the slot is free whatever the database says.
    if (this.options.registry.release(worker, ref.taskId, ref.attempt)) this.options.onSlotFreed();
    const action = finishAction(message);
    const target = attemptRefFromProto(ref, worker.id);
    if (action.kind === "record") this.finishes.push({ worker, report: { ref: target, result: action.result } });
    else this.track(this.recordOther(worker, message, action));
    this.kick();
  }

  /** Waits for reports in progress (they give up retrying once stopped). */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.flushing;
    await Promise.all(this.pending);
  }

  /**
   * Group commit: reports that arrive while a write is in flight wait for it and then go
   * together in one statement, so under load the database sees one write per batch rather
   * than one per task, and an idle system still writes each report at once.
   *
   * Not src/db/group-commit.ts: that answers each caller and, on an error, rejects the batch or
   * writes its items one by one. Here nobody waits for an answer but the worker's Ack, starts
   * and finishes go in order through one loop (a start before the finish that follows it), a
   * failed start is dropped (the finish repairs it), and failed finishes are retried whole, in
   * place, after a pause that holds back every other write while the database is away.
   */
  private kick(): void {
    if (this.flushing) return;
    this.flushing = this.flush().finally(() => {
      this.flushing = null;
      if ((this.starts.length > 0 || this.finishes.length > 0) && !this.stopped) this.kick();
    });
  }

  private async flush(): Promise<void> {
    const starts = this.starts.splice(0, MAX_REPORTS_PER_WRITE);
    const finishes = this.finishes.splice(0, MAX_REPORTS_PER_WRITE);
    if (starts.length > 0) {
      await markStartedMany(this.options.sql, starts).catch((error) =>
        // TaskFinished carries started_at too, so a lost start is repaired by the finish.
        this.options.log.warn({ err: error, tasks: starts.length }, "recording starts failed"),
      );
    }
    if (finishes.length === 0) return;
    try {
      const applied = await finishAttempts(
        this.options.sql,
        finishes.map((f) => f.report),
      );
      finishes.forEach(({ worker, report }, i) => {
        this.ack(worker, report.ref, applied[i] === null);
      });
    } catch (error) {
      // Unacknowledged, the workers still hold these results; keep the ones still ours.
      const kept = finishes.filter(({ worker }) => this.options.registry.isCurrent(worker));
      if (this.stopped || kept.length === 0) return;
      this.options.log.warn(
        { event: "completer.record_failed", err: error, tasks: kept.length },
        "recording results failed; retrying",
      );
      await Bun.sleep(this.options.retryMs ?? 500);
      this.finishes.unshift(...kept);
    }
  }

  private ack(worker: WorkerConnection, ref: AttemptRef, stale: boolean): void {
    worker.send(ackMessage(ref, stale));
  }

  /** A handed-back or stopped attempt (rare): one statement each, retried like results. */
  private async recordOther(
    worker: WorkerConnection,
    message: TaskFinished,
    action: Exclude<FinishAction, { kind: "record" }>,
  ): Promise<void> {
    const ref = message.ref!;
    const target = attemptRefFromProto(ref, worker.id);
    for (;;) {
      try {
        let applied = true;
        // The requeue's NOTIFY wakes every coordinator's dispatcher.
        if (action.kind === "requeue")
          applied = (await requeueAttempt(this.options.sql, target, action.reason, action.cause)) !== null;
        else await recordAttemptStopped(this.options.sql, target, action.reason, action.usage);
        this.ack(worker, target, !applied);
        return;
      } catch (error) {
        if (this.stopped || !this.options.registry.isCurrent(worker)) return;
        this.options.log.warn({ err: error, task: ref.taskId }, "recording a report failed; retrying");
        await Bun.sleep(this.options.retryMs ?? 500);
      }
    }
  }

  private track(promise: Promise<void>): void {
    this.pending.add(promise);
    void promise.finally(() => this.pending.delete(promise));
  }
}
