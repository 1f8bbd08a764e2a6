// The HTTP shapes of the dashboard's reads (src/api/overview.ts): the overview and the
// concurrency keys in use.
import { Type } from "@sinclair/typebox";

const Count = (description: string) => Type.Integer({ minimum: 0, description });
const Minute = Type.String({ description: "The minute's start (RFC 3339, UTC).", examples: ["2026-12-02T02:31:00.000Z"] });

export const OverviewJson = Type.Object(
  {
    at: Type.String({ description: "When this was read (RFC 3339)." }),
    last_event_id: Type.String({
      description: "The newest task event's id: it moves whenever any task changes (the dashboard reloads a view then).",
    }),
    states: Type.Record(Type.String(), Type.Integer({ minimum: 0 }), {
      description: "Every task, counted by state (states without tasks are 0).",
    }),
    queues: Type.Array(
      Type.Object(
        {
          queue: Type.String(),
          states: Type.Record(Type.String(), Type.Integer({ minimum: 0 })),
          total: Count("The queue's tasks, in any state."),
        },
        { additionalProperties: false },
      ),
      { description: "Each queue that has tasks, with its tasks by state." },
    ),
    throughput: Type.Array(
      Type.Object(
        {
          minute: Minute,
          succeeded: Count("Attempts that succeeded in the minute."),
          failed: Count("Attempts that failed (a non-zero exit)."),
          other: Count("Attempts that ended otherwise: timed out, lost, stopped."),
        },
        { additionalProperties: false },
      ),
      { description: "Attempts ended per minute over the last hour, oldest first, one entry per minute." },
    ),
    latency: Type.Array(
      Type.Object(
        {
          minute: Minute,
          started: Count("First attempts started in the minute."),
          p50_ms: Type.Number({ description: "Median submit-to-start latency, ms." }),
          p95_ms: Type.Number({ description: "95th percentile, ms." }),
          max_ms: Type.Number({ description: "Slowest, ms." }),
        },
        { additionalProperties: false },
      ),
      {
        description:
          "Submit-to-start latency per minute over the last hour (from when a task could first run, its creation or its " +
          "scheduled time, to its first start), only minutes with starts.",
      },
    ),
    slots: Type.Object(
      {
        workers: Count("Live workers."),
        total: Count("Their slots."),
        used: Count("Slots holding a task (dispatched or running)."),
        free: Count("Slots free."),
      },
      { additionalProperties: false, description: "Worker slots, across every coordinator." },
    ),
  },
  { additionalProperties: false, description: "The dashboard's overview of the whole system." },
);
export type OverviewJson = typeof OverviewJson.static;

export const ConcurrencyKeyJson = Type.Object(
  {
    key: Type.String({ description: "The key, as expanded at creation." }),
    max: Type.Union([Type.Integer(), Type.Null()], { description: "Most live tasks of the key, as its tasks ask." }),
    live: Count("Tasks of the key dispatched or running."),
    queued: Count("Tasks of the key queued."),
  },
  { additionalProperties: false },
);

export const ConcurrencyKeyList = Type.Object(
  { keys: Type.Array(ConcurrencyKeyJson, { description: "Keys with live or queued tasks, busiest first (at most 500)." }) },
  { additionalProperties: false },
);
