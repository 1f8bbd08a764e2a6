// Microbenchmarks, with mitata, of the pieces every task passes through: the claim statement
// against a deep queue, the protobuf messages of the worker stream and of TaskService, and the
// HTTP edge (validation alone, then a whole POST /submit through the Elysia app with a stub
// that persists nothing). Each case is timed by mitata's `measure` with explicit options
// (`run` takes none per case): a time budget, so that --quick stays a short smoke run; one call
// per sample; and, for the claim, a sample cap that keeps it within the queue it was given.
import { create, type DescMessage, fromBinary, type MessageShape, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { do_not_optimize, measure } from "mitata";
import mitataPackage from "mitata/package.json" with { type: "json" };
import type { ApiDeps } from "../src/api/deps";
import { createApp } from "../src/api/index";
import { apiSettings, loadConfig } from "../src/config";
import type { TaskChangeRow } from "../src/db/changes";
import { claimDue } from "../src/db/claim";
import { insertTasks } from "../src/db/insert";
import { migrate } from "../src/db/migrate";
import { TaskChangeFeed } from "../src/db/notify";
import { connect, type Sql } from "../src/db/sql";
import { TaskSchema } from "../src/gen/taskqueue/v1/task_pb";
import { CoordinatorMessageSchema, Outcome, WorkerMessageSchema } from "../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../src/log";
import { taskToProto } from "../src/rpc/convert";
import { toTaskSpec } from "../src/task/spec";
import type { Task, TaskSpec } from "../src/task/task";
import { openAuth, taskRow, taskSpec } from "../test/support/factories";
import { type Bench, type BenchOptions, type BenchResult, createBenchDatabase, Scope, type SummaryRow } from "./support";

/**
 * mitata's own default per case (642 ms of measured time) for the full run; quick keeps only
 * enough to prove each case runs.
 */
const FULL = { minTimeNs: 642e6, queued: 10_000 };
const QUICK = { minTimeNs: 20e6, queued: 1_000 };
/** Free slots per claim, as one dispatcher pass fills them: two workers with four slots each. */
const SLOTS = [
  "bench-worker-a",
  "bench-worker-a",
  "bench-worker-a",
  "bench-worker-a",
  "bench-worker-b",
  "bench-worker-b",
  "bench-worker-b",
  "bench-worker-b",
];
/** The coordinator's lease with the default heartbeats (timeout + interval). */
const LEASE_MS = 4000;
/** insertTasks rows per statement while filling the queue. */
const FILL_CHUNK = 1000;

/** One measured case: mitata's figures in nanoseconds per call. */
interface CaseFigures {
  mean_ns: number;
  p50_ns: number;
  p99_ns: number;
  min_ns: number;
  max_ns: number;
  /** Samples mitata kept, one call each (it drops the two fastest and two slowest of more than 12). */
  samples: number;
}

interface Case {
  key: string;
  label: string;
  /** One call of the thing measured. */
  fn: () => unknown;
  /** mitata `measure` options beyond the time budget and the one call per sample. */
  options?: { max_samples?: number };
}

// ---- fixtures ------------------------------------------------------------------------------

const at = (iso: string) => new Date(iso);

/** A finished task as the database returns it: every column set, output tails included. */
function representativeTask(): Task {
  return taskRow({
    command: "pg_dump --format=custom --file=/var/backups/app.dump app && gzip -9 /var/backups/app.dump",
    state: "succeeded",
    scheduled_at: at("2030-01-01T09:00:00.000Z"),
    run_at: at("2030-01-01T09:00:00.000Z"),
    created_at: at("2029-12-31T17:12:45.123Z"),
    picked_at: at("2030-01-01T09:00:00.004Z"),
    started_at: at("2030-01-01T09:00:00.011Z"),
    completed_at: at("2030-01-01T09:00:42.517Z"),
    attempt: 1,
    timeout_ms: 600_000,
    env: { PGHOST: "db.internal", PGUSER: "backup", BACKUP_BUCKET: "s3://backups/app" },
    cwd: "/var/backups",
    worker_id: "01960f3b-1111-7222-8333-444455556666",
    coordinator_id: "coordinator-1:50051",
    exit_code: 0,
    stdout: 'pg_dump: dumping contents of table "public.events"\n'.repeat(8),
    stderr: "",
    retry_on_timeout: false,
    retry_backoff_base_ms: 5000,
    retry_backoff_cap_ms: 60_000,
    idempotency_key: "backup-2030-01-01",
    idempotency_hash: "9f2c".repeat(16),
    secret_env: { PGPASSWORD: "not-returned" },
    limits: { memory_mb: 512, pids: 64 },
  });
}

/** The row a stub submit answers with, as insertTask would return it for `spec`. */
function createdRow(id: string, spec: TaskSpec): TaskChangeRow {
  const now = new Date();
  return {
    ...taskRow({
      id,
      command: spec.command,
      scheduled_at: spec.scheduledAt ?? now,
      run_at: spec.scheduledAt ?? now,
      created_at: now,
      max_attempts: spec.maxAttempts,
      timeout_ms: spec.timeoutMs,
      env: spec.env,
      cwd: spec.cwd,
      retry_on_failure: spec.retry.onFailure,
      retry_on_timeout: spec.retry.onTimeout,
      retry_on_lost: spec.retry.onLost,
      retry_backoff_base_ms: spec.retry.backoffBaseMs,
      retry_backoff_cap_ms: spec.retry.backoffCapMs,
      idempotency_key: spec.idempotencyKey,
      secret_env: spec.secretEnv,
      limits: spec.limits ?? null,
      schedule_id: spec.firing?.scheduleId ?? null,
      fire_at: spec.firing?.fireAt ?? null,
    }),
    event_id: "1",
  };
}

/** A full-form POST /tasks body with every option a careful client sets. */
const FULL_FORM_BODY = {
  command: "pg_dump --format=custom --file=/var/backups/app.dump app",
  scheduled_at: "2030-01-01T09:00:00+01:00",
  timeout_ms: 600_000,
  max_attempts: 3,
  retry: { on_failure: true, on_timeout: false, on_lost: true, backoff_base_ms: 5000, backoff_cap_ms: 60_000 },
  env: { PGHOST: "db.internal", PGUSER: "backup", BACKUP_BUCKET: "s3://backups/app" },
  secret_env: { PGPASSWORD: "example-only" },
  cwd: "/var/backups",
};

/** The same without scheduled_at: what POST /submit takes. */
const { scheduled_at: _, ...SUBMIT_BODY } = FULL_FORM_BODY;

/** Cases that encode a message once and decode the bytes back, with the encoded size. */
function protobufCases<Desc extends DescMessage>(
  key: string,
  label: string,
  schema: Desc,
  message: MessageShape<Desc>,
): { cases: Case[]; bytes: number } {
  const bytes = toBinary(schema, message);
  return {
    bytes: bytes.length,
    cases: [
      {
        key: `${key}_encode`,
        label: `protobuf ${label} toBinary (${bytes.length} B)`,
        fn: () => do_not_optimize(toBinary(schema, message)),
      },
      {
        key: `${key}_decode`,
        label: `protobuf ${label} fromBinary (${bytes.length} B)`,
        fn: () => do_not_optimize(fromBinary(schema, bytes)),
      },
    ],
  };
}

// ---- the database case ---------------------------------------------------------------------

/** Fills a migrated database with `count` due queued tasks, FILL_CHUNK per statement. */
async function fillQueue(sql: Sql, count: number): Promise<void> {
  const spec = taskSpec({ retry: { ...taskSpec().retry, backoffBaseMs: 1000, backoffCapMs: 60_000 } });
  for (let done = 0; done < count; done += FILL_CHUNK) {
    const items = Array.from({ length: Math.min(FILL_CHUNK, count - done) }, () => ({ id: Bun.randomUUIDv7(), spec }));
    await insertTasks(sql, items);
  }
}

/**
 * claimDue for SLOTS slots, one call per sample. No task is put back between calls: the queue
 * starts `queued` deep and max_samples keeps the calls (warm-up included) within it, so every
 * claim finds SLOTS due tasks; one that does not fails the bench rather than timing a short
 * claim.
 */
function claimCase(sql: Sql, queued: number): Case {
  // mitata's warm-up makes up to 1 + warmup_samples (2) calls before sampling.
  const warmupCalls = 3;
  return {
    key: "claim_due",
    label: `claimDue, ${SLOTS.length} slots, from ${queued.toLocaleString("en-US")} queued`,
    fn: async () => {
      const claimed = await claimDue(sql, "bench-coordinator", SLOTS, LEASE_MS);
      if (claimed.length !== SLOTS.length)
        throw new Error(`claimDue claimed ${claimed.length} tasks, not ${SLOTS.length}: the queue ran dry`);
    },
    options: { max_samples: Math.floor(queued / SLOTS.length) - warmupCalls },
  };
}

// ---- running -------------------------------------------------------------------------------

function figuresOf(stats: Awaited<ReturnType<typeof measure>>): CaseFigures {
  const round = (x: number) => Math.round(x * 10) / 10;
  return {
    mean_ns: round(stats.avg),
    p50_ns: round(stats.p50),
    p99_ns: round(stats.p99),
    min_ns: round(stats.min),
    max_ns: round(stats.max),
    samples: stats.samples.length,
  };
}

/** ns, µs or ms, whichever reads best. */
function time(ns: number): string {
  if (ns < 1000) return `${ns.toFixed(0)} ns`;
  if (ns < 1e6) return `${(ns / 1000).toFixed(ns < 10_000 ? 2 : 1)} µs`;
  return `${(ns / 1e6).toFixed(2)} ms`;
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const plan = options.quick ? QUICK : FULL;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`micro: ${line}`));
    console.log(`micro: PostgreSQL (${db.postgres.source}): ${db.postgres.version}`);
    const sql = connect(db.url, { max: 1, applicationName: "task-queue bench micro" });
    scope.defer("close the bench's database pool", () => sql.end({ timeout: 5 }));
    await migrate(sql);
    await fillQueue(sql, plan.queued);
    console.log(`micro: ${plan.queued} due tasks queued`);

    const config = loadConfig({});
    const task = representativeTask();
    const pbTask = taskToProto(task);
    const assign = create(CoordinatorMessageSchema, {
      payload: {
        case: "assign",
        value: {
          ref: { taskId: task.id, attempt: 1 },
          command: task.command,
          env: { ...task.env, ...task.secret_env },
          cwd: task.cwd ?? "",
          timeoutMs: task.timeout_ms,
          leaseExpiresAt: timestampFromDate(at("2030-01-01T09:00:04.004Z")),
        },
      },
    });
    const finished = create(WorkerMessageSchema, {
      payload: {
        case: "finished",
        value: {
          ref: { taskId: task.id, attempt: 1 },
          outcome: Outcome.EXITED,
          exitCode: 0,
          stdout: task.stdout ?? "",
          stderr: "",
          startedAt: timestampFromDate(at("2030-01-01T09:00:00.011Z")),
          finishedAt: timestampFromDate(at("2030-01-01T09:00:42.517Z")),
        },
      },
    });
    const pb = {
      task: protobufCases("pb_task", "Task", TaskSchema, pbTask),
      assign: protobufCases("pb_assign", "CoordinatorMessage{Assign}", CoordinatorMessageSchema, assign),
      finished: protobufCases("pb_finished", "WorkerMessage{TaskFinished}", WorkerMessageSchema, finished),
    };

    // The real app and error mapping; only persistence is a stub, so nothing reaches the pool.
    const deps: ApiDeps = {
      role: "coordinator",
      settings: apiSettings(config),
      sql,
      feed: new TaskChangeFeed(sql),
      log: silentLogger,
      auth: openAuth,
      submit: async (id, spec) => ({ kind: "created", task: createdRow(id, spec) }),
    };
    const app = createApp(deps);
    const submitBody = JSON.stringify(SUBMIT_BODY);
    const submitOnce = async () => {
      const request = new Request("http://localhost/submit", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: submitBody,
      });
      const response = await app.handle(request);
      const text = await response.text();
      if (response.status !== 201) throw new Error(`POST /submit answered ${response.status}: ${text}`);
    };
    await submitOnce();

    const cases: Case[] = [
      claimCase(sql, plan.queued),
      ...pb.task.cases,
      ...pb.assign.cases,
      ...pb.finished.cases,
      {
        key: "to_task_spec",
        label: "toTaskSpec, full-form body",
        fn: () => do_not_optimize(toTaskSpec(FULL_FORM_BODY, deps.settings.taskDefaults)),
      },
      { key: "http_submit", label: "POST /submit through app.handle, stub persistence", fn: submitOnce },
    ];

    const figures: Record<string, CaseFigures> = {};
    const summary: SummaryRow[] = [];
    console.log(`micro: mitata ${mitataPackage.version}, at least ${plan.minTimeNs / 1e6} ms measured per case`);
    for (const c of cases) {
      // batch_threshold 0: one call per sample, so p99 is of single calls. mitata would
      // otherwise time calls under 65 µs in batches of 4096, or not, depending on how long
      // the first (cold) call took; the calls here are microseconds, far above timer cost.
      const stats = await measure(c.fn, { min_cpu_time: plan.minTimeNs, batch_threshold: 0, ...c.options });
      const f = figuresOf(stats);
      figures[c.key] = f;
      summary.push({
        metric: `${c.label} (mean / p50 / p99)`,
        value: `${time(f.mean_ns)} / ${time(f.p50_ns)} / ${time(f.p99_ns)}`,
      });
      console.log(
        `  ${c.label.padEnd(66)} mean ${time(f.mean_ns).padStart(9)}  p50 ${time(f.p50_ns).padStart(9)}  ` +
          `p99 ${time(f.p99_ns).padStart(9)}  (${f.samples} samples)`,
      );
    }

    return {
      name: "micro",
      description:
        "Microbenchmarks (mitata): the claim statement on a deep queue, protobuf encode/decode of the stream messages, and request validation at the HTTP edge.",
      settings: {
        mitata: mitataPackage.version,
        min_measured_ns_per_case: plan.minTimeNs,
        sampling:
          "one call per sample (batch_threshold 0), so p50/p99 are of single calls; mitata drops the 2 fastest and 2 slowest samples",
        claim: {
          slots: SLOTS.length,
          queued_at_start: plan.queued,
          lease_ms: LEASE_MS,
          queue: `due tasks from insertTasks; claimed tasks are not put back, so the queue shrinks by ${SLOTS.length} per call`,
          connection: "one postgres.js connection from the bench process, prepared statements (src/db/sql.ts)",
        },
        protobuf_bytes: { task: pb.task.bytes, assign: pb.assign.bytes, task_finished: pb.finished.bytes },
        validation: {
          to_task_spec_body: FULL_FORM_BODY,
          http_submit:
            "createApp(deps).handle(new Request(...)) with open auth and a submit stub that resolves at once; the body is read",
        },
        process: "one bench process; PostgreSQL on the same machine",
        database: db.postgres.source,
      },
      figures,
      summary,
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const micro: Bench = { name: "micro", run };
