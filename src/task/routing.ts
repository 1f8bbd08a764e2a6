// What a task asks about where and in what order it runs: its queue, priority, the worker
// labels it requires and prefers, and how long it may wait for a worker. Schemas that
// src/task/spec.ts spreads into every task form, and the rules JSON Schema cannot say.
import { type Static, Type } from "@sinclair/typebox";
import { invalidArgument } from "./errors";
import { checkLabelRules, type LabelPreference, type LabelRequirement } from "./labels";
import type { TaskRouting } from "./task";

/** Priorities run from -MAX_PRIORITY to MAX_PRIORITY (src/db/claim.ts bounds its scan with it). */
export const MAX_PRIORITY = 100;
export const MAX_LABEL_RULES = 16;
export const MAX_PREFER_WEIGHT = 100;
/** Seven days. */
export const MAX_SCHEDULE_TIMEOUT_MS = 604_800_000;
export const DEFAULT_QUEUE = "default";
export const QUEUE_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$";
const QUEUE_NAME = new RegExp(QUEUE_NAME_PATTERN);

export const QueueName = Type.String({
  pattern: QUEUE_NAME_PATTERN,
  description: "A queue name: 1 to 63 letters, digits, `_`, `.` or `-`, starting with a letter or digit.",
  examples: ["default", "emails"],
});

const labelRule = {
  key: Type.String({ minLength: 1, maxLength: 63, description: "The label's name.", examples: ["gpu"] }),
  op: Type.Union(
    [
      Type.Literal("="),
      Type.Literal("!="),
      Type.Literal(">"),
      Type.Literal(">="),
      Type.Literal("<"),
      Type.Literal("<="),
      Type.Literal("exists"),
    ],
    { description: "`=`, `!=` (a worker without the label matches), `>`, `>=`, `<`, `<=` (numbers), `exists`." },
  ),
  value: Type.Optional(
    Type.String({ maxLength: 256, description: "What to compare with; a number for the ordering comparators; none for exists." }),
  ),
};

export const LabelRequirementSchema = Type.Object(labelRule, {
  additionalProperties: false,
  description: "A label a worker must have, e.g. {key: gpu, op: '=', value: '1'}.",
});

export const LabelPreferenceSchema = Type.Object(
  {
    ...labelRule,
    weight: Type.Integer({ minimum: 1, maximum: MAX_PREFER_WEIGHT, description: "How much a worker that matches is preferred." }),
  },
  { additionalProperties: false, description: "A label a worker is preferred for, with a weight." },
);

/** Spread into the task forms' properties. */
export const routingOptions = {
  queue: Type.Optional({ ...QueueName, description: `${QueueName.description} Defaults to \`default\`.` }),
  priority: Type.Optional(
    Type.Integer({
      minimum: -MAX_PRIORITY,
      maximum: MAX_PRIORITY,
      description:
        `Higher runs first, from -${MAX_PRIORITY} to ${MAX_PRIORITY}; defaults to 0. Priorities age: a waiting task ranks as ` +
        "run_at - priority * TQ_PRIORITY_AGING_MS, so a task is passed by one of higher priority only while that one has " +
        "waited less than the difference times the aging.",
    }),
  ),
  require: Type.Optional(
    Type.Array(LabelRequirementSchema, {
      maxItems: MAX_LABEL_RULES,
      description: "Worker labels the task needs (all of them); it waits, saying so, while no live worker has them.",
    }),
  ),
  prefer: Type.Optional(
    Type.Array(LabelPreferenceSchema, {
      maxItems: MAX_LABEL_RULES,
      description: "Worker labels the task prefers, with weights: among free workers, one with a higher score is chosen.",
    }),
  ),
  schedule_timeout_ms: Type.Optional(
    Type.Integer({
      minimum: 0,
      maximum: MAX_SCHEDULE_TIMEOUT_MS,
      description:
        "Fail the task if it has waited this long after its run_at without being dispatched; 0 (the default) waits forever.",
    }),
  ),
};

type RoutingInput = { [K in keyof typeof routingOptions]?: Static<(typeof routingOptions)[K]> };

/** The routing part of a TaskSpec; undefined when the request asked for none (the hash stays as before). */
export function toRouting(body: RoutingInput): TaskRouting | undefined {
  const { queue, priority, require, prefer, schedule_timeout_ms: timeout } = body;
  if ([queue, priority, require, prefer, timeout].every((v) => v === undefined)) return undefined;
  if (queue !== undefined && !QUEUE_NAME.test(queue)) throw invalidArgument("queue", `queue must match ${QUEUE_NAME_PATTERN}`);
  const requires: LabelRequirement[] = (require ?? []).map((r) => ({ ...r }));
  const prefers: LabelPreference[] = (prefer ?? []).map((p) => ({ ...p }));
  checkLabelRules(requires, "require");
  checkLabelRules(prefers, "prefer");
  return {
    queue: queue ?? DEFAULT_QUEUE,
    priority: priority ?? 0,
    requires,
    prefers,
    scheduleTimeoutMs: timeout ?? 0,
  };
}

/** A queue name from a path or a config list; throws invalidArgument naming `field`. */
export function parseQueueName(name: string, field = "name"): string {
  if (!QUEUE_NAME.test(name)) throw invalidArgument(field, `${field} must be a queue name matching ${QUEUE_NAME_PATTERN}`);
  return name;
}

/** What a worker takes: the queues it serves (null: all) and its labels. */
export interface WorkerRouting {
  queues: readonly string[] | null;
  labels: Readonly<Record<string, string>>;
}

/** A worker that has not said otherwise: every queue, no labels. */
export const ANY_TASK: WorkerRouting = { queues: null, labels: {} };

/**
 * A worker's routing from its Hello: no queues is every queue. A name that is not a queue name
 * is dropped (no task can be in such a queue).
 */
export function workerRouting(queues: readonly string[], labels: Readonly<Record<string, string>>): WorkerRouting {
  const served = queues.filter((q) => QUEUE_NAME.test(q));
  if (queues.length === 0 && Object.keys(labels).length === 0) return ANY_TASK;
  return { queues: queues.length === 0 ? null : served, labels: { ...labels } };
}

/** A task the fast path may place on any worker serving its queue: no labels, priority 0. */
export function isPlainRouting(routing: TaskRouting): boolean {
  return routing.priority === 0 && routing.requires.length === 0 && routing.prefers.length === 0;
}

export function servesQueue(routing: WorkerRouting | undefined, queue: string): boolean {
  return !routing || routing.queues === null || routing.queues.includes(queue);
}
