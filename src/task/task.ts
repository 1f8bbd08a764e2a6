// The task record as the database stores it and every transport reads it.
import type { ConcurrencySpec, RateLimitRef } from "./flow";
import type { LabelPreference, LabelRequirement } from "./labels";
import type { TaskState } from "./state";
import type { Waiting } from "./waiting";

export interface Task {
  id: string;
  command: string;
  state: TaskState;
  priority: number;
  /** The time the client asked for, exactly as submitted (run-now: the submit's time). Never changes. */
  scheduled_at: Date;
  /** When the current or next attempt becomes due: scheduled_at, then moved by each retry's backoff. */
  run_at: Date;
  created_at: Date;
  picked_at: Date | null;
  started_at: Date | null;
  completed_at: Date | null;
  failed_at: Date | null;
  cancelled_at: Date | null;
  /** Attempts started so far, the current one included: the fencing token, which only rises. */
  attempt: number;
  /**
   * Of those, the attempts that ended interrupted (a drain's hand-back, an assignment never
   * delivered): attempt - interruptions is what counts against max_attempts.
   */
  interruptions: number;
  max_attempts: number;
  timeout_ms: number;
  env: Record<string, string>;
  cwd: string | null;
  /** The worker that holds the task, or held its last attempt. */
  worker_id: string | null;
  coordinator_id: string | null;
  exit_code: number | null;
  signal: string | null;
  stdout: string | null;
  stderr: string | null;
  stdout_truncated: boolean;
  stderr_truncated: boolean;
  stdout_replaced: boolean;
  stderr_replaced: boolean;
  error: string | null;
  /** When the current attempt's lease lapses; null unless dispatched or running. */
  lease_expires_at: Date | null;
  /** Each attempt's lease as the task asked; null: TQ_DEFAULT_LEASE_MS of the coordinator granting it. */
  lease_ms: number | null;
  retry_on_failure: boolean;
  retry_on_timeout: boolean;
  retry_on_lost: boolean;
  retry_backoff_base_ms: number;
  retry_backoff_cap_ms: number;
  idempotency_key: string | null;
  idempotency_hash: string | null;
  /** Passed to the process, never returned by any API. */
  secret_env: Record<string, string>;
  /** What the task asked for; null when it asked for nothing (the worker's maxima apply). */
  limits: TaskLimits | null;
  /** The W3C traceparent it was submitted under (src/trace), carried to its worker; null: none. */
  traceparent: string | null;
  /** Flow control (src/task/flow.ts): the concurrency key (expanded), its max and strategy; null without. */
  concurrency_key?: string | null;
  concurrency_max?: number | null;
  concurrency_strategy?: string | null;
  /** The rate limit's name and bucket ('' for the limit's own); null without. */
  rate_limit?: string | null;
  rate_limit_key?: string | null;
  /** Cancelled while live: it holds its key's slot until its process is gone, at the latest until then (migration 0024). */
  key_held_until?: Date | null;
  /** The named queue (src/db/queues.ts). */
  queue: string;
  /** Labels a worker must have to take the task (src/task/labels.ts). */
  requires: LabelRequirement[];
  /** Labels a worker is preferred for, with weights. */
  prefers: LabelPreference[];
  /** Fails queued after this long without a worker; 0: waits forever. */
  schedule_timeout_ms: number;
  /** The aging its rank was computed with (TQ_PRIORITY_AGING_MS of its submitter). */
  priority_aging_ms: number;
  /** The claim's order: run_at - priority * priority_aging_ms. */
  rank: Date | null;
  /** Not a column: what a queued task waits for, filled by reads that show it (src/db/waiting.ts). */
  waiting?: Waiting | null;
  // Dependencies (src/db/dependencies.ts).
  /** Its ref in the batch that declared it; null outside a DAG batch. */
  ref: string | null;
  /** What a failed parent does to it; null for a task without parents. */
  on_parent_failure: ParentFailurePolicy | null;
  /** Parents not yet ended (counted off exactly once each); 0 once released. */
  parents_pending: number;
  /** Some task depends on it: ending it resolves its children's edges. */
  has_children: boolean;
  /** TQ_PARENT_<ref>_EXIT of each parent, written at release; merged into the env at dispatch. */
  parent_env: Record<string, string> | null;
  /** The recurring schedule whose firing created the task, and that firing's time; null otherwise. */
  schedule_id: string | null;
  fire_at: Date | null;
}

/**
 * What a child does when a parent ends other than succeeded (failed, timed_out, cancelled; a
 * parent that will retry has not ended): `cancel` it (the default; event `parent_failed`),
 * `skip` it (ends cancelled too, event `skipped`, error "skipped: ..."), or `run` it anyway
 * once every parent has ended.
 */
export const PARENT_FAILURE_POLICIES = ["cancel", "skip", "run"] as const;
export type ParentFailurePolicy = (typeof PARENT_FAILURE_POLICIES)[number];

/**
 * Resource limits a task asks for, each capped by the worker that runs it (its TQ_WORKER_MAX_*
 * settings); absent: the worker's maximum. Stored and sent as the API spells them.
 */
