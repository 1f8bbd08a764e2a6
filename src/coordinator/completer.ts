// Turns a worker's reports into fenced state changes and acknowledges them. A result is
// acknowledged only once it is durable (or known stale), so a worker keeps re-sending it
// across database outages and reconnects.
//
// Backpressure: the reports waiting for the database are bounded. At `maxPending` the
// completer holds back all new work (the registry gives no worker a free slot), so the only
// reports still to come are those of attempts already out: the backlog stays within
// maxPending plus the slots of the connected workers, and shrinks once the database takes
// writes again, when new work resumes.
import type { TaskChangeRow } from "../db/changes";
import type { Sql } from "../db/sql";
import {
  type FinishReport,
  finishAttempts,
  markStartedMany,
  recordAttemptStopped,
  recordStaleHandBack,
  requeueAttempt,
  type StartReport,
} from "../db/transitions";
import type { TaskFinished, TaskStarted } from "../gen/taskqueue/v1/worker_service_pb";
import { type Logger, taskFields } from "../log";
import { type FinalState, secondsBetween, type TaskMetrics } from "../metrics/metrics";
import { attemptRefFromProto, type FinishAction, finishAction, fromTimestamp } from "../rpc/convert";
import { ackMessage } from "../rpc/messages";
import type { AttemptRef } from "../task/attempt";
import { isTransientDatabaseError } from "../task/errors";
import { unstorableResult } from "../task/retry";
import type { AttemptResult } from "../task/task";
import type { WorkerConnection, WorkerRegistry } from "./registry";

export interface CompleterOptions {
  sql: Sql;
  registry: WorkerRegistry;
  log: Logger;
  /** This coordinator, for the log lines of the attempts it records. */
  coordinatorId: string;
  /**
   * Called when a slot frees up (or new work may go out again). `exited`: only because a
   * process exited, its result not yet written (the dispatcher may wait for the write's wake).
   */
  onSlotFreed: (exited?: boolean) => void;
  /** Delay between retries of a report the database did not take. Defaults to 500 ms. */
  retryMs?: number;
  /** Reports held for the database at which new work is held back. Defaults to 10000. */
  maxPending?: number;
  /** Counts starts, results, retries and stale reports as they are recorded. */
  metrics?: TaskMetrics;
  /**
   * How long a start may wait to be written (0: not at all), so that a short task's finish,
   * arriving meanwhile, takes it along (takeStarts). Defaults to START_WINDOW_MS.
   */
  startWindowMs?: number;
}

/**
 * A start's wait for its finish: long enough for a short command's exit to come back from the
 * worker on a busy machine (in the cost bench, 10 ms merged a fifth of the starts of 4 workers
 * of 2 slots, 40 ms nearly all), short against what a start's record is for (the task's state
 * showing `running`).
 * Nothing waits on it: the worker runs the command whether or not its start is written, the
 * lease covers the attempt either way (dispatched and running alike), and submit-to-start is
 * timed by the start's own time.
 */
export const START_WINDOW_MS = 40;

/** A start waiting to be written, and when it came (performance.now()). */
interface QueuedStart {
  report: StartReport;
  at: number;
}

/** A result waiting to be written, and the worker to acknowledge it to. */
interface Finish {
  worker: WorkerConnection;
  report: FinishReport;
}

/** The final states a result can give its task (a cancel is counted by the API that made it). */
const FINISHED_STATES: ReadonlySet<string> = new Set<FinalState>(["succeeded", "failed", "timed_out"]);

/** Most reports of a kind (starts, results) written in one statement. */
const MAX_REPORTS_PER_WRITE = 500;

export class Completer {
  private readonly pending = new Set<Promise<void>>();
  /** In the order they came, so those whose window is over are first. */
  private readonly starts: QueuedStart[] = [];
  private readonly finishes: Finish[] = [];
  private flushing: Promise<void> | null = null;
  /** Set while starts alone wait out their window (startWindowMs). */
  private startTimer: ReturnType<typeof setTimeout> | null = null;
  /** Reports taken out of the queues by the write in progress (and its retry pause). */
  private writing = 0;
  private stopped = false;

  constructor(private readonly options: CompleterOptions) {}

  /** Reports held for the database: starts, results, and hand-backs being recorded. */
  get backlog(): number {
    return this.starts.length + this.finishes.length + this.writing + this.pending.size;
  }

  started(worker: WorkerConnection, message: TaskStarted): void {
    const ref = message.ref;
    if (!ref) return;
    this.starts.push({
      report: {
        ...attemptRefFromProto(ref, worker.id),
        startedAt: fromTimestamp(message.startedAt) ?? new Date(),
        pid: message.pid,
      },
      at: performance.now(),
    });
    this.kick();
  }

