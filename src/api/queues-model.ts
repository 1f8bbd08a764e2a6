// The HTTP shapes of queues and of a task's routing (queue, priority, labels, waiting).
import { Type } from "@sinclair/typebox";
import type { QueueRow } from "../db/queues";
import { LabelPreferenceSchema, LabelRequirementSchema, QueueName } from "../task/routing";
import type { Task } from "../task/task";

export const WaitingJson = Type.Object(
  {
    kind: Type.Union(
      [
        Type.Literal("queue_paused"),
        Type.Literal("no_worker"),
        Type.Literal("queue_full"),
        Type.Literal("key_full"),
        Type.Literal("rate_limit"),
        Type.Literal("parents"),
      ],
      { description: "What holds the task back." },
    ),
    message: Type.String({ description: 'In words, e.g. "no worker with gpu=1".', examples: ["no worker with gpu=1"] }),
  },
  { additionalProperties: false, description: "Why a queued task is not running yet." },
);

/** The routing fields of a task view. */
export const TaskRoutingJson = {
  queue: QueueName,
  priority: Type.Integer({ description: "Higher first; ages (TQ_PRIORITY_AGING_MS)." }),
  require: Type.Array(LabelRequirementSchema),
  prefer: Type.Array(LabelPreferenceSchema),
  schedule_timeout_ms: Type.Integer({ description: "Fails after waiting this long for a worker; 0: never." }),
  waiting: Type.Union([WaitingJson, Type.Null()], {
    description: "Why the task is not running yet: null when nothing holds it back (or it is not queued).",
  }),
};

export function taskRoutingJson(task: Task) {
  return {
    queue: task.queue ?? "default",
    priority: task.priority,
    require: task.requires ?? [],
    prefer: task.prefers ?? [],
    schedule_timeout_ms: task.schedule_timeout_ms ?? 0,
    waiting: task.waiting ?? null,
  };
}

const Count = (description: string) => Type.Integer({ minimum: 0, description });

export const QueueJson = Type.Object(
  {
    name: QueueName,
    paused: Type.Boolean({ description: "A paused queue's tasks stay queued; those running carry on." }),
    concurrency_limit: Type.Union([Type.Integer({ minimum: 0 }), Type.Null()], {
      description: "Most tasks of the queue dispatched or running at once, across every coordinator; null: no limit.",
    }),
    running: Count("Tasks of the queue dispatched or running now."),
    depth: Type.Object(
      {
        waiting: Count("Waiting for their parents (not yet queued)."),
        queued: Count("Queued (due or not)."),
        dispatched: Count("Dispatched."),
        running: Count("Running."),
        succeeded: Count("Succeeded."),
        failed: Count("Failed."),
        timed_out: Count("Timed out."),
        cancelled: Count("Cancelled."),
      },
      { additionalProperties: false, description: "The queue's tasks by state." },
    ),
  },
  { additionalProperties: false },
);

export const QueueList = Type.Object({ queues: Type.Array(QueueJson) }, { additionalProperties: false });

export const QueuePatch = Type.Object(
  {
    concurrency_limit: Type.Union([Type.Integer({ minimum: 0, maximum: 1_000_000 }), Type.Null()], {
      description: "Most tasks of the queue live at once across every coordinator; null removes the limit.",
    }),
  },
  { additionalProperties: false, description: "Changes a queue (creating it if it does not exist)." },
);

export const QueueParams = Type.Object({ name: Type.String({ description: "The queue's name." }) });

export function queueJson(row: QueueRow) {
  return {
    name: row.name,
    paused: row.paused,
    concurrency_limit: row.concurrency_limit,
    running: row.depth.dispatched + row.depth.running,
    depth: row.depth,
  };
}