export interface TaskLimits {
  /** Memory in MiB: the cgroup's memory limit (the OOM killer ends the task), else the address space (ulimit -v). */
  memory_mb?: number;
  /** Processes and threads at once: the cgroup's pids.max. Not enforced without cgroups. */
  pids?: number;
  /** Open files per process (ulimit -n), with or without cgroups. */
  nofile?: number;
  /** CPU cores (0.5: half a core), the cgroup's CPU quota. Not enforced without cgroups. */
  cpu?: number;
}

/** How an attempt's limits were enforced. */
export const LIMITS_APPLIED = ["cgroup-v1", "cgroup-v2", "rlimit", "none"] as const;
export type LimitsApplied = (typeof LIMITS_APPLIED)[number];

/** The limits that held for one attempt, each null when none held. */
export interface EffectiveLimits {
  memory_mb: number | null;
  pids: number | null;
  nofile: number | null;
  cpu: number | null;
}

/** What an attempt used and how it was limited, as its worker measured it. */
export interface AttemptUsage {
  limitsApplied: LimitsApplied;
  limits: EffectiveLimits;
  /** CPU time in microseconds; null when unknown (the process never ran). */
  cpuUserUs: number | null;
  cpuSystemUs: number | null;
  /** Peak memory: the cgroup's peak charge, else the largest resident set of the process and the children it waited for. */
  peakMemoryBytes: number | null;
  /** The kernel's OOM killer killed a process of the attempt. */
  oomKilled: boolean;
}

/** What is retried while attempts remain, and the backoff between attempts. */
export interface RetryPolicy {
  /** A non-zero exit, a signal, or a command that could not start. */
  onFailure: boolean;
  onTimeout: boolean;
  /** The worker died, froze or was cut off (retried at once, without backoff). */
  onLost: boolean;
  /** Delay before attempt n+1: min(cap, base * 2^(n-1)), times a random factor in [0.5, 1). */
  backoffBaseMs: number;
  backoffCapMs: number;
}

/** What a client asks for; validated at the edge (src/task/spec.ts). */
export interface TaskSpec {
  command: string;
  /** null: run now. */
  scheduledAt: Date | null;
  /** 0: no timeout. */
  timeoutMs: number;
  maxAttempts: number;
  env: Record<string, string>;
  /** Environment passed to the process but never returned by any API, event stream or log. */
  secretEnv: Record<string, string>;
  cwd: string | null;
  retry: RetryPolicy;
  /** A repeated submit with the same key returns the original task. */
  idempotencyKey: string | null;
  /** Each attempt's lease (lease_ms); absent: TQ_DEFAULT_LEASE_MS of the coordinator granting it. */
  leaseMs?: number;
  /** Absent: none asked for (and the idempotency hash of such a spec is what it was before limits existed). */
  limits?: TaskLimits;
  /** Absent: no concurrency key (flow control, src/task/flow.ts; `{schedule}` filled in at creation). */
  concurrency?: ConcurrencySpec;
  /** Absent: no rate limit. */
  rateLimit?: RateLimitRef;
  /** Absent: the default queue, priority 0, any worker (and the idempotency hash is unchanged). */
  routing?: TaskRouting;
  /**
   * Parents: task ids, or (in a batch) refs of other items. Absent: none (and the idempotency
   * hash is what it was before dependencies existed).
   */
  dependsOn?: string[];
  /** With dependsOn; absent means cancel. */
  onParentFailure?: ParentFailurePolicy;
  /** This item's name in its batch, for the other items' dependsOn. */
  ref?: string;
  /** The schedule firing that creates this task: at most one task per (schedule, fire time). */
  firing?: { scheduleId: string; fireAt: Date; reason?: string };
}

/** Where and in what order a task runs (src/db/claim.ts). */
export interface TaskRouting {
  queue: string;
  /** Higher first, from -MAX_PRIORITY to MAX_PRIORITY; ages (TQ_PRIORITY_AGING_MS). */
  priority: number;
  requires: LabelRequirement[];
  prefers: LabelPreference[];
  /** 0: waits for a worker forever. */
  scheduleTimeoutMs: number;
}

/** The outcome of a submit: the task, and whether this call created it. */
export interface Submitted {
  task: Task;
  /** false when an Idempotency-Key matched an earlier submit. */
  created: boolean;
}

/**
 * The tail of an attempt's output, as the worker captured it. Each stream is text that
 * PostgreSQL and JSON can hold: a NUL byte or a byte sequence that is not UTF-8 is replaced with
 * U+FFFD, and `*Replaced` says so (the text is then not byte for byte what the command wrote).
 */
export interface CapturedOutput {
  stdout: string;
  stderr: string;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  /** The worker replaced NUL or invalid UTF-8 in the stream with U+FFFD. */
  stdoutReplaced: boolean;
  stderrReplaced: boolean;
}

/** The output of a command that never started (or whose output is not kept). */
export const NO_OUTPUT: CapturedOutput = {
  stdout: "",
  stderr: "",
  stdoutTruncated: false,
  stderrTruncated: false,
  stdoutReplaced: false,
  stderrReplaced: false,
};

/** How an attempt ended, as the worker reports it. */
export interface AttemptResult extends CapturedOutput {
  state: "succeeded" | "failed" | "timed_out";
  exitCode: number | null;
  signal: string | null;
  error: string | null;
  startedAt: Date | null;
  finishedAt: Date;
  /** Absent or null from a worker that does not measure (an older build). */
  usage?: AttemptUsage | null;
}
