// The Prometheus metrics of one role (GET /metrics). Each role owns its own registry, labelled
// with `role`: the all-in-one process runs three roles, and each port shows only its own
// (prom-client's global default registry is never used). Every event is counted where it
// happens in this process (the API for submits and cancels, the dispatcher for dispatches,
// the completer for starts and results, the rescuer and the sessions for rescues) through the
// small verbs below, each an inc() or observe() on a child made once: nothing is allocated
// per task.
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import { PRUNED_TABLES, type PrunedRows } from "../db/retention";

type PrunedTable = keyof PrunedRows;

/** Buckets for latencies from a millisecond to ten minutes, in seconds. */
export const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];
/** Buckets for a task's run, from 10 ms to six hours, in seconds. */
export const RUN_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600];

/** How a task's end is counted: its final state. */
export type FinalState = "succeeded" | "failed" | "timed_out" | "cancelled";
const FINAL_STATES: readonly FinalState[] = ["succeeded", "failed", "timed_out", "cancelled"];

/** What became of a schedule's due firing. */
export type FiringOutcome = "fired" | "skipped" | "missed";
const FIRING_OUTCOMES: readonly FiringOutcome[] = ["fired", "skipped", "missed"];

export type MetricsRole = "coordinator" | "scheduler" | "worker";

/** The content type of the Prometheus text format that prom-client writes. */
export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

/** Seconds between two dates, never negative (clocks of two machines). */
export function secondsBetween(from: Date, to: Date): number {
  return Math.max(0, (to.getTime() - from.getTime()) / 1000);
}

export class TaskMetrics {
  readonly registry: Registry;
  private readonly submittedTotal: Counter;
  private readonly dispatchedTotal: Counter;
  private readonly startedTotal: Counter;
  private readonly finishedBy: Record<FinalState, Counter.Internal>;
  private readonly retriedTotal: Counter;
  private readonly rescuedTotal: Counter;
  private readonly staleTotal: Counter;
  private readonly firingsBy: Record<FiringOutcome, Counter.Internal>;
  private readonly rateLimitedTotal: Counter;
  private readonly prunedBy: Record<PrunedTable, Counter.Internal>;
  private readonly submitToStart: Histogram;
  private readonly queueWait: Histogram;
  private readonly runDuration: Histogram;
  private readonly lateness: Histogram;

  constructor(role: MetricsRole) {
    const registry = new Registry();
    registry.setDefaultLabels({ role });
    this.registry = registry;
    const counter = (name: string, help: string, labelNames: string[] = []) =>
      new Counter({ name, help, labelNames, registers: [registry] });
    const histogram = (name: string, help: string, buckets: number[]) =>
      new Histogram({ name, help, buckets, registers: [registry] });
    this.submittedTotal = counter(
      "taskqueue_tasks_submitted_total",
      "Tasks created by submits to this role (idempotent repeats not counted).",
    );
    this.dispatchedTotal = counter("taskqueue_tasks_dispatched_total", "Attempts assigned to a worker by this coordinator.");
    this.startedTotal = counter("taskqueue_tasks_started_total", "Attempts whose start this coordinator recorded.");
    const finished = counter(
      "taskqueue_tasks_finished_total",
      "Tasks that reached a final state here, by state (succeeded, failed, timed_out by the completer; cancelled by the API).",
      ["state"],
    );
    this.finishedBy = Object.fromEntries(FINAL_STATES.map((state) => [state, finished.labels(state)])) as Record<
      FinalState,
      Counter.Internal
    >;
    this.retriedTotal = counter("taskqueue_tasks_retried_total", "Ended attempts whose task was queued again for a retry.");
    this.rescuedTotal = counter(
      "taskqueue_tasks_rescued_total",
      "Attempts requeued because their worker was lost or their lease lapsed.",
    );
    this.staleTotal = counter(
      "taskqueue_stale_reports_total",
      "Worker results for an attempt that no longer held its task (recorded, changed nothing).",
    );
    const firings = counter("taskqueue_schedule_firings_total", "Due firings of recurring schedules, by outcome.", ["outcome"]);
    this.firingsBy = Object.fromEntries(FIRING_OUTCOMES.map((outcome) => [outcome, firings.labels(outcome)])) as Record<
      FiringOutcome,
      Counter.Internal
    >;
    this.rateLimitedTotal = counter(
      "taskqueue_dispatch_rate_limited_total",
      "Dispatch passes that left worker slots free while a due task waited for a rate limit's token.",
    );
    const pruned = counter(
      "taskqueue_retention_pruned_rows_total",
      "Rows deleted by retention (TQ_RETENTION), by table; rows that went by a cascade (log chunks) are not counted.",
      ["table"],
    );
    this.prunedBy = Object.fromEntries(PRUNED_TABLES.map((table) => [table, pruned.labels(table)])) as Record<
      PrunedTable,
      Counter.Internal
    >;
    this.submitToStart = histogram(
      "taskqueue_task_submit_to_start_seconds",
      "From a task's creation to the start of its first attempt.",
      LATENCY_BUCKETS,
    );
    this.queueWait = histogram(
      "taskqueue_task_queue_wait_seconds",
      "From an attempt becoming due (run_at) to its dispatch; 0 for an early hand-over.",
      LATENCY_BUCKETS,
    );
    this.runDuration = histogram(
      "taskqueue_task_run_duration_seconds",
      "From an attempt's start to its end, as its worker measured.",
      RUN_BUCKETS,
    );
    this.lateness = histogram(
      "taskqueue_schedule_lateness_seconds",
      "From a schedule's due time to its firing's task being written.",
      LATENCY_BUCKETS,
    );
  }