  finished(worker: WorkerConnection, message: TaskFinished): void {
    const ref = message.ref;
    if (!ref) return;
    // The process has exited: the slot is free whatever the database says.
    if (this.options.registry.release(worker, ref.taskId, ref.attempt)) this.options.onSlotFreed(true);
    const action = finishAction(message);
    const target = attemptRefFromProto(ref, worker.id);
    if (action.kind === "record") this.finishes.push({ worker, report: { ref: target, result: action.result } });
    else this.track(this.recordOther(worker, message, action));
    this.kick();
  }

  /** Holds back new work while the backlog is at its bound, and lets it go once below. */
  private checkBacklog(): void {
    const max = this.options.maxPending ?? 10_000;
    const full = this.backlog >= max;
    const why = full ? `${this.backlog} worker reports wait for the database` : null;
    if (!this.options.registry.holdWork(why)) return;
    if (full) {
      this.options.log.warn(
        { event: "completer.backlog_full", backlog: this.backlog, max },
        "too many reports wait for the database: no new work until they are written",
      );
    } else {
      this.options.log.info({ event: "completer.backlog_cleared", backlog: this.backlog }, "reports written: new work resumes");
      this.options.onSlotFreed();
    }
  }

  /** Waits for reports in progress (they give up retrying once stopped). */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.flushing;
    // Starts waiting out their window are written now.
    if (this.starts.length > 0) {
      this.kick();
      await this.flushing;
    }
    await Promise.all(this.pending);
  }

  /**
   * Group commit: reports that arrive while a write is in flight wait for it and then go
   * together in one statement, so under load the database sees one write per batch rather
   * than one per task, and an idle system still writes each result at once. A start waits up
   * to startWindowMs, for its finish to take it along (takeStarts).
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
    this.checkBacklog();
    if (this.flushing) return;
    if (this.finishes.length === 0) {
      // Starts alone: the first is written once its window is over (a result never waits).
      const first = this.starts[0];
      if (!first) return;
      const wait = first.at + this.startWindowMs() - performance.now();
      if (wait > 0 && !this.stopped) {
        this.startTimer ??= setTimeout(() => {
          this.startTimer = null;
          this.kick();
        }, Math.ceil(wait));
        return;
      }
    }
    if (this.startTimer) {
      clearTimeout(this.startTimer);
      this.startTimer = null;
    }
    // From a microtask: the reports of one batch (src/rpc/batch.ts), handed over in one
    // synchronous loop, go in one statement; an idle system still writes each at once.
    this.flushing = Promise.resolve()
      .then(() => this.flush())
      .finally(() => {
        this.flushing = null;
        this.writing = 0;
        if ((this.starts.length > 0 || this.finishes.length > 0) && !this.stopped) this.kick();
        else this.checkBacklog();
      });
  }

  private async flush(): Promise<void> {
    const finishes = this.finishes.splice(0, MAX_REPORTS_PER_WRITE);
    const starts = this.takeStarts(finishes);
    this.writing = starts.length + finishes.length;
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

  private startWindowMs(): number {
    return this.options.startWindowMs ?? START_WINDOW_MS;
  }

  /**
   * A short task's Started and Finished often both reach the completer before its start is
   * written: the start then goes with its finish (FinishReport.started), one update of the task
   * and of its attempt instead of two each, and one statement fewer. A start is merged only
   * with the finish of the same attempt on the same worker, which the finish's fence checks as
   * it would the start's. Takes those, and returns the starts to write on their own now: those
   * whose window is over (every one once stopped), at most MAX_REPORTS_PER_WRITE. The others
   * wait on in the queue for their finishes.
   */
  private takeStarts(finishes: readonly Finish[]): StartReport[] {
    if (this.starts.length === 0) return [];
    const byAttempt = new Map<string, Finish>();
    for (const finish of finishes) byAttempt.set(attemptRefKey(finish.report.ref), finish);
    const dueBy = this.stopped ? Number.POSITIVE_INFINITY : performance.now() - this.startWindowMs();
    const alone: StartReport[] = [];
    const kept: QueuedStart[] = [];
    for (const queued of this.starts) {
      const finish = byAttempt.get(attemptRefKey(queued.report));
      if (finish && !finish.report.started) finish.report.started = { pid: queued.report.pid };
      else if (queued.at <= dueBy && alone.length < MAX_REPORTS_PER_WRITE) alone.push(queued.report);
      else kept.push(queued);
    }
    this.starts.splice(0, this.starts.length, ...kept);
    return alone;
  }

  /**
   * TaskFinished carries started_at too, so a lost start is repaired by the finish. A batch
   * the database refuses for its values is written start by start, so that one it cannot take
   * (its values, not the database, at fault) does not lose the others.
   */
  private async recordStarts(starts: StartReport[]): Promise<void> {
    try {
      this.countStarts(await markStartedMany(this.options.sql, starts));
      return;
    } catch (error) {
      if (starts.length === 1 || isTransientDatabaseError(error)) {
        this.options.log.warn({ err: error, tasks: starts.length }, "recording starts failed");
        return;
      }
    }
    for (const start of starts) {
      try {
        this.countStarts(await markStartedMany(this.options.sql, [start]));
      } catch (error) {
        this.options.log.warn(
          { err: error, ...taskFields({ ...start, coordinatorId: this.options.coordinatorId }) },
          "recording a start failed",
        );
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
      finishes.forEach((finish, i) => {
        this.recorded(finish, applied[i] ?? null);
      });
      this.countMergedStarts(finishes, applied);
      this.wakeForKeys(applied);
      return { reports: [] };
    } catch (error) {
      if (isTransientDatabaseError(error)) return { reports: finishes, error };
      if (finishes.length === 1 && !finishes[0]!.report.started)
        return (await this.recordRefused(finishes[0]!, error)) ? { reports: [] } : { reports: finishes, error };
    }
    for (const [i, finish] of finishes.entries()) {
      try {
        const [applied] = await this.finishAlone(finish);
        this.recorded(finish, applied ?? null);
        this.countMergedStarts([finish], [applied ?? null]);
        this.wakeForKeys(applied ? [applied] : []);
      } catch (error) {
        if (isTransientDatabaseError(error) || !(await this.recordRefused(finish, error))) {
          return { reports: finishes.slice(i), error };
        }
      }
    }
    return { reports: [] };
  }

  /**
   * One result by itself. Refused with a start merged into it, it is written again without
   * that start, as if the start had gone alone and been refused (recordStarts drops such a
   * start): the start's values must not cost the result.
   */
  private async finishAlone(finish: Finish): Promise<(TaskChangeRow | null)[]> {
    try {
      return await finishAttempts(this.options.sql, [finish.report]);
    } catch (error) {
      if (!finish.report.started || isTransientDatabaseError(error)) throw error;
      this.options.log.warn(
        { err: error, ...taskFields({ ...finish.report.ref, coordinatorId: this.options.coordinatorId }) },
        "recording a start failed",
      );
      delete finish.report.started;
      return await finishAttempts(this.options.sql, [finish.report]);
    }
  }

  /**
   * Results of keyed tasks are durable: their keys' slots are free only now. The slot freed
   * when the process exited woke a dispatch pass already, but that claim still counted the
   * task live and left its key's next task queued; wake once more now rather than wait for
   * the NOTIFY (which still wakes the other coordinators) to come back round.
   */
  private wakeForKeys(applied: readonly (TaskChangeRow | null | undefined)[]): void {
    if (applied.some((row) => row?.concurrency_key && row.state !== "dispatched" && row.state !== "running"))
      this.options.onSlotFreed();
  }

  /** A result is durable (`applied`: the task as changed, or null when stale): its log line, its count, the worker's Ack. */
  private recorded({ worker, report }: Finish, applied: TaskChangeRow | null): void {
    const stale = applied === null;
    this.logFinished(worker, report.ref, report.result.state, report.result, stale);
    this.countFinish(applied, report.result);
    this.ack(worker, report.ref, stale);
  }

  /** Starts recorded: the first attempt's start also times submit-to-start. */
  private countStarts(rows: readonly TaskChangeRow[]): void {
    const metrics = this.options.metrics;
    if (!metrics) return;
    for (const row of rows) {
      metrics.started(row.attempt === 1 && row.started_at ? secondsBetween(row.created_at, row.started_at) : null);
    }
  }

  /** Starts written with their finishes (takeStarts) count as starts too, once applied. */
  private countMergedStarts(finishes: readonly Finish[], applied: readonly (TaskChangeRow | null)[]): void {
    this.countStarts(
      finishes.flatMap(({ report }, i) => {
        const row = applied[i];
        return report.started && row ? [row] : [];
      }),
    );
  }

  private countFinish(applied: TaskChangeRow | null, result: Pick<AttemptResult, "startedAt" | "finishedAt">): void {
    const metrics = this.options.metrics;
    if (!metrics) return;
    if (applied === null) {
      metrics.staleReport();
      return;
    }
    const runSeconds = result.startedAt ? secondsBetween(result.startedAt, result.finishedAt) : null;
    if (applied.state === "queued") metrics.retried(runSeconds);
    else if (FINISHED_STATES.has(applied.state)) metrics.finished(applied.state as FinalState, runSeconds);
  }

  /**
   * A result the database refused on its own (a value it cannot hold, a constraint it breaks):
   * its task fails for good with "result could not be stored" (the database's reason is logged
   * here, never shown to clients), and the worker is acknowledged, so that the result is not
   * sent again and again. Returns false when the database was away meanwhile: retry later.
   */
  private async recordRefused(finish: Finish, refused: unknown): Promise<boolean> {
    const { worker, report } = finish;
    const where = taskFields({ ...report.ref, workerId: worker.id, coordinatorId: this.options.coordinatorId });
    this.options.log.error(
      { event: "completer.result_refused", ...where, err: refused },
      "the database refused a result; failing its task",
    );
    const stored: FinishReport = { ref: report.ref, result: unstorableResult(report.result), unstorable: true };
    try {
      const [applied] = await finishAttempts(this.options.sql, [stored]);
      this.recorded({ worker, report: stored }, applied ?? null);
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
        if (action.kind === "requeue") {
          applied = (await requeueAttempt(this.options.sql, target, reason, action.cause)) !== null;
          // Superseded (or a repeat of one applied): the history still says it came.
          if (!applied) await recordStaleHandBack(this.options.sql, target, reason, action.cause);
        } else if (await recordAttemptStopped(this.options.sql, target, reason, action.usage)) {
          // A cancelled keyed task's process is gone: only now is its key's slot free.
          this.options.onSlotFreed();
        }
        const result = finishedTimes(message);
        this.logFinished(worker, target, action.kind === "requeue" ? "handed_back" : "stopped", result, !applied, reason);
        if (!applied) this.options.metrics?.staleReport();
        this.ack(worker, target, !applied);
        return;
      } catch (error) {
        if (this.stopped || !this.options.registry.isCurrent(worker)) return;
        const where = taskFields({ ...target, coordinatorId: this.options.coordinatorId });
        const fallback = action.kind === "requeue" ? "handed back by the worker" : "told to stop";
        if (!isTransientDatabaseError(error) && reason !== fallback) {
          // The worker's words (which the database refused) are not needed to apply the report.
          this.options.log.error({ err: error, ...where }, "the database refused a report's reason; using our own");
          reason = fallback;
          continue;
        }
        if (!isTransientDatabaseError(error)) {
          this.options.log.error({ err: error, ...where }, "the database refused a report; dropping it");
          this.ack(worker, target, true);
          return;
        }
        this.options.log.warn(
          { err: error, ...taskFields({ ...target, coordinatorId: this.options.coordinatorId }) },
          "recording a report failed; retrying",
        );
        await Bun.sleep(this.options.retryMs ?? 500);
      }
    }
  }

  private track(promise: Promise<void>): void {
    this.pending.add(promise);
    void promise.finally(() => {
      this.pending.delete(promise);
      this.checkBacklog();
    });
  }

  /**
   * One line per attempt whose end this coordinator recorded (event `attempt.finished`): how it
   * ended, its exit code or signal, how long it ran, and its resource usage when the worker
   * measured it. `stale`: the attempt no longer held its task, so the result changed nothing.
   */
  private logFinished(
    worker: WorkerConnection,
    ref: AttemptRef,
    outcome: string,
    result: Pick<AttemptResult, "exitCode" | "signal" | "startedAt" | "finishedAt" | "error">,
    stale: boolean,
    reason?: string,
  ): void {
    const durationMs = result.startedAt ? Math.max(0, result.finishedAt.getTime() - result.startedAt.getTime()) : null;
    this.options.log.info(
      {
        event: "attempt.finished",
        ...taskFields({ ...ref, workerId: worker.id, coordinatorId: this.options.coordinatorId }),
        outcome,
        exit_code: result.exitCode,
        signal: result.signal,
        duration_ms: durationMs,
        stale,
        ...(reason || result.error ? { error: reason ?? result.error } : {}),
        ...usageOf(result),
      },
      "attempt finished",
    );
  }
}

