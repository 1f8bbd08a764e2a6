// Turns a worker's reports into fenced state changes and acknowledges them. A result is
// acknowledged only once it is durable (or known stale), so a worker keeps re-sending it
// across database outages and reconnects.
import { create } from "@bufbuild/protobuf";
import { CoordinatorMessageSchema, type TaskFinished, type TaskStarted } from "../gen/taskqueue/v1/worker_service_pb";
import type { Sql } from "../db/sql";
import { finishAttempt, markStarted, recordAttemptNote, requeueAttempt } from "../db/tasks";
import { finishAction, fromTimestamp } from "../rpc/convert";
import type { Logger } from "../log";
import { attemptKey, type WorkerConnection, type WorkerRegistry } from "./registry";

export interface CompleterOptions {
  sql: Sql;
  registry: WorkerRegistry;
  log: Logger;
  /** Called when a slot frees up. */
  onSlotFreed: () => void;
  /** Delay between retries of a report the database did not take. Defaults to 500 ms. */
  retryMs?: number;
}

export class Completer {
  private readonly pending = new Set<Promise<void>>();
  private stopped = false;

  constructor(private readonly options: CompleterOptions) {}

  started(worker: WorkerConnection, message: TaskStarted): void {
    const ref = message.ref;
    if (!ref) return;
    this.track(
      markStarted(this.options.sql, {
        id: ref.taskId,
        attempt: ref.attempt,
        workerId: worker.id,
        startedAt: fromTimestamp(message.startedAt) ?? new Date(),
        pid: message.pid,
      }).then(
        () => {},
        // TaskFinished carries started_at too, so a lost start is repaired by the finish.
        (error) => this.options.log.warn({ err: error, task: ref.taskId }, "recording a start failed"),
      ),
    );
  }

  finished(worker: WorkerConnection, message: TaskFinished): void {
    const ref = message.ref;
    if (!ref) return;
    // The process has exited: the slot is free whatever the database says.
    if (worker.inFlight.delete(attemptKey(ref.taskId, ref.attempt))) this.options.onSlotFreed();
    this.track(this.record(worker, message));
  }

  /** Waits for reports in progress (they give up retrying once stopped). */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.pending);
  }

  private async record(worker: WorkerConnection, message: TaskFinished): Promise<void> {
    const ref = message.ref!;
    const target = { id: ref.taskId, attempt: ref.attempt, workerId: worker.id };
    const action = finishAction(message);
    for (;;) {
      try {
        let applied = true;
        if (action.kind === "record") applied = (await finishAttempt(this.options.sql, target, action.result)).applied !== null;
        // The requeue's NOTIFY wakes every coordinator's dispatcher.
        else if (action.kind === "requeue") applied = (await requeueAttempt(this.options.sql, target, action.reason)) !== null;
        else await recordAttemptNote(this.options.sql, target, "stopped", { reason: action.reason });
        worker.send(create(CoordinatorMessageSchema, { payload: { case: "ack", value: { ref, stale: !applied } } }));
        return;
      } catch (error) {
        // Unacknowledged, the worker still holds the result; keep trying while it is ours.
        if (this.stopped || !this.options.registry.isCurrent(worker)) return;
        this.options.log.warn({ err: error, task: ref.taskId }, "recording a result failed; retrying");
        await Bun.sleep(this.options.retryMs ?? 500);
      }
    }
  }

  private track(promise: Promise<void>): void {
    this.pending.add(promise);
    void promise.finally(() => this.pending.delete(promise));
  }
}
