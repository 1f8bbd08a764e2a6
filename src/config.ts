// Configuration: one TypeBox schema, read from the environment once in each role's main and
// passed down as a typed object. This is the only module that reads process.env. Each role's
// assembly turns it into the options its parts take (taskDefaults, apiSettings, authOptions,
// leaseTimings below), so no part below a role reads a setting by its variable's name.

import { readFileSync } from "node:fs";
import { type Static, Type } from "@sinclair/typebox";
import { Value } from "@sinclair/typebox/value";
import type { ApiSettings } from "./api/deps";
import type { AuthOptions } from "./auth/authenticator";
import { type JoinToken, joinTokens } from "./auth/worker-tokens";
import type { ConnectOptions } from "./db/sql";
import { GRPC_DEFAULT_MAX_MESSAGE_BYTES, RESULT_HEADROOM_BYTES } from "./rpc/message-size";
import { parseDuration } from "./schedule/rules";
import { parseLabels } from "./task/labels";
import { type HeartbeatTimings, type LeaseTimings, minLeaseMs } from "./task/lease";
import { QUEUE_NAME_PATTERN } from "./task/routing";
import type { TaskDefaults } from "./task/spec";
import type { IsolationSettings } from "./worker/identity";

const Port = (fallback: number, description: string) =>
  Type.Integer({ minimum: 0, maximum: 65535, default: fallback, description });

const Millis = (fallback: number, description: string, minimum = 1) =>
  Type.Integer({ minimum, maximum: 86_400_000, default: fallback, description });

/**
 * Every option, keyed by its environment variable. Each description states its default; the
 * README's configuration table is checked against this schema by a test.
 */
