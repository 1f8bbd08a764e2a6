// Flow control rules with no SQL: a task's concurrency key and rate limit as a client asks for
// them (the TypeBox schemas spec.ts adds to every submit form), the rate syntax ("100/1m"),
// key templates ("{schedule}"), the token bucket arithmetic the claim applies in SQL, and the
// waiting reasons a queued task shows.
import { type Static, Type } from "@sinclair/typebox";
import { invalidArgument } from "./errors";

export const CONCURRENCY_STRATEGIES = ["queue", "cancel_in_progress", "cancel_newest"] as const;
export type ConcurrencyStrategy = (typeof CONCURRENCY_STRATEGIES)[number];

export const MAX_KEY_BYTES = 255;
export const MAX_CONCURRENCY = 100_000;
export const MAX_BURST = 1_000_000;
export const RATE_LIMIT_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$";

/** A task's concurrency rule, as stored (key expanded). */
export interface ConcurrencySpec {
  key: string;
  max: number;
  strategy: ConcurrencyStrategy;
}

/** A task's rate limit: the named limit, and the bucket of it ('' for the limit's own). */
export interface RateLimitRef {
  name: string;
  key: string;
}

export const ConcurrencyInput = Type.Object(
  {
    key: Type.String({
      minLength: 1,
      maxLength: MAX_KEY_BYTES,
      description:
        "Tasks with the same key share `max` live slots (dispatched or running), across every coordinator. " +
        "`{schedule}` is replaced by the id of the schedule that created the task.",
      examples: ["customer-42"],
    }),
    max: Type.Optional(
      Type.Integer({ minimum: 1, maximum: MAX_CONCURRENCY, description: "Most live tasks with this key. Defaults to 1." }),
    ),
    strategy: Type.Optional(
      Type.Union(
        CONCURRENCY_STRATEGIES.map((s) => Type.Literal(s)),
        {
          description:
            "When the key is full: `queue` waits (keys served round robin), `cancel_in_progress` cancels the oldest " +
            "live task of the key and runs this one once it is gone, `cancel_newest` cancels this one at submit. " +
            "Defaults to queue.",
        },
      ),
    ),
  },
  { additionalProperties: false, description: "Per-key concurrency." },
);
export type ConcurrencyInput = Static<typeof ConcurrencyInput>;

/** The fields every submit form gets (spreads into spec.ts's runOptions). */
export const flowOptions = {
  concurrency: Type.Optional(ConcurrencyInput),
  rate_limit: Type.Optional(
    Type.String({
      minLength: 1,
      maxLength: 64 + 1 + MAX_KEY_BYTES,
      description:
        "A rate limit (POST /rate-limits) each attempt takes a token from: `name`, or `name:bucket` for a bucket of " +
        "its own per value (`{key}` is replaced by the concurrency key, `{schedule}` by the schedule's id).",
      examples: ["smtp", "smtp:{key}"],
    }),
  ),
};

/** A placeholder a key template may hold: filled in when a schedule creates the task. */
export const SCHEDULE_PLACEHOLDER = "{schedule}";

/**
 * Checks a key template: `{schedule}` (kept, filled in at creation by expandSchedule) and, in
 * a rate limit's bucket, `{key}` (replaced by the concurrency key) are its only placeholders.
 */
function expandTemplate(template: string, key: string | undefined, field: string): string {
  return template.replace(/\{([A-Za-z_]*)\}/g, (whole, name: string) => {
    if (name === "schedule") return whole;
    if (name === "key" && key !== undefined) return key;
    if (name === "key") throw invalidArgument(field, `${field}: {key} needs a concurrency key on the task`);
    throw invalidArgument(field, `${field}: unknown placeholder ${whole}; use {schedule} or {key}`);
  });
}

/** Fills in `{schedule}` at creation: the creating schedule's id, or refused without one. */
export function expandSchedule(text: string, scheduleId: string | null): string {
  if (!text.includes(SCHEDULE_PLACEHOLDER)) return text;
  if (scheduleId === null) throw new Error("a {schedule} key template reached an insert without a schedule");
  return text.replaceAll(SCHEDULE_PLACEHOLDER, scheduleId);
}

/** Whether a spec's keys wait for a schedule's id (a direct submit may not hold `{schedule}`). */
export function needsSchedule(concurrency: ConcurrencySpec | undefined, rateLimit: RateLimitRef | undefined): boolean {
  return (concurrency?.key.includes(SCHEDULE_PLACEHOLDER) ?? false) || (rateLimit?.key.includes(SCHEDULE_PLACEHOLDER) ?? false);
}

/** A concurrency rule from its input (`{schedule}` kept for creation). */
export function toConcurrencySpec(input: ConcurrencyInput): ConcurrencySpec {
  const key = expandTemplate(input.key, undefined, "concurrency.key");
  checkKey(key, "concurrency.key");
  return { key, max: input.max ?? 1, strategy: input.strategy ?? "queue" };
}

