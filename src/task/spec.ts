// What a client may ask for, and the one place that turns it into a TaskSpec. The schemas are
// the HTTP route bodies (and so the OpenAPI document) and what the gRPC TaskService checks;
// toTaskSpec adds the rules JSON Schema cannot say (a real calendar date, no NUL byte, which
// PostgreSQL text cannot hold) and accepts any transport's input, so nothing malformed
// reaches the database or a shell.
import { type Static, Type } from "@sinclair/typebox";
import { invalidArgument, TaskQueueError } from "./errors";
import { checkSchema } from "./explain";
import { flowOptions, toConcurrencySpec, toRateLimitRef } from "./flow";
import { EXAMPLE_TIME, parseRfc3339 } from "./rfc3339";
import { routingOptions, toRouting } from "./routing";
import { PARENT_FAILURE_POLICIES, type TaskSpec } from "./task";

export const MAX_COMMAND_BYTES = 65_536;
/** Seven days. */
export const MAX_TIMEOUT_MS = 604_800_000;
export const MAX_ATTEMPTS_LIMIT = 100;
export const MAX_ENV_ENTRIES = 256;
export const MAX_ENV_VALUE_BYTES = 32 * 1024;
/**
 * env and secret_env together, as execve counts them: each entry's `NAME=value` and its NUL,
 * and its pointer (8 bytes). Linux refuses (E2BIG) a command whose arguments and environment
 * pass ARG_MAX (2 MiB with the default 8 MiB stack); this leaves the other half for the command
 * itself (at most 64 KiB) and the environment the worker passes on.
 */
export const MAX_ENV_TOTAL_BYTES = 1024 * 1024;
export const MAX_CWD_BYTES = 4096;
/** One day. */
export const MAX_BACKOFF_MS = 86_400_000;
/** The longest lease an attempt may hold (lease_ms): a week, as the longest timeout. */
export const MAX_LEASE_MS = 604_800_000;
export const MAX_IDEMPOTENCY_KEY_BYTES = 255;
export const ENV_KEY_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*$";
/** Bounds of a task's limits: what any worker could grant (each worker caps them further). */
export const MAX_LIMIT_MEMORY_MB = 4_194_304;
export const MAX_LIMIT_PIDS = 4_194_304;
export const MAX_LIMIT_NOFILE = 1_048_576;
export const MAX_LIMIT_CPU = 1024;
/** Parents one task may list. */
export const MAX_DEPENDS_ON = 100;
/** A batch ref: usable as it is in TQ_PARENT_<ref>_EXIT. */
export const REF_PATTERN = "^[A-Za-z_][A-Za-z0-9_]{0,63}$";

// Every string limit here counts UTF-8 bytes (checked in buildSpec). A schema's maxLength
// counts UTF-16 code units, never more than the bytes, so it is a bound that refuses nothing
// valid; it stays for the document and to stop a huge string early.
const Command = Type.String({
  minLength: 1,
  maxLength: MAX_COMMAND_BYTES,
  description: `Shell command, run with \`sh -c\`. Not blank, no NUL byte, at most ${MAX_COMMAND_BYTES} bytes (UTF-8).`,
  examples: ["echo hello"],
});

const ScheduledAt = Type.String({
  description:
    "When the task becomes due: an RFC 3339 date-time with a time zone (`Z` or `±hh:mm`), any fraction of a second " +
    "(kept to the millisecond), a leap second (`23:59:60Z`, read as the next second), from 0001-01-01T00:00:00Z to " +
    "9999-12-31T23:59:59.999Z. A time in the past, however far, runs at once.",
  examples: [EXAMPLE_TIME],
});

/** An environment map: the rules env and secret_env share. */
const EnvMap = (what: string) =>
  Type.Record(Type.String({ pattern: ENV_KEY_PATTERN }), Type.String({ maxLength: MAX_ENV_VALUE_BYTES }), {
    additionalProperties: false,
    maxProperties: MAX_ENV_ENTRIES,
    description: `${what}: at most ${MAX_ENV_ENTRIES}, names matching ${ENV_KEY_PATTERN}, values without NUL of at most ${MAX_ENV_VALUE_BYTES} bytes; env and secret_env together at most ${MAX_ENV_TOTAL_BYTES} bytes, counting each NAME=value, its NUL and 8 bytes.`,
  });