  submitted(count = 1): void {
    this.submittedTotal.inc(count);
  }

  /** An Assign went out; `queueWaitSeconds` since the attempt became due. */
  dispatched(queueWaitSeconds: number): void {
    this.dispatchedTotal.inc();
    this.queueWait.observe(Math.max(0, queueWaitSeconds));
  }

  /** A start was recorded; `submitToStartSeconds` for a task's first attempt, else null. */
  started(submitToStartSeconds: number | null): void {
    this.startedTotal.inc();
    if (submitToStartSeconds !== null) this.submitToStart.observe(submitToStartSeconds);
  }

  /** A task reached a final state; `runSeconds` of its last attempt when it ran. */
  finished(state: FinalState, runSeconds: number | null = null): void {
    this.finishedBy[state].inc();
    if (runSeconds !== null) this.runDuration.observe(runSeconds);
  }

  /** An attempt ended and its task was queued again for a retry. */
  retried(runSeconds: number | null = null): void {
    this.retriedTotal.inc();
    if (runSeconds !== null) this.runDuration.observe(runSeconds);
  }

  rescued(count = 1): void {
    if (count > 0) this.rescuedTotal.inc(count);
  }

  staleReport(): void {
    this.staleTotal.inc();
  }

  /** A schedule's due firing (src/scheduler, branch `schedules`): `latenessSeconds` when it fired. */
  scheduleFired(outcome: FiringOutcome, latenessSeconds: number | null = null): void {
    this.firingsBy[outcome].inc();
    if (latenessSeconds !== null) this.lateness.observe(Math.max(0, latenessSeconds));
  }

  /**
   * Dispatch passes that left slots free while a due task waited for a token (src/db/flow.ts).
   * The claim filters such tasks out inside its statement, so a pass knows that some wait, not how many.
   */
  rateLimited(count = 1): void {
    if (count > 0) this.rateLimitedTotal.inc(count);
  }

  /** A retention batch committed (src/coordinator/pruner.ts). */
  pruned(rows: PrunedRows): void {
    for (const table of PRUNED_TABLES) if (rows[table] > 0) this.prunedBy[table].inc(rows[table]);
  }

  /** Adds a gauge whose values are read at scrape time. */
  gauge(name: string, help: string, labelNames: string[], collect: (gauge: Gauge) => void | Promise<void>): Gauge {
    return new Gauge({
      name,
      help,
      labelNames,
      registers: [this.registry],
      async collect() {
        await collect(this);
      },
    });
  }

  /** The Prometheus text exposition of every metric of this role. */
  scrape(): Promise<string> {
    return this.registry.metrics();
  }
}
