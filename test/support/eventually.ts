// The one way a test waits for a state it cannot be told about: ask again until it holds.
// Prefer a signal (a log event, a NOTIFY, a promise) wherever the part offers one; this is for
// the rest, such as a row that no notification announces.

export interface EventuallyOptions {
  /** What is awaited, for the failure message ("the stopped event of task 42"). */
  what: string;
  /** Gives up after this long. Defaults to 10 000 ms. */
  timeoutMs?: number;
  /** Pause between tries. Defaults to 20 ms. */
  intervalMs?: number;
  /** Gives up after this many tries, too, when a test allows only so many. Defaults to no limit. */
  tries?: number;
}

/**
 * Calls `fn` until it returns a truthy value and resolves with that value. A throw or a falsy
 * value is another try; a try still running at the deadline is not waited for. When the time
 * is up it rejects naming `what`, with the last error (or the last value) `fn` gave.
 */
export async function eventually<T>(fn: () => T | Promise<T>, options: EventuallyOptions): Promise<NonNullable<T>> {
  const timeoutMs = options.timeoutMs ?? 10_000;
  const intervalMs = options.intervalMs ?? 20;
  const maxTries = options.tries ?? Number.POSITIVE_INFINITY;
  const deadline = performance.now() + timeoutMs;
  let last: { error: unknown } | { value: unknown } = { value: "no try finished" };
  let tries = 0;
  for (;;) {
    const left = deadline - performance.now();
    if (left <= 0) break;
    tries++;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const outcome = await Promise.race([
      Promise.resolve()
        .then(fn)
        .then(
          (value) => ({ value }),
          (error: unknown) => ({ error }),
        ),
      new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), left))),
    ]);
    clearTimeout(timer);
    if (outcome === null) {
      last = { error: new Error(`a try still running after ${Math.round(left)} ms`) };
      break;
    }
    if ("value" in outcome && outcome.value) return outcome.value as NonNullable<T>;
    last = outcome;
    if (tries >= maxTries) break;
    const pause = Math.min(intervalMs, deadline - performance.now());
    if (pause > 0) await Bun.sleep(pause);
  }
  const detail =
    "error" in last
      ? `last error: ${last.error instanceof Error ? last.error.message : String(last.error)}`
      : `last value: ${describe(last.value)}`;
  const limit = tries >= maxTries ? `not in ${tries} tries` : `not within ${timeoutMs} ms (${tries} tries)`;
  throw new Error(`${options.what}: ${limit}; ${detail}`, {
    cause: "error" in last ? last.error : undefined,
  });
}

function describe(value: unknown): string {
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}