const strict = { additionalProperties: false } as const;

const Limits = Type.Object(
  {
    memory_mb: Type.Optional(
      Type.Integer({
        minimum: 1,
        maximum: MAX_LIMIT_MEMORY_MB,
        description:
          "Memory in MiB. With cgroups, the attempt's memory limit: the OOM killer ends it and the attempt says " +
          "oom_killed. Without, the address space of each process (ulimit -v).",
      }),
    ),
    pids: Type.Optional(
      Type.Integer({
        minimum: 1,
        maximum: MAX_LIMIT_PIDS,
        description: "Processes and threads at once (cgroup pids.max); a fork beyond it fails. Not enforced without cgroups.",
      }),
    ),
    nofile: Type.Optional(
      Type.Integer({ minimum: 1, maximum: MAX_LIMIT_NOFILE, description: "Open files per process (ulimit -n)." }),
    ),
    cpu: Type.Optional(
      Type.Number({
        exclusiveMinimum: 0,
        maximum: MAX_LIMIT_CPU,
        description: "CPU cores (0.5 is half a core): the cgroup's CPU quota. Not enforced without cgroups.",
      }),
    ),
  },
  {
    ...strict,
    description:
      "Resource limits, each capped by the maxima of the worker that runs the task (TQ_WORKER_MAX_*); one left out is that " +
      "worker's maximum. A request above a worker's maximum is clamped, not refused (the submitter cannot know the worker); " +
      "each attempt records what applied and how (`limits_applied`, `limits`).",
  },
);

const dependencyOptions = {
  depends_on: Type.Optional(
    Type.Array(Type.String({ minLength: 1, maxLength: 64 }), {
      maxItems: MAX_DEPENDS_ON,
      uniqueItems: true,
      description:
        "Parents: task ids (and, in a batch, refs of other items). The task waits (state `waiting`) until every parent " +
        "has ended, and runs once all succeeded (see on_parent_failure). A parent that will retry has not ended yet. " +
        `At most ${MAX_DEPENDS_ON}; an unknown id or ref is a 400 naming it.`,
      examples: [["build"]],
    }),
  ),
  on_parent_failure: Type.Optional(
    Type.Union(
      PARENT_FAILURE_POLICIES.map((policy) => Type.Literal(policy)),
      {
        description:
          "When a parent ends failed, timed_out or cancelled: `cancel` (the default) ends this task cancelled with an error " +
          "naming the parent (event `parent_failed`); `skip` ends it cancelled with an error starting `skipped:` (event " +
          "`skipped`); `run` runs it anyway once every parent has ended. Its own children see a cancelled or skipped task " +
          "as a failed parent.",
      },
    ),
  ),
};

