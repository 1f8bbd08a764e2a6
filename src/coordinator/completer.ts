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
import { isTransientDatabaseError } from "../task/errors";
import { unstorableResult } from "../task/retry";
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

/** A result waiting to be written, and the worker to acknowledge it to. */
interface Finish {
  worker: WorkerConnection;
  report: FinishReport;
}

/** Most reports of a kind (starts, results) written in one statement. */
const MAX_REPORTS_PER_WRITE = 500;

export class Completer {
  private readonly pending = new Set<Promise<void>>();
  private readonly starts: StartReport[] = [];
  private readonly finishes: Finish[] = [];
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
   * failed start is dropped (the finish repairs it), and finishes that failed because the
   * database is away or busy are retried whole, in place, after a pause that holds back every
   * other write meanwhile. A batch refused for its values is written item by item, as
   * group-commit does, and a result refused alone fails only its own task.
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
    if (starts.length > 0) await this.recordStarts(starts);
    if (finishes.length === 0) return;
    const later = await this.recordFinishes(finishes);
    if (later.reports.length === 0) return;
    // Unacknowledged, the workers still hold these results; keep the ones still ours.
    const kept = later.reports.filter(({ worker }) => this.options.registry.isCurrent(worker));
    if (this.stopped || kept.length === 0) return;
    this.options.log.warn(
      { event: "completer.record_failed", err: later.error, tasks: kept.length },
      "recording results failed; retrying",
    );
    await Bun.sleep(this.options.retryMs ?? 500);
    this.finishes.unshift(...kept);
  }

  /**
   * TaskFinished carries started_at too, so a lost start is repaired by the finish. A batch
   * the database refuses for its values is written start by start, so that one it cannot take
   * (its values, not the database, at fault) does not lose the others.
   */
  private async recordStarts(starts: StartReport[]): Promise<void> {
    try {
      await markStartedMany(this.options.sql, starts);
      return;
    } catch (error) {
      if (starts.length === 1 || isTransientDatabaseError(error)) {
        this.options.log.warn({ err: error, tasks: starts.length }, "recording starts failed");
        return;
      }
    }
    for (const start of starts) {
      try {
        await markStartedMany(this.options.sql, [start]);
      } catch (error) {
        this.options.log.warn({ err: error, task: start.taskId, attempt: start.attempt }, "recording a start failed");
        if (isTransientDatabaseError(error)) return;
      }
    }
  }

  /**
   * Writes a batch of results and acknowledges each. When the database refuses the batch for
   * a reason other than being away or busy (isTransientDatabaseError), it is written report by
   * report, as src/db/group-commit.ts does, and a report it refuses alone fails only its own
   * task (recordRefused). Returns what must be retried later, whole: the database was away.
   */
  private async recordFinishes(finishes: Finish[]): Promise<{ reports: Finish[]; error?: unknown }> {
    try {
      const applied = await finishAttempts(
        this.options.sql,
        finishes.map((f) => f.report),
      );
      finishes.forEach(({ worker, report }, i) => {
        this.ack(worker, report.ref, applied[i] === null);
      });
      return { reports: [] };
    } catch (error) {
      if (isTransientDatabaseError(error)) return { reports: finishes, error };
      if (finishes.length === 1)
        return (await this.recordRefused(finishes[0]!, error)) ? { reports: [] } : { reports: finishes, error };
    }
    for (const [i, finish] of finishes.entries()) {
      try {
        const [applied] = await finishAttempts(this.options.sql, [finish.report]);
        this.ack(finish.worker, finish.report.ref, applied === null);
      } catch (error) {
        if (isTransientDatabaseError(error) || !(await this.recordRefused(finish, error))) {
          return { reports: finishes.slice(i), error };
        }
      }
    }
    return { reports: [] };
  }

  /**
   * A result the database refused on its own (a value it cannot hold, a constraint it breaks):
   * its task fails for good with "result could not be stored" (the database's reason is logged
   * here, never shown to clients), and the worker is acknowledged, so that the result is not
   * sent again and again. Returns false when the database was away meanwhile: retry later.
   */
  private async recordRefused(finish: Finish, refused: unknown): Promise<boolean> {
    const { worker, report } = finish;
    const where = { task: report.ref.taskId, attempt: report.ref.attempt, worker: worker.id };
    this.options.log.error(
      { event: "completer.result_refused", ...where, err: refused },
      "the database refused a result; failing its task",
    );
    try {
      const [applied] = await finishAttempts(this.options.sql, [
        { ref: report.ref, result: unstorableResult(report.result), unstorable: true },
      ]);
      this.ack(worker, report.ref, applied === null);
    } catch (error) {
      if (isTransientDatabaseError(error)) return false;
      // Nothing of the worker's is left in what was written. Acknowledged, the attempt drops
      // out of the worker's heartbeats, its lease lapses and the rescuer ends it as lost.
      this.options.log.error(
        { event: "completer.result_dropped", ...where, err: error },
        "could not record a refused result either; dropping it",
      );
      this.ack(worker, report.ref, true);
    }
    return true;
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
    let reason = action.reason;
    for (;;) {
      try {
        let applied = true;
        // The requeue's NOTIFY wakes every coordinator's dispatcher.
        if (action.kind === "requeue") applied = (await requeueAttempt(this.options.sql, target, reason)) !== null;
        else await recordAttemptStopped(this.options.sql, target, reason);
        this.ack(worker, target, !applied);
        return;
      } catch (error) {
        if (this.stopped || !this.options.registry.isCurrent(worker)) return;
        const fallback = action.kind === "requeue" ? "handed back by the worker" : "told to stop";
        if (!isTransientDatabaseError(error) && reason !== fallback) {
          // The worker's words (which the database refused) are not needed to apply the report.
          this.options.log.error({ err: error, task: ref.taskId }, "the database refused a report's reason; using our own");
          reason = fallback;
          continue;
        }
        if (!isTransientDatabaseError(error)) {
          this.options.log.error({ err: error, task: ref.taskId }, "the database refused a report; dropping it");
          this.ack(worker, target, true);
          return;
        }
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
