// The database's clock as this process can read it without a round trip: a lower bound on it,
// from the tightest of the recent `SELECT clock_timestamp()` samples. A sample read at
// database time T and answered at local monotonic time t1 says only that the database's clock
// is at least T + (now - t1) now (T was read before the answer came), so the bound is never
// ahead of the database and is behind it by that sample's return trip: a few tenths of a ms
// on an idle connection. The early hand-over uses it (src/coordinator/dispatcher.ts): what is
// left until a task is due, counted as the Assign is sent rather than as the claim read it.
// The claim's own figure comes before its writes and its commit, a few ms to tens of ms on a
// busy database, and each of those ms made the start later.
import type { Sql } from "./sql";

/** How often a sample is taken. */
export const CLOCK_SAMPLE_MS = 1000;
/**
 * Samples older than this are dropped: the bound assumes the two clocks run at one rate, which
 * holds to well under a ms over this long.
 */
export const CLOCK_SAMPLE_KEEP_MS = 10_000;
/** A sample whose round trip took longer than this says too little to keep. */
const MAX_SAMPLE_RTT_MS = 50;

interface Sample {
  /** Database time minus local monotonic time at the answer: a lower bound on their difference. */
  offset: number;
  /** Local monotonic time of the answer. */
  at: number;
}

export class DatabaseClock {
  private samples: Sample[] = [];
  private timer: ReturnType<typeof setInterval> | null = null;
  private sampling = false;

  /** `sql`: where to sample; null for a clock fed only by record() (a worker's, from its Assigns). */
  constructor(private readonly sql: Sql | null) {}

  /** Samples now and every CLOCK_SAMPLE_MS; a failed sample is skipped (the next one retries). */
  start(): void {
    if (this.timer || !this.sql) return;
    void this.sample();
    this.timer = setInterval(() => void this.sample(), CLOCK_SAMPLE_MS);
    this.timer.unref?.();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Takes one sample; resolves whether it was kept. */
  async sample(): Promise<boolean> {
    if (this.sampling || !this.sql) return false;
    this.sampling = true;
    try {
      const sent = performance.now();
      const [row] = await this.sql<{ now: string }[]>`SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8::text AS now`;
      const answered = performance.now();
      if (!row || answered - sent > MAX_SAMPLE_RTT_MS) return false;
      this.record(Number(row.now), answered);
      return true;
    } catch {
      return false;
    } finally {
      this.sampling = false;
    }
  }

  /** A reading of the database's clock (epoch ms) answered at local monotonic time `answeredAt`. */
  record(databaseMs: number, answeredAt: number): void {
    if (!Number.isFinite(databaseMs)) return;
    const offset = databaseMs - answeredAt;
    // One sample per CLOCK_SAMPLE_MS, the tightest: a worker records one per Assign, and the
    // bound is read per Assign too, so the list stays ~11 long whatever the rate.
    const last = this.samples.at(-1);
    if (last && answeredAt - last.at < CLOCK_SAMPLE_MS) {
      if (offset > last.offset) last.offset = offset;
    } else this.samples.push({ offset, at: answeredAt });
    const keepFrom = answeredAt - CLOCK_SAMPLE_KEEP_MS;
    while (this.samples.length > 0 && this.samples[0]!.at < keepFrom) this.samples.shift();
  }

  /**
   * The database's time now (epoch ms), never ahead of it; null with no recent sample. The
   * tightest recent sample (the largest offset) gives the bound.
   */
  now(): number | null {
    const offset = this.offset();
    return offset === null ? null : performance.now() + offset;
  }

  /**
   * When the database's clock reads `databaseMs`, in local monotonic time, never before it does;
   * null with no recent sample.
   */
  toLocal(databaseMs: number): number | null {
    const offset = this.offset();
    return offset === null ? null : databaseMs - offset;
  }

  private offset(): number | null {
    const local = performance.now();
    let best = Number.NEGATIVE_INFINITY;
    for (const sample of this.samples) if (local - sample.at <= CLOCK_SAMPLE_KEEP_MS) best = Math.max(best, sample.offset);
    return best === Number.NEGATIVE_INFINITY ? null : best;
  }
}