const runOptions = {
  ...dependencyOptions,
  timeout_ms: Type.Optional(
    Type.Integer({
      minimum: 0,
      maximum: MAX_TIMEOUT_MS,
      description: "Kill the command after this many milliseconds; 0 means no timeout. Defaults to 0.",
    }),
  ),
  max_attempts: Type.Optional(
    Type.Integer({
      minimum: 1,
      maximum: MAX_ATTEMPTS_LIMIT,
      description: "Attempts before the task fails for good. Defaults to TQ_DEFAULT_MAX_ATTEMPTS (3).",
    }),
  ),
  lease_ms: Type.Optional(
    Type.Integer({
      minimum: 1,
      maximum: MAX_LEASE_MS,
      description:
        "How long each attempt's lease lasts, renewed by its worker's heartbeats: a worker cut off for this long stops " +
        "the attempt on its own, and only then may another run it. At least the heartbeat timeout plus two intervals " +
        "(5000 ms with the defaults). Defaults to TQ_DEFAULT_LEASE_MS (30000).",
    }),
  ),
  env: Type.Optional(EnvMap("Extra environment variables")),
  secret_env: Type.Optional(
    EnvMap("Environment variables passed to the process but never returned by any API, event stream or log"),
  ),
  cwd: Type.Optional(
    Type.String({
      minLength: 1,
      maxLength: MAX_CWD_BYTES,
      description: `Absolute working directory on the worker, at most ${MAX_CWD_BYTES} bytes. Defaults to the worker's own.`,
    }),
  ),
  limits: Type.Optional(Limits),
  // Flow control (src/task/flow.ts): concurrency, rate_limit.
  ...flowOptions,
  retry: Type.Optional(
    Type.Object(
      {
        on_failure: Type.Optional(
          Type.Boolean({ description: "Retry a non-zero exit, a signal, or a command that could not start. Defaults to true." }),
        ),
        on_timeout: Type.Optional(Type.Boolean({ description: "Retry an attempt that timed out. Defaults to true." })),
        on_lost: Type.Optional(
          Type.Boolean({ description: "Retry when the worker died, froze or was cut off (at once). Defaults to true." }),
        ),
        backoff_base_ms: Type.Optional(
          Type.Integer({
            minimum: 0,
            maximum: MAX_BACKOFF_MS,
            description:
              "Backoff before the second attempt, doubling after each further one. Defaults to TQ_RETRY_BACKOFF_BASE_MS, " +
              "or to backoff_cap_ms when that is lower.",
          }),
        ),
        backoff_cap_ms: Type.Optional(
          Type.Integer({
            minimum: 0,
            maximum: MAX_BACKOFF_MS,
            description:
              "Longest backoff between attempts, at least backoff_base_ms (400 otherwise). Defaults to " +
              "TQ_RETRY_BACKOFF_CAP_MS, or to backoff_base_ms when that is higher.",
          }),
        ),
      },
      {
        additionalProperties: false,
        description:
          "What is retried while attempts remain (max_attempts), and the exponential backoff (with jitter) between attempts.",
      },
    ),
  ),
  // Queue, priority, labels (src/task/routing.ts).
  ...routingOptions,
};

/** The full form (`POST /tasks`, gRPC SubmitTask). */
export const TaskInput = Type.Object(
  { command: Command, scheduled_at: Type.Optional(ScheduledAt), ...runOptions },
  { ...strict, description: "A task to run now, or at scheduled_at." },
);
export type TaskInput = Static<typeof TaskInput>;

/** Run now (`POST /submit`): the full form without scheduled_at. */
export const SubmitInput = Type.Object(
  { command: Command, ...runOptions },
  { ...strict, description: "A task to run as soon as a worker is free." },
);
export type SubmitInput = Static<typeof SubmitInput>;

/** The seed's `POST /schedule`; `schedule_at` is the original Go code's name for scheduled_at. */
export const ScheduleInput = Type.Object(
  {
    command: Command,
    scheduled_at: Type.Optional(ScheduledAt),
    schedule_at: Type.Optional(
      Type.String({ description: "Legacy alias of scheduled_at, accepted from the original clients.", deprecated: true }),
    ),
  },
  { ...strict, description: "A task to run at scheduled_at (required)." },
);
export type ScheduleInput = Static<typeof ScheduleInput>;

/** What a task gets where its request says nothing; from the configuration (taskDefaults in src/config.ts). */
export interface TaskDefaults {
  maxAttempts: number;
  retry: { backoffBaseMs: number; backoffCapMs: number };
  /**
   * The shortest lease a request may ask for (lease_ms): the heartbeat timeout plus two
   * intervals (minLeaseMs, src/task/lease.ts). Unset: no lower bound but 1.
   */
  minLeaseMs?: number;
}

/** Validates a full-form request; throws invalidArgument naming the field. */
export function toTaskSpec(input: unknown, defaults: TaskDefaults): TaskSpec {
  const body = checkSchema(TaskInput, input);
  const scheduledAt = body.scheduled_at === undefined ? null : parseRfc3339(body.scheduled_at, "scheduled_at");
  const spec = buildSpec(body, scheduledAt, defaults);
  for (const parent of spec.dependsOn ?? []) {
    // Refs are a batch's: outside one, only ids name a parent.
    if (!isTaskId(parent)) throw invalidArgument("depends_on", `depends_on: ${JSON.stringify(parent)} is not a task id`);
  }
  return spec;
}

