// Group commit for independent writes: callers add one item each and get its own result, and
// items that arrive while a write is in flight go together in the next one. An idle system
// writes each item at once; under load the database sees one statement and one commit per
// batch. That matters most for statements that NOTIFY: PostgreSQL serialises the commits of
// notifying transactions (a database-wide lock held through the WAL flush), so one notifying
// commit per request caps a server at a few hundred requests per second.
import { isDatabaseUnavailable } from "../task/errors";

interface Waiting<I, O> {
  item: I;
  resolve: (out: O) => void;
  reject: (error: unknown) => void;
}

export interface GroupCommitOptions {
  /** Most items one write carries; a longer queue goes in several. */
  maxItemsPerWrite: number;
}

export class GroupCommit<I, O> {
  private queue: Waiting<I, O>[] = [];
  private flushing: Promise<void> | null = null;

  /** `write` persists items in one statement and answers one output per item, in order. */
  constructor(
    private readonly write: (items: I[]) => Promise<O[]>,
    private readonly options: GroupCommitOptions,
  ) {}

  /** Resolves with the item's output once its batch has committed; rejects with its error. */
  add(item: I): Promise<O> {
    return new Promise<O>((resolve, reject) => {
      this.queue.push({ item, resolve, reject });
      this.kick();
    });
  }

  /** Resolves when nothing is waiting or in flight. */
  async drained(): Promise<void> {
    while (this.flushing) await this.flushing;
  }

  private kick(): void {
    if (this.flushing) return;
    this.flushing = this.flush().finally(() => {
      this.flushing = null;
      if (this.queue.length > 0) this.kick();
    });
  }

  private async flush(): Promise<void> {
    const batch = this.queue.splice(0, this.options.maxItemsPerWrite);
    try {
      settle(batch, await this.write(batch.map((w) => w.item)));
    } catch (error) {
      // A lost database fails everyone alike. Any other error may be one item's (a value the
      // server refuses): write each alone so that only its own caller gets the error.
      if (batch.length === 1 || isDatabaseUnavailable(error)) {
        for (const waiting of batch) waiting.reject(error);
        return;
      }
      for (const waiting of batch) {
        try {
          settle([waiting], await this.write([waiting.item]));
        } catch (own) {
          waiting.reject(own);
        }
      }
    }
  }
}

function settle<I, O>(batch: Waiting<I, O>[], outputs: O[]): void {
  if (outputs.length !== batch.length) {
    const error = new Error(`group commit: ${batch.length} items written but ${outputs.length} results`);
    for (const waiting of batch) waiting.reject(error);
    return;
  }
  batch.forEach((waiting, i) => {
    waiting.resolve(outputs[i] as O);
  });
}
