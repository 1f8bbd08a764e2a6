// The schemas of the rate limits' routes (src/api/flow.ts) and their row conversion; named in
// the OpenAPI document (NAMED_SCHEMAS, src/api/openapi.ts).
import { Type } from "@sinclair/typebox";
import type { RateLimitRow } from "../db/flow";
import { formatRate, MAX_BURST, RATE_LIMIT_NAME_PATTERN } from "../task/flow";
import type { Task } from "../task/task";

const Name = Type.String({
  pattern: RATE_LIMIT_NAME_PATTERN,
  description: 'The limit\'s name: 1 to 64 letters, digits, "_", "." or "-", starting with a letter or digit.',
  examples: ["smtp"],
});
const RateText = Type.String({
  description: 'Tokens per period: "100/1m", "10/s", "5/500ms" (units ms, s, m, h, d).',
  examples: ["100/1m"],
});
const Burst = Type.Integer({
  minimum: 1,
  maximum: MAX_BURST,
  description: "Most tokens the bucket holds (what may start at once after a quiet spell). Defaults to the rate's count.",
});

export const RateLimitInput = Type.Object(
  { name: Name, rate: RateText, burst: Type.Optional(Burst) },
  { additionalProperties: false, description: "A named rate limit: a token bucket shared by every coordinator." },
);
export const RateLimitPatch = Type.Object(
  { rate: Type.Optional(RateText), burst: Type.Optional(Burst) },
  {
    additionalProperties: false,
    minProperties: 1,
    description: "A change of a limit's rate or burst; its buckets keep the tokens they earned (cut to a lower burst).",
  },
);
export const RateLimitJson = Type.Object(
  {
    name: Type.String(),
    rate: Type.String({ description: 'As "count/period", e.g. "100/1m".' }),
    burst: Type.Integer(),
    tokens_per_second: Type.Number({ description: "The refill rate, for comparison." }),
    created_at: Type.String({ format: "date-time" }),
    updated_at: Type.String({ format: "date-time" }),
  },
  { description: "A named rate limit." },
);
export const RateLimitList = Type.Object(
  { rate_limits: Type.Array(RateLimitJson) },
  { description: "Every rate limit, by name." },
);

export function rateLimitJson(row: RateLimitRow): typeof RateLimitJson.static {
  return {
    name: row.name,
    rate: formatRate({ count: row.rate_count, periodMs: row.period_ms }),
    burst: row.burst,
    tokens_per_second: (row.rate_count * 1000) / row.period_ms,
    created_at: row.created_at.toISOString(),
    updated_at: row.updated_at.toISOString(),
  };
}

/** A task view's flow control fields (TaskJson). */
export const flowTaskFields = {
  concurrency: Type.Union(
    [
      Type.Object(
        { key: Type.String(), max: Type.Integer(), strategy: Type.String() },
        { additionalProperties: false, description: "The task's concurrency key (expanded), its max and strategy." },
      ),
      Type.Null(),
    ],
    { description: "The task's concurrency key; null when it has none." },
  ),
  rate_limit: Type.Union([Type.String(), Type.Null()], {
    description: "The rate limit it takes a token from (`name` or `name:bucket`); null when none.",
  }),
};

export function flowTaskJson(task: Task) {
  return {
    concurrency: task.concurrency_key
      ? { key: task.concurrency_key, max: task.concurrency_max ?? 1, strategy: task.concurrency_strategy ?? "queue" }
      : null,
    rate_limit: task.rate_limit ? (task.rate_limit_key ? `${task.rate_limit}:${task.rate_limit_key}` : task.rate_limit) : null,
  };
}