/** One task of a batch: the full form, and its own idempotency key. */
export const BatchItemInput = Type.Object(
  {
    ...TaskInput.properties,
    idempotency_key: Type.Optional(
      Type.String({
        maxLength: MAX_IDEMPOTENCY_KEY_BYTES,
        description:
          "This task's own idempotency key (visible ASCII, at most 255 bytes): when it was used before, the original task " +
          "is returned in its place (its index listed in `replayed`); with a different request, the batch is a 409.",
      }),
    ),
    ref: Type.Optional(
      Type.String({
        pattern: REF_PATTERN,
        description:
          "This task's name within the batch, for the other items' depends_on, and the <ref> of their " +
          "TQ_PARENT_<ref>_EXIT: a letter or _, then letters, digits or _, at most 64. Unique in the batch.",
        examples: ["build"],
      }),
    ),
  },
  { ...strict, description: "A task of a batch: the full form of POST /tasks, with an optional idempotency_key." },
);
export type BatchItemInput = Static<typeof BatchItemInput>;

/** `POST /tasks/batch`: many full-form tasks at once. */
export const BatchInput = Type.Object(
  { tasks: Type.Array(BatchItemInput, { minItems: 1, description: "The tasks, at least one." }) },
  { ...strict, description: "Tasks submitted in one statement: all are created, or none." },
);
export type BatchInput = Static<typeof BatchInput>;

/**
 * Validates a batch; too many tasks is payload_too_large naming the limit, and an invalid
 * task an invalid_argument naming it (`tasks[3].command`).
 */
export function toBatchSpecs(input: unknown, defaults: TaskDefaults, maxTasks: number): TaskSpec[] {
  const count = (input as { tasks?: unknown })?.tasks;
  if (Array.isArray(count) && count.length > maxTasks) {
    throw new TaskQueueError(
      "payload_too_large",
      `a batch may hold at most ${maxTasks} tasks (TQ_MAX_BATCH); this one has ${count.length}`,
      "tasks",
    );
  }
  if (Array.isArray(count) && count.length === 0) {
    throw invalidArgument("tasks", `tasks is empty; a batch holds 1 to ${maxTasks} tasks`);
  }
  const body = checkSchema(BatchInput, input);
  const specs = body.tasks.map(({ idempotency_key: key, ref, ...task }, i) => {
    try {
      const checked = checkSchema(TaskInput, task);
      const scheduledAt = checked.scheduled_at === undefined ? null : parseRfc3339(checked.scheduled_at, "scheduled_at");
      const spec = buildSpec(checked, scheduledAt, defaults);
      spec.idempotencyKey = parseIdempotencyKey(key, "idempotency_key");
      if (ref !== undefined) spec.ref = ref;
      return spec;
    } catch (error) {
      if (error instanceof TaskQueueError && error.field !== undefined) {
        throw invalidArgument(`tasks[${i}].${error.field}`, `tasks[${i}]: ${error.message}`);
      }
      throw error;
    }
  });
  checkBatchGraph(specs);
  return specs;
}

/**
 * A batch's refs and depends_on: refs unique and not ids, each entry a ref of the batch or a
 * task id, and no cycle among the refs (a 400 naming it: "cycle: build -> test -> build").
 * Whether an id exists is the database's to say.
 */