/** A rate limit reference from its input (`name` or `name:bucket`), `{key}` filled in. */
export function toRateLimitRef(input: string, concurrencyKey?: string): RateLimitRef {
  const colon = input.indexOf(":");
  const name = colon < 0 ? input : input.slice(0, colon);
  checkRateLimitName(name, "rate_limit");
  const key = colon < 0 ? "" : expandTemplate(input.slice(colon + 1), concurrencyKey, "rate_limit");
  if (colon >= 0 && key === "") throw invalidArgument("rate_limit", "rate_limit: the bucket after the colon is empty");
  checkKey(key, "rate_limit");
  return { name, key };
}

function checkKey(key: string, field: string): void {
  if (key.includes("\0")) throw invalidArgument(field, `${field} must not contain a NUL byte`);
  const bytes = Buffer.byteLength(key, "utf8");
  if (bytes > MAX_KEY_BYTES) throw invalidArgument(field, `${field} must be at most ${MAX_KEY_BYTES} bytes; it has ${bytes}`);
}

export function checkRateLimitName(name: string, field: string): void {
  if (!new RegExp(RATE_LIMIT_NAME_PATTERN).test(name)) {
    throw invalidArgument(
      field,
      `${field}: a rate limit name is 1 to 64 letters, digits, "_", "." or "-", not ${JSON.stringify(name)}`,
    );
  }
}

/** A rate: `count` tokens every `periodMs`. */
export interface Rate {
  count: number;
  periodMs: number;
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Parses "100/1m", "10/s", "5/500ms" (units ms, s, m, h, d; the period's number defaults to 1). */
export function parseRate(text: string, field = "rate"): Rate {
  const match = /^\s*(\d{1,9})\s*\/\s*(\d{1,9})?\s*(ms|s|m|h|d)\s*$/.exec(text);
  if (!match)
    throw invalidArgument(
      field,
      `${field} must look like "100/1m" (count/period; units ms, s, m, h, d), not ${JSON.stringify(text)}`,
    );
  const count = Number(match[1]);
  const periodMs = Number(match[2] ?? "1") * UNIT_MS[match[3]!]!;
  if (count < 1) throw invalidArgument(field, `${field}: the count must be at least 1`);
  if (periodMs < 1 || periodMs > 366 * UNIT_MS.d!) throw invalidArgument(field, `${field}: the period must be 1 ms to 366 d`);
  return { count, periodMs };
}

export function formatRate(rate: Rate): string {
  for (const unit of ["d", "h", "m", "s"] as const) {
    const ms = UNIT_MS[unit]!;
    if (rate.periodMs % ms === 0) return `${rate.count}/${rate.periodMs / ms === 1 ? "" : rate.periodMs / ms}${unit}`;
  }
  return `${rate.count}/${rate.periodMs}ms`;
}

/** A bucket as stored: its tokens as of `atMs`. */
export interface Bucket {
  tokens: number;
  atMs: number;
}

/**
 * The token bucket, as the claim computes it in SQL (src/db/flow.ts): tokens refill at
 * count/periodMs per ms up to the burst, from the later of the stored time and now (a claim
 * that started before another's committed refill never adds negative time).
 */
export function refill(bucket: Bucket, rate: Rate, burst: number, nowMs: number): Bucket {
  const elapsed = Math.max(0, nowMs - bucket.atMs);
  return { tokens: Math.min(burst, bucket.tokens + (elapsed * rate.count) / rate.periodMs), atMs: Math.max(bucket.atMs, nowMs) };
}

/** How many of `wanted` a refilled bucket admits now, and the bucket after taking them. */
export function take(bucket: Bucket, wanted: number): { admitted: number; bucket: Bucket } {
  const admitted = Math.max(0, Math.min(wanted, Math.floor(bucket.tokens)));
  return { admitted, bucket: { tokens: bucket.tokens - admitted, atMs: bucket.atMs } };
}

/** Milliseconds (rounded up) until a refilled bucket holds a whole token: 0 when it does. */
export function nextTokenInMs(bucket: Bucket, rate: Rate): number {
  if (bucket.tokens >= 1) return 0;
  return Math.ceil(((1 - bucket.tokens) * rate.periodMs) / rate.count);
}

/** Why a queued task is not dispatched yet, as flow control sees it. */
export type FlowWait =
  | { kind: "concurrency"; key: string; live: number; max: number }
  | { kind: "rate_limit"; name: string; key: string; nextInMs: number };

export function describeWait(wait: FlowWait): string {
  if (wait.kind === "concurrency") return `waiting: concurrency key ${wait.key} full (${wait.live}/${wait.max} live)`;
  const bucket = wait.key === "" ? wait.name : `${wait.name}:${wait.key}`;
  return `waiting: rate limit ${bucket}, next slot in ${wait.nextInMs} ms`;
}
