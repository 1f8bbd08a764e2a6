// The write path of new tasks, the same in every role that accepts them: concurrent submits
// share one insertTasks statement and its commit (group-commit.ts), so the NOTIFY that wakes
// the coordinators costs one commit per batch rather than one per task. A coordinator adds its
// run-now fast path through `placeRunNow`; the scheduler (and whatever else submits) has none
// and writes every task queued.

import type { TaskSpec } from "../task/task";
import type { TaskChangeRow } from "./changes";
import { hasFlow } from "./flow";
import { GroupCommit } from "./group-commit";
import { type Assignment, type InsertOutcome, insertTasks, MAX_TASKS_PER_INSERT, type NewTask } from "./insert";
import type { Sql } from "./sql";

/** A free worker slot held for a run-now task while its insert is written. */
export interface RunNowPlacement {
  /** Where the task is born dispatched, in the statement that writes it. */
  assignTo: Assignment;
  /** The task was written dispatched there: hand it to the worker. */
  assigned(task: TaskChangeRow): void;
  /** Nothing was written to the slot (the write failed, or the idempotency key's earlier task answered): free it. */
  release(): void;
}

export interface SubmitterOptions {
  sql: Sql;
  /**
   * Asked for each task to run now (no scheduled time): a slot to give it in the same statement
   * that writes it, which saves the claim's round trip, or null to queue it like any other.
   * Without it every task is written queued.
   */
  placeRunNow?: (id: string, spec: TaskSpec) => RunNowPlacement | null;
  /** TQ_PRIORITY_AGING_MS: the rank of the tasks it writes. Defaults to 1000. */
  agingMs?: number;
}

export class Submitter {
  private readonly inserts: GroupCommit<NewTask, InsertOutcome>;

  constructor(private readonly options: SubmitterOptions) {
    this.inserts = new GroupCommit((items) => insertTasks(options.sql, items), { maxItemsPerWrite: MAX_TASKS_PER_INSERT });
  }

  /**
   * Persists a new task and resolves after commit. A spec whose idempotency key was used before
   * writes nothing and returns the earlier task.
   */
  async submit(id: string, spec: TaskSpec, actor?: string, traceparent: string | null = null): Promise<InsertOutcome> {
    // A task with parents is born waiting, never dispatched; a task under flow control waits
    // for the claim, the one place its key and bucket are kept.
    const placement =
      spec.scheduledAt === null && !spec.dependsOn && !hasFlow(spec) ? (this.options.placeRunNow?.(id, spec) ?? null) : null;
    const agingMs = this.options.agingMs;
    if (!placement) return this.inserts.add({ id, spec, actor, agingMs, traceparent });
    let outcome: InsertOutcome;
    try {
      outcome = await this.inserts.add({ id, spec, actor, agingMs, assignTo: placement.assignTo, traceparent });
    } catch (error) {
      placement.release();
      throw error;
    }
    if (outcome.kind === "existing" || outcome.task.state === "queued") {
      // A repeated idempotency key: nothing was written, the slot stays free. Or the task's
      // queue is paused or limited, which only the claim may decide: it was born queued.
      placement.release();
      return outcome;
    }
    placement.assigned(outcome.task);
    return outcome;
  }

  /** Resolves when no submit is being written; call once nothing submits any more. */
  async drained(): Promise<void> {
    await this.inserts.drained();
  }
}