function checkBatchGraph(specs: readonly TaskSpec[]): void {
  const index = new Map<string, number>();
  specs.forEach((spec, i) => {
    if (spec.ref === undefined) return;
    if (index.has(spec.ref))
      throw invalidArgument(`tasks[${i}].ref`, `tasks[${i}]: ref ${JSON.stringify(spec.ref)} is used twice`);
    index.set(spec.ref, i);
  });
  specs.forEach((spec, i) => {
    for (const parent of spec.dependsOn ?? []) {
      if (!index.has(parent) && !isTaskId(parent)) {
        throw invalidArgument(
          `tasks[${i}].depends_on`,
          `tasks[${i}]: depends_on names ${JSON.stringify(parent)}, which is neither a ref in this batch nor a task id`,
        );
      }
    }
  });
  // Depth-first, refs only (an id names a task that exists already, so it cannot close a cycle).
  const state = new Map<number, "open" | "done">();
  const path: number[] = [];
  const visit = (i: number): void => {
    state.set(i, "open");
    path.push(i);
    for (const parent of specs[i]?.dependsOn ?? []) {
      const j = index.get(parent);
      if (j === undefined) continue;
      if (state.get(j) === "open") {
        const cycle = [...path.slice(path.indexOf(j)), j].map((k) => specs[k]?.ref);
        // Written in the direction work flows: parent -> child.
        throw invalidArgument(`tasks[${i}].depends_on`, `cycle: ${cycle.reverse().join(" -> ")}`);
      }
      if (state.get(j) === undefined) visit(j);
    }
    path.pop();
    state.set(i, "done");
  };
  specs.forEach((_, i) => {
    if (state.get(i) === undefined) visit(i);
  });
}

/** Validates a seed `/schedule` request: scheduled_at (or its alias) is required. */
export function toScheduleSpec(input: unknown, defaults: TaskDefaults): TaskSpec {
  const body = checkSchema(ScheduleInput, input);
  const { scheduled_at: current, schedule_at: legacy } = body;
  if (current === undefined && legacy === undefined) {
    throw invalidArgument("scheduled_at", `scheduled_at is required, e.g. "${EXAMPLE_TIME}"`);
  }
  let scheduledAt: Date;
  if (current !== undefined) {
    scheduledAt = parseRfc3339(current, "scheduled_at");
    if (legacy !== undefined && parseRfc3339(legacy, "schedule_at").getTime() !== scheduledAt.getTime()) {
      throw invalidArgument("schedule_at", "schedule_at (legacy alias) disagrees with scheduled_at; send only scheduled_at");
    }
  } else {
    scheduledAt = parseRfc3339(legacy!, "schedule_at");
  }
  return buildSpec({ command: body.command }, scheduledAt, defaults);
}