export const ConfigSchema = Type.Object({
  DATABASE_URL: Type.Optional(
    Type.String({
      minLength: 1,
      description: "PostgreSQL connection URL. Required by the single roles; `bun start` runs embedded PostgreSQL when unset.",
    }),
  ),
  TQ_HOST: Type.String({
    minLength: 1,
    default: "127.0.0.1",
    description: "Address the HTTP and gRPC servers bind. Defaults to 127.0.0.1 (loopback only).",
  }),
  TQ_SCHEDULER_PORT: Port(8081, "Scheduler HTTP port. Defaults to 8081."),
  TQ_COORDINATOR_PORT: Port(8080, "Coordinator HTTP port. Defaults to 8080."),
  TQ_GRPC_PORT: Port(50051, "Coordinator gRPC port. Defaults to 50051."),
  TQ_COORDINATOR_ID: Type.Optional(
    Type.String({
      minLength: 1,
      maxLength: 200,
      description: "Name of this coordinator in the database. Defaults to <hostname>:<gRPC port>.",
    }),
  ),
  TQ_COORDINATOR_ADDRESSES: Type.String({
    minLength: 1,
    default: "127.0.0.1:50051",
    description:
      "Comma-separated host:port list a worker dials, in order, moving on when one fails. Defaults to 127.0.0.1:50051.",
  }),
  TQ_WORKER_SLOTS: Type.Integer({
    minimum: 1,
    maximum: 1024,
    default: 4,
    description: "Commands one worker runs at once. Defaults to 4.",
  }),
  TQ_WORKER_NAME: Type.Optional(
    Type.String({
      minLength: 1,
      maxLength: 200,
      description: "Human-readable worker name shown by GET /workers. Defaults to <hostname>/<pid>.",
    }),
  ),
  TQ_WORKER_GATE_DIR: Type.Optional(
    Type.String({
      minLength: 1,
      maxLength: 1000,
      description:
        "Folder (made 0700, this user's only) where the workers of one user on a host share their start gates: the " +
        "tasks due at one time wait on one FIFO, and the first worker at that time lets every one of them go; off: each " +
        "worker's gates are its own. Defaults to <tmpdir>/taskqueue-gates-<uid>.",
    }),
  ),
  TQ_WORKER_LIMITS: Type.Union([Type.Literal("auto"), Type.Literal("rlimit"), Type.Literal("none")], {
    default: "auto",
    description:
      "How a worker enforces task limits: auto (a cgroup per attempt where the worker may create them, which needs root " +
      "for cgroup v1, else rlimits), rlimit (per-process limits only), none. Defaults to auto.",
  }),
  TQ_WORKER_WATCHDOG: Type.Union([Type.Literal("on"), Type.Literal("lean"), Type.Literal("off")], {
    default: "on",
    description:
      "on: each worker starts a watchdog process outside its process group that kills the worker's tasks when the worker " +
      "dies or freezes and reports them stopped, so that they are requeued at once (a Bun process, ~60 MB); lean: the " +
      "same, watched by bash (~3 MB, next to no CPU), the report starting Bun only then, so it comes later; off: no " +
      "watchdog, the tasks run on until their lease lapses. Defaults to on.",
  }),
  TQ_WORKER_MAX_MEMORY_MB: Type.Integer({
    minimum: 0,
    maximum: 4_194_304,
    default: 0,
    description:
      "Most memory (MiB) a task may have on this worker, and what one that asks none gets; 0: no maximum. Defaults to 0.",
  }),
  TQ_WORKER_MAX_PIDS: Type.Integer({
    minimum: 0,
    maximum: 4_194_304,
    default: 4096,
    description:
      "Most processes and threads a task may run at once on this worker (cgroups only); 0: no maximum. Defaults to 4096.",
  }),
  TQ_WORKER_MAX_NOFILE: Type.Integer({
    minimum: 0,
    maximum: 1_048_576,
    default: 0,
    description: "Most open files per process of a task on this worker; 0: the worker's own limit. Defaults to 0.",
  }),
  TQ_WORKER_MAX_CPU: Type.Number({
    minimum: 0,
    maximum: 1024,
    default: 0,
    description: "Most CPU cores a task may use on this worker (cgroups only); 0: no maximum. Defaults to 0.",
  }),
  TQ_WORKERS: Type.Integer({
    minimum: 0,
    maximum: 64,
    default: 2,
    description: "Workers that `bun start` runs in its process. Defaults to 2.",
  }),
  TQ_WORKER_HEALTH_PORT: Port(
    0,
    "Port of the worker's own GET /healthz (connected, last acknowledgement, running and unacknowledged counts), bound on TQ_HOST; 0 serves none. Defaults to 0.",
  ),
  TQ_WORKER_MAX_UNACKED: Type.Integer({
    minimum: 1,
    maximum: 1_000_000,
    default: 1000,
    description:
      "Results a worker keeps waiting for the coordinator's acknowledgement before it reports itself full and takes no new work. Defaults to 1000.",
  }),
  TQ_COMPLETER_MAX_PENDING: Type.Integer({
    minimum: 1,
    maximum: 1_000_000,
    default: 10_000,
    description:
      "Worker results a coordinator holds in memory waiting for the database; at this many it gives its workers no new work until they are written. Defaults to 10000.",
  }),
  TQ_HEARTBEAT_INTERVAL_MS: Millis(1000, "How often a worker heartbeats on its stream. Defaults to 1000 ms."),
  TQ_HEARTBEAT_TIMEOUT_MS: Millis(
    3000,
    "Silence after which the coordinator declares a worker dead: it gets no new work (its tasks keep their leases, TQ_DEFAULT_LEASE_MS). Defaults to 3000 ms.",
  ),
  TQ_DEFAULT_LEASE_MS: Millis(
    30_000,
    "Each attempt's lease when its task asks for none (lease_ms): a worker cut off for this long stops the attempt itself, and only then may another coordinator rerun it. At least TQ_HEARTBEAT_TIMEOUT_MS plus two TQ_HEARTBEAT_INTERVAL_MS. Defaults to 30000 ms.",
  ),
  TQ_DRAIN_GRACE_MS: Millis(
    30_000,
    "On SIGTERM a worker lets running tasks finish for this long, then hands them back. Defaults to 30000 ms.",
    0,
  ),
  TQ_WORKER_REFUSED_BACKOFF_MS: Millis(
    30_000,
    "How long a worker waits before dialing again after a coordinator refused its protocol version (FAILED_PRECONDITION), with jitter. Defaults to 30000 ms.",
    10,
  ),
  TQ_KILL_GRACE_MS: Millis(5000, "Between SIGTERM and SIGKILL when a task times out or is stopped. Defaults to 5000 ms.", 0),
  TQ_SAFETY_POLL_MS: Millis(
    5000,
    "Slow poll that covers a missed notification; dispatch is otherwise woken by NOTIFY and timers. Defaults to 5000 ms.",
    10,
  ),
  TQ_DISPATCH_AHEAD_MS: Type.Integer({
    minimum: 0,
    maximum: 1000,
    // Issue 13 (schedule lateness): long enough for a worker to arm (spawn ahead, held before
    // the command) every attempt due at one instant on a busy host, so that the start time only
    // releases them (src/worker/attempts.ts). Was 50.
    default: 200,
    description:
      "How long before a task is due the coordinator hands it to a worker, which spawns its process meanwhile (held before the command) and starts the command at its time; 0 hands tasks over only once due. The attempt holds its slot meanwhile. Defaults to 200 ms.",
  }),
  // Recurring schedules (src/schedule/firer.ts).
  TQ_SCHEDULE_AHEAD_MS: Type.Integer({
    minimum: 0,
    maximum: 60_000,
    default: 500,
    description:
      "How long before its fire time a schedule's firing writes its task (due at the fire time, so it starts then, never before). Defaults to 500 ms.",
  }),
  TQ_SCHEDULE_POLL_MS: Millis(
    1000,
    "Longest sleep of the schedule firing loop: how soon a schedule created or resumed on another replica is seen. Defaults to 1000 ms.",
    10,
  ),
  TQ_SCHEDULES: Type.Boolean({
    default: true,
    description: "Whether this scheduler or coordinator runs the schedule firing loop (any number may). Defaults to true.",
  }),
  TQ_MAX_OUTPUT_BYTES: Type.Integer({
    minimum: 0,
    maximum: 16 * 1024 * 1024,
    default: 64 * 1024,
    description:
      "Tail of stdout and of stderr kept per task, in bytes; twice this plus 65536 must fit TQ_GRPC_MAX_MESSAGE_BYTES. Defaults to 65536.",
  }),
  TQ_GRPC_MAX_MESSAGE_BYTES: Type.Integer({
    minimum: 2 * 1024 * 1024,
    maximum: 256 * 1024 * 1024,
    default: GRPC_DEFAULT_MAX_MESSAGE_BYTES,
    description:
      "Largest gRPC message a coordinator or worker sends or accepts (a task's result, an assignment), in bytes; a coordinator tells its workers, which cut results to fit. Defaults to 4194304 (gRPC's own default).",
  }),
  TQ_MAX_BODY_BYTES: Type.Integer({
    minimum: 1024,
    maximum: 64 * 1024 * 1024,
    default: 1024 * 1024,
    description: "Largest HTTP request body accepted (413 beyond). Defaults to 1048576.",
  }),
  TQ_MAX_BATCH: Type.Integer({
    minimum: 1,
    maximum: 100_000,
    default: 1000,
    description: "Most tasks one POST /tasks/batch may submit (413 beyond). Defaults to 1000.",
  }),
  TQ_DEFAULT_MAX_ATTEMPTS: Type.Integer({
    minimum: 1,
    maximum: 100,
    default: 3,
    description: "Attempts a task gets when it does not say. Defaults to 3.",
  }),
  TQ_RETRY_BACKOFF_BASE_MS: Millis(
    1000,
    "Backoff before a task's second attempt; it doubles for each further one (with jitter). Tasks may override it. Defaults to 1000 ms.",
    0,
  ),
  TQ_RETRY_BACKOFF_CAP_MS: Millis(
    60_000,
    "Longest backoff between two attempts of a task. Tasks may override it. Defaults to 60000 ms.",
    0,
  ),
  TQ_DB_POOL_SIZE: Type.Integer({
    minimum: 1,
    maximum: 200,
    default: 10,
    description: "PostgreSQL connections per process. Defaults to 10.",
  }),
  TQ_DB_STATEMENT_TIMEOUT_MS: Millis(
    5000,
    "PostgreSQL statement_timeout on every connection of a role's pool: a statement running longer is cancelled and its request answered 503 (migrations are exempt); 0 turns it off. Defaults to 5000 ms.",
    0,
  ),
  TQ_DB_LOCK_TIMEOUT_MS: Millis(
    2000,
    "PostgreSQL lock_timeout on every connection of a role's pool: a statement waiting longer for a lock (a table locked by a migration or by hand) fails and its request is answered 503; 0 turns it off. Defaults to 2000 ms.",
    0,
  ),
  // PostgreSQL high availability (Patroni failover; README "Production").
  TQ_DB_QUERY_TIMEOUT_MS: Millis(
    7000,
    "The client's own deadline for every database query of a role: past it the query fails (answered 503) and its connection is dropped, so a primary cut off the network (no reset, queries silent) cannot hold requests; keep it above TQ_DB_STATEMENT_TIMEOUT_MS. 0 turns it off. Defaults to 7000 ms.",
    0,
  ),
  DATABASE_READ_URL: Type.Optional(
    Type.String({
      minLength: 1,
      description:
        "PostgreSQL URL for read queries that may lag a little (GET /tasks lists, /workers, /queues), e.g. a streaming replica (target_session_attrs=standby). Unset: DATABASE_URL serves them.",
    }),
  ),
  TQ_DATA_DIR: Type.String({
    minLength: 1,
    default: ".data/postgres",
    description: "Embedded PostgreSQL data folder for `bun start`. Defaults to .data/postgres.",
  }),
  TQ_EMBEDDED_PG_PORT: Port(54329, "Embedded PostgreSQL port for `bun start`. Defaults to 54329."),
  TQ_EMBEDDED_PG_HOME: Type.String({
    minLength: 1,
    default: "/var/lib/task-queue",
    description:
      "Started by root, embedded PostgreSQL runs as user postgres: its binaries, and a TQ_DATA_DIR that user cannot reach, are placed here. Defaults to /var/lib/task-queue.",
  }),
  TQ_INSECURE: Type.Boolean({
    default: false,
    description:
      "Let a role listen beyond loopback without API tokens, a worker token or TLS, and a worker dial a coordinator beyond loopback without TLS. Defaults to false: such a role refuses to start.",
  }),
  TQ_API_TOKENS: Type.Optional(
    Type.String({
      minLength: 1,
      description:
        "API tokens from configuration, besides those in the database: comma-separated name:scope+scope:sha256-of-token entries, as `bun run token hash` prints them. Unset by default.",
    }),
  ),
  TQ_WORKER_TOKEN: Type.Optional(
    Type.String({
      minLength: 16,
      description:
        "Join token: a worker presents it to join; the coordinator accepts it (besides TQ_WORKER_TOKENS). Joined workers reconnect with their own credential. Unset by default (allowed on loopback only).",
    }),
  ),
  TQ_WORKER_TOKENS: Type.Optional(
    Type.String({
      minLength: 1,
      description:
        "Join tokens the coordinator accepts besides TQ_WORKER_TOKEN, for rotation with overlap: comma-separated name:sha256-of-token entries, as `bun run token worker-hash` prints them. Unset by default.",
    }),
  ),
  TQ_WORKER_TOKEN_FILE: Type.Optional(
    Type.String({
      minLength: 1,
      description:
        "Path of a file holding the join token (instead of TQ_WORKER_TOKEN, which then stays out of the process's environment); read once at start. Unset by default.",
    }),
  ),
  TQ_TASK_ISOLATION: Type.Union([Type.Literal("auto"), Type.Literal("required"), Type.Literal("off")], {
    default: "auto",
    description:
      "auto: a worker able to switch users (root, or CAP_SETUID and CAP_SETGID) runs each slot's tasks as its own uid from TQ_TASK_UIDS, otherwise it warns and runs them as itself; required: it refuses to start unless able; off: tasks run as the worker. Defaults to auto.",
  }),
  TQ_TASK_UIDS: Type.String({
    pattern: "^[0-9]+-[0-9]+$",
    default: "20000-20063",
    description:
      "Range of uids (and gids, the same numbers) a worker's slots run their tasks as: slot i is the first plus i, so each worker on a host needs a range of its own. Defaults to 20000-20063.",
  }),
  TQ_TASK_HOME_DIR: Type.String({
    minLength: 1,
    default: "/var/lib/task-queue/slots",
    description:
      "Where each slot's private home (<uid>, mode 0700) is made: the default cwd and HOME of its tasks. Defaults to /var/lib/task-queue/slots.",
  }),
  TQ_RATE_LIMIT_PER_SECOND: Type.Number({
    minimum: 0,
    maximum: 1_000_000,
    default: 0,
    description: "Requests per second each API token may make to this process (429 beyond); 0 turns it off. Defaults to 0.",
  }),
  TQ_RATE_LIMIT_BURST: Type.Integer({
    minimum: 1,
    maximum: 1_000_000,
    default: 100,
    description: "Requests a token may make at once before the per-second rate applies. Defaults to 100.",
  }),
  TQ_TLS_CERT: Type.Optional(
    Type.String({
      minLength: 1,
      description: "PEM certificate (chain) path: serves gRPC and HTTP over TLS when set with TQ_TLS_KEY. Unset by default.",
    }),
  ),
  TQ_TLS_KEY: Type.Optional(
    Type.String({ minLength: 1, description: "PEM private key path for TQ_TLS_CERT. Unset by default." }),
  ),
  TQ_TLS_CLIENT_CA: Type.Optional(
    Type.String({
      minLength: 1,
      description:
        "PEM CA path: the coordinator's gRPC port then requires client certificates signed by it (mutual TLS for workers). Unset by default.",
    }),
  ),
  TQ_TLS_CA: Type.Optional(
    Type.String({
      minLength: 1,
      description:
        "PEM CA path a worker trusts for its coordinators; setting it (or the two below) makes the worker dial over TLS. Unset by default.",
    }),
  ),
  TQ_TLS_CLIENT_CERT: Type.Optional(
    Type.String({ minLength: 1, description: "PEM certificate path a worker presents for mutual TLS. Unset by default." }),
  ),
  TQ_TLS_CLIENT_KEY: Type.Optional(
    Type.String({ minLength: 1, description: "PEM private key path for TQ_TLS_CLIENT_CERT. Unset by default." }),
  ),
  // Queues, priorities, labels (src/task/routing.ts, src/db/claim.ts).
  TQ_WORKER_QUEUES: Type.Optional(
    Type.String({ description: "Comma-separated queues this worker takes tasks from. Unset by default: every queue." }),
  ),
  TQ_WORKER_LABELS: Type.Optional(
    Type.String({
      description:
        "This worker's labels, `key=value` comma-separated (`gpu=1,region=eu,mem_gb=64`; a bare key is `true`), matched against tasks' `require` and `prefer`. Unset by default: none.",
    }),
  ),
  TQ_PRIORITY_AGING_MS: Type.Integer({
    minimum: 0,
    maximum: 3_600_000,
    default: 1000,
    description:
      "How fast a waiting task's priority ages: tasks run in order of run_at - priority * this, so a task is passed by one of priority higher by d only while that one has waited less than d times this. Set the same on every role. Defaults to 1000 ms.",
  }),
  // --- retention (branch `retention`; src/coordinator/pruner.ts, src/db/retention.ts) ---
  TQ_RETENTION: Type.String({
    minLength: 1,
    default: "7d",
    description:
      "How long a final task (succeeded, failed, timed_out, cancelled) is kept after it ended, with its events, attempts and logs, before a coordinator deletes it: a duration such as 7d, 36h, 1d12h, 90m or 30s (units d, h, m, s, ms; at most 366d); off or 0 keeps everything. Defaults to 7d.",
  }),
  TQ_RETENTION_BATCH_SIZE: Type.Integer({
    minimum: 1,
    maximum: 100_000,
    default: 500,
    description: "Tasks deleted per retention batch, each batch one short transaction. Defaults to 500.",
  }),
  TQ_RETENTION_PAUSE_MS: Millis(
    50,
    "Pause between two retention batches, so that pruning a backlog never holds the database for long. Defaults to 50 ms.",
    0,
  ),
  TQ_RETENTION_INTERVAL_MS: Millis(
    60_000,
    "How often a coordinator looks for tasks past TQ_RETENTION once a pass has found no more. Defaults to 60000 ms.",
    10,
  ),
  TQ_LOG_LEVEL: Type.Union(
    [Type.Literal("debug"), Type.Literal("info"), Type.Literal("warn"), Type.Literal("error"), Type.Literal("silent")],
    { default: "info", description: "Log level: debug, info, warn, error or silent. Defaults to info." },
  ),
  // --- live logs (branch `logs`: src/worker/log-streamer.ts, src/db/logs.ts) ---
  TQ_LOG_MAX_BYTES: Type.Integer({
    minimum: 0,
    maximum: 1024 * 1024 * 1024,
    default: 8 * 1024 * 1024,
    description:
      "Most bytes of output (stdout and stderr together) stored per attempt of a task; what is written beyond is cut, and the API says how much (tq-log-truncated). 0 stores none. Set it on coordinators, which tell their workers. Defaults to 8388608 (8 MiB).",
  }),
  TQ_LOG_RETENTION_MS: Type.Integer({
    minimum: 0,
    maximum: 10 * 365 * 86_400_000,
    default: 7 * 86_400_000,
    description:
      "Stored output older than this is deleted by the coordinators, in small batches; 0 keeps it until its task is deleted. Defaults to 604800000 ms (7 days).",
  }),
  TQ_LOG_FLUSH_BYTES: Type.Integer({
    minimum: 1024,
    maximum: 1024 * 1024,
    default: 64 * 1024,
    description: "A worker sends a running task's buffered output once this many bytes wait. Defaults to 65536.",
  }),
  TQ_LOG_FLUSH_MS: Millis(
    1000,
    "Longest a worker holds a running task's output before sending it: the first bytes after a quiet spell go within 50 ms, a steady writer's every this long (or TQ_LOG_FLUSH_BYTES). Defaults to 1000 ms.",
    50,
  ),
  // --- traces (branch `metrics`) ---
  OTEL_EXPORTER_OTLP_ENDPOINT: Type.Optional(
    Type.String({
      pattern: "^https?://",
      description:
        "OpenTelemetry collector base URL (OTLP/HTTP, JSON); spans go to <it>/v1/traces. Unset by default: no traces, at no cost.",
    }),
  ),
});

