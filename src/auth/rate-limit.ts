// Per-key token buckets, in this process: `rate` requests per second with bursts of `burst`.
// With `maxKeys`, at most that many buckets are kept: past it, the one used least recently is
// dropped (a dropped bucket comes back full), so keys an untrusted caller chooses (a peer, a
// presented credential) cannot grow the map without end.

export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    private readonly rate: number,
    private readonly burst: number,
    private readonly maxKeys = Number.POSITIVE_INFINITY,
  ) {}

  /** Takes one request for `key`: 0 when allowed, else the milliseconds until it would be. */
  take(key: string, now = performance.now()): number {
    const bucket = this.buckets.get(key) ?? { tokens: this.burst, at: now };
    bucket.tokens = Math.min(this.burst, bucket.tokens + (Math.max(0, now - bucket.at) / 1000) * this.rate);
    bucket.at = Math.max(bucket.at, now);
    // Most recently used last (Map keeps insertion order).
    this.buckets.delete(key);
    this.buckets.set(key, bucket);
    while (this.buckets.size > this.maxKeys) {
      const oldest = this.buckets.keys().next().value;
      if (oldest === undefined) break;
      this.buckets.delete(oldest);
    }
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return 0;
    }
    return ((1 - bucket.tokens) / this.rate) * 1000;
  }

  /** Buckets held (for tests). */
  get size(): number {
    return this.buckets.size;
  }
}