function buildSpec(body: SubmitInput, scheduledAt: Date | null, defaults: TaskDefaults): TaskSpec {
  if (body.command.trim() === "") throw invalidArgument("command", "command must not be blank");
  if (body.command.includes("\0")) throw invalidArgument("command", "command must not contain a NUL byte");
  checkBytes("command", body.command, MAX_COMMAND_BYTES);
  const env = body.env ?? {};
  const secretEnv = body.secret_env ?? {};
  for (const [field, values] of [
    ["env", env],
    ["secret_env", secretEnv],
  ] as const) {
    for (const [key, value] of Object.entries(values)) {
      if (value.includes("\0")) throw invalidArgument(`${field}.${key}`, `${field}.${key} must not contain a NUL byte`);
      checkBytes(`${field}.${key}`, value, MAX_ENV_VALUE_BYTES);
    }
  }
  const both = Object.keys(env).length + Object.keys(secretEnv).length;
  if (both > MAX_ENV_ENTRIES) {
    throw invalidArgument("secret_env", `env and secret_env together may hold at most ${MAX_ENV_ENTRIES} entries`);
  }
  const envBytes = execveBytes(env) + execveBytes(secretEnv);
  if (envBytes > MAX_ENV_TOTAL_BYTES) {
    throw invalidArgument(
      Object.keys(secretEnv).length > 0 ? "secret_env" : "env",
      `env and secret_env together must be at most ${MAX_ENV_TOTAL_BYTES} bytes (each NAME=value, its NUL and 8 bytes, as execve counts them); they have ${envBytes}`,
    );
  }
  const cwd = body.cwd ?? null;
  if (cwd !== null) {
    if (!cwd.startsWith("/")) throw invalidArgument("cwd", "cwd must be an absolute path");
    if (cwd.includes("\0")) throw invalidArgument("cwd", "cwd must not contain a NUL byte");
    checkBytes("cwd", cwd, MAX_CWD_BYTES);
  }
  const retry = body.retry ?? {};
  // A default never contradicts what the client sent: an explicit base above the default cap
  // lifts the cap to it, an explicit cap below the default base lowers the base to it.
  const backoffBaseMs = retry.backoff_base_ms ?? Math.min(defaults.retry.backoffBaseMs, retry.backoff_cap_ms ?? Infinity);
  const backoffCapMs = retry.backoff_cap_ms ?? Math.max(defaults.retry.backoffCapMs, backoffBaseMs);
  if (backoffCapMs < backoffBaseMs) {
    throw invalidArgument(
      "retry.backoff_cap_ms",
      `retry.backoff_cap_ms (${backoffCapMs}) must be at least retry.backoff_base_ms (${backoffBaseMs})`,
    );
  }
  const concurrency = body.concurrency === undefined ? undefined : toConcurrencySpec(body.concurrency);
  const rateLimit = body.rate_limit === undefined ? undefined : toRateLimitRef(body.rate_limit, concurrency?.key);
  const routing = toRouting(body);
  const minLeaseMs = defaults.minLeaseMs ?? 1;
  if (body.lease_ms !== undefined && body.lease_ms < minLeaseMs) {
    throw invalidArgument(
      "lease_ms",
      `lease_ms (${body.lease_ms}) must be at least ${minLeaseMs} (the heartbeat timeout plus two heartbeat intervals)`,
    );
  }
  return {
    command: body.command,
    scheduledAt,
    timeoutMs: body.timeout_ms ?? 0,
    maxAttempts: body.max_attempts ?? defaults.maxAttempts,
    env: { ...env },
    secretEnv: { ...secretEnv },
    cwd,
    retry: {
      onFailure: retry.on_failure ?? true,
      onTimeout: retry.on_timeout ?? true,
      onLost: retry.on_lost ?? true,
      backoffBaseMs,
      backoffCapMs,
    },
    idempotencyKey: null,
    // Absent: TQ_DEFAULT_LEASE_MS of the coordinator that grants it (and the idempotency hash
    // of such a spec is what it was before leases were a task option).
    ...(body.lease_ms === undefined ? {} : { leaseMs: body.lease_ms }),
    ...(body.limits === undefined || Object.keys(body.limits).length === 0 ? {} : { limits: { ...body.limits } }),
    ...(concurrency === undefined ? {} : { concurrency }),
    ...(rateLimit === undefined ? {} : { rateLimit }),
    ...(routing === undefined ? {} : { routing }),
    ...(body.depends_on === undefined || body.depends_on.length === 0
      ? {}
      : { dependsOn: [...body.depends_on], onParentFailure: body.on_parent_failure ?? "cancel" }),
  };
}

/** What an environment costs execve: NAME=value and a NUL per entry, and the entry's pointer. */
function execveBytes(env: Record<string, string>): number {
  let total = 0;
  for (const [key, value] of Object.entries(env))
    total += Buffer.byteLength(key, "utf8") + Buffer.byteLength(value, "utf8") + 2 + 8;
  return total;
}

/** A string limit, in UTF-8 bytes. */
function checkBytes(field: string, value: string, limit: number): void {
  const bytes = Buffer.byteLength(value, "utf8");
  if (bytes > limit) throw invalidArgument(field, `${field} must be at most ${limit} bytes (UTF-8); it has ${bytes}`);
}

/**
 * Validates an Idempotency-Key (header or gRPC field); empty or absent means none. Visible
 * ASCII only, so that a key is the same string whatever carried it.
 */
export function parseIdempotencyKey(value: string | null | undefined, field = "Idempotency-Key"): string | null {
  if (value === null || value === undefined || value === "") return null;
  checkBytes(field, value, MAX_IDEMPOTENCY_KEY_BYTES);
  if (!/^[\x21-\x7e]+$/.test(value)) throw invalidArgument(field, `${field} must be visible ASCII characters without spaces`);
  return value;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A task id: a UUID of any version (ours are v7), in the canonical hyphenated form. */
export function isTaskId(value: string): boolean {
  return UUID.test(value);
}