export type Config = Static<typeof ConfigSchema>;

export class ConfigError extends Error {
  override name = "ConfigError";
}

/**
 * Reads the configuration from an environment. Unknown variables are ignored; a known one
 * that does not fit its rule is an error naming the variable and the rule.
 */
export function loadConfig(env: Record<string, string | undefined> = process.env): Config {
  const raw: Record<string, unknown> = {};
  for (const key of Object.keys(ConfigSchema.properties)) {
    const value = env[key];
    if (value !== undefined && value !== "") raw[key] = value.trim();
  }
  // Value.Convert would round "1.5" into an integer; refuse non-integers outright.
  for (const [key, value] of Object.entries(raw)) {
    const schema = ConfigSchema.properties[key as keyof typeof ConfigSchema.properties] as { type?: string };
    if (schema.type === "integer" && !/^[+-]?\d+$/.test(String(value))) {
      throw new ConfigError(`invalid configuration: ${key}=${JSON.stringify(value)}: Expected integer`);
    }
  }
  const converted = Value.Convert(ConfigSchema, Value.Default(ConfigSchema, raw));
  const errors = [...Value.Errors(ConfigSchema, converted)];
  if (errors.length > 0) {
    const problems = errors.map((e) => {
      const key = e.path.replace(/^\//, "");
      return `${key}=${JSON.stringify(raw[key] ?? null)}: ${e.message}`;
    });
    throw new ConfigError(`invalid configuration: ${problems.join("; ")}`);
  }
  const config = converted as Config;
  if (config.TQ_HEARTBEAT_TIMEOUT_MS <= config.TQ_HEARTBEAT_INTERVAL_MS) {
    throw new ConfigError(
      `invalid configuration: TQ_HEARTBEAT_TIMEOUT_MS (${config.TQ_HEARTBEAT_TIMEOUT_MS}) must exceed TQ_HEARTBEAT_INTERVAL_MS (${config.TQ_HEARTBEAT_INTERVAL_MS})`,
    );
  }
  const shortestLease = minLeaseMs(heartbeatOf(config));
  if (config.TQ_DEFAULT_LEASE_MS < shortestLease) {
    throw new ConfigError(
      `invalid configuration: TQ_DEFAULT_LEASE_MS (${config.TQ_DEFAULT_LEASE_MS}) must be at least TQ_HEARTBEAT_TIMEOUT_MS plus two TQ_HEARTBEAT_INTERVAL_MS (${shortestLease})`,
    );
  }
  coordinatorAddresses(config);
  const result = 2 * config.TQ_MAX_OUTPUT_BYTES + RESULT_HEADROOM_BYTES;
  if (result > config.TQ_GRPC_MAX_MESSAGE_BYTES) {
    throw new ConfigError(
      `invalid configuration: a task's result (2 x TQ_MAX_OUTPUT_BYTES = ${2 * config.TQ_MAX_OUTPUT_BYTES}, plus ${RESULT_HEADROOM_BYTES} bytes for the rest of it) must fit TQ_GRPC_MAX_MESSAGE_BYTES (${config.TQ_GRPC_MAX_MESSAGE_BYTES}); lower TQ_MAX_OUTPUT_BYTES to at most ${Math.floor((config.TQ_GRPC_MAX_MESSAGE_BYTES - RESULT_HEADROOM_BYTES) / 2)} or raise TQ_GRPC_MAX_MESSAGE_BYTES to at least ${result}`,
    );
  }
  retentionMs(config);
  taskIsolation(config);
  workerRoutingConfig(config);
  readWorkerTokenFile(config);
  workerJoinTokens(config);
  if (Boolean(config.TQ_TLS_CERT) !== Boolean(config.TQ_TLS_KEY)) {
    throw new ConfigError("invalid configuration: TQ_TLS_CERT and TQ_TLS_KEY go together");
  }
  if (Boolean(config.TQ_TLS_CLIENT_CERT) !== Boolean(config.TQ_TLS_CLIENT_KEY)) {
    throw new ConfigError("invalid configuration: TQ_TLS_CLIENT_CERT and TQ_TLS_CLIENT_KEY go together");
  }
  if (config.TQ_TLS_CLIENT_CA && !config.TQ_TLS_CERT) {
    throw new ConfigError("invalid configuration: TQ_TLS_CLIENT_CA (mutual TLS) needs TQ_TLS_CERT and TQ_TLS_KEY");
  }
  return config;
}

/** TQ_WORKER_QUEUES and TQ_WORKER_LABELS, validated: what the worker tells its coordinator in Hello. */
export function workerRoutingConfig(config: Config): { queues: string[]; labels: Record<string, string> } {
  const queues = (config.TQ_WORKER_QUEUES ?? "")
    .split(",")
    .map((q) => q.trim())
    .filter((q) => q !== "");
  for (const q of queues) {
    if (!new RegExp(QUEUE_NAME_PATTERN).test(q)) {
      throw new ConfigError(`invalid configuration: TQ_WORKER_QUEUES: "${q}" is not a queue name (${QUEUE_NAME_PATTERN})`);
    }
  }
  try {
    return { queues, labels: parseLabels(config.TQ_WORKER_LABELS ?? "") };
  } catch (error) {
    throw new ConfigError(`invalid configuration: TQ_WORKER_LABELS: ${(error as Error).message}`);
  }
}

/** The worker's dial list, validated. */
export function coordinatorAddresses(config: Config): string[] {
  const list = config.TQ_COORDINATOR_ADDRESSES.split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  for (const address of list) {
    if (!/^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/.test(address)) {
      throw new ConfigError(`invalid configuration: TQ_COORDINATOR_ADDRESSES entry "${address}" is not host:port`);
    }
  }
  if (list.length === 0) throw new ConfigError("invalid configuration: TQ_COORDINATOR_ADDRESSES is empty");
  return list;
}

/**
 * TQ_WORKER_TOKEN_FILE read into TQ_WORKER_TOKEN, so that the token need never be in the
 * environment, where a process of the same user can read it (/proc/<pid>/environ).
 */
function readWorkerTokenFile(config: Config): void {
  const path = config.TQ_WORKER_TOKEN_FILE;
  if (path === undefined) return;
  if (config.TQ_WORKER_TOKEN !== undefined) {
    throw new ConfigError("invalid configuration: set TQ_WORKER_TOKEN or TQ_WORKER_TOKEN_FILE, not both");
  }
  let token: string;
  try {
    token = readFileSync(path, "utf8").trim();
  } catch (err) {
    throw new ConfigError(`invalid configuration: TQ_WORKER_TOKEN_FILE ${path} cannot be read: ${(err as Error).message}`);
  }
  if (token.length < 16) {
    throw new ConfigError(`invalid configuration: TQ_WORKER_TOKEN_FILE ${path} must hold a token of at least 16 characters`);
  }
  config.TQ_WORKER_TOKEN = token;
}

/** Who a worker's tasks run as (src/worker/identity.ts). */
export function taskIsolation(config: Config): IsolationSettings {
  const [first, last] = config.TQ_TASK_UIDS.split("-").map(Number) as [number, number];
  if (first < 1 || last > 4_294_967_294 || first > last) {
    throw new ConfigError(
      `invalid configuration: TQ_TASK_UIDS=${config.TQ_TASK_UIDS}: expected first-last with 1 <= first <= last <= 4294967294`,
    );
  }
  return { mode: config.TQ_TASK_ISOLATION, ids: { first, last }, homeDir: config.TQ_TASK_HOME_DIR };
}

/** The database URL, or a clear error for a role that cannot run without one. */
export function requireDatabaseUrl(config: Config, role: string): string {
  if (!config.DATABASE_URL) {
    throw new ConfigError(`${role} needs DATABASE_URL (for example postgres://user@127.0.0.1:5432/taskqueue)`);
  }
  return config.DATABASE_URL;
}

// ---------------------------------------------------------------------------------------------
// The configuration as the parts take it.

/** What a task gets where its request says nothing. */
export function taskDefaults(config: Config): TaskDefaults {
  return {
    maxAttempts: config.TQ_DEFAULT_MAX_ATTEMPTS,
    retry: { backoffBaseMs: config.TQ_RETRY_BACKOFF_BASE_MS, backoffCapMs: config.TQ_RETRY_BACKOFF_CAP_MS },
    minLeaseMs: minLeaseMs(heartbeatOf(config)),
  };
}

/** The HTTP API's limits and defaults (the gRPC TaskService, which shares its service, takes them too). */
export function apiSettings(config: Config): ApiSettings {
  return {
    maxBodyBytes: config.TQ_MAX_BODY_BYTES,
    maxBatchTasks: config.TQ_MAX_BATCH,
    taskDefaults: taskDefaults(config),
    workerTimeoutMs: config.TQ_HEARTBEAT_TIMEOUT_MS,
    priorityAgingMs: config.TQ_PRIORITY_AGING_MS,
  };
}

/** The schedule firing loop's timings, or null where this role does not fire schedules. */
export function scheduleFiring(config: Config): { aheadMs: number; pollMs: number } | null {
  return config.TQ_SCHEDULES ? { aheadMs: config.TQ_SCHEDULE_AHEAD_MS, pollMs: config.TQ_SCHEDULE_POLL_MS } : null;
}

/** Who may call the API: where the role listens, tokens from configuration, rate limits. */
export function authOptions(config: Config): AuthOptions {
  return {
    host: config.TQ_HOST,
    insecure: config.TQ_INSECURE,
    configuredTokens: config.TQ_API_TOKENS,
    rateLimit: { perSecond: config.TQ_RATE_LIMIT_PER_SECOND, burst: config.TQ_RATE_LIMIT_BURST },
  };
}

/** A role's pool: its size and the server-side timeouts every one of its connections runs under. */
export function databaseOptions(config: Config): ConnectOptions {
  return {
    max: config.TQ_DB_POOL_SIZE,
    statementTimeoutMs: config.TQ_DB_STATEMENT_TIMEOUT_MS,
    lockTimeoutMs: config.TQ_DB_LOCK_TIMEOUT_MS,
    queryTimeoutMs: config.TQ_DB_QUERY_TIMEOUT_MS,
  };
}

/** The join tokens a coordinator accepts from workers (none: any worker may join). */
export function workerJoinTokens(config: Config): JoinToken[] {
  try {
    return joinTokens(config.TQ_WORKER_TOKEN, config.TQ_WORKER_TOKENS);
  } catch (error) {
    throw new ConfigError(`invalid configuration: ${(error as Error).message}`);
  }
}

function heartbeatOf(config: Config): HeartbeatTimings {
  return { heartbeatIntervalMs: config.TQ_HEARTBEAT_INTERVAL_MS, heartbeatTimeoutMs: config.TQ_HEARTBEAT_TIMEOUT_MS };
}

/** The heartbeat timings and the default lease of an attempt (src/task/lease.ts). */
export function leaseTimings(config: Config): LeaseTimings {
  return { ...heartbeatOf(config), leaseMs: config.TQ_DEFAULT_LEASE_MS };
}

/** The process environment, which a worker's tasks inherit (minus DATABASE_URL and TQ_*). */
export function inheritedEnvironment(): Record<string, string | undefined> {
  return { ...process.env };
}

/** Where the role exports its spans (src/trace/tracing.ts), or undefined: tracing is off. */
export function tracingEndpoint(config: Config): string | undefined {
  return config.OTEL_EXPORTER_OTLP_ENDPOINT;
}

/** TQ_RETENTION in milliseconds, or null: retention is off and nothing is ever deleted. */
export function retentionMs(config: Config): number | null {
  const value = config.TQ_RETENTION.trim().toLowerCase();
  if (value === "off" || value === "0") return null;
  // The same duration form as a schedule's `every` (src/schedule/rules.ts), up to a year.
  let ms: number;
  try {
    ms = parseDuration(value, "TQ_RETENTION");
  } catch (error) {
    throw new ConfigError(`invalid configuration: ${(error as Error).message}, or off`);
  }
  if (ms === 0) return null;
  if (ms < 1000) {
    throw new ConfigError(`invalid configuration: TQ_RETENTION must be at least 1s (or off); got ${ms} ms`);
  }
  return ms;
}

/** How the coordinator's pruner runs (src/coordinator/pruner.ts), or null: retention is off. */
export function retentionSettings(
  config: Config,
): { retentionMs: number; batchSize: number; pauseMs: number; intervalMs: number } | null {
  const ms = retentionMs(config);
  if (ms === null) return null;
  return {
    retentionMs: ms,
    batchSize: config.TQ_RETENTION_BATCH_SIZE,
    pauseMs: config.TQ_RETENTION_PAUSE_MS,
    intervalMs: config.TQ_RETENTION_INTERVAL_MS,
  };
}