function attemptRefKey(ref: AttemptRef): string {
  return `${ref.taskId}/${ref.attempt}/${ref.workerId}`;
}

/** The times and exit status of a hand-back or a stop, for its log line. */
function finishedTimes(message: TaskFinished): Pick<AttemptResult, "exitCode" | "signal" | "startedAt" | "finishedAt" | "error"> {
  return {
    exitCode: message.exitCode ?? null,
    signal: message.signal || null,
    startedAt: fromTimestamp(message.startedAt),
    finishedAt: fromTimestamp(message.finishedAt) ?? new Date(),
    error: message.error || null,
  };
}

/**
 * The attempt's resource usage, when its result carries one (`usage`: CPU time, peak memory,
 * OOM; measured by workers that can), as plain JSON for the log line.
 */
function usageOf(result: object): { usage?: unknown } {
  const usage = (result as { usage?: unknown }).usage;
  if (usage === undefined || usage === null) return {};
  return { usage: plainJson(usage) };
}

/** A copy with bigints as numbers (pino cannot write a bigint), without a JSON round trip. */
function plainJson(value: unknown): unknown {
  if (typeof value === "bigint") return Number(value);
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map(plainJson);
  if (value instanceof Date) return value.toISOString();
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) if (v !== undefined) out[k] = plainJson(v);
  return out;
}
